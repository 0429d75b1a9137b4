"""Loading WorldStereo transformers, checked as strictly as the reference allows.

The model is built on the meta device (parameters take no memory), then every parameter is
assigned straight from the checkpoint tensors: the Wan2.1-I2V base (a diffusers folder or a
ComfyUI-style single file) overlaid with the variant's ``model.safetensors``, or the variant file
alone when it is complete. Hard errors, naming the tensors and the file: a wrong shape, a tensor
the forward uses that is in neither file, a non-float tensor where a weight belongs, NaN or inf
values. Differences the reference (``load_state_dict(strict=False)`` on top of the base) accepts
are accepted with a warning (:attr:`LoadReport.warnings`, also logged): tensors the model does
not have, a model tensor the forward never reads missing from both files (set as the reference
initialises it), the variant config's tolerated quirks, and a base that is not, or cannot be told
to be, the one the variant's ``base_model`` names.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from ..constants import HF_REPO_ID
from ..errors import CheckpointError, InputError, MissingWeightsError
from ..hub import WAN_BASE_REPO
from ..models.config import (BASE_CONFIG_FILES, WorldStereoConfig, base_mismatch, clean_transformer_config,
                             load_worldstereo_config, read_json_object, shipped_base_config,
                             shipped_config_for_base_model)
from ..models.transformer import WorldStereoTransformer, build_transformer
from ..progress import ProgressFn
from ..runtime.fp8 import convert_worldstereo_fp8, quantize_stream
from .safetensors_files import SafetensorsFiles, listing, read_header
from .strict import assign_tensors, check_keys, tensor_shapes
from .wan_keys import is_original_wan_layout, original_to_diffusers, strip_prefix

logger = logging.getLogger(__name__)

#: Modules some Wan checkpoints carry that the I2V model has no use for (diffusers drops them too):
#: the all-zero ``blocks.N.attn2.norm_added_q`` of the Wan-AI Diffusers repos.
IGNORED_MODULES = frozenset({"norm_added_q"})
#: Prefixes of keys that only WorldStereo adds; everything else belongs to the Wan backbone.
WORLDSTEREO_PREFIXES = ("controlnet.", "camera_embedding.", "ref_index_embedding.")
#: Model tensors the forward never reads, with the reference's initial value.
UNUSED_BY_FORWARD = {"ref_index_embedding.weight": torch.zeros}
VARIANT_WEIGHTS = "model.safetensors"

# ----- base checkpoints ----------------------------------------------------------------------------

@dataclass
class BaseCheckpoint:
    """A Wan2.1-I2V transformer checkpoint: its tensors (diffusers names) and its config."""

    files: SafetensorsFiles
    config: dict | None
    source: str
    #: Where ``config`` came from (named in errors about it).
    config_source: str = "base_config"


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
                f"{WAN_BASE_REPO} (at least transformer/*) or pass a single-file checkpoint")
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
                                      f"{listing(listed - set(files_view.keys()))}); re-download {tdir}")
        return BaseCheckpoint(files_view, config, str(tdir), str(tdir / "config.json"))
    if not path.exists():
        raise MissingWeightsError(f"base checkpoint not found: {path}")
    stored = list(read_header(path))
    if any("scale_weight" in k or k == "scaled_fp8" for k in stored):
        raise CheckpointError(f"{path} is a scaled-fp8 checkpoint, which is not supported; use a bf16/fp16/fp32 "
                              "Wan2.1-I2V-14B file")
    if is_original_wan_layout(stored):
        files = SafetensorsFiles([path], rename=lambda k: original_to_diffusers(k, source=str(path)))
    else:
        files = SafetensorsFiles([path], rename=strip_prefix)
    config_source = "base_config"
    if isinstance(base_config, (str, Path)):
        config_source = str(base_config)
        base_config = read_json_object(Path(base_config), "base_config")
    return BaseCheckpoint(files, base_config, str(path), config_source)


def _match_shipped_config(shapes: Mapping[str, tuple]) -> dict | None:
    """The shipped base config whose parameter shapes fit ``shapes`` (backbone keys only)."""
    for name in BASE_CONFIG_FILES:
        cfg = shipped_base_config(name)
        with torch.device("meta"):
            probe = WanTransformer3DModel(**cfg)
        expected = tensor_shapes(probe.state_dict(keep_vars=True))
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
    #: Accepted differences from the expected files (each also logged as a warning).
    warnings: list[str] = field(default_factory=list)


def _resolve_transformer_config(cfg: WorldStereoConfig, base: BaseCheckpoint | None,
                                variant_shapes: Mapping[str, tuple]) -> tuple[dict, str]:
    if base is not None and base.config is not None:
        return clean_transformer_config(base.config, base.config_source), f"config of {base.source}"
    if cfg.transformer_config is not None:
        return clean_transformer_config(cfg.transformer_config), "transformer config in the variant config.json"
    name = shipped_config_for_base_model(cfg.base_model)
    if name is not None:
        return shipped_base_config(name), f"shipped config {name} (from base_model {cfg.base_model!r})"
    shapes = base.files.shapes if base is not None else variant_shapes
    backbone = {k: v for k, v in shapes.items() if not k.startswith(WORLDSTEREO_PREFIXES)
                and not _ignored(k)}
    matched = _match_shipped_config(backbone)
    if matched is None:
        raise InputError(
            "cannot tell which Wan2.1-I2V transformer config to use: the base checkpoint matches none of the "
            f"shipped configs {sorted(BASE_CONFIG_FILES)}; pass base_config=<transformer config.json>")
    return matched, "shipped config matched by tensor shapes"


def _ignored(key: str) -> bool:
    return not IGNORED_MODULES.isdisjoint(key.split("."))


def _check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], source: str, hint: str) -> None:
    """:func:`.strict.check_keys` on the tensors both sides have (one file may hold only a part)."""
    common = [k for k in found if k in expected]
    check_keys({k: expected[k] for k in common}, {k: found[k] for k in common}, source=source, hint=hint)


@dataclass
class _Plan:
    """Which file each model tensor comes from, and what was accepted on the way."""

    from_variant: list[str]
    from_base: list[str]
    unused_missing: list[str]
    warnings: list[str]


def _plan(expected: Mapping[str, tuple], cfg: WorldStereoConfig, variant: SafetensorsFiles, variant_path: Path,
          base: BaseCheckpoint | None, hint_variant: str) -> _Plan:
    """Check shapes, presence and dtypes; decide where every tensor comes from (see the module docstring)."""
    hint_base = ("this is not a Wan2.1-I2V-14B transformer matching the variant's base_model "
                 f"{cfg.base_model!r}; use the Wan2.1-I2V base the variant was trained on")
    warnings = []
    _check_shapes(expected, variant.shapes, str(variant_path), hint_variant)
    from_variant = [k for k in variant.keys() if k in expected]
    unknown = {str(variant_path): [k for k in variant.keys() if k not in expected and not _ignored(k)]}
    from_base: list[str] = []
    if base is not None:
        backbone = {k: v for k, v in expected.items() if not k.startswith(WORLDSTEREO_PREFIXES)}
        base_shapes = {k: v for k, v in base.files.shapes.items() if not _ignored(k)}
        _check_shapes(backbone, base_shapes, base.source, hint_base)
        from_base = [k for k in base_shapes if k in backbone and k not in variant.shapes]
        unknown[base.source] = [k for k in base_shapes if k not in backbone]
        base.files.require_float(from_base)
        float8 = [k for k in from_base if base.files.dtype(k).startswith("F8")]
        if float8:
            warnings.append(f"base {Path(base.source).name} stores {len(float8)} of its weights in float8: the "
                            "release samples with bf16 weights, so the output differs from it")
    variant.require_float(from_variant)
    present = set(from_variant) | set(from_base)
    missing = [k for k in expected if k not in present]
    strays = [k for names in unknown.values() for k in names]
    needed = [k for k in missing if k not in UNUSED_BY_FORWARD]
    if needed:
        where = (f"{len(needed)} tensors the model uses are in neither the base ({base.source}) nor the variant "
                 f"({variant_path})" if base is not None else f"{variant_path} lacks tensors the model uses")
        stray = (f"; the files hold tensors this model does not have: {listing(strays)} (renamed, or a checkpoint "
                 "of another model?)" if strays else "")
        raise CheckpointError(f"{where}: missing tensors: {listing(needed)}{stray}. "
                              f"{hint_variant if base is None else hint_base}")
    for source, names in unknown.items():
        if names:
            warnings.append(f"{source}: ignoring tensors this model does not have: {listing(names)}; the "
                            "reference loads without them too")
    unused = [k for k in missing if k in UNUSED_BY_FORWARD]
    if unused:
        warnings.append(f"{listing(unused)} is in neither file; the forward never reads it, so it is set as the "
                        "reference initialises it")
    return _Plan(from_variant, from_base, unused, warnings)


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
    loads Wan). ``device="meta"`` checks everything the file headers tell (names, shapes, dtypes,
    config) without reading any tensor data and returns the model on the meta device.
    ``attention_scope``: ``"full"`` (released) or ``"pairs"`` (memory models, see ``ssm.py``);
    ``attention_backend``: a diffusers backend name (default torch SDPA). ``fp8``: ``"channel"`` or
    ``"tensor"`` stores the block Linear weights as float8 e4m3 with per-channel / per-tensor scales,
    quantised tensor by tensor while reading (:mod:`..runtime.fp8`).
    ``progress(done, total)`` is called per tensor and may raise to abort.
    Returns the model in eval mode on ``device``, with ``model.load_report`` (a :class:`LoadReport`)."""
    variant_dir = Path(variant_dir)
    cfg = load_worldstereo_config(variant_dir)
    variant_path = variant_dir / VARIANT_WEIGHTS
    hint_variant = (f"wrong variant folder or an incomplete download: re-download {HF_REPO_ID}/{cfg.model_type}"
                    f"/{VARIANT_WEIGHTS}")
    variant = SafetensorsFiles([variant_path])
    base_ckpt = open_base(base, base_config=base_config) if base is not None else None
    transformer_config, config_source = _resolve_transformer_config(cfg, base_ckpt, variant.shapes)

    model = build_transformer(transformer_config, cfg.controlnet_cfg, memory=cfg.is_memory, device="meta",
                              dtype=dtype, attention_scope=attention_scope, attention_backend=attention_backend)
    if fp8 is not None:
        convert_worldstereo_fp8(model, fp8)
    expected = tensor_shapes(model.state_dict(keep_vars=True))
    plan = _plan(expected, cfg, variant, variant_path, base_ckpt, hint_variant)
    warnings = list(cfg.warnings) + plan.warnings
    if base_ckpt is not None:
        mismatch = base_mismatch(cfg.base_model, base_ckpt.source)
        warnings += [mismatch] if mismatch else []

    overridden = sum(1 for k in plan.from_variant if not k.startswith(WORLDSTEREO_PREFIXES)) if base_ckpt else 0
    if torch.device(device).type != "meta":
        params = model.state_dict(keep_vars=True)
        items = itertools.chain(base_ckpt.files.iter_tensors(plan.from_base) if base_ckpt is not None else (),
                                variant.iter_tensors(plan.from_variant),
                                ((k, UNUSED_BY_FORWARD[k](params[k].shape)) for k in plan.unused_missing))
        if fp8 is not None:
            items = quantize_stream(model, items)
        assign_tensors(model, items, device, progress, total=len(expected))
    model.eval()

    summary = LoadReport(
        variant=str(variant_dir), base=base_ckpt.source if base_ckpt else None, n_keys=len(expected),
        n_from_base=len(plan.from_base), n_from_variant=len(plan.from_variant), backbone_overridden=overridden,
        dtype=str(dtype).replace("torch.", ""), notes=[f"transformer config: {config_source}"], warnings=warnings,
    )
    if fp8 is not None:
        summary.notes.append(f"block Linear weights stored in float8 e4m3 with per-{fp8} scales")
    model.load_report = summary
    for warning in warnings:
        logger.warning("%s: %s", cfg.model_type, warning)
    logger.info("loaded %s (%s): %d tensors, %d from the base, %d from the variant file, of which %d override "
                "backbone weights; %s", cfg.model_type, summary.dtype, summary.n_keys, summary.n_from_base,
                summary.n_from_variant, overridden, summary.notes[0])
    return model
