"""Wan's 3-axis rotary position embedding, for any token positions.

A token at grid position (f, y, x) rotates the channel pairs of its head dimension by angles
``pos * theta^(-2i/d_axis)`` per axis; the head dimension is split into (frame, height, width)
parts of ``d - 4(d//6)``, ``2(d//6)``, ``2(d//6)`` channels, as Wan2.1 does. Tables are computed
in float64 and returned as float32, exactly as diffusers' ``WanRotaryPosEmbed`` computes them for
integer grid positions; positions need not form a grid (reference frames sit beside their targets).
"""
from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels of the (frame, height, width) parts of a head dimension."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def grid_positions(frames: int, height: int, width: int) -> torch.Tensor:
    """(f, y, x) of every token of a [frames, height, width] token grid in Wan's order, int64 [N, 3]."""
    axes = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, 3)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = ROPE_THETA
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables [1, N, 1, head_dim] (float32, each angle repeated for its channel pair)."""
    cos, sin = [], []
    for axis, dim in enumerate(rope_axes(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2]
                                / dim)
        angles = positions[:, axis].to(torch.float64)[:, None] * freqs[None]
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return (torch.cat(cos, dim=1).float()[None, :, None], torch.cat(sin, dim=1).float()[None, :, None])


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the interleaved channel pairs of ``x`` [B, S, H, d] by (cos, sin) tables [1, S, 1, d]."""
    cos, sin = rotary
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)
