"""A tiny models folder in the real ComfyUI-style layout, for CLI and loop tests.

``write_models_root(root)`` writes ``worldstereo/<model-type>/`` overlays (WorldStereo-only keys,
as released variants may be), the tiny Wan2.1-I2V diffusers base the variants name
(``diffusers/Wan2.1-I2V-tiny-Diffusers/``: transformer, VAE, UMT5, CLIP, scheduler) and, with
``moge=True``, a tiny random MoGe-2 ``moge/moge-2-vitl-normal/model.pt`` whose mask is all valid.
The variants use ``latent_cond_mode="first_frame_only"`` so the tiny VAE encodes one condition
frame instead of an 81-frame video (the full-VAE path is covered by the pipeline fixtures).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_checkpoints import (TINY_BASE_MODEL, random_state_dict, split_backbone, tiny_transformer_config,
                              write_diffusers_base, write_variant)
from tiny_components import write_tiny_base
from tiny_moge import write_tiny_moge

def write_models_root(root: str | Path, model_types=("worldstereo-camera", "worldstereo-memory",
                                                     "worldstereo-memory-dmd"), *, moge: bool = False) -> Path:
    root = Path(root)
    tcfg = tiny_transformer_config()
    backbone = None
    for seed, model_type in enumerate(model_types):
        backbone, extra = split_backbone(random_state_dict(model_type, tcfg, seed=seed))
        write_variant(root / "worldstereo", model_type, extra, latent_cond_mode="first_frame_only")
    base = root / "diffusers" / TINY_BASE_MODEL.split("/")[1]
    write_tiny_base(base)
    write_diffusers_base(base, tcfg, backbone)  # the backbone keys are identical for every variant
    if moge:
        write_tiny_moge(root / "moge" / "moge-2-vitl-normal" / "model.pt")
    return root
