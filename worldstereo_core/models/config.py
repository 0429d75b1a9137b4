"""WorldStereo variant configs (``<variant>/config.json``) and the shipped base transformer configs.

A released variant folder is named after its model type and holds ``config.json`` (WorldStereo's
own config, not a diffusers one) and ``model.safetensors``. Absent optional fields take the
defaults of the reference code. Differences the reference
tolerates are accepted with a warning in :attr:`WorldStereoConfig.warnings`: a ``model_type`` field
other than the folder name (the folder decides), a memory config without ``update_ref`` (false, as
the reference reads it) and a top-level ``transformer`` field that is no Wan transformer config
(the reference never reads it).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..constants import (DEFAULT_SCALE_MAP, DMD_END_STEPS, DMD_SHIFT, DMD_START_STEPS, DMD_STEPS, HF_REPO_ID, MODEL_TYPES,
                         NFRAME)
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
#: The fields that set weight shapes (the others default to the Wan2.1 values in diffusers).
WAN_REQUIRED_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "image_dim", "added_kv_proj_dim",
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
    dmd_start_steps: int = DMD_START_STEPS
    dmd_end_steps: int = DMD_END_STEPS
    gen_shift: float = DMD_SHIFT
    dmd_steps: int = DMD_STEPS
    #: Diffusers transformer config embedded in the file (test fixtures only; releases have none).
    transformer_config: dict | None = None
    extra: dict = field(default_factory=dict)
    #: Harmless differences from what the loader expects, accepted as the reference does.
    warnings: tuple[str, ...] = ()

    @property
    def is_memory(self) -> bool:
        """True for the SSM variants (worldstereo-memory, worldstereo-memory-dmd)."""
        return self.model_type != CAMERA_MODEL_TYPE

    @property
    def is_dmd(self) -> bool:
        return self.model_type.endswith("-dmd")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], model_type: str, *, source: str = "config.json",
                  warnings: Sequence[str] = ()) -> "WorldStereoConfig":
        """``data`` of ``source`` for ``model_type``; ``warnings`` found before are kept."""
        warnings = list(warnings)
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
            cn = dataclasses.replace(cn, update_ref=False)
            warnings.append(f"{source}: controlnet_cfg has no update_ref; using false, as the reference does "
                            "(every memory block sees the original reference tokens)")
        transformer = data.get("transformer")
        if transformer is not None and wan_config_problem(transformer) is not None:
            warnings.append(f"{source}: ignoring its 'transformer' field ({wan_config_problem(transformer)}); the "
                            "reference does not read it either")
            transformer = None
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
            transformer_config=transformer,
            extra={k: v for k, v in data.items() if k not in handled},
            warnings=tuple(warnings),
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
    path = folder / "config.json"
    data = read_json_object(path, "WorldStereo config")
    declared = data.get("model_type")
    warnings = []
    if folder.name in MODEL_TYPES:
        if declared is not None and declared != folder.name:
            warnings.append(f"{path} says model_type {declared!r} but the folder is named {folder.name!r}; the "
                            "folder name decides, as in the reference")
        model_type = folder.name
    elif declared in MODEL_TYPES:
        model_type = declared
    else:
        raise InputError(
            f"cannot tell the WorldStereo model type of {folder}: name the folder after the model type "
            f"(one of {list(MODEL_TYPES)}), as in {HF_REPO_ID}"
        )
    return WorldStereoConfig.from_dict(data, model_type, source=str(path), warnings=warnings)


def wan_config_problem(config: Any) -> str | None:
    """Why ``config`` is not a usable diffusers ``WanTransformer3DModel`` config, or None."""
    if not isinstance(config, Mapping):
        return f"a {type(config).__name__}, not a mapping"
    unknown = [k for k in config if not k.startswith("_") and k not in WAN_CONFIG_FIELDS]
    if unknown:
        return f"fields {unknown} that diffusers' WanTransformer3DModel does not take"
    missing = [k for k in WAN_REQUIRED_FIELDS if config.get(k) is None]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} (needed for the weight shapes)"
    return None


def clean_transformer_config(config: Mapping[str, Any], source: str = "transformer config") -> dict:
    """Keep only ``WanTransformer3DModel`` constructor fields (drops ``_class_name`` and the like);
    InputError naming ``source`` and the field when one that sets weight shapes is missing."""
    problem = wan_config_problem(config)
    if problem is not None:
        raise InputError(f"{source} is not a complete Wan2.1-I2V transformer config: it has {problem}; use the "
                         "transformer/config.json of the Wan2.1-I2V Diffusers repo (or re-download it)")
    out = {k: v for k, v in config.items() if k in WAN_CONFIG_FIELDS}
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])
    return out


def shipped_base_config(name: str) -> dict:
    """One of the shipped Wan2.1-I2V transformer configs (see :data:`BASE_CONFIG_FILES`)."""
    if name not in BASE_CONFIG_FILES:
        raise InputError(f"no shipped base config named {name!r}; choose one of {sorted(BASE_CONFIG_FILES)}")
    return clean_transformer_config(read_json_object(BASE_CONFIG_FILES[name], "shipped base config"))


@dataclass(frozen=True)
class WanIdentity:
    """What a Wan checkpoint's name says about it (None: the name does not say)."""

    version: str | None
    task: str | None
    size: str | None
    resolution: str | None

    def complete(self) -> bool:
        return None not in (self.version, self.task, self.size, self.resolution)

    def describe(self) -> str:
        parts = [f"Wan{self.version}" if self.version else None, (self.task or "").upper() or None,
                 (self.size or "").upper() or None, (self.resolution or "").upper() or None]
        return " ".join(p for p in parts if p) or "an unnamed Wan model"


def wan_identity(name: str) -> WanIdentity:
    """Version, task, size and resolution named in a repo id, folder or file name, e.g.
    ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` or ``wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors``."""
    text = str(name).lower()

    def find(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return ".".join(m.groups()) if m else None

    return WanIdentity(version=find(r"wan[\s_-]*(\d)[._-]?(\d)"),
                       task=find(r"(?<![a-z0-9])([a-z]*2v)(?![a-z0-9])"),
                       size=find(r"(?<![0-9.])(\d+(?:\.\d+)?b)(?![a-z])"),
                       resolution=find(r"(?<!\d)(\d{3,4}p)(?![a-z])"))


def shipped_config_for_base_model(base_model: str) -> str | None:
    """Name of the shipped config that matches a ``base_model`` id or path, or None."""
    ident = wan_identity(base_model)
    if (ident.version, ident.task, ident.size) != ("2.1", "i2v", "14b"):
        return None
    name = f"wan2.1-i2v-14b-{ident.resolution}"
    return name if name in BASE_CONFIG_FILES else None


def base_mismatch(base_model: str, base: str | Path) -> str | None:
    """A warning when the base checkpoint ``base`` (a diffusers folder, its ``transformer/`` or a
    single file) is not, or cannot be told to be, the Wan model the variant's ``base_model`` names."""
    path = Path(base)
    if path.is_dir() and path.name == "transformer" and (path.parent / "transformer").is_dir():
        path = path.parent
    expected_name = Path(str(base_model).rstrip("/\\")).name
    if path.is_dir() and expected_name and path.name.lower() == expected_name.lower():
        return None
    expected, found = wan_identity(expected_name), wan_identity(path.name)
    if expected.complete() and found.complete() and expected == found:
        return None
    consequence = (f"the variant was trained on {base_model!r} (base_model in its config.json); on another base "
                   "the output looks plausible but is not what the release makes. Use that model")
    if found.complete() or (found.resolution and expected.resolution and found.resolution != expected.resolution):
        return f"base {path.name} is {found.describe()}, but {consequence}"
    return f"cannot tell from its name whether base {path.name} is {base_model!r}: {consequence} (if it is, " \
           "name its folder or file after it)"
