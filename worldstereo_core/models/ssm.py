"""Spatial-stereo memory (SSM): joint attention of target and reference tokens (spec §4).

Reference frame m is placed "to the right of" its target frame ``ref_index[m] + 1`` in RoPE space
(width stitching) and its tokens join the self-attention of every backbone block. The SSM block has
exactly the parameters of a diffusers ``WanTransformerBlock``; only the computation differs.

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

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

ATTENTION_SCOPES = ("full", "pairs")


def apply_rotary(x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Interleaved-pair RoPE on [B, S, H, d] with repeat-interleaved cos/sin tables [1, S, 1, d]."""
    cos, sin = rotary_emb
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def stitched_rotary(rope, num_frames: int, height: int, width: int, ref_index: torch.Tensor):
    """RoPE tables (cos, sin), each [1, N_r + N, 1, d], for the joint sequence [refs; targets].

    Both come from one table over a double-width grid (``height``/``width`` are latent sizes):
    target token (f, y, x) uses grid position (f, y, x), which equals the plain Wan RoPE, and
    reference token (m, y, x) uses (ref_index[m] + 1, y, w' + x)."""
    shape_probe = torch.empty(1, 1, num_frames, height, 2 * width, device="meta")
    tables = rope(shape_probe)  # only reads the shape; each [1, F*h'*2w', 1, d]
    p_t, p_h, p_w = rope.patch_size
    f, hp, wp = num_frames // p_t, height // p_h, width // p_w

    def joint(table: torch.Tensor) -> torch.Tensor:
        grid = table.view(f, hp, 2 * wp, -1)
        ref = grid[ref_index.to(grid.device) + 1, :, wp:].reshape(-1, grid.shape[-1])
        main = grid[:, :, :wp].reshape(-1, grid.shape[-1])
        return torch.cat([ref, main])[None, :, None]

    return tuple(joint(t) for t in tables)


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
        ref_index = ref_index.to(device=device, dtype=torch.long)
        n_refs, tpf = ref_index.numel(), tokens_per_frame
        frame = ref_index + 1
        counts = torch.bincount(frame, minlength=num_frames)
        slots = 1 + (int(counts.max()) if n_refs else 0)
        # slot of reference m among the references of its frame (stable in m)
        order = torch.argsort(frame, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(frame)
        slot[order] = torch.arange(n_refs, device=device) - first[frame[order]]

        tok = torch.arange(tpf, device=device)
        index = torch.zeros(num_frames, slots, tpf, dtype=torch.long, device=device)
        valid = torch.zeros(num_frames, slots, dtype=torch.bool, device=device)
        frames = torch.arange(num_frames, device=device)
        index[:, 0] = n_refs * tpf + frames[:, None] * tpf + tok
        valid[:, 0] = True
        index[frame, 1 + slot] = torch.arange(n_refs, device=device)[:, None] * tpf + tok
        valid[frame, 1 + slot] = True

        index = index.flatten(1)
        key_mask = valid[:, :, None].expand(-1, -1, tpf).flatten(1)
        inverse = torch.empty(n_refs * tpf + num_frames * tpf, dtype=torch.long, device=device)
        flat_valid = key_mask.flatten()
        inverse[index.flatten()[flat_valid]] = torch.arange(index.numel(), device=device)[flat_valid]
        return cls(index, None if bool(key_mask.all()) else key_mask, inverse)


class JointReferenceAttnProcessor:
    """Self-attention over [reference tokens; target tokens] with the block's own projections.

    ``_attention_backend`` follows diffusers' ``set_attention_backend`` (torch SDPA by default);
    ``_parallel_config`` (set by :mod:`worldstereo_core.distributed`) runs it sequence-parallel."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, *, reference_states: torch.Tensor, pair_groups: PairGroups | None = None,
                 reference_output: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rotary_emb`` covers the joint sequence [refs; targets] (see :func:`stitched_rotary`).
        Returns (target output, reference output or None when ``reference_output`` is False)."""
        n_ref = reference_states.shape[1]
        joint = torch.cat([reference_states, hidden_states], dim=1)
        q = attn.norm_q(attn.to_q(joint)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(joint)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(joint).unflatten(2, (attn.heads, -1))
        q, k = apply_rotary(q, rotary_emb), apply_rotary(k, rotary_emb)

        if pair_groups is None:
            out = dispatch_attention_fn(q, k, v, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            out = self._pairs(q, k, v, pair_groups)
        out = out.flatten(2, 3).type_as(q)
        out_x = attn.to_out[0](out[:, n_ref:])
        return out_x, (attn.to_out[0](out[:, :n_ref]) if reference_output else None)

    def _pairs(self, q, k, v, groups: PairGroups) -> torch.Tensor:
        batch, _, heads, head_dim = q.shape
        n_groups, group_len = groups.index.shape
        flat = groups.index.flatten()

        def gather(t):
            return t.index_select(1, flat).view(batch * n_groups, group_len, heads, head_dim)

        mask = None
        if groups.key_mask is not None:
            mask = groups.key_mask[None, :, None, None, :].expand(batch, -1, 1, 1, -1).flatten(0, 1)
        out = dispatch_attention_fn(gather(q), gather(k), gather(v), attn_mask=mask,
                                    backend=self._attention_backend)
        return out.reshape(batch, n_groups * group_len, heads, head_dim).index_select(1, groups.inverse)


class MemoryTransformerBlock(WanTransformerBlock):
    """A Wan block whose self-attention also carries reference tokens (same keys as the Wan block)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn1.set_processor(JointReferenceAttnProcessor())

    def forward(self, hidden_states: torch.Tensor, reference_states: torch.Tensor, encoder_hidden_states, temb,
                rotary_emb, pair_groups: PairGroups | None = None, update_reference: bool = True):
        """Returns (targets, references); references are None when ``update_reference`` is False
        (nothing downstream reads them, and the target outputs do not depend on them)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        x, r = hidden_states, reference_states

        def modulated(t, norm, s, sh):
            return (norm(t.float()) * (1 + s) + sh).type_as(t)

        attn_x, attn_r = self.attn1(
            modulated(x, self.norm1, scale, shift), None, None, rotary_emb,
            reference_states=modulated(r, self.norm1, scale, shift), pair_groups=pair_groups,
            reference_output=update_reference,
        )
        x = (x.float() + attn_x * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)
        x = (x.float() + self.ffn(modulated(x, self.norm3, c_scale, c_shift)).float() * c_gate).type_as(x)
        if not update_reference:
            return x, None
        r = (r.float() + attn_r * gate).type_as(r)
        r = (r.float() + self.ffn(modulated(r, self.norm3, c_scale, c_shift)).float() * c_gate).type_as(r)
        return x, r
