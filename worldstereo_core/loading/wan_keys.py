"""Key names of Wan2.1 transformer checkpoints: original (Wan / ComfyUI single file) <-> diffusers.

Explicit tables, so an unknown key fails loudly instead of being renamed by accident.
"""
from __future__ import annotations

import re
from typing import Iterable

from ..errors import CheckpointError

#: Prefix ComfyUI puts in front of diffusion-model keys in some single-file checkpoints.
COMFY_PREFIX = "model.diffusion_model."

#: Module paths outside the blocks (original -> diffusers); the leaf (.weight/.bias) is kept.
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
#: Module paths inside ``blocks.<i>.`` (original -> diffusers). Original norm3 is the cross-attention
#: norm (diffusers norm2); the original norm1/norm2 have no parameters.
_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LEAVES = ("weight", "bias")


def _split(path: str) -> tuple[str, str]:
    head, _, leaf = path.rpartition(".")
    return (head, "." + leaf) if leaf in _LEAVES and head else (path, "")


def _rename(key: str, top: dict, block: dict, source: str, layout: str) -> str:
    m = _BLOCK_RE.match(key)
    table, prefix, rest = (block, f"blocks.{m.group(1)}.", m.group(2)) if m else (top, "", key)
    module, leaf = _split(rest)
    if module not in table:
        raise CheckpointError(
            f"{source}: tensor {key!r} is not part of a {layout} Wan2.1 transformer; is this a Wan2.1-I2V "
            "transformer checkpoint (not a VAE, text encoder, LoRA or another model)?"
        )
    return prefix + table[module] + leaf


def strip_prefix(key: str) -> str:
    return key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key


def original_to_diffusers(key: str, *, source: str = "checkpoint") -> str:
    """Diffusers name of an original-layout key (``model.diffusion_model.`` prefix allowed)."""
    return _rename(strip_prefix(key), _TOP, _BLOCK, source, "original-layout")


_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def diffusers_to_original(key: str, *, source: str = "state dict") -> str:
    """Original (Wan / ComfyUI) name of a diffusers-layout Wan key."""
    return _rename(key, _TOP_INV, _BLOCK_INV, source, "diffusers-layout")


def is_original_wan_layout(keys: Iterable[str]) -> bool:
    """True if the keys use the original Wan names (``head.head``, ``blocks.0.self_attn.q`` ...)."""
    for key in keys:
        key = strip_prefix(key)
        if key.startswith(("head.", "text_embedding.", "time_embedding.")) or ".self_attn." in key:
            return True
    return False
