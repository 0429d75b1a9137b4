"""Write tiny WorldStereo checkpoints in the exact layouts the loader meets in real life.

* a variant folder ``<root>/<model-type>/{config.json, model.safetensors}`` (WorldStereo's own
  config: base_model, controlnet_cfg, ...), complete or as an overlay on a base;
* a diffusers Wan2.1-I2V base ``<root>/transformer/{config.json, *.safetensors}`` (optionally
  sharded with ``diffusion_pytorch_model.safetensors.index.json``), to which other helpers can add
  vae/, text_encoder/ ... of their own;
* a ComfyUI-style single-file base (original Wan key names, optional ``model.diffusion_model.``).

Weights are random (seeded) with every branch non-zero, so each part of the model matters.
Other test modules reuse these helpers; keep the signatures stable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from worldstereo_core.models import build_transformer
from worldstereo_core.loading.transformer import WORLDSTEREO_PREFIXES
from worldstereo_core.loading.wan_keys import COMFY_PREFIX, diffusers_to_original

CAMERA, MEMORY, MEMORY_DMD = "worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd"
MODEL_TYPES = (CAMERA, MEMORY, MEMORY_DMD)
#: What a tiny variant's config.json names as its base (not resolvable: tiny bases are passed explicitly).
TINY_BASE_MODEL = "tiny/Wan2.1-I2V-tiny-Diffusers"


def tiny_transformer_config(**overrides) -> dict:
    """A Wan2.1-I2V transformer config (diffusers schema) small enough for unit tests.

    ``text_dim`` must equal the text encoder width and ``image_dim`` the CLIP vision width."""
    cfg = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 36,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 16,
        "ffn_dim": 40,
        "num_layers": 3,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": 40,
        "added_kv_proj_dim": 24,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    cfg.update(overrides)
    return cfg


def tiny_controlnet_cfg(model_type: str, transformer_config: dict | None = None, **overrides) -> dict:
    tcfg = transformer_config or tiny_transformer_config()
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    cfg = {
        "dim": 16, "num_heads": 2, "ffn_dim": 24, "num_layers": 2,
        "conv_out_dim": inner, "time_embed_dim": inner,
        "add_channels": 7, "mid_channels": 16, "mask_downsample": 1, "interp": False,
    }
    if model_type != CAMERA:
        cfg.update(update_ref=True, ref_embedding=True, main_camera_embedding=True, camera_embedding_dim=7)
    cfg.update(overrides)
    return cfg


def random_state_dict(model_type: str, transformer_config: dict | None = None, controlnet_cfg: dict | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete float32 state dict of the WorldStereo model, every tensor seeded-random."""
    tcfg = transformer_config or tiny_transformer_config()
    ccfg = controlnet_cfg or tiny_controlnet_cfg(model_type, tcfg)
    model = build_transformer(tcfg, ccfg, memory=model_type != CAMERA, device="meta", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        shape = tuple(param.shape)
        if len(shape) >= 2:
            fan_in = math.prod(shape) // shape[0] if "scale_shift_table" not in name else shape[-1]
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:
            base = 1.0 if name.endswith("weight") and "norm" in name else 0.0
            out[name] = base + 0.1 * torch.randn(shape, generator=gen)
    return out


def split_backbone(state_dict: dict) -> tuple[dict, dict]:
    """(Wan backbone keys, WorldStereo-only keys)."""
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(WORLDSTEREO_PREFIXES)}
    extra = {k: v for k, v in state_dict.items() if k.startswith(WORLDSTEREO_PREFIXES)}
    return backbone, extra


def _save(tensors: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_variant(root: str | Path, model_type: str, tensors: dict, *, controlnet_cfg: dict | None = None,
                  base_model: str = TINY_BASE_MODEL, transformer_config: dict | None = None,
                  **config_fields) -> Path:
    """Write ``<root>/<model_type>/{config.json, model.safetensors}`` and return the folder.

    ``transformer_config`` embeds the base config in config.json (as the test fixtures do) so a
    complete variant loads with no base; released variants have no such field."""
    folder = Path(root) / model_type
    config = {
        "base_model": base_model,
        "controlnet_cfg": controlnet_cfg or tiny_controlnet_cfg(model_type, transformer_config),
        "latent_cond_mode": "full_vae",
        "negative_prompt": "",
        "nframe": 21,
        **config_fields,
    }
    if model_type == MEMORY_DMD:
        config.update({k: config_fields.get(k, v) for k, v in
                       (("dmd_start_steps", 250), ("dmd_end_steps", 1000), ("gen_shift", 5.0), ("dmd_steps", 4))})
    if transformer_config is not None:
        config["transformer"] = transformer_config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _save(tensors, folder / "model.safetensors")
    return folder


def write_diffusers_base(root: str | Path, transformer_config: dict, backbone: dict, *, shards: int = 1) -> Path:
    """Write a diffusers Wan2.1-I2V repo's ``transformer/`` folder and return the repo root."""
    tdir = Path(root) / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "config.json").write_text(json.dumps(transformer_config, indent=2), encoding="utf-8")
    if shards == 1:
        _save(backbone, tdir / "diffusion_pytorch_model.safetensors")
        return Path(root)
    names = sorted(backbone)
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        _save({k: backbone[k] for k in part}, tdir / fname)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in backbone.values())},
             "weight_map": weight_map}
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                                        encoding="utf-8")
    return Path(root)


def write_single_file_base(path: str | Path, backbone: dict, *, comfy_prefix: bool = True,
                           original_names: bool = True) -> Path:
    """Write a single-file Wan2.1-I2V transformer (ComfyUI ``diffusion_models/`` style)."""
    out = {}
    for key, value in backbone.items():
        name = diffusers_to_original(key) if original_names else key
        out[(COMFY_PREFIX if comfy_prefix else "") + name] = value
    return _save(out, Path(path))


def tiny_inputs(model_type: str, transformer_config: dict | None = None, controlnet_cfg: dict | None = None, *,
                frames: int = 3, height: int = 4, width: int = 6, ref_index=(1, 0), batch: int = 1,
                seed: int = 0) -> dict:
    """Random forward inputs with the fixtures' keyword names (float32, UniPC-style int timestep)."""
    tcfg = transformer_config or tiny_transformer_config()
    ccfg = controlnet_cfg or tiny_controlnet_cfg(model_type, tcfg)
    g = torch.Generator().manual_seed(seed)
    ph, pw = 8 * height, 8 * width
    inputs = {
        "hidden_states": torch.randn(batch, tcfg["in_channels"], frames, height, width, generator=g),
        "timestep": torch.full((batch,), 757, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, 512, tcfg["text_dim"], generator=g),
        "encoder_hidden_states_image": torch.randn(batch, 257, tcfg["image_dim"], generator=g),
        "render_latent": torch.randn(batch, tcfg["out_channels"], frames, height, width, generator=g),
        "render_mask": (torch.rand(batch, 1, frames, ph, pw, generator=g) > 0.5).float(),
        "camera_embedding": torch.randn(batch, ccfg["add_channels"] - 1, frames, ph, pw, generator=g),
    }
    if model_type != CAMERA:
        n_refs = len(ref_index)
        ref = torch.randn(batch, 16, n_refs, height, width, generator=g)
        inputs.update(
            reference_latent=torch.cat([ref, torch.ones(batch, 4, n_refs, height, width), ref], dim=1),
            ref_index=torch.tensor(ref_index, dtype=torch.long),
            camera_qt=torch.randn(batch, frames, 7, generator=g),
            camera_qt_ref=torch.randn(batch, n_refs, 7, generator=g),
        )
    return inputs
