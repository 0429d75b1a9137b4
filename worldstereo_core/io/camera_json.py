"""camera.json read/write in the reference schema, with validation.

Trajectory files (one schema for all three data families)::

    {"extrinsic": [F x 4x4 w2c], "intrinsic": [F x 3x3 K], ["width": int, "height": int], ...}

* single-view ``examples/images/<scene>/camera.json`` adds ``motion_list`` and has no size (K is in
  pixels of the scene's image.png: pass ``width``/``height`` or ``default_size`` to
  :func:`load_camera_json`; a trajectory always has a size, and files written here state it);
* reconstruction ``renders/traj_*/camera.json`` has ``width``/``height``;
* panorama ``<view>/traj<k>/camera.json`` adds ``id``, ``type``, optional ``eloop_rotation`` ...

Every field other than extrinsic/intrinsic/width/height is kept in ``CameraTrajectory.meta`` and
written back unchanged. The panorama bank ``pano_bank/cameras.json`` is
``{"0000": {"intrinsic": 3x3, "extrinsic": 4x4}, ...}`` (:func:`load_bank_cameras`).
Conventions (w2c, OpenCV axes, pixel K) are those of :mod:`worldstereo_core.cameras`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..cameras import CameraTrajectory, rigidity_error
from ..errors import InputError
from ..sizes import check_image_side, check_image_size
from .atomic import write_json_atomic
from .json_files import read_json as _read_json
from .scene_layout import CAMERA_FILE, CAMERAS_FILE

#: Largest accepted deviation of an extrinsic from a rigid transform (see cameras.rigidity_error).
RIGIDITY_TOLERANCE = 1e-3

_CORE_FIELDS = ("extrinsic", "intrinsic", "width", "height")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> Any:
    """Parse a camera JSON file; errors name the file (and the line for syntax errors)."""
    return _read_json(path, "camera file")


def _resolve(path: str | os.PathLike, default_name: str) -> Path:
    path = Path(path)
    return path / default_name if path.is_dir() else path


def load_camera_json(path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
                     default_size: tuple[int, int] | None = None) -> CameraTrajectory:
    """Read a trajectory camera.json (a folder means ``<folder>/camera.json``).

    ``width``/``height`` give the image size for files that do not state it (single-view); when
    the file states a different size an InputError is raised (use ``CameraTrajectory.resized``).
    ``default_size`` (height, width) is the size of a file that states none, without that check.
    """
    path = _resolve(path, CAMERA_FILE)
    data = read_json(path)
    if isinstance(data, dict) and "extrinsic" not in data and data and all(
            isinstance(v, dict) and "extrinsic" in v for v in data.values()):
        raise InputError(f"{path}: this is a panorama bank {CAMERAS_FILE}; read it with load_bank_cameras")
    if isinstance(data, dict):
        for name, given in (("width", width), ("height", height)):
            if given is None:
                continue
            given = check_image_side(given, str(path), f"{name} argument")
            stated = _size_field(data, name, str(path))
            if stated is not None and stated != given:
                raise InputError(
                    f"{path}: file states {name} {stated} but {given} was requested; load without the "
                    "size and call .resized(height, width) to rescale the intrinsics"
                )
        if width is not None and height is not None:
            default_size = (height, width)
    return camera_trajectory_from_dict(data, source=str(path), default_size=default_size)


def camera_trajectory_from_dict(d: Any, *, source: str = CAMERA_FILE,
                                default_size: tuple[int, int] | None = None) -> CameraTrajectory:
    """Validate a parsed trajectory dict and build a :class:`CameraTrajectory` (float64).

    ``default_size`` (height, width): the image size when ``d`` states none; without it such a
    dict raises an InputError (a trajectory's K means nothing without its image size)."""
    if not isinstance(d, dict):
        raise InputError(f"{source}: expected a JSON object with 'extrinsic' and 'intrinsic', got "
                         f"{type(d).__name__}")
    for key in ("extrinsic", "intrinsic"):
        if key not in d:
            what = "4x4 world-to-camera matrices" if key == "extrinsic" else "3x3 pixel intrinsics"
            raise InputError(f"{source}: missing field '{key}' (a list of {what}, one per frame)")
    width = _size_field(d, "width", source)
    height = _size_field(d, "height", source)
    w2c = _matrix_stack(d["extrinsic"], 4, "extrinsic", source)
    K = _matrix_stack(d["intrinsic"], 3, "intrinsic", source)
    if len(K) != len(w2c):
        raise InputError(
            f"{source}: 'extrinsic' has {len(w2c)} frames but 'intrinsic' has {len(K)}; give one "
            "intrinsic per extrinsic"
        )
    validate_cameras(w2c, K, source)
    if width is None and height is None and default_size is not None:
        height, width = check_image_size(*default_size, f"{source}: image size")
    if width is None or height is None:
        raise InputError(f"{source}: the cameras state no image size ('width' and 'height'); give the size of "
                         "the image their intrinsics refer to (e.g. the file_width/file_height of the node, or "
                         "the scene's image size)")
    meta = {k: v for k, v in d.items() if k not in _CORE_FIELDS}
    return CameraTrajectory(w2c=w2c, K=K, width=width, height=height, meta=meta)


def _size_field(d: dict, key: str, source: str) -> int | None:
    if key not in d or d[key] is None:
        return None
    value = d[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (isinstance(value, float) and not value.is_integer()):
        raise InputError(f"{source}: field '{key}' must be a whole number of pixels, got {value!r}")
    return check_image_side(int(value), source, f"field '{key}'")


def _matrix_stack(value: Any, n: int, field: str, source: str) -> torch.Tensor:
    """A list of n x n matrices -> float64 tensor (F, n, n) with F >= 1."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"{source}: field '{field}' must be a list of {n}x{n} numeric matrices ({exc})"
        ) from exc
    if arr.size == 0:
        raise InputError(f"{source}: field '{field}' is empty; a trajectory needs at least one camera")
    if arr.ndim != 3 or arr.shape[1:] != (n, n):
        raise InputError(
            f"{source}: field '{field}' has shape {arr.shape}; expected (frames, {n}, {n})"
        )
    return torch.from_numpy(arr)


def validate_cameras(w2c: torch.Tensor, K: torch.Tensor, source: str) -> None:
    """Check finite values, rigid extrinsics, positive focals, no skew, K bottom row (0,0,1)."""
    for field, m in (("extrinsic", w2c), ("intrinsic", K)):
        bad = ~torch.isfinite(m).flatten(1).all(dim=1)
        if bool(bad.any()):
            raise InputError(f"{source}: field '{field}' frame {int(bad.nonzero()[0])} contains NaN or "
                             "infinite values")
    if not rigidity_error(w2c) <= RIGIDITY_TOLERANCE:
        errors = [rigidity_error(m) for m in w2c]
        i = next(i for i, e in enumerate(errors) if not e <= RIGIDITY_TOLERANCE)
        raise InputError(
            f"{source}: 'extrinsic' frame {i} is not a rigid world-to-camera transform (error "
            f"{errors[i]:.3g} > {RIGIDITY_TOLERANCE}); it must be [R | t] with orthonormal R, det +1, "
            "bottom row [0, 0, 0, 1]"
        )
    fx, fy, skew = K[:, 0, 0], K[:, 1, 1], K[:, 0, 1]
    bad = (fx <= 0) | (fy <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise InputError(f"{source}: 'intrinsic' frame {i} has non-positive focal length "
                         f"(fx={fx[i].item():.6g}, fy={fy[i].item():.6g}); focals must be > 0 pixels")
    scale = torch.maximum(fx, fy)
    bad = skew.abs() > 1e-6 * scale
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise InputError(f"{source}: 'intrinsic' frame {i} has skew K[0][1]={skew[i].item():.6g}; "
                         "only zero-skew pinhole intrinsics [[fx,0,cx],[0,fy,cy],[0,0,1]] are supported")
    rest = torch.stack([K[:, 1, 0], K[:, 2, 0], K[:, 2, 1], K[:, 2, 2] - 1], dim=1).abs()
    bad = (rest > 1e-6).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise InputError(f"{source}: 'intrinsic' frame {i} is not of the form "
                         "[[fx,0,cx],[0,fy,cy],[0,0,1]]")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def camera_json_dict(traj: CameraTrajectory) -> dict:
    """The camera.json dict of ``traj``: extrinsic, intrinsic, width, height, meta."""
    out: dict = {"extrinsic": traj.w2c.detach().cpu().to(torch.float64).tolist(),
                 "intrinsic": traj.K.detach().cpu().to(torch.float64).tolist(),
                 "width": traj.width, "height": traj.height}
    for key, value in traj.meta.items():
        if key in _CORE_FIELDS:
            raise InputError(f"CameraTrajectory.meta may not contain the core field '{key}'")
        out[key] = value
    return out


def save_camera_json(traj: CameraTrajectory, path: str | os.PathLike) -> Path:
    """Validate and write ``traj`` atomically as camera.json (a folder means ``<folder>/camera.json``)."""
    path = _resolve(path, CAMERA_FILE)
    d = camera_json_dict(traj)
    camera_trajectory_from_dict(d, source=f"trajectory to save as {path}")  # same checks as reading
    _check_json_serialisable(d, path)
    return write_json_atomic(path, d, indent=2)


def _check_json_serialisable(d: dict, path: Path) -> None:
    try:
        json.dumps(d, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot write {path}: meta holds a value JSON cannot store ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Panorama bank (pano_bank/cameras.json)
# --------------------------------------------------------------------------------------------

def _bank_json(path: str | os.PathLike) -> tuple[Path, dict]:
    path = _resolve(path, CAMERAS_FILE)
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a non-empty object {{\"0000\": {{\"intrinsic\", \"extrinsic\"}}, ...}}")
    return path, data


def bank_keys(path: str | os.PathLike) -> list[str]:
    """The keys of ``pano_bank/cameras.json`` (a folder means ``<folder>/cameras.json``), sorted."""
    return sorted(_bank_json(path)[1])


def load_bank_cameras(path: str | os.PathLike, *, width: int, height: int) -> tuple[list[str], CameraTrajectory]:
    """Read ``pano_bank/cameras.json`` (a folder means ``<folder>/cameras.json``).

    Returns the keys in sorted order and their cameras stacked in that order. The file does not
    state the image size: ``width``/``height`` are the size of the bank images (their K's pixels).
    """
    path, data = _bank_json(path)
    keys = sorted(data)
    w2c, K = [], []
    for key in keys:
        entry = data[key]
        src = f"{path} [{key!r}]"
        if not isinstance(entry, dict):
            raise InputError(f"{src}: expected an object with 'intrinsic' and 'extrinsic'")
        for field in ("extrinsic", "intrinsic"):
            if field not in entry:
                raise InputError(f"{src}: missing field '{field}'")
        w2c.append(_matrix_stack([entry["extrinsic"]], 4, "extrinsic", src)[0])
        K.append(_matrix_stack([entry["intrinsic"]], 3, "intrinsic", src)[0])
    w2c_t, K_t = torch.stack(w2c), torch.stack(K)
    validate_cameras(w2c_t, K_t, str(path))
    height, width = check_image_size(height, width, f"{path}: bank image size")
    return keys, CameraTrajectory(w2c=w2c_t, K=K_t, width=width, height=height)


def save_bank_cameras(keys: Sequence[str], traj: CameraTrajectory, path: str | os.PathLike) -> Path:
    """Write ``{key: {"intrinsic", "extrinsic"}}`` atomically, in the order of ``keys``."""
    path = _resolve(path, CAMERAS_FILE)
    keys = [str(k) for k in keys]
    if len(keys) != len(traj):
        raise InputError(f"save_bank_cameras: {len(keys)} keys for {len(traj)} cameras; give one key per camera")
    if len(set(keys)) != len(keys):
        raise InputError("save_bank_cameras: keys must be unique")
    validate_cameras(traj.w2c, traj.K, f"bank to save as {path}")
    w2c, K = traj.w2c.detach().cpu().to(torch.float64), traj.K.detach().cpu().to(torch.float64)
    d = {k: {"intrinsic": K[i].tolist(), "extrinsic": w2c[i].tolist()} for i, k in enumerate(keys)}
    return write_json_atomic(path, d, indent=None)

