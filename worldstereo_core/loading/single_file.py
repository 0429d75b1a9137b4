"""The Wan2.1-I2V base parts from the single files a ComfyUI user already has.

ComfyUI keeps them as one ``.safetensors`` each: ``models/vae/wan_2.1_vae.safetensors`` (original
Wan key layout), ``models/text_encoders/umt5_xxl_*.safetensors`` (transformers' T5 key names,
optionally "scaled fp8", usually with the SentencePiece model embedded as a ``spiece_model``
byte tensor) and ``models/clip_vision/clip_vision_h.safetensors`` (transformers' CLIP key names).
This module turns them into the diffusers/transformers objects the pipelines use, so nothing is
downloaded twice:

* :func:`load_vae_file` -> ``AutoencoderKLWan`` (original keys converted with diffusers'
  ``convert_wan_vae_to_diffusers``; diffusers-named files load as they are);
* :func:`load_umt5_file` -> ``UMT5EncoderModel`` and :func:`umt5_tokenizer_from_file` -> a tokenizer
  over the embedded SentencePiece model (:class:`SentencePieceTokenizer`);
* :func:`load_clip_vision_file` -> ``(CLIPVisionModel, CLIPImageProcessor)`` (transformers or open_clip
  key names);
* :func:`default_scheduler_config` -> the UniPC flow config of the repo the variant's ``base_model``
  names (single files carry none): its ``flow_shift`` is that repo's (3.0 for 480P, 5.0 for 720P).

Configs: the shipped JSON files in ``single_file_configs/`` (the real Wan2.1 parts); sizes the
weights determine (widths, layer counts, vocabulary) are read from the tensors, so smaller
checkpoints of the same architecture load too. A JSON file next to the weights with the same stem
(``<name>.json``, a transformers/diffusers config) overrides everything. Every load is strict:
missing, unexpected or wrongly shaped tensors raise :class:`CheckpointError` naming them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import CheckpointError, InputError, MissingWeightsError
from ..models.config import wan_identity
from .strict import load_state_dict_strict

CONFIGS_DIR = Path(__file__).resolve().parent / "single_file_configs"
#: Prefixes some single files put in front of every key (ComfyUI checkpoints, merged files).
KNOWN_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "vae.", "text_encoders.umt5xxl.transformer.",
                  "umt5xxl.transformer.", "clip_vision_model.", "clip_vision.")
#: Tensor holding the serialised SentencePiece model in ComfyUI's text-encoder files.
SPIECE_KEY = "spiece_model"
#: The fix when a single file's tensors do not fit the model its config describes.
FILE_HINT = "Check that it is the right kind of file (or add a config JSON next to it)."
#: ``flow_shift`` in scheduler/scheduler_config.json of Wan-AI/Wan2.1-I2V-14B-{480P,720P}-Diffusers.
FLOW_SHIFT_BY_RESOLUTION = {"480p": 3.0, "720p": 5.0}


def shipped_config(name: str) -> dict[str, Any]:
    """A shipped config (``single_file_configs/<name>.json``) without its ``_`` comment keys."""
    path = CONFIGS_DIR / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def default_scheduler_config(flow_shift: float | None = None, *, base_model: str = "") -> dict[str, Any]:
    """The UniPC flow-matching config of the Wan2.1-I2V-14B Diffusers repo ``base_model`` names (the
    variant config's field): ``flow_shift`` of its resolution (:data:`FLOW_SHIFT_BY_RESOLUTION`; the
    480P repo's, which the released variants name, when the name says none). ``flow_shift`` overrides."""
    config = shipped_config("unipc_flow_scheduler")
    resolution = wan_identity(Path(str(base_model)).name).resolution
    config["flow_shift"] = float(flow_shift if flow_shift is not None
                                 else FLOW_SHIFT_BY_RESOLUTION.get(resolution, config["flow_shift"]))
    return config


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (CPU), with a known common key prefix removed."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{what}: file not found: {path}")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise CheckpointError(f"{what}: {path.name} is not a .safetensors file; only safetensors weights are "
                              "loaded (convert pickled .pt/.bin/.ckpt files first)")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{what}: {path} is not a readable safetensors file ({exc}); it is truncated or "
                              "corrupt: download it again") from exc
    return strip_common_prefix(state)


def strip_common_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove one of :data:`KNOWN_PREFIXES` when every key (but ``spiece_model``) carries it."""
    keys = [k for k in state if k != SPIECE_KEY]
    for prefix in KNOWN_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return dict(state)


def dequantize_scaled_fp8(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
                          ) -> dict[str, torch.Tensor]:
    """Undo ComfyUI's "scaled fp8" storage: ``weight * weight_scale`` for every ``<name>.scale_weight``;
    the ``scaled_fp8`` marker and ``scale_input`` entries are dropped. Other tensors are unchanged."""
    if "scaled_fp8" not in state and not any(k.endswith(".scale_weight") for k in state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale_key = key[: -len(".weight")] + ".scale_weight" if key.endswith(".weight") else None
        if scale_key is not None and scale_key in state:
            value = value.to(torch.float32) * state[scale_key].to(torch.float32)
            value = value.to(dtype)
        elif value.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
            value = value.to(dtype)
        out[key] = value
    return out


def _sidecar_config(path: Path) -> dict[str, Any] | None:
    """``<stem>.json`` next to the weights, if present (a full config that overrides the shipped one)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{sidecar} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise InputError(f"{sidecar} must hold a JSON object (a model config)")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _required_shape(state: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    """The shape of the tensor ``key`` of a checkpoint that must have it."""
    if key not in state:
        raise CheckpointError(f"{what}: tensor {key!r} is missing; this is not the expected kind of checkpoint")
    return tuple(state[key].shape)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(found) + 1 if found else 0


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------

def is_original_wan_vae(keys: Sequence[str]) -> bool:
    """Original Wan VAE names (``encoder.conv1``, ``decoder.upsamples``) rather than diffusers ones."""
    keys = set(keys)
    return "encoder.conv1.weight" in keys or any(k.startswith("decoder.upsamples.") for k in keys)


def vae_config_from_state(state: Mapping[str, torch.Tensor], base: Mapping[str, Any]) -> dict[str, Any]:
    """The shipped Wan VAE config with ``base_dim``, ``z_dim`` and ``num_res_blocks`` read from
    diffusers-named tensors (a decoder level holds num_res_blocks + 1 residual blocks)."""
    config = dict(base)
    config["base_dim"] = _required_shape(state, "encoder.conv_in.weight", "Wan VAE")[0]
    config["z_dim"] = _required_shape(state, "post_quant_conv.weight", "Wan VAE")[0]
    config["num_res_blocks"] = max(1, _count(state, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1)
    return config


def load_vae_file(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A Wan2.1 ``AutoencoderKLWan`` from a single file (original Wan or diffusers key names).

    Original-layout files are converted with diffusers' converter, which knows the Wan2.1 decoder
    (2 residual blocks per level) only."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    state = read_state_dict(path, "Wan VAE")
    if is_original_wan_vae(list(state)):
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        if _count(state, r"decoder\.upsamples\.(\d+)\.") not in (0, 15):
            raise CheckpointError(f"{path.name}: only the Wan2.1 VAE layout (2 residual blocks per level) can be "
                                  "converted; this file has a different decoder")
        state = convert_wan_vae_to_diffusers(state)
    config = _sidecar_config(path) or vae_config_from_state(state, shipped_config("wan2.1_vae"))
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    load_state_dict_strict(vae, state, source=f"Wan VAE {path.name}", hint=FILE_HINT)
    vae = vae.to(device) if dtype == torch.float32 else vae.to(device=device, dtype=dtype)
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# UMT5 text encoder and its tokenizer
# ------------------------------------------------------------------------------------------------

def umt5_config_from_state(state: Mapping[str, torch.Tensor], base: Mapping[str, Any]) -> dict[str, Any]:
    """The shipped UMT5-XXL config with every size the tensors determine read from them."""
    what = "UMT5 text encoder"
    vocab, d_model = _required_shape(state, "shared.weight", what)
    inner = _required_shape(state, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0]
    buckets, heads = _required_shape(state, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                     what)
    d_ff = _required_shape(state, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", what)[0]
    config = dict(base)
    config.update(vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=inner // heads, d_ff=d_ff,
                  relative_attention_num_buckets=buckets, num_layers=_count(state, r"encoder\.block\.(\d+)\."))
    return config


def load_umt5_file(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``UMT5EncoderModel`` (eval) from a ComfyUI text-encoder file (fp32/fp16/bf16 or scaled fp8).

    The token embedding is tied (``encoder.embed_tokens`` = ``shared``), as Wan's loaders do.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    state = read_state_dict(path, "UMT5 text encoder")
    state.pop(SPIECE_KEY, None)
    state = dequantize_scaled_fp8(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" not in state:
        raise CheckpointError(f"{path.name} has no token embedding (shared.weight); is it a UMT5 text encoder?")
    state["encoder.embed_tokens.weight"] = state.get("shared.weight")
    config = UMT5Config(**(_sidecar_config(path) or umt5_config_from_state(state, shipped_config("umt5_xxl"))))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_state_dict_strict(model, state, source=f"UMT5 text encoder {path.name}", hint=FILE_HINT)
    model.encoder.embed_tokens = model.shared
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class SentencePieceTokenizer:
    """The UMT5 tokenizer as a SentencePiece model (what ComfyUI uses for Wan), with the calling
    convention of a transformers tokenizer that :func:`conditioning.encode_prompt` relies on:
    text -> pieces, ``</s>`` appended, truncated to ``max_length`` and padded with ``<pad>``."""

    def __init__(self, model_proto: bytes, *, pad_id: int = 0, eos_id: int = 1) -> None:
        try:
            import sentencepiece
        except ImportError as exc:
            raise MissingWeightsError("the embedded UMT5 tokenizer needs the sentencepiece package (ComfyUI "
                                      "installs it); or choose a tokenizer/ folder of a diffusers repo") from exc
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.pad_token_id, self.eos_token_id = int(pad_id), int(eos_id)

    def __len__(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = list(self.processor.encode(text))
        if max_length is not None:
            ids = ids[: max(0, max_length - 1)]
        return ids + [self.eos_token_id]

    def __call__(self, texts: str | Sequence[str], *, padding: str = "max_length", max_length: int = 512,
                 truncation: bool = True, add_special_tokens: bool = True, return_attention_mask: bool = True,
                 return_tensors: str = "pt"):
        if padding != "max_length" or return_tensors != "pt" or not truncation or not add_special_tokens:
            raise InputError("SentencePieceTokenizer supports padding='max_length', truncation, special tokens "
                             "and return_tensors='pt' only")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.encode(text, max_length)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return _Tokens(ids, mask)


class _Tokens:
    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = input_ids, attention_mask


def umt5_tokenizer_from_file(path: str | os.PathLike) -> SentencePieceTokenizer:
    """The tokenizer embedded in a ComfyUI UMT5 file (its ``spiece_model`` byte tensor)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            key = next((k for k in keys if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)), None)
            blob = handle.get_tensor(key) if key is not None else None
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    if blob is None:
        raise MissingWeightsError(f"{path.name} carries no embedded tokenizer ({SPIECE_KEY}); choose the tokenizer/ "
                                  "folder of a Wan2.1 diffusers repo (models/diffusers/<repo>/tokenizer)")
    return SentencePieceTokenizer(blob.to(torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------------------------
# CLIP vision
# ------------------------------------------------------------------------------------------------

#: Heads of the standard CLIP vision widths (needed because shapes do not tell them).
CLIP_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def clip_config_from_state(state: Mapping[str, torch.Tensor], base: Mapping[str, Any]) -> dict[str, Any]:
    """The shipped ViT-H/14 config with the sizes the tensors determine read from them."""
    what = "CLIP vision encoder"
    hidden, _, patch, _ = _required_shape(state, "vision_model.embeddings.patch_embedding.weight", what)
    positions = _required_shape(state, "vision_model.embeddings.position_embedding.weight", what)[0]
    side = int(round((positions - 1) ** 0.5))
    config = dict(base)
    if hidden != base["hidden_size"]:
        if hidden not in CLIP_HEADS:
            raise CheckpointError(f"{what}: width {hidden} is not a standard CLIP size; put a CLIPVisionConfig JSON "
                                  "with the same name next to the file")
        config["num_attention_heads"] = CLIP_HEADS[hidden]
    config.update(hidden_size=hidden, patch_size=patch, image_size=side * patch,
                  intermediate_size=_required_shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight", what)[0],
                  num_hidden_layers=_count(state, r"vision_model\.encoder\.layers\.(\d+)\."))
    return config


def open_clip_to_transformers(state: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """An open_clip vision tower (``visual.conv1``, ``visual.transformer.resblocks.N``: fused
    ``attn.in_proj``, ``mlp.c_fc``/``c_proj``, ``ln_1``/``ln_2``) under transformers' CLIP names."""
    top = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    rx = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in top:
            out["vision_model." + top[name]] = value
        elif name == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif (m := rx.match(key)) is not None:
            layer, part, kind = m.groups()
            base = f"vision_model.encoder.layers.{layer}."
            if part == "attn.in_proj":
                for sub, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{sub}.{kind}"] = chunk.contiguous()
            elif part in block:
                out[f"{base}{block[part]}.{kind}"] = value
            else:
                raise CheckpointError(f"open_clip tensor {key} has no transformers counterpart")
        elif key.startswith(prefix):
            raise CheckpointError(f"open_clip tensor {key} has no transformers counterpart")
    return out


def load_clip_vision_file(path: str | os.PathLike, *, device: torch.device | str = "cpu"):
    """(``CLIPVisionModel`` float32 eval, ``CLIPImageProcessor``) from a ComfyUI clip_vision file
    (transformers key names, with or without ``vision_model.``, or open_clip's ``visual.`` layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    state = read_state_dict(path, "CLIP vision encoder")
    prefix = next((p for p in ("visual.", "") if f"{p}transformer.resblocks.0.attn.in_proj_weight" in state), None)
    if prefix is not None:
        state = open_clip_to_transformers(state, prefix)
    other = ("visual_projection.", "text_model.", "text_projection.", "logit_scale")
    if not any(k.startswith("vision_model.") for k in state):
        state = {(k if k.startswith(other) else "vision_model." + k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith("vision_model.")}  # drop projection / text parts
    config = CLIPVisionConfig(**(_sidecar_config(path) or clip_config_from_state(state, shipped_config("clip_vit_h_14"))))
    model = CLIPVisionModel(config)
    own = set(model.state_dict())
    if not any(k.startswith("vision_model.") for k in own):
        state = {k[len("vision_model."):]: v for k, v in state.items()}
    load_state_dict_strict(model, state, source=f"CLIP vision encoder {path.name}", hint=FILE_HINT)
    return model.float().to(device).eval().requires_grad_(False), clip_image_processor(config.image_size)


def clip_image_processor(image_size: int, image_mean: Sequence[float] | None = None,
                         image_std: Sequence[float] | None = None):
    """The Wan2.1-I2V ``CLIPImageProcessor`` settings (shipped) for a CLIP of ``image_size`` pixels
    (``image_mean`` / ``image_std`` override the shipped normalisation)."""
    from transformers import CLIPImageProcessor

    config = shipped_config("clip_image_processor")
    config.update(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if image_mean is not None:
        config["image_mean"] = list(image_mean)
    if image_std is not None:
        config["image_std"] = list(image_std)
    return CLIPImageProcessor(**config)
