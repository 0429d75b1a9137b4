"""Depth map -> coloured point cloud, exactly as the reference's ``run_camera_control``.

Steps of :func:`lift_depth`:

1. invalid pixels (depth 0, or outside ``mask``) are set to 0;
2. far depths are contracted beyond ``contract`` x the (lower) median valid depth;
3. edges are found on the disparity of the *contracted* depth (:func:`boundary_mask`);
4. pixels that are valid and not edges are unprojected through pixel centres with the inverse of
   ``w2c`` (:func:`worldstereo_core.cameras.unproject_depth`), in row-major pixel order.

Users who bring their own geometry can pass a depth map (:func:`load_depth_map` reads .npy, .npz
and 16-bit PNG) or a point map (:func:`points_from_pointmap`, :func:`load_point_map`).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import as_tensor, invert_rigid, unproject_depth
from ..constants import DEPTH_CONTRACT_FACTOR, SOBEL_EDGE_THRESHOLD
from ..errors import InputError
from .pointcloud import PointCloud

#: Fewest surviving points for a usable scene (the reference rejects <= 8).
MIN_POINTS = 9
#: Default PNG depth scale: stored value / scale = depth (millimetres -> metres).
PNG_DEPTH_SCALE = 1000.0
#: How values in 0..1 (a depth image from another model) map to depth (:func:`depth_from_values`).
DEPTH_ENCODINGS = ("depth = value x scale", "bright = near (near..far)", "bright = far (near..far)")

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))

#: ``depth_fn(image uint8 (H,W,3), K (3,3) for that image, w2c (4,4)) -> depth (H,W)`` (0 = invalid),
#: or a dict with a ``"depth"`` entry and optionally ``"mask"`` and ``"intrinsics_normalised"`` (what
#: :func:`.moge.estimate_depth` returns; :func:`.start_view.ViewDepth.of` reads all three).
DepthFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor], Any]


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------

def _depth_tensor(depth, name: str = "depth") -> torch.Tensor:
    """(H, W) float tensor (float32 unless float64 was given) from (H,W), (1,H,W) or (1,1,H,W)."""
    d = depth if isinstance(depth, torch.Tensor) else torch.as_tensor(np.asarray(depth))
    while d.dim() > 2 and d.shape[0] == 1:
        d = d[0]
    if d.dim() != 2:
        raise InputError(f"{name} must be a single (H, W) map; got shape {tuple(depth.shape)}")
    return d.to(torch.float64 if d.dtype == torch.float64 else torch.float32)


def _mask_tensor(mask, shape: tuple[int, ...], device, what: str) -> torch.Tensor:
    """Boolean (H, W) mask (non-zero = keep) checked against ``shape``."""
    m = _depth_tensor(mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask)), "mask")
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"mask shape {tuple(m.shape)} does not match the {what} size {tuple(shape)}")
    return m.to(device) != 0


def _matrix(x, shape: tuple[int, int], name: str, dtype, device) -> torch.Tensor:
    m = as_tensor(x, dtype=dtype, device=device)
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != shape:
        raise InputError(f"{name} must be a {shape[0]}x{shape[1]} matrix; got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return m


def image_to_rgb01(image, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Colours (H, W, 3) float32 in [0, 1] from an image in one of the accepted layouts.

    * uint8, (H, W, 3) or (3, H, W): 0..255;
    * float (3, H, W) (reference layout): values in [-1, 1] unless ``value_range`` says otherwise;
    * float (H, W, 3) (ComfyUI IMAGE layout, a batch of 1 allowed): values in [0, 1] unless
      ``value_range`` says otherwise.
    """
    img = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    while img.dim() > 3 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or 3 not in (img.shape[0], img.shape[-1]):
        raise InputError(f"image must be (H, W, 3) or (3, H, W); got shape {tuple(image.shape)}")
    channels_last = img.shape[-1] == 3
    hwc = img if channels_last else img.permute(1, 2, 0)
    if img.dtype == torch.uint8:
        return (hwc.float() / 255.0).contiguous()
    if not img.is_floating_point():
        raise InputError(f"image dtype {img.dtype} is not supported; use uint8 or float")
    lo, hi = value_range if value_range is not None else ((0.0, 1.0) if channels_last else (-1.0, 1.0))
    tol = 1e-3 * (hi - lo)
    if hwc.numel() and (float(hwc.min()) < lo - tol or float(hwc.max()) > hi + tol):
        raise InputError(
            f"float image in {'(H, W, 3)' if channels_last else '(3, H, W)'} layout must hold values in "
            f"[{lo:g}, {hi:g}]; got [{float(hwc.min()):.3g}, {float(hwc.max()):.3g}]. "
            "Pass uint8 or rescale the image")
    return ((hwc.float() - lo) / (hi - lo)).clamp(0.0, 1.0).contiguous()


def _image_for(image, height: int, width: int) -> torch.Tensor:
    rgb = image_to_rgb01(image)
    if tuple(rgb.shape[:2]) != (height, width):
        raise InputError(f"image size {tuple(rgb.shape[:2])} does not match the depth size {(height, width)}; "
                         "resize one of them first")
    return rgb


def valid_depth(depth, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth with 0 outside ``mask``, validity mask depth > 0); rejects unusable maps.

    Raises :class:`InputError` for NaN/inf or negative values inside the mask, or no valid pixel.
    """
    d = _depth_tensor(depth)
    if mask is not None:
        d = torch.where(_mask_tensor(mask, d.shape, d.device, "depth"), d, torch.zeros_like(d))
    if not bool(torch.isfinite(d).all()):
        raise InputError("depth contains NaN or infinite values; set invalid pixels to 0 or pass a mask "
                         "that excludes them")
    if bool((d < 0).any()):
        raise InputError("depth contains negative values; depth must be a z-distance >= 0 (0 = invalid)")
    valid = d > 0
    if not bool(valid.any()):
        raise InputError("depth is zero everywhere (no valid pixel); check the depth source or the mask")
    return d, valid


def depth_map(output: Any) -> torch.Tensor:
    """The (H, W) depth of a depth function's output (a tensor/array or a dict with ``"depth"``)."""
    if isinstance(output, dict):
        if "depth" not in output:
            raise InputError(f"depth function returned a dict without 'depth' (keys {sorted(output)})")
        output = output["depth"]
    d = output if isinstance(output, torch.Tensor) else torch.as_tensor(np.asarray(output))
    return d.detach().to("cpu", torch.float32)


# --------------------------------------------------------------------------------------------
# Reference steps
# --------------------------------------------------------------------------------------------

def contract_depth(depth, factor: float = DEPTH_CONTRACT_FACTOR) -> torch.Tensor:
    """Contract depths beyond mid = ``factor`` x lower-median(depth > 0) to 2 mid - mid^2/(d + 1e-6)."""
    d = _depth_tensor(depth)
    pos = d[d > 0]
    if pos.numel() == 0:
        return d.clone()
    mid = factor * torch.median(pos)  # torch.median = lower middle value, as the reference
    return torch.where(d > mid, 2 * mid - mid * mid / (d + 1e-6), d)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Un-normalised 3x3 Sobel gradient magnitude of an (H, W) map, replicate padding."""
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2,1,3,3): d/dx, d/dy
    padded = F.pad(x[None, None], (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernels)[0]
    return torch.sqrt(g[0] ** 2 + g[1] ** 2)


def boundary_mask(depth, threshold: float = SOBEL_EDGE_THRESHOLD) -> torch.Tensor:
    """Depth-edge pixels (H, W) bool: exp(-10 |Sobel(normalised disparity)|) < ``threshold``.

    Disparity = 1 / (depth + 1e-7), min-max normalised over the whole map (+1e-6); zero-depth
    (invalid) pixels thus have a huge disparity, so their neighbours become edges.
    """
    d = _depth_tensor(depth)
    disp = 1.0 / (d + 1e-7)
    disp = (disp - disp.min()) / (disp.max() - disp.min() + 1e-6)
    return torch.exp(-10.0 * sobel_magnitude(disp)) < threshold


def keep_mask(depth, mask=None, *, sobel_threshold: float = SOBEL_EDGE_THRESHOLD,
              contract: float | None = DEPTH_CONTRACT_FACTOR) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels kept as points (H,W) bool, the depth used for them): valid and not an edge."""
    d, valid = valid_depth(depth, mask)
    if contract:
        d = contract_depth(d, contract)
    keep = valid & ~boundary_mask(d, sobel_threshold)
    return keep, d


def _check_count(n: int, what: str) -> None:
    if n < MIN_POINTS:
        raise InputError(f"only {n} valid points survive from the {what} (need at least {MIN_POINTS}); "
                         "the map is empty, masked out or all edges. Check the input and the mask")


def lift_depth(depth, image, K, w2c, *, mask=None, sobel_threshold: float = SOBEL_EDGE_THRESHOLD,
               contract: float | None = DEPTH_CONTRACT_FACTOR) -> PointCloud:
    """Point cloud of a z-depth map seen by camera (``K`` pixels, ``w2c``), reference behaviour.

    ``depth`` (H, W): 0 = invalid; ``image``: see :func:`image_to_rgb01`; ``K`` (3,3) for the
    (H, W) grid; ``w2c`` (4,4). ``contract`` None or 0 disables depth contraction. Points come
    out in row-major pixel order with colours in [0, 1].
    """
    keep, d = keep_mask(depth, mask, sobel_threshold=sobel_threshold, contract=contract)
    H, W = d.shape
    rgb = _image_for(image, H, W).to(d.device)
    K = _matrix(K, (3, 3), "K", d.dtype, d.device)
    w2c = _matrix(w2c, (4, 4), "w2c", d.dtype, d.device)
    _check_count(int(keep.sum()), "depth map")
    world = unproject_depth(d, K, invert_rigid(w2c))
    return PointCloud(world[keep], rgb[keep])


def points_from_pointmap(pointmap, image, *, c2w=None, mask=None) -> PointCloud:
    """Point cloud of a per-pixel point map (H, W, 3); non-finite points and masked pixels dropped.

    The point map is in world coordinates, or in camera coordinates (OpenCV axes) when ``c2w``
    (4,4) is given to place it in the world. Row-major pixel order, colours in [0, 1].
    """
    p = pointmap if isinstance(pointmap, torch.Tensor) else torch.as_tensor(np.asarray(pointmap))
    while p.dim() > 3 and p.shape[0] == 1:
        p = p[0]
    if p.dim() != 3 or p.shape[-1] != 3:
        raise InputError(f"point map must have shape (H, W, 3); got {tuple(pointmap.shape)}")
    p = p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    H, W = p.shape[:2]
    keep = torch.isfinite(p).all(dim=-1)
    if mask is not None:
        keep &= _mask_tensor(mask, (H, W), p.device, "point map")
    rgb = _image_for(image, H, W).to(p.device)
    _check_count(int(keep.sum()), "point map")
    pts = p[keep]
    if c2w is not None:
        c2w = _matrix(c2w, (4, 4), "c2w", p.dtype, p.device)
        pts = pts @ c2w[:3, :3].T + c2w[:3, 3]
    return PointCloud(pts, rgb[keep])


def resize_depth(depth, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of a depth map (never blends valid depth with invalid zeros)."""
    d = _depth_tensor(depth)
    return F.interpolate(d[None, None], size=(height, width), mode="nearest-exact")[0, 0]


def depth_from_values(values: torch.Tensor, encoding: str, scale: float, near: float, far: float) -> torch.Tensor:
    """Depth (H, W) float32 from values in 0..1 according to ``encoding`` (see :data:`DEPTH_ENCODINGS`)."""
    v = values.float()
    if encoding == DEPTH_ENCODINGS[0]:
        return v * float(scale)
    if not 0 < near < far:
        raise InputError(f"need 0 < near < far, got near={near}, far={far}")
    if encoding == DEPTH_ENCODINGS[1]:  # bright = near: linear in disparity
        return 1.0 / (1.0 / far + v * (1.0 / near - 1.0 / far))
    if encoding == DEPTH_ENCODINGS[2]:
        return near + v * (far - near)
    raise InputError(f"encoding must be one of {DEPTH_ENCODINGS}, got {encoding!r}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _load_array(path: str | os.PathLike, key: str | None, preferred: tuple[str, ...], what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"unsupported {what} file type {suffix!r} ({path.name}); use .npy or .npz"
                         + (" or a 16-bit .png" if what == "depth" else ""))
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is None:
                    key = next((k for k in preferred if k in names), names[0] if len(names) == 1 else None)
                if key not in names:
                    raise InputError(f"{path.name} holds arrays {names}; pass key= to choose the {what}")
                arr = z[key]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable {what} file ({exc}); it may be empty, truncated or hold Python "
                         f"objects. Save the {what} as a float array, e.g. numpy.save(path, "
                         f"{what.replace(' ', '_')}.astype('float32'))") from exc
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
        raise InputError(f"{path}: the {what} must be a non-empty numeric array, got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)} of shape {getattr(arr, 'shape', '?')}")
    return arr


def load_depth_map(path: str | os.PathLike, *, key: str | None = None,
                   png_scale: float = PNG_DEPTH_SCALE) -> torch.Tensor:
    """Read an (H, W) z-depth map from .npy, .npz (``key`` or 'depth') or a 16-bit PNG.

    PNG values are divided by ``png_scale`` (default 1000: millimetres -> metres); 0 = invalid.
    NaN/inf in .npy/.npz files are kept: pass a mask to :func:`lift_depth` or set them to 0.
    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        import cv2

        if not path.is_file():
            raise InputError(f"depth file not found: {path}")
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.dtype != np.uint16 or raw.ndim != 2:
            raise InputError(f"{path.name}: a depth PNG must be single-channel 16-bit "
                             "(values / png_scale = depth); save depth as 16-bit PNG, .npy or .npz")
        if not png_scale > 0:
            raise InputError(f"png_scale must be > 0; got {png_scale}")
        return torch.from_numpy(raw.astype(np.float32) / np.float32(png_scale))
    arr = _load_array(path, key, ("depth",), "depth")
    return _depth_tensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), f"depth map {path}")


def load_point_map(path: str | os.PathLike, *, key: str | None = None) -> torch.Tensor:
    """Read an (H, W, 3) point map from .npy or .npz (``key``, or 'points' / 'pointmap')."""
    arr = _load_array(path, key, ("points", "pointmap", "point_map"), "point map")
    arr = np.squeeze(arr)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"{Path(path).name}: point map must have shape (H, W, 3); got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
