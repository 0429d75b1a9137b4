"""WorldStereo variant configs (``<variant>/config.json``) and the shipped base transformer configs.

A released variant folder is named after its model type and holds ``config.json`` (WorldStereo's
own config, not a diffusers one) and ``model.safetensors``. Absent optional fields take the
defaults of the reference code (see shared/spec/models.md §1.2-1.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..constants import DEFAULT_SCALE_MAP, HF_REPO_ID, MODEL_TYPES, NFRAME
from ..errors import InputError, MissingWeightsError
from ..io.json_files import read_json_object as _read_json_object

CAMERA_MODEL_TYPE = "worldstereo-camera"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
#: Shipped diffusers-schema configs of the Wan2.1-I2V transformers WorldStereo builds on.
BASE_CONFIG_FILES = {
    "wan2.1-i2v-14b-480p": CONFIGS_DIR / "wan2.1-i2v-14b-480p.json",
    "wan2.1-i2v-14b-720p": CONFIGS_DIR / "wan2.1-i2v-14b-720p.json",
}
#: Constructor fields of diffusers' ``WanTransformer3DModel`` (the schema of transformer/config.json).
WAN_CONFIG_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
)


def read_json_object(path: Path, what: str) -> dict:
    """Read a JSON object; a missing file is a MissingWeightsError naming it."""
    return _read_json_object(path, what, missing=MissingWeightsError)


@dataclass(frozen=True)
class ControlNetConfig:
    """``controlnet_cfg`` of a WorldStereo config (GGM branch and, for memory models, SSM extras)."""

    dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    conv_out_dim: int
    time_embed_dim: int
    add_channels: int = 1
    mid_channels: int = 64
    mask_downsample: int = 4
    interp: bool = False
    update_ref: bool | None = None
    ref_embedding: bool = False
    main_camera_embedding: bool = False
    camera_embedding_dim: int | None = None
    base_model: str = ""
    extra: dict = field(default_factory=dict)

    REQUIRED = ("dim", "num_heads", "ffn_dim", "num_layers", "conv_out_dim", "time_embed_dim")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "ControlNetConfig") -> "ControlNetConfig":
        if isinstance(data, ControlNetConfig):
            return data
        if not isinstance(data, Mapping):
            raise InputError(f"controlnet_cfg must be a mapping, got {type(data).__name__}")
        missing = [k for k in cls.REQUIRED if data.get(k) is None]
        if missing:
            raise InputError(
                f"controlnet_cfg lacks required field(s) {missing}; the variant's config.json is incomplete "
                f"(re-download it from {HF_REPO_ID})"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        cfg = cls(**known, extra=extra)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        for name in self.REQUIRED + ("add_channels", "mid_channels", "mask_downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"controlnet_cfg.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise InputError(f"controlnet_cfg.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mid_channels % 8:
            raise InputError(f"controlnet_cfg.mid_channels ({self.mid_channels}) must be a multiple of 8 (GroupNorm)")
        if self.main_camera_embedding and not self.camera_embedding_dim:
            raise InputError("controlnet_cfg.main_camera_embedding is true but camera_embedding_dim is missing")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class WorldStereoConfig:
    """A released variant's ``config.json`` with the reference defaults filled in."""

    model_type: str
    base_model: str
    controlnet_cfg: ControlNetConfig
    latent_cond_mode: str = "full_vae"
    negative_prompt: str = ""
    nframe: int = NFRAME
    scale_map: tuple[tuple[int, int], ...] = DEFAULT_SCALE_MAP
    freeze_backbone: bool | None = None
    dmd_start_steps: int = 250
    dmd_end_steps: int = 1000
    gen_shift: float = 5.0
    dmd_steps: int = 4
    #: Diffusers transformer config embedded in the file (test fixtures only; releases have none).
    transformer_config: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_memory(self) -> bool:
        """True for the SSM variants (worldstereo-memory, worldstereo-memory-dmd)."""
        return self.model_type != CAMERA_MODEL_TYPE

    @property
    def is_dmd(self) -> bool:
        return self.model_type.endswith("-dmd")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], model_type: str) -> "WorldStereoConfig":
        if model_type not in MODEL_TYPES:
            raise InputError(f"unknown WorldStereo model type {model_type!r}; expected one of {list(MODEL_TYPES)}")
        for required in ("base_model", "controlnet_cfg"):
            if required not in data:
                raise InputError(
                    f"WorldStereo config.json lacks {required!r}; re-download {HF_REPO_ID}/{model_type}/config.json"
                )
        cn = ControlNetConfig.from_dict(data["controlnet_cfg"])
        memory = model_type != CAMERA_MODEL_TYPE
        if memory and cn.update_ref is None:
            raise InputError(
                f"controlnet_cfg.update_ref is required for {model_type}; re-download its config.json"
            )
        mode = data.get("latent_cond_mode") or "full_vae"
        if mode not in ("full_vae", "first_frame_only"):
            raise InputError(f"latent_cond_mode must be 'full_vae' or 'first_frame_only', got {mode!r}")
        scale_map = data.get("scale_map") or DEFAULT_SCALE_MAP
        try:
            scale_map = tuple((int(h), int(w)) for h, w in scale_map)
        except (TypeError, ValueError) as exc:
            raise InputError(f"scale_map must be a list of [H, W] pairs, got {data.get('scale_map')!r}") from exc
        handled = {
            "model_type", "base_model", "controlnet_cfg", "latent_cond_mode", "negative_prompt", "nframe",
            "scale_map", "freeze_backbone", "dmd_start_steps", "dmd_end_steps", "gen_shift", "dmd_steps",
            "transformer",
        }

        def pick(name, default, cast):
            value = data.get(name)
            if value is None:
                return default
            if isinstance(value, bool) or (cast in (int, float) and not isinstance(value, (int, float))):
                raise InputError(f"WorldStereo config.json: {name!r} must be a number, got {value!r}; fix the "
                                 f"field or re-download {HF_REPO_ID}/{model_type}/config.json")
            return cast(value)

        nframe = pick("nframe", NFRAME, int)
        if nframe < 2 or data.get("nframe") not in (None, nframe):
            raise InputError(f"WorldStereo config.json: 'nframe' must be a whole number >= 2 (frames per clip), got "
                             f"{data.get('nframe')!r}; fix the field or re-download {HF_REPO_ID}/{model_type}/config.json")
        return cls(
            model_type=model_type,
            base_model=str(data["base_model"] or ""),
            controlnet_cfg=cn,
            latent_cond_mode=mode,
            negative_prompt=pick("negative_prompt", "", str),
            nframe=nframe,
            scale_map=scale_map,
            freeze_backbone=data.get("freeze_backbone"),
            dmd_start_steps=pick("dmd_start_steps", 250, int),
            dmd_end_steps=pick("dmd_end_steps", 1000, int),
            gen_shift=pick("gen_shift", 5.0, float),
            dmd_steps=pick("dmd_steps", 4, int),
            transformer_config=data.get("transformer"),
            extra={k: v for k, v in data.items() if k not in handled},
        )


def load_worldstereo_config(folder: str | Path) -> WorldStereoConfig:
    """Read ``<folder>/config.json``. The folder name is the model type; a ``model_type`` field
    inside the file is used when the folder has another name (e.g. test fixtures)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(
            f"WorldStereo variant folder not found: {folder}; download {HF_REPO_ID}/<model-type> "
            f"(one of {list(MODEL_TYPES)}) into a folder of that name"
        )
    data = read_json_object(folder / "config.json", "WorldStereo config")
    declared = data.get("model_type")
    if folder.name in MODEL_TYPES:
        if declared is not None and declared != folder.name:
            raise InputError(
                f"{folder / 'config.json'} says model_type {declared!r} but the folder is named {folder.name!r}; "
                "the folder name must be the model type — rename the folder or re-download the variant"
            )
        model_type = folder.name
    elif declared in MODEL_TYPES:
        model_type = declared
    else:
        raise InputError(
            f"cannot tell the WorldStereo model type of {folder}: name the folder after the model type "
            f"(one of {list(MODEL_TYPES)}), as in {HF_REPO_ID}"
        )
    return WorldStereoConfig.from_dict(data, model_type)


def clean_transformer_config(config: Mapping[str, Any]) -> dict:
    """Keep only ``WanTransformer3DModel`` constructor fields (drops ``_class_name`` and the like)."""
    if not isinstance(config, Mapping):
        raise InputError(f"transformer config must be a mapping, got {type(config).__name__}")
    unknown = [k for k in config if not k.startswith("_") and k not in WAN_CONFIG_FIELDS]
    if unknown:
        raise InputError(
            f"transformer config has fields {unknown} that diffusers' WanTransformer3DModel does not take; "
            "is this a Wan2.1 transformer/config.json?"
        )
    out = {k: v for k, v in config.items() if k in WAN_CONFIG_FIELDS}
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])
    return out


def shipped_base_config(name: str) -> dict:
    """One of the shipped Wan2.1-I2V transformer configs (see :data:`BASE_CONFIG_FILES`)."""
    if name not in BASE_CONFIG_FILES:
        raise InputError(f"no shipped base config named {name!r}; choose one of {sorted(BASE_CONFIG_FILES)}")
    return clean_transformer_config(read_json_object(BASE_CONFIG_FILES[name], "shipped base config"))


def shipped_config_for_base_model(base_model: str) -> str | None:
    """Name of the shipped config that matches a ``base_model`` id or path, or None."""
    text = base_model.lower()
    if "wan2.1" not in text or "i2v" not in text or "14b" not in text:
        return None
    for resolution in ("720p", "480p"):
        if resolution in text:
            return f"wan2.1-i2v-14b-{resolution}"
    return None
