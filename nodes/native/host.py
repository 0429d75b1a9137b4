"""The WorldStereo host interface over ComfyUI's ``WanModel`` (see ``worldstereo_core.models.host``).

Everything goes through the model's own modules and ComfyUI's own functions: its patch embedding,
time embedding and projection, text/image context, RoPE embedder (``EmbedND`` over explicit token
positions), blocks (called as ComfyUI calls them; for the SSM, their layers one by one), head and
unpatchify, and ``optimized_attention`` with the run's ``transformer_options``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention
import comfy.model_management
from comfy.ldm.flux.math import apply_rope1
from comfy.ldm.wan.model import sinusoidal_embedding_1d

from ...worldstereo_core.models.ssm import BlockParts, joint_block


@dataclass(frozen=True)
class ComfyConditioning:
    temb: torch.Tensor         # [B, D]
    e: torch.Tensor            # [B, 1, D], the head's modulation input
    e0: torch.Tensor           # [B, 1, 6, D], the blocks' modulation input
    context: torch.Tensor      # [B, image tokens + text tokens, D]
    context_img_len: int | None


class ComfyWanHost:
    """A ``comfy.ldm.wan.model.WanModel`` as a ``worldstereo_core.models.host.WanHost``."""

    def __init__(self, wan, transformer_options: dict) -> None:
        self.wan = wan
        self.options = transformer_options
        self.patch_size = tuple(wan.patch_size)
        self.num_blocks = len(wan.blocks)
        self.branch_attention = self.attention

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        heads = q.shape[2]
        return comfy.ldm.modules.attention.optimized_attention(
            q.flatten(2), k.flatten(2), v.flatten(2), heads=heads, mask=mask, transformer_options=self.options)

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        return self.wan.patch_embedding(latent.float()).to(latent.dtype).flatten(2).transpose(1, 2)

    def conditioning(self, timestep, text, image) -> ComfyConditioning:
        wan = self.wan
        e = wan.time_embedding(sinusoidal_embedding_1d(wan.freq_dim, timestep.flatten()).to(dtype=text.dtype))
        e = e.reshape(timestep.shape[0], -1, e.shape[-1])
        e0 = wan.time_projection(e).unflatten(2, (6, wan.dim))
        context = wan.text_embedding(text)
        context_img_len = None
        if image is not None and wan.img_emb is not None:
            context = torch.cat([wan.img_emb(image), context], dim=1)
            context_img_len = image.shape[-2]
        return ComfyConditioning(e[:, 0], e, e0, context, context_img_len)

    def rotary(self, positions: torch.Tensor) -> torch.Tensor:
        return self.wan.rope_embedder(positions[None].float()).movedim(1, 2)

    def block(self, index, x, cond: ComfyConditioning, rotary):
        return self.wan.blocks[index](x, e=cond.e0, freqs=rotary, context=cond.context,
                                      context_img_len=cond.context_img_len, transformer_options=self.options)

    def memory_block(self, index, x, r, cond: ComfyConditioning, rotary, pair_groups, update_reference):
        return joint_block(self.block_parts(index, cond, x.device), x, r, rotary, pair_groups, update_reference)

    def block_parts(self, index: int, cond: ComfyConditioning, device) -> BlockParts:
        block = self.wan.blocks[index]
        attn = block.self_attn
        table = comfy.model_management.cast_to(block.modulation, dtype=torch.float32, device=device)

        def cross_attention(x):
            return block.cross_attn(block.norm3(x), cond.context, context_img_len=cond.context_img_len,
                                    transformer_options=self.options)

        return BlockParts(
            modulation=(table.unsqueeze(0) + cond.e0.float()).unbind(2),
            norm1=block.norm1, norm_ffn=block.norm2, q=attn.q, k=attn.k, v=attn.v, out=attn.o,
            norm_q=attn.norm_q, norm_k=attn.norm_k, heads=attn.num_heads, cross_attention=cross_attention,
            ffn=block.ffn, apply_rotary=apply_rope1, attention=self.attention,
        )

    def head(self, x: torch.Tensor, cond: ComfyConditioning) -> torch.Tensor:
        return self.wan.head(x, cond.e)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        return self.wan.unpatchify(tokens, grid)
