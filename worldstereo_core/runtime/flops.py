"""Arithmetic cost of one WorldStereo transformer forward: the compute floor of sampling.

Counts the floating-point operations of every matrix product (2·m·n·k for a Linear, the two
attention products 2·2·S_q·S_k·d per head, 2·out·in·kernel for a convolution), which is what
``torch.utils.flop_counter.FlopCounterMode`` counts; norms, activations and RoPE are left out
(they are memory-bound and a small fraction). For the released 14B config at 480x768 with 21
keyframes (30,240 tokens) one camera-model forward is about 1.6 PFLOP, three quarters of it in
the main blocks; attention over the token sequence dominates at this length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..constants import TEXT_SEQ_LEN
from ..models.config import ControlNetConfig

#: CLIP ViT-H/14 penultimate-layer tokens (256 patches + class token) the I2V image context holds.
IMAGE_TOKENS = 257


@dataclass
class FlopCount:
    """FLOPs of one forward, by part, and their sum."""

    parts: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, flops: int) -> None:
        self.parts[part] = self.parts.get(part, 0) + int(flops)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(q_tokens: int, kv_tokens: int, width: int) -> int:
    """Both products (Q K^T and P V) over all heads: heads x head_dim = width."""
    return 4 * q_tokens * kv_tokens * width


def transformer_flops(transformer_config: Mapping[str, Any], controlnet_cfg: Mapping[str, Any] | ControlNetConfig,
                      *, latent_frames: int, latent_height: int, latent_width: int, batch: int = 1,
                      memory: bool = False, ref_index: list[int] | tuple[int, ...] = (),
                      attention_scope: str = "full", text_tokens: int = TEXT_SEQ_LEN,
                      image_tokens: int = IMAGE_TOKENS) -> FlopCount:
    """FLOPs of one forward of a WorldStereo transformer on a ``batch`` of latents
    [batch, 36, latent_frames, latent_height, latent_width] (``ref_index``: one entry per reference
    frame of the memory models)."""
    c = dict(transformer_config)
    cn = ControlNetConfig.from_dict(controlnet_cfg)
    p_t, p_h, p_w = c["patch_size"]
    D, ffn, layers = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"], c["num_layers"]
    patch_volume = p_t * p_h * p_w
    tpf = (latent_height // p_h) * (latent_width // p_w)
    F = latent_frames // p_t
    N, R = F * tpf, len(ref_index) * tpf
    B = batch
    out = FlopCount()

    # embeddings
    out.add("patch_embedding", 2 * B * (N + (R if memory else 0)) * D * c["in_channels"] * patch_volume)
    out.add("condition_embedder", B * (_linear(1, c["freq_dim"], D) + _linear(1, D, D) + _linear(1, D, 6 * D)
                                       + _linear(text_tokens, c["text_dim"], D) + _linear(text_tokens, D, D)))
    image = c.get("image_dim") is not None
    if image:
        I = c["image_dim"]
        out.add("condition_embedder", B * (_linear(image_tokens, I, I) + _linear(image_tokens, I, D)))
    if memory and cn.main_camera_embedding:
        rows = F + len(ref_index)
        out.add("camera_embedding", B * (_linear(rows, cn.camera_embedding_dim, D // 2) + _linear(rows, D // 2, D)
                                         + _linear(rows, D, D)))

    # main blocks
    carry = bool(memory and cn.update_ref)
    for i in range(layers):
        refs_out = R if carry and i < layers - 1 else 0
        joint = N + (R if memory else 0)
        part = "blocks"
        out.add(part, B * _linear(joint, D, 3 * D))                      # q, k, v
        out.add(part, B * _linear(N + refs_out, D, D))                   # to_out
        if memory and attention_scope == "pairs":
            counts = [list(ref_index).count(f - 1) for f in range(F)]
            group = tpf * (1 + max(counts, default=0))
            out.add(part + ".self_attention", B * F * _attention(group, group, D))
        else:
            out.add(part + ".self_attention", B * _attention(joint, joint, D))
        out.add(part, B * (_linear(N, D, D) * 2 + _linear(text_tokens, D, D) * 2))  # cross q, out, text k, v
        out.add(part + ".cross_attention", B * _attention(N, text_tokens, D))
        if image:
            out.add(part, B * _linear(image_tokens, c["added_kv_proj_dim"], D) * 2)
            out.add(part + ".cross_attention", B * _attention(N, image_tokens, D))
        out.add(part, B * 2 * _linear(N + refs_out, D, ffn))             # FFN up + down

    # output head
    out.add("head", B * _linear(N, D, c["out_channels"] * patch_volume))

    # GGM ControlNet
    Dc, Co = cn.dim, cn.conv_out_dim
    out.add("controlnet.embedding", 2 * B * N * Co * c["in_channels"] * patch_volume
            + 2 * B * F * latent_height * latent_width * cn.mid_channels * cn.add_channels * cn.mask_downsample * 64
            + 2 * B * N * Co * cn.mid_channels * p_h * p_w
            + (B * _linear(N, Co, Dc) if Co != Dc else 0))
    for _ in range(cn.num_layers):
        out.add("controlnet.blocks", B * (2 * _linear(1, cn.time_embed_dim, 3 * Dc) + _linear(N, Dc, 4 * Dc)
                                          + 2 * _linear(N, Dc, cn.ffn_dim) + _linear(N, Dc, D)))
        out.add("controlnet.blocks.self_attention", B * _attention(N, N, Dc))
    return out
