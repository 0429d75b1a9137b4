"""MoGe-2 / MoGe-1 monocular geometry: strict local loading, optional download, inference.

Checkpoints are the official ``model.pt`` files, ``{"model_config": {...}, "model": state_dict}``,
read with ``torch.load(weights_only=True)``. MoGe's own ``from_pretrained`` loads non-strictly,
so :func:`load_moge` checks missing / unexpected keys and shapes itself and names them
(:func:`..loading.strict.check_keys`).
The default layout of a models folder is ``<models_dir>/<repo-name>/model.pt``
(e.g. ``models/moge/moge-2-vitl-normal/model.pt``).

The model code comes from the ``moge`` package (``dlr-moge==2.0.0``, installed with --no-deps).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InputError, MissingWeightsError
from ..hub import MOGE_CHECKPOINT, MOGE_REPO, fetch_files
from ..io.atomic import safe_join
from ..io.fingerprint import file_stamps
from ..loading.strict import check_keys, tensor_shapes
from ..progress import ProgressFn
from .depth import image_to_rgb01

#: Known checkpoints (Hugging Face repo id -> MoGe version). WorldStereo uses the first.
MOGE_REPOS: dict[str, str] = {
    MOGE_REPO: "v2",
    "Ruicheng/moge-2-vitl": "v2",
    "Ruicheng/moge-vitl": "v1",
}
#: Constant buffers re-created identically at construction; a checkpoint may omit them.
REBUILT_BUFFERS = ("image_mean", "image_std")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# --------------------------------------------------------------------------------------------
# Locating / downloading checkpoints
# --------------------------------------------------------------------------------------------

def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InputError(f"MoGe repo id {repo_id!r} is not of the form 'owner/name' "
                         f"(known: {', '.join(MOGE_REPOS)})")
    return repo_id


def moge_checkpoint_path(models_dir: str | os.PathLike, repo_id: str = MOGE_REPO) -> Path:
    """Where ``repo_id``'s checkpoint lives in ``models_dir``: ``<models_dir>/<repo-name>/model.pt``."""
    return safe_join(models_dir, _check_repo_id(repo_id).split("/")[1], MOGE_CHECKPOINT)


def ensure_moge_checkpoint(models_dir: str | os.PathLike, repo_id: str = MOGE_REPO, *,
                           download: bool = False, progress: ProgressFn | None = None) -> Path:
    """Path of the local checkpoint; with ``download`` fetch it from the Hub when absent.

    Raises :class:`MissingWeightsError` (naming the file, the folder and the download command)
    when it is absent and cannot be fetched (download off, ``HF_HUB_OFFLINE`` set, or failure);
    see :func:`worldstereo_core.hub.fetch_files`.
    """
    path = moge_checkpoint_path(models_dir, repo_id)
    fetch_files(repo_id, [MOGE_CHECKPOINT], path.parent, download=download, what="MoGe checkpoint",
                progress=progress)
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def read_moge_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model_config, state_dict) of an official MoGe ``model.pt`` (weights_only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"MoGe checkpoint not found: {path}. Put the official model.pt there "
                                  f"(see {MOGE_REPO} on Hugging Face)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                              "Use the official MoGe model.pt; arbitrary pickled objects are refused") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or not isinstance(ckpt.get("model"), dict):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an official MoGe checkpoint: expected a dict with "
                              f"'model_config' (dict) and 'model' (state dict); found {keys}")
    return ckpt["model_config"], ckpt["model"]


def detect_moge_version(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """'v1' or 'v2' from the config layout (v2: ``encoder``/``neck`` sub-configs) or the keys."""
    if isinstance(model_config.get("encoder"), dict) or "neck" in model_config:
        return "v2"
    if isinstance(model_config.get("encoder"), str) or "dim_upsample" in model_config:
        return "v1"
    keys = state_dict.keys() if state_dict else ()
    if any(k.startswith("neck.") for k in keys):
        return "v2"
    if any(k.startswith("head.") for k in keys):
        return "v1"
    raise CheckpointError("cannot tell MoGe v1 from v2 from this checkpoint's config or keys; "
                          "pass version='v1' or version='v2'")


def _empty_weights():
    """Context that creates parameters on the meta device (no random init); buffers stay real."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # accelerate is a requirement; without it construction just runs the init
        return contextlib.nullcontext()
    return init_empty_weights()


def build_moge(model_config: dict[str, Any], version: str, *, empty: bool = False) -> torch.nn.Module:
    """A MoGe model of ``version`` ('v1' / 'v2') from its config: randomly initialised, or with
    ``empty`` parameters on the meta device (to be filled by ``load_state_dict(assign=True)``)."""
    if version not in ("v1", "v2"):
        raise InputError(f"MoGe version must be 'v1' or 'v2'; got {version!r}")
    try:
        from moge.model import import_model_class_by_version
    except ImportError as exc:
        raise ImportError("the MoGe model code is not installed: pip install --no-deps \"dlr-moge>=2.0.0\" "
                          f"and pip install \"dlr-utils3d>=1.3\" ({exc})") from exc
    try:
        with _empty_weights() if empty else contextlib.nullcontext():
            return import_model_class_by_version(version)(**model_config)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"model_config does not describe a MoGe {version} model: {exc}") from exc


def load_moge(path: str | os.PathLike, *, version: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an official MoGe ``model.pt`` strictly; returns the model in eval mode on ``device``.

    ``version`` ('v1' / 'v2') is detected from the checkpoint when None; an explicit value that
    contradicts the checkpoint raises :class:`CheckpointError`. Parameters are never randomly
    initialised: the model is built empty and takes the checkpoint tensors.
    """
    config, state_dict = read_moge_checkpoint(path)
    detected = detect_moge_version(config, state_dict)
    if version is not None and version != detected:
        raise CheckpointError(f"{path} holds a MoGe {detected} checkpoint but version={version!r} was requested")
    model = build_moge(config, detected, empty=True)
    own = model.state_dict(keep_vars=True)
    check_keys(tensor_shapes(own), tensor_shapes(state_dict), source=str(path),
               optional=[k for k in own if k.rsplit(".", 1)[-1] in REBUILT_BUFFERS],
               hint="Use an unmodified official model.pt (its model_config describes this architecture)")
    # only the rebuilt constant buffers may be absent (they are real already)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.checkpoint_stamps = file_stamps(path)  # what a run's resume key records of these weights
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------

def estimate_depth(model: torch.nn.Module, image, *, resolution_level: int = 9, num_tokens: int | None = None,
                   use_fp16: bool | None = None, fov_x: float | None = None) -> dict[str, torch.Tensor]:
    """Metric z-depth of one image as the reference uses it (MoGe ``infer`` defaults).

    ``image``: uint8 (H,W,3)/(3,H,W), or float in [0,1] as (3,H,W) (MoGe layout) or (H,W,3)
    (ComfyUI layout). ``use_fp16`` None = fp16 autocast on CUDA only (the reference runs fp16 on
    GPU; CPU autocast does not support it). ``num_tokens`` overrides ``resolution_level``.
    ``fov_x`` (degrees) gives MoGe a known horizontal field of view instead of estimating it (the
    reference leaves it unknown; panorama views know theirs).

    Returns ``depth`` (H,W) float32 with 0 where invalid, ``mask`` (H,W) bool and
    ``intrinsics_normalised`` (3,3) (fx, fy relative to width/height, cx = cy = 0.5; the
    reference ignores it and uses the camera file's K).
    """
    if not 0 <= int(resolution_level) <= 9:
        raise InputError(f"resolution_level must be in 0..9; got {resolution_level}")
    rgb = image_to_rgb01(image, value_range=(0.0, 1.0))
    device = next(model.parameters()).device
    if use_fp16 is None:
        use_fp16 = device.type == "cuda"
    kwargs: dict[str, Any] = dict(resolution_level=int(resolution_level), force_projection=True,
                                  apply_mask=True, use_fp16=bool(use_fp16))
    if num_tokens is not None:
        kwargs["num_tokens"] = int(num_tokens)
    if fov_x is not None:
        if not 0 < float(fov_x) < 180:
            raise InputError(f"fov_x must be a horizontal field of view in (0, 180) degrees; got {fov_x}")
        kwargs["fov_x"] = float(fov_x)
    with warnings.catch_warnings():  # MoGe's fp32 autocast block warns on CPU; harmless
        warnings.filterwarnings("ignore", message="CPU Autocast only supports")
        warnings.filterwarnings("ignore", message="In CPU autocast")
        out = model.infer(rgb.permute(2, 0, 1).to(device), **kwargs)
    depth = out["depth"].float()
    mask = out["mask"].bool() & torch.isfinite(depth) & (depth > 0)
    return {
        "depth": torch.where(mask, depth, torch.zeros_like(depth)),
        "mask": mask,
        "intrinsics_normalised": out["intrinsics"].float(),
    }
