"""Strict loading of WorldStereo transformers.

The model is built on the meta device (parameters take no memory), then every parameter is
assigned straight from the checkpoint tensors: the Wan2.1-I2V base (a diffusers folder or a
ComfyUI-style single file) overlaid with the variant's ``model.safetensors``, or the variant file
alone when it is complete. Every key is checked: the union must equal the model's key set, the
overlay may hold no unknown key and every shape must match; errors name the tensors.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from safetensors import safe_open

from ..constants import HF_REPO_ID
from ..errors import CheckpointError, InputError, MissingWeightsError
from ..progress import ProgressFn, report
from ..runtime.fp8 import convert_worldstereo_fp8, quantize_stream
from .config import (BASE_CONFIG_FILES, WorldStereoConfig, clean_transformer_config, load_worldstereo_config,
                     read_json_object, shipped_base_config, shipped_config_for_base_model)
from .transformer import WorldStereoTransformer, build_transformer
from .wan_keys import is_original_wan_layout, original_to_diffusers, strip_prefix

logger = logging.getLogger(__name__)

#: How many offending names an error message lists before summarising.
MAX_LISTED = 8
#: Keys some Wan checkpoints carry that the I2V model has no use for (diffusers ignores them too).
IGNORED_BASE_KEYS = ("norm_added_q",)
#: Prefixes of keys that only WorldStereo adds; everything else belongs to the Wan backbone.
WORLDSTEREO_PREFIXES = ("controlnet.", "camera_embedding.", "ref_index_embedding.")
VARIANT_WEIGHTS = "model.safetensors"
#: Byte alignment every CPU parameter gets (what torch's allocator gives fresh tensors).
ALIGNMENT = 64


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else f" ({len(names)})")


def check_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, source: str, hint: str,
               allow_missing: bool = False, allow_unexpected: bool = False) -> None:
    """Compare key -> shape maps; raise :class:`CheckpointError` naming every kind of mismatch."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} (model expects {list(expected[k])})"
             for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    if missing and not allow_missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected and not allow_unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrongly shaped tensors: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems) + f". {hint}")


def _expected_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _prepare(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if t.device.type == "cpu" and t.data_ptr() % ALIGNMENT:
        # safetensors hands out tensors at arbitrary offsets; SIMD kernels then take other code
        # paths, so results would depend on where the bytes sat in the file.
        t = t.clone()
    return t


def _assign(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], device: torch.device | str | None,
            progress: ProgressFn | None = None, total: int = 0) -> None:
    """Fill ``model`` (meta or real) from checked ``(name, tensor)`` pairs, one tensor at a time.

    Each tensor is cast/moved as it arrives, so peak memory is the model plus one tensor."""
    params = model.state_dict(keep_vars=True)
    if _is_meta(model):
        ready = {}
        for done, (name, tensor) in enumerate(items, 1):
            ready[name] = _prepare(tensor, params[name].dtype, device)
            report(progress, done, total)
        model.load_state_dict(ready, strict=True, assign=True)
    else:
        with torch.no_grad():
            for done, (name, tensor) in enumerate(items, 1):
                params[name].copy_(tensor)
                report(progress, done, total)
    if device is not None:
        model.to(device)  # buffers (RoPE tables) follow the parameters


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                           hint: str = "check that the checkpoint belongs to this model type and config",
                           device: torch.device | str | None = None) -> nn.Module:
    """Load a complete state dict with zero missing, zero unexpected and zero wrongly shaped keys.

    A meta-device model (from ``build_transformer(device="meta")``) takes the tensors themselves
    (cast to each parameter's dtype, moved to ``device`` if given); a real model copies them.
    Raises :class:`CheckpointError` naming the offending tensors and ``source``."""
    check_keys(_expected_shapes(model), {k: tuple(v.shape) for k, v in state_dict.items()},
               source=source, hint=hint)
    _assign(model, state_dict.items(), device)
    return model


# ----- safetensors files ---------------------------------------------------------------------------

class SafetensorsFiles:
    """Lazy view of one or more safetensors files as a single key -> tensor mapping."""

    def __init__(self, files: list[Path], rename=None) -> None:
        self.files = files
        self._where: dict[str, tuple[Path, str]] = {}
        self._shapes: dict[str, tuple] = {}
        for path in files:
            with _open(path) as handle:
                for stored in handle.keys():
                    name = rename(stored) if rename else stored
                    if name in self._where:
                        raise CheckpointError(f"tensor {name} appears twice ({self._where[name][0]} and {path}); "
                                              "remove the duplicate file")
                    self._where[name] = (path, stored)
                    self._shapes[name] = tuple(handle.get_slice(stored).get_shape())

    @property
    def shapes(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def keys(self) -> list[str]:
        return list(self._where)

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` on CPU, reading one file at a time."""
        wanted: dict[Path, list[str]] = {}
        for name in names:
            wanted.setdefault(self._where[name][0], []).append(name)
        for path, group in wanted.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in group:
                        yield name, handle.get_tensor(self._where[name][1])
            except (OSError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"cannot read tensors from {path} ({exc}); the file is damaged: "
                                      "re-download it") from exc


def _open(path: Path):
    if not path.is_file():
        raise MissingWeightsError(f"weight file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors file; only safetensors weights are loaded "
                              "(convert pickled .bin/.pt/.ckpt weights to safetensors first)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is truncated or "
                              "corrupt: re-download it") from exc


# ----- base checkpoints ----------------------------------------------------------------------------

@dataclass
class BaseCheckpoint:
    """A Wan2.1-I2V transformer checkpoint: its tensors (diffusers names) and its config."""

    files: SafetensorsFiles
    config: dict | None
    source: str


def _diffusers_transformer_dir(path: Path) -> Path | None:
    for candidate in (path / "transformer", path):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def open_base(base: str | Path, *, base_config: dict | str | Path | None = None) -> BaseCheckpoint:
    """Open a diffusers Wan folder (``<repo>`` or ``<repo>/transformer``) or a single-file checkpoint."""
    path = Path(base)
    if path.is_dir():
        tdir = _diffusers_transformer_dir(path)
        if tdir is None:
            raise MissingWeightsError(
                f"{path} is not a diffusers Wan2.1-I2V folder: no transformer/config.json; download e.g. "
                "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (at least transformer/*) or pass a single-file checkpoint")
        config = read_json_object(tdir / "config.json", "base transformer config")
        index = sorted(tdir.glob("*.safetensors.index.json"))
        if index:
            weight_map = read_json_object(index[0], "shard index").get("weight_map", {})
            files = sorted({tdir / name for name in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise MissingWeightsError(f"{index[0]} lists shard(s) that are not there: "
                                          f"{[f.name for f in missing]}; finish the download")
        else:
            files = sorted(tdir.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in tdir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise MissingWeightsError(
                f"no .safetensors weights in {tdir}" + (f" (found {others}: only safetensors are loaded)" if others
                                                         else "; download transformer/*.safetensors"))
        files_view = SafetensorsFiles(files)
        if index:
            listed = set(weight_map)
            if listed != set(files_view.keys()):
                raise CheckpointError(f"{index[0]} does not match its shards (tensors listed but absent: "
                                      f"{_listing(listed - set(files_view.keys()))}); re-download {tdir}")
        return BaseCheckpoint(files_view, config, str(tdir))
    if not path.exists():
        raise MissingWeightsError(f"base checkpoint not found: {path}")
    with _open(path) as handle:
        stored = list(handle.keys())
    if any("scale_weight" in k or k == "scaled_fp8" for k in stored):
        raise CheckpointError(f"{path} is a scaled-fp8 checkpoint, which is not supported; use a bf16/fp16/fp32 "
                              "Wan2.1-I2V-14B file")
    if is_original_wan_layout(stored):
        files = SafetensorsFiles([path], rename=lambda k: original_to_diffusers(k, source=str(path)))
    else:
        files = SafetensorsFiles([path], rename=strip_prefix)
    if isinstance(base_config, (str, Path)):
        base_config = read_json_object(Path(base_config), "base_config")
    return BaseCheckpoint(files, base_config, str(path))


def _match_shipped_config(shapes: Mapping[str, tuple]) -> dict | None:
    """The shipped base config whose parameter shapes fit ``shapes`` (backbone keys only)."""
    for name in BASE_CONFIG_FILES:
        cfg = shipped_base_config(name)
        with torch.device("meta"):
            probe = WanTransformer3DModel(**cfg)
        expected = _expected_shapes(probe)
        if all(k in expected and tuple(v) == expected[k] for k, v in shapes.items()):
            return cfg
    return None


# ----- the public loader -------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_worldstereo_transformer` assembled (also logged)."""

    variant: str
    base: str | None
    n_keys: int
    n_from_base: int
    n_from_variant: int
    backbone_overridden: int
    dtype: str
    notes: list[str] = field(default_factory=list)


def _resolve_transformer_config(cfg: WorldStereoConfig, base: BaseCheckpoint | None,
                                variant_shapes: Mapping[str, tuple]) -> tuple[dict, str]:
    if base is not None and base.config is not None:
        return clean_transformer_config(base.config), f"config of {base.source}"
    if cfg.transformer_config is not None:
        return clean_transformer_config(cfg.transformer_config), "transformer config in the variant config.json"
    name = shipped_config_for_base_model(cfg.base_model)
    if name is not None:
        return shipped_base_config(name), f"shipped config {name} (from base_model {cfg.base_model!r})"
    shapes = base.files.shapes if base is not None else variant_shapes
    backbone = {k: v for k, v in shapes.items() if not k.startswith(WORLDSTEREO_PREFIXES)
                and k.split(".")[-1] not in IGNORED_BASE_KEYS}
    matched = _match_shipped_config(backbone)
    if matched is None:
        raise InputError(
            "cannot tell which Wan2.1-I2V transformer config to use: the base checkpoint matches none of the "
            f"shipped configs {sorted(BASE_CONFIG_FILES)}; pass base_config=<transformer config.json>")
    return matched, "shipped config matched by tensor shapes"


def load_worldstereo_transformer(
    variant_dir: str | Path,
    *,
    base: str | Path | None = None,
    base_config: dict | str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attention_scope: str = "full",
    attention_backend: str | None = None,
    fp8: str | None = None,
    progress: ProgressFn | None = None,
) -> WorldStereoTransformer:
    """Load a WorldStereo variant folder (``config.json`` + ``model.safetensors``).

    ``base``: a diffusers Wan2.1-I2V folder (repo root or its ``transformer/``), a single-file
    checkpoint (original Wan or diffusers key names, optional ``model.diffusion_model.`` prefix), or
    None when ``model.safetensors`` is complete. ``base_config`` overrides the transformer config
    for a single-file base (default: the shipped config named by the variant's ``base_model``, else
    the shipped one matching the tensor shapes). ``dtype`` is the compute dtype (bf16/fp16/fp32; in
    half precision the backbone's norms, modulation tables and time embedder stay fp32, as diffusers
    loads Wan). ``attention_scope``: ``"full"`` (released) or ``"pairs"`` (memory models, see
    ``ssm.py``); ``attention_backend``: a diffusers backend name (default torch SDPA). ``fp8``:
    ``"channel"`` or ``"tensor"`` stores the block Linear weights as float8 e4m3 with per-channel /
    per-tensor scales, quantised tensor by tensor while reading (:mod:`..runtime.fp8`).
    ``progress(done, total)`` is called per tensor and may raise to abort.
    Returns the model in eval mode on ``device``, with ``model.load_report`` (a :class:`LoadReport`)."""
    variant_dir = Path(variant_dir)
    cfg = load_worldstereo_config(variant_dir)
    hint_variant = (f"wrong variant folder or an incomplete download: re-download {HF_REPO_ID}/{cfg.model_type}"
                    f"/{VARIANT_WEIGHTS}")
    variant = SafetensorsFiles([variant_dir / VARIANT_WEIGHTS])
    base_ckpt = open_base(base, base_config=base_config) if base is not None else None
    transformer_config, config_source = _resolve_transformer_config(cfg, base_ckpt, variant.shapes)

    model = build_transformer(transformer_config, cfg.controlnet_cfg, memory=cfg.is_memory, device="meta",
                              dtype=dtype, attention_scope=attention_scope, attention_backend=attention_backend)
    if fp8 is not None:
        convert_worldstereo_fp8(model, fp8)
    expected = _expected_shapes(model)

    # The variant file may hold any subset of the model's keys, nothing else.
    check_keys(expected, variant.shapes, source=str(variant_dir / VARIANT_WEIGHTS), hint=hint_variant,
               allow_missing=base_ckpt is not None)
    from_variant = set(variant.keys())
    from_base: list[str] = []
    if base_ckpt is not None:
        base_shapes = {k: v for k, v in base_ckpt.files.shapes.items() if k.split(".")[-1] not in IGNORED_BASE_KEYS}
        check_keys({k: v for k, v in expected.items() if not k.startswith(WORLDSTEREO_PREFIXES)}, base_shapes,
                   source=base_ckpt.source, allow_missing=True,
                   hint="this is not a Wan2.1-I2V-14B transformer matching the variant's base_model "
                        f"{cfg.base_model!r}; use the Wan2.1-I2V base the variant was trained on")
        from_base = [k for k in base_shapes if k not in from_variant]
        missing = [k for k in expected if k not in from_variant and k not in base_shapes]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensors are in neither the base ({base_ckpt.source}) nor the variant "
                f"({variant_dir / VARIANT_WEIGHTS}): {_listing(missing)}. {hint_variant}")

    overridden = sum(1 for k in from_variant if not k.startswith(WORLDSTEREO_PREFIXES)) if base_ckpt else 0
    items = itertools.chain(base_ckpt.files.iter_tensors(from_base) if base_ckpt is not None else (),
                            variant.iter_tensors(from_variant))
    if fp8 is not None:
        items = quantize_stream(model, items)
    _assign(model, items, device, progress, total=len(expected))
    model.eval()

    summary = LoadReport(
        variant=str(variant_dir), base=base_ckpt.source if base_ckpt else None, n_keys=len(expected),
        n_from_base=len(from_base), n_from_variant=len(from_variant), backbone_overridden=overridden,
        dtype=str(dtype).replace("torch.", ""), notes=[f"transformer config: {config_source}"],
    )
    if fp8 is not None:
        summary.notes.append(f"block Linear weights stored in float8 e4m3 with per-{fp8} scales")
    model.load_report = summary
    logger.info("loaded %s (%s): %d tensors, %d from the base, %d from the variant file, of which %d override "
                "backbone weights; %s", cfg.model_type, summary.dtype, summary.n_keys, summary.n_from_base,
                summary.n_from_variant, overridden, summary.notes[0])
    return model
