"""VAE tiling and offloading of the non-transformer parts.

The pipelines (:mod:`worldstereo_core.pipelines.base`) move every component to the execution
device only while it is used and back to where it was loaded ("home") afterwards, unless
``keep_on_device=True``. So offloading means: load (or move) the text encoder, CLIP and VAE to the
CPU and give the pipeline ``device="cuda"``; at most one of them is then on the GPU at a time,
and never together with the transformer. :func:`offload_components` does that, optionally
casting the UMT5 text encoder to bfloat16 (22.7 GB in float32 for UMT5-XXL, 11.4 GB in bf16: only
the latter fits a 24 GB card).

VAE tiling (:func:`enable_vae_tiling`) splits each keyframe into overlapping spatial tiles for
encode and decode (diffusers' ``AutoencoderKLWan`` tiling), lowering the VAE's peak activation
memory at a small cost in exactness along tile seams.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..pipelines.vae import SPATIAL_FACTOR

HOME = torch.device("cpu")
#: diffusers' AutoencoderKLWan tiling defaults (pixels): 256 px tiles every 192 px (64 px overlap).
DEFAULT_TILE = 256
DEFAULT_TILE_STRIDE = 192


def enable_vae_tiling(vae: Any, *, tile: int = DEFAULT_TILE, stride: int = DEFAULT_TILE_STRIDE) -> None:
    """Tiled encode/decode with ``tile``-pixel tiles every ``stride`` pixels (frames no larger than
    one tile are processed whole, exactly as without tiling)."""
    if not hasattr(vae, "enable_tiling"):
        raise InputError(f"{type(vae).__name__} has no tiling support (expected diffusers' AutoencoderKLWan)")
    if tile % SPATIAL_FACTOR or stride % SPATIAL_FACTOR or not 0 < stride <= tile:
        raise InputError(f"VAE tiles need 0 < stride <= tile, both multiples of {SPATIAL_FACTOR} pixels; "
                         f"got tile {tile}, stride {stride}")
    vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                      tile_sample_stride_height=stride, tile_sample_stride_width=stride)


def disable_vae_tiling(vae: Any) -> None:
    vae.use_tiling = False


def offload_components(components: Any, *, text_encoder_dtype: torch.dtype | None = None) -> None:
    """Move a pipeline's or a ``BaseComponents``' text encoder, image encoder and VAE to the CPU
    (their home from now on), casting the text encoder to ``text_encoder_dtype`` if given."""
    for name in ("text_encoder", "image_encoder", "vae"):
        module = getattr(components, name, None)
        if module is None:
            continue
        if name == "text_encoder" and text_encoder_dtype is not None:
            module.to(dtype=text_encoder_dtype)
        module.to(HOME)
