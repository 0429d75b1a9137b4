"""Attention as the WorldStereo branches use it: a host-supplied kernel and the branch self-attention.

An :data:`AttentionFn` takes q, k, v as [B, S, H, d] and an optional additive mask broadcastable
to [B, H, S_q, S_k] (0 where attention is allowed, -inf where not) and returns [B, S, H*d]. The
default is torch's ``scaled_dot_product_attention``; hosts pass their own (diffusers' dispatcher
with its backends and sequence parallelism, ComfyUI's ``optimized_attention``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import TORCH_OPS
from .rope import apply_rotary

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Torch SDPA over [B, S, H, d] inputs -> [B, S, H*d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def key_mask_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [G, 1, 1, S] (0 / -inf) from a boolean key mask [G, S]."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


class BranchSelfAttention(nn.Module):
    """Self-attention with RMS-normed q/k (across heads) and RoPE; keys ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``, ``norm_q``, ``norm_k`` (diffusers' WanAttention names, as the checkpoints use).

    ``processor`` is the :data:`AttentionFn` used when a call passes none (hosts may replace it)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, ops=TORCH_OPS) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (ops.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([ops.Linear(dim, dim)])
        self.norm_q = ops.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = ops.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.processor: AttentionFn = sdpa_attention

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention: AttentionFn | None = None) -> torch.Tensor:
        q = apply_rotary(self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1)), rotary)
        k = apply_rotary(self.norm_k(self.to_k(x)).unflatten(2, (self.heads, -1)), rotary)
        v = self.to_v(x).unflatten(2, (self.heads, -1))
        out = (attention or self.processor)(q, k, v, None)
        return self.to_out[0](out.type_as(x))
