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

_STACK = dict(dim_res_blocks=[64, 32, 16, 16, 8], num_res_blocks=[0, 1, 1, 1, 0], res_block_in_norm="none",
              res_block_hidden_norm="none", resamplers=["conv_transpose", "conv_transpose", "conv_transpose", "bilinear"])
TINY_MOGE_V2 = dict(
    encoder=dict(backbone="dinov2_vits14", intermediate_layers=[2, 5, 8, 11], dim_out=64),
    neck=dict(dim_in=[66, 2, 2, 2, 2], dim_out=None, **_STACK),
    points_head=dict(dim_in=[64, 32, 16, 16, 8], dim_out=[None, None, None, None, 3], **_STACK),
    mask_head=dict(dim_in=[64, 32, 16, 16, 8], dim_out=[None, None, None, None, 1], **_STACK),
    scale_head=dict(dims=[384, 64, 1]),
    remap_output="exp", num_tokens_range=[12, 24],
)


def write_tiny_moge(path: Path) -> Path:
    """A random MoGe-2 checkpoint in the official format, its mask head biased to 'valid' everywhere."""
    from worldstereo_core.geometry.moge import build_moge

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_moge(TINY_MOGE_V2, "v2").eval()
    conv = [m for m in model.mask_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        conv.bias += 20.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": TINY_MOGE_V2, "model": model.state_dict()}, path)
    return path


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
