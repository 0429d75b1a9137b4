"""Spatial-stereo memory (SSM): joint attention of target and reference tokens (the
reference's ``WanTransformerSparseSpatialBlock``).

Reference frame m is placed "to the right of" its target frame ``ref_index[m] + 1`` in RoPE space
(width stitching: grid position (ref_index[m] + 1, y, w' + x)) and its tokens join the
self-attention of every backbone block. The step is written once over a :class:`BlockParts` view
of a host's block (its own projections, norms, feed-forward and modulation), so it needs no
parameters of its own; only the pose MLP (``camera_embedding``) is new.

Two attention scopes:

* ``full`` (default; what the released inference code does): one dense softmax attention over
  [reference tokens; target tokens].
* ``pairs`` (the paper's restricted attention, optional): every target frame f forms a stereo pair
  with the references attached to it (``ref_index == f - 1``); attention runs inside each pair only.
  A target frame without a reference attends to its own frame only, so every pair is isolated:
  reference m can influence target frame ``ref_index[m] + 1`` and nothing else, in every block.
  Note that this also removes temporal attention between target frames from the backbone (the GGM
  ControlNet still attends across frames); the released weights were not run this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from .attention import AttentionFn, key_mask_bias
from .controlnet import zero_init
from .ops import TORCH_OPS
from .rope import grid_positions
from .transfer import host_to_device

ATTENTION_SCOPES = ("full", "pairs")
Layer = Callable[[torch.Tensor], torch.Tensor]


def camera_pose_mlp(camera_dim: int, inner_dim: int, ops=TORCH_OPS) -> nn.Sequential:
    """The pose MLP (module ``camera_embedding``): one [camera_dim] pose per frame -> a [D] offset
    added to every token of that frame (last layer zero-initialised)."""
    return nn.Sequential(
        ops.Linear(camera_dim, inner_dim // 2), nn.SiLU(),
        ops.Linear(inner_dim // 2, inner_dim), nn.SiLU(),
        zero_init(ops.Linear(inner_dim, inner_dim)),
    )


def add_pose(tokens: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, F*T, D] + per-frame ``pose`` [B, F, D] broadcast over each frame's T tokens."""
    return (tokens.unflatten(1, (pose.shape[1], -1)) + pose[:, :, None]).flatten(1, 2)


def joint_positions(ref_index: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Grid positions [N_r + N, 3] of the joint sequence [refs; targets] (token units; ``ref_index`` on the CPU).

    Target token (f, y, x) keeps its position; reference token (m, y, x) sits at
    (ref_index[m] + 1, y, width + x)."""
    refs = grid_positions(1, height, width)[None].repeat(ref_index.numel(), 1, 1)
    refs[:, :, 0] = ref_index[:, None] + 1
    refs[:, :, 2] += width
    return torch.cat([refs.reshape(-1, 3), grid_positions(frames, height, width)])


@dataclass(frozen=True)
class PairGroups:
    """Token layout of the ``pairs`` scope over the joint sequence [refs; targets].

    ``index`` [G, S_g]: joint-sequence positions of group g (target frame g, then its references),
    padded to the longest group; ``key_mask`` [G, S_g] marks real tokens (None if no padding);
    ``inverse`` [S]: where each joint token sits in the flattened groups."""

    index: torch.Tensor
    key_mask: torch.Tensor | None
    inverse: torch.Tensor

    @classmethod
    def build(cls, ref_index: torch.Tensor, num_frames: int, tokens_per_frame: int, device) -> "PairGroups":
        """Built on the CPU from the host tensor ``ref_index``, then copied to ``device`` without a host sync."""
        if ref_index.device.type != "cpu":
            raise InputError("ref_index must be a CPU tensor (reading it from the device would wait for the device)")
        ref_index = ref_index.long()
        n_refs, tpf = ref_index.numel(), tokens_per_frame
        frame = ref_index + 1
        counts = torch.bincount(frame, minlength=num_frames)
        slots = 1 + (int(counts.max()) if n_refs else 0)
        # slot of reference m among the references of its frame (stable in m)
        order = torch.argsort(frame, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(frame)
        slot[order] = torch.arange(n_refs) - first[frame[order]]

        tok = torch.arange(tpf)
        index = torch.zeros(num_frames, slots, tpf, dtype=torch.long)
        valid = torch.zeros(num_frames, slots, dtype=torch.bool)
        frames = torch.arange(num_frames)
        index[:, 0] = n_refs * tpf + frames[:, None] * tpf + tok
        valid[:, 0] = True
        index[frame, 1 + slot] = torch.arange(n_refs)[:, None] * tpf + tok
        valid[frame, 1 + slot] = True

        index = index.flatten(1)
        key_mask = valid[:, :, None].expand(-1, -1, tpf).flatten(1)
        inverse = torch.empty(n_refs * tpf + num_frames * tpf, dtype=torch.long)
        flat_valid = key_mask.flatten()
        inverse[index.flatten()[flat_valid]] = torch.arange(index.numel())[flat_valid]
        return cls(host_to_device(index, device), None if bool(key_mask.all()) else host_to_device(key_mask, device),
                   host_to_device(inverse, device))


@dataclass
class BlockParts:
    """One backbone block as the joint step sees it; a host builds it from its own block.

    ``modulation``: (shift, scale, gate, ffn shift, ffn scale, ffn gate), each [B, 1, D] float32.
    ``norm1`` / ``norm_ffn``: the parameter-free pre-norms of self-attention and feed-forward.
    ``q``, ``k``, ``v``, ``out``, ``norm_q``, ``norm_k``, ``heads``: the self-attention's layers.
    ``cross_attention``: the block's cross-attention on the un-normed stream (its norm and the
    text/image context included). ``apply_rotary(x [B,S,H,d], rotary)``: the host's RoPE.
    ``attention``: the kernel (:data:`AttentionFn`)."""

    modulation: Sequence[torch.Tensor]
    norm1: Layer
    norm_ffn: Layer
    q: Layer
    k: Layer
    v: Layer
    out: Layer
    norm_q: Layer
    norm_k: Layer
    heads: int
    cross_attention: Layer
    ffn: Layer
    apply_rotary: Callable[[torch.Tensor, Any], torch.Tensor]
    attention: AttentionFn


def _pairs_attention(attention: AttentionFn, q, k, v, groups: PairGroups) -> torch.Tensor:
    batch, _, heads, head_dim = q.shape
    n_groups, group_len = groups.index.shape
    flat = groups.index.flatten()

    def gather(t):
        return t.index_select(1, flat).view(batch * n_groups, group_len, heads, head_dim)

    mask = None
    if groups.key_mask is not None:
        mask = key_mask_bias(groups.key_mask, q.dtype).repeat(batch, 1, 1, 1)
    out = attention(gather(q), gather(k), gather(v), mask)
    return out.reshape(batch, n_groups * group_len, heads * head_dim).index_select(1, groups.inverse)


def joint_attention(parts: BlockParts, x: torch.Tensor, r: torch.Tensor, rotary, pair_groups: PairGroups | None,
                    reference_output: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention over [references ``r``; targets ``x``] with the block's projections.

    ``rotary`` covers the joint sequence (see :func:`joint_positions`). Returns (target output,
    reference output or None when ``reference_output`` is False)."""
    n_ref = r.shape[1]
    joint = torch.cat([r, x], dim=1)
    q = parts.apply_rotary(parts.norm_q(parts.q(joint)).unflatten(2, (parts.heads, -1)), rotary)
    k = parts.apply_rotary(parts.norm_k(parts.k(joint)).unflatten(2, (parts.heads, -1)), rotary)
    v = parts.v(joint).unflatten(2, (parts.heads, -1))
    if pair_groups is None:
        out = parts.attention(q, k, v, None)
    else:
        out = _pairs_attention(parts.attention, q, k, v, pair_groups)
    out = out.type_as(q)
    return parts.out(out[:, n_ref:]), (parts.out(out[:, :n_ref]) if reference_output else None)


def joint_block(parts: BlockParts, x: torch.Tensor, r: torch.Tensor, rotary, pair_groups: PairGroups | None = None,
                update_reference: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One backbone block over targets ``x`` and references ``r`` (modulation sums in float32).

    References see the same self-attention and feed-forward but no cross-attention. Returns
    (targets, references); references are None when ``update_reference`` is False (nothing
    downstream reads them, and the target outputs do not depend on them)."""
    shift, scale, gate, c_shift, c_scale, c_gate = parts.modulation

    def modulated(t, norm, s, sh):
        return (norm(t.float()) * (1 + s) + sh).type_as(t)

    attn_x, attn_r = joint_attention(parts, modulated(x, parts.norm1, scale, shift),
                                     modulated(r, parts.norm1, scale, shift), rotary, pair_groups,
                                     reference_output=update_reference)
    x = (x.float() + attn_x * gate).type_as(x)
    x = x + parts.cross_attention(x)
    x = (x.float() + parts.ffn(modulated(x, parts.norm_ffn, c_scale, c_shift)).float() * c_gate).type_as(x)
    if not update_reference:
        return x, None
    r = (r.float() + attn_r * gate).type_as(r)
    r = (r.float() + parts.ffn(modulated(r, parts.norm_ffn, c_scale, c_shift)).float() * c_gate).type_as(r)
    return x, r
