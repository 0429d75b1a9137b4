"""Tiny random MoGe checkpoints in the official ``model.pt`` format (one place for their configs)."""
from __future__ import annotations

from pathlib import Path

import torch

_STACK = dict(dim_res_blocks=[64, 32, 16, 16, 8], num_res_blocks=[0, 1, 1, 1, 0], res_block_in_norm="none",
              res_block_hidden_norm="none", resamplers=["conv_transpose", "conv_transpose", "conv_transpose", "bilinear"])
#: MoGe-2 with the smallest backbone (ViT-S); scale_head's first dim must equal the backbone width.
TINY_MOGE_V2 = dict(
    encoder=dict(backbone="dinov2_vits14", intermediate_layers=[2, 5, 8, 11], dim_out=64),
    neck=dict(dim_in=[66, 2, 2, 2, 2], dim_out=None, **_STACK),
    points_head=dict(dim_in=[64, 32, 16, 16, 8], dim_out=[None, None, None, None, 3], **_STACK),
    mask_head=dict(dim_in=[64, 32, 16, 16, 8], dim_out=[None, None, None, None, 1], **_STACK),
    scale_head=dict(dims=[384, 64, 1]),
    remap_output="exp", num_tokens_range=[12, 24],
)
#: MoGe-1 (each dim_upsample must be >= 32: GroupNorm uses channels // 32 groups).
TINY_MOGE_V1 = dict(encoder="dinov2_vits14", intermediate_layers=4, dim_proj=64, dim_upsample=[64, 32, 32],
                    last_conv_channels=32, remap_output="exp", num_tokens_range=[12, 24])
TINY_MOGE_CONFIGS = {"v2": TINY_MOGE_V2, "v1": TINY_MOGE_V1}


def write_tiny_moge(path: Path, *, seed: int = 0) -> Path:
    """A random MoGe-2 checkpoint whose mask head calls every pixel valid (so lifting has points)."""
    from worldstereo_core.geometry.moge import build_moge

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_moge(TINY_MOGE_V2, "v2").eval()
    conv = [m for m in model.mask_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        conv.bias.fill_(20.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": TINY_MOGE_V2, "model": model.state_dict()}, path)
    return path
