"""Point-cloud warp renderer: the reference's pytorch3d points rasteriser + alpha compositor.

Semantics (those of pytorch3d's ``rasterize_points`` + ``AlphaCompositor`` as the reference calls them):

* Projection is the plain OpenCV pinhole of :func:`cameras.project_points`; pixel (i, j) has its
  centre at (i + 0.5, j + 0.5). Points with view z < 0 are skipped (z >= 0 is kept).
* A point covers a pixel when ``d2 < r**2`` (strict), where ``d2`` is the squared distance between
  the projected point and the pixel centre in NDC units: pixels divided by ``s = min(H, W) / 2``
  (pytorch3d's NDC spans [-1, 1] on the shorter side).
* Per pixel the ``points_per_pixel`` covering points nearest in view z are kept (ascending z; exact
  ties keep the lower point index first), weighted ``w = 1 - d2 / r**2`` and composited front to
  back: ``C = sum_k w_k c_k prod_{j<k} (1 - w_j)``.
* Pixels that no point covers get the background colour (0 in [-1, 1] colour space = mid-grey)
  and mask 1 (hole); every other pixel has mask 0.

Geometry runs in float64 (float32 on devices without float64, e.g. MPS); outputs are float32.
The reference ran pytorch3d in float32, so results agree with it to ~1e-4 except where float32
rounding decided: a point within ~1e-6 (NDC) of a pixel's coverage circle, or two points closer in
depth than float32 resolves (their front-to-back order was arbitrary there).
Non-finite points, colours or cameras are rejected, not silently dropped: filter the cloud first
(e.g. ``keep = torch.isfinite(points).all(1)``).

Backends: ``"torch"`` (vectorised PyTorch on the input's device: a stable depth sort of the points,
splatting onto candidate pixels, one integer sort of the fragments by (pixel, depth rank)),
``"numba"`` (optional CPU kernel with per-pixel depth lists, no global sort, run on a pool of
``torch.get_num_threads()`` threads), ``"pytorch3d"`` (only
when importable; for comparison) and ``"auto"`` (torch on accelerators, numba on CPU when
available, else torch). torch and numba evaluate the same float64 expressions and give identical
results.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Sequence

import numpy as np
import torch

from ..cameras import CameraTrajectory, opencv_to_pytorch3d, project_points
from ..constants import RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC
from ..errors import InputError
from ..progress import ProgressFn, report
from ..sizes import MAX_IMAGE_SIDE
from ..threads import thread_map

BACKENDS = ("auto", "torch", "numba", "pytorch3d")
#: Largest points_per_pixel accepted.
MAX_POINTS_PER_PIXEL = 256
#: Rows per task of the numba kernel (frames x bands run on a thread pool), at most.
NUMBA_BAND_ROWS = 64
#: Memory budget of one numba task's per-pixel depth lists (12 bytes per entry).
_NUMBA_TASK_BYTES = 64 * 2**20
#: Candidate (point, pixel) pairs evaluated at once by the torch splatting.
_TORCH_CANDIDATES_PER_BATCH = 2**25


@functools.cache
def _importable(module: str, package: str | None = None) -> bool:
    try:
        importlib.import_module(module, package)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def numba_available() -> bool:
    """True when the optional numba CPU kernel can be used."""
    return _importable(".raster_numba", __package__)


def pytorch3d_available() -> bool:
    """True when pytorch3d's renderer is importable (comparison backend only)."""
    return _importable("pytorch3d.renderer")


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend ``render_point_cloud`` uses for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "numba" if torch.device(device).type == "cpu" and numba_available() else "torch"
    if backend == "numba" and not numba_available():
        raise InputError("backend='numba' needs the optional package numba (pip install numba); "
                         "use backend='torch' or 'auto' instead")
    if backend == "pytorch3d" and not pytorch3d_available():
        raise InputError("backend='pytorch3d' needs pytorch3d, which is not installed; "
                         "use backend='torch' or 'auto' instead")
    return backend


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def render_point_cloud(points, colors, K, w2c, height: int, width: int, *,
                       radius: float = RENDER_RADIUS_NDC,
                       points_per_pixel: int = RENDER_POINTS_PER_PIXEL,
                       background: float | Sequence[float] = 0.0, chunk: int = 4,
                       backend: str = "auto", progress: ProgressFn | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a coloured point cloud into every camera.

    Args:
        points: (N, 3) world points (OpenCV axes). colors: (N, 3), nominally in [-1, 1].
        K: (F, 3, 3) or (3, 3) pixel intrinsics for a (height, width) image. w2c: (F, 4, 4).
        radius: point radius in NDC units; points_per_pixel: depth-list length per pixel.
        background: hole colour (scalar or 3 values). chunk: frames rendered per batch.
        progress: called as ``progress(frames_done, F)`` after each chunk; may raise to stop.

    Returns:
        ``rgb`` (F, 3, H, W) float32 and ``mask`` (F, 1, H, W) float32 with 1 = hole, on the
        device of ``points``.
    """
    points, colors, K, w2c, bg = _validate(points, colors, K, w2c, height, width, radius,
                                           points_per_pixel, background, chunk)
    device = points.device
    name = resolve_backend(backend, device)
    n_frames = w2c.shape[0]
    rgb = torch.empty(n_frames, 3, height, width, dtype=torch.float32, device=device)
    mask = torch.empty(n_frames, 1, height, width, dtype=torch.float32, device=device)
    if name == "pytorch3d":
        def render_chunk(sl):
            return _render_pytorch3d(points, colors, K[sl], w2c[sl], height, width, radius,
                                     points_per_pixel, bg)
    else:
        work = torch.device("cpu") if name == "numba" else device
        gdt = _geometry_dtype(work)
        pts, cols, background = points.to(work, gdt), colors.to(work, gdt), bg.to(work, gdt)
        Kw, w2cw = K.to(work, gdt), w2c.to(work, gdt)
        raster = _raster_numba if name == "numba" else _raster_torch

        def render_chunk(sl):
            uv, z = project_points(pts, Kw[sl], w2cw[sl])
            return raster(uv[..., 0], uv[..., 1], z, cols, height, width, radius,
                          points_per_pixel, background)
    for start in range(0, n_frames, chunk):
        sl = slice(start, min(start + chunk, n_frames))
        out_rgb, out_mask = render_chunk(sl)
        rgb[sl], mask[sl] = out_rgb.to(device), out_mask.to(device)
        report(progress, sl.stop, n_frames)
    return rgb, mask


def render_warps(points, colors, trajectory: CameraTrajectory, image, height: int, width: int,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp renders along ``trajectory`` as the reference feeds them to the model.

    Frames 1..F-1 are rendered with :func:`render_point_cloud` (``kwargs`` pass through); frame 0
    is the input ``image`` (3, height, width) in [-1, 1] with mask 0. The trajectory's K is
    rescaled to (height, width) when its stated size differs.
    """
    if not isinstance(trajectory, CameraTrajectory):
        raise InputError(f"trajectory must be a CameraTrajectory, got {type(trajectory).__name__}")
    if len(trajectory) == 0:
        raise InputError("trajectory has no cameras; give at least one pose")
    _check_size(height, width)
    trajectory = trajectory.resized(height, width)
    image = torch.as_tensor(image)
    if image.shape != (3, height, width):
        raise InputError(f"image must be (3, {height}, {width}) in [-1, 1] to fill frame 0, got "
                         f"{tuple(image.shape)}; resize it to the render size first")
    points = torch.as_tensor(points)
    rest = len(trajectory) - 1
    device = points.device
    rgb = torch.empty(rest + 1, 3, height, width, dtype=torch.float32, device=device)
    mask = torch.empty(rest + 1, 1, height, width, dtype=torch.float32, device=device)
    if rest:
        rgb[1:], mask[1:] = render_point_cloud(points, colors, trajectory.K[1:], trajectory.w2c[1:],
                                               height, width, **kwargs)
    rgb[0] = image.to(device=device, dtype=torch.float32)
    mask[0] = 0.0
    return rgb, mask


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _check_size(height, width) -> None:
    for name, val in (("height", height), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise InputError(f"{name} must be an int, got {val!r}")
        if not 0 < val <= MAX_IMAGE_SIDE:
            raise InputError(f"{name} must be in 1..{MAX_IMAGE_SIDE} pixels, got {val}")


def _finite_tensor(x, name: str, shape_desc: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{name} must be a tensor/array of shape {shape_desc}: {exc}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise InputError(f"{name} must be numeric, got dtype {t.dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).sum()) if t.dim() else 1
        raise InputError(f"{name} contains non-finite values (NaN/inf) in {bad} row(s); remove them "
                         "first, e.g. keep = torch.isfinite(points).all(1)")
    return t


def _validate(points, colors, K, w2c, height, width, radius, k_max, background, chunk):
    _check_size(height, width)
    points = _finite_tensor(points, "points", "(N, 3)")
    if points.dim() != 2 or points.shape[1] != 3:
        raise InputError(f"points must have shape (N, 3), got {tuple(points.shape)}")
    colors = _finite_tensor(colors, "colors", "(N, 3)")
    if colors.shape != points.shape:
        raise InputError(f"colors must have shape {tuple(points.shape)} like points (one RGB "
                         f"row in [-1, 1] per point), got {tuple(colors.shape)}")
    w2c = _finite_tensor(w2c, "w2c", "(F, 4, 4)")
    if w2c.dim() == 2:
        w2c = w2c[None]
    if w2c.dim() != 3 or w2c.shape[1:] != (4, 4):
        raise InputError(f"w2c must have shape (F, 4, 4), got {tuple(w2c.shape)}")
    if w2c.shape[0] == 0:
        raise InputError("w2c holds no cameras (F = 0); give at least one pose")
    K = _finite_tensor(K, "K", "(F, 3, 3)")
    if K.dim() == 2:
        K = K[None]
    if K.dim() != 3 or K.shape[1:] != (3, 3) or K.shape[0] not in (1, w2c.shape[0]):
        raise InputError(f"K must have shape ({w2c.shape[0]}, 3, 3) or (3, 3), got {tuple(K.shape)}")
    K = K.expand(w2c.shape[0], 3, 3)
    if not bool(((K[:, 0, 0] > 0) & (K[:, 1, 1] > 0)).all()):
        raise InputError("K must have positive focal lengths fx, fy (pixel intrinsics "
                         "[[fx,0,cx],[0,fy,cy],[0,0,1]])")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise InputError(f"radius must be a positive number (NDC units), got {radius!r}")
    if (isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer))
            or not 1 <= k_max <= MAX_POINTS_PER_PIXEL):
        raise InputError(f"points_per_pixel must be an int in 1..{MAX_POINTS_PER_PIXEL}, got {k_max!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"chunk must be a positive int (frames per batch), got {chunk!r}")
    bg = torch.as_tensor(background, dtype=torch.float64).flatten()
    if bg.numel() == 1:
        bg = bg.expand(3)
    if bg.numel() != 3 or not bool(torch.isfinite(bg).all()):
        raise InputError(f"background must be one number or 3 numbers, got {background!r}")
    device = points.device
    return (points, colors.to(device), K.to(device), w2c.to(device), bg.clone())


def _geometry_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------

def _raster_torch(u, v, z, colors, height, width, radius, k_max, background):
    """Vectorised PyTorch rasteriser + compositor for projected points u, v, z of shape (F, N).

    Splats every in-front point onto its candidate pixels, orders the fragments by one integer
    sort on (pixel, depth rank) and composites the first ``k_max`` of each pixel. Only 1-D
    gathers are used (multi-dimensional advanced indexing is slow on CPU).
    """
    n_frames, n_points = u.shape
    dev, dt = u.device, u.dtype
    s = min(height, width) / 2.0
    s2, r2, r_px = s * s, radius * radius, radius * s
    n_side = math.ceil(2.0 * r_px) + 1  # candidates per axis, one spare (see raster_numba)
    n_pix = n_frames * height * width

    u, v, z = u.reshape(-1), v.reshape(-1), z.reshape(-1)
    valid = ((z >= 0) & (u > -r_px - 1.0) & (u < width + r_px + 1.0)
             & (v > -r_px - 1.0) & (v < height + r_px + 1.0))
    flat = valid.nonzero().squeeze(1)
    # Depth rank: stable, so equal depths keep the lower point index first.
    flat = flat.index_select(0, torch.sort(z.index_select(0, flat), stable=True).indices)
    n_cand = flat.numel()
    frame = torch.div(flat, n_points, rounding_mode="floor")
    point = flat - frame * n_points
    # Splat in batches of points so the candidate grid stays bounded for large radii.
    batch = max(1, _TORCH_CANDIDATES_PER_BATCH // (n_side * n_side))
    pieces = [_splat_torch(u.index_select(0, flat[b:b + batch]), v.index_select(0, flat[b:b + batch]),
                           frame[b:b + batch], b, height, width, s2, r2, r_px, n_side)
              for b in range(0, n_cand, batch)]
    if pieces:
        pix, rank, d2 = (torch.cat(t) for t in zip(*pieces))
    else:
        pix = rank = torch.zeros(0, dtype=torch.long, device=dev)
        d2 = torch.zeros(0, dtype=dt, device=dev)
    del pieces
    # (pixel, depth rank) pairs are unique, so one plain sort orders each pixel front to back.
    span = max(n_cand, 1)
    key, order = torch.sort(pix * span + rank)
    pix = torch.div(key, span, rounding_mode="floor")
    frag_point = point.index_select(0, key - pix * span)
    d2 = d2.index_select(0, order)
    del key, order, rank

    counts = torch.bincount(pix, minlength=n_pix)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.zeros(n_pix, 3, dtype=dt, device=dev)
    act = (counts > 0).nonzero().squeeze(1)
    cnt, first = counts.index_select(0, act), starts.index_select(0, act)
    trans = torch.ones(act.numel(), dtype=dt, device=dev)
    acc = torch.zeros(act.numel(), 3, dtype=dt, device=dev)
    for k in range(min(k_max, int(counts.max()) if n_pix else 0)):
        if k:
            more = cnt > k
            done = (~more).nonzero().squeeze(1)
            out.index_copy_(0, act.index_select(0, done), acc.index_select(0, done))
            more = more.nonzero().squeeze(1)
            act, cnt, first, trans, acc = (t.index_select(0, more) for t in (act, cnt, first, trans, acc))
        fi = first + k
        w = 1.0 - d2.index_select(0, fi) / r2
        acc = acc + (w * trans)[:, None] * colors.index_select(0, frag_point.index_select(0, fi))
        trans = trans * (1.0 - w)
    out.index_copy_(0, act, acc)

    hole = counts == 0
    out[hole] = background.to(dt)
    rgb = out.view(n_frames, height, width, 3).permute(0, 3, 1, 2).float()
    mask = hole.view(n_frames, 1, height, width).float()
    return rgb, mask


def _splat_torch(up, vp, frame, rank0, height, width, s2, r2, r_px, n_side):
    """Fragments (pixel index, depth rank, d2) of points at depth ranks rank0, rank0 + 1, ..."""
    dt = up.dtype
    col0 = torch.floor(up - 0.5 - r_px).long()
    row0 = torch.floor(vp - 0.5 - r_px).long()
    offs = torch.arange(n_side, device=up.device)
    du = up[:, None] - ((col0[:, None] + offs).to(dt) + 0.5)
    dv = vp[:, None] - ((row0[:, None] + offs).to(dt) + 0.5)
    d2 = ((du * du)[:, None, :] + (dv * dv)[:, :, None]) / s2  # (M, rows, cols)
    hit = (d2 < r2).view(-1).nonzero().squeeze(1)
    d2 = d2.view(-1).index_select(0, hit)
    local = torch.div(hit, n_side * n_side, rounding_mode="floor")
    cell = hit - local * (n_side * n_side)
    row = row0.index_select(0, local) + torch.div(cell, n_side, rounding_mode="floor")
    col = col0.index_select(0, local) + cell % n_side
    keep = ((row >= 0) & (row < height) & (col >= 0) & (col < width)).nonzero().squeeze(1)
    local = local.index_select(0, keep)
    pix = ((frame.index_select(0, local) * height + row.index_select(0, keep)) * width
           + col.index_select(0, keep))
    return pix, local + rank0, d2.index_select(0, keep)


def _raster_numba(u, v, z, colors, height, width, radius, k_max, background):
    """CPU kernel (see :mod:`raster_numba`): frames, then bands of rows, on a thread pool."""
    from .raster_numba import depth_order, raster_band

    n_frames = u.shape[0]
    s = min(height, width) / 2.0
    r_px = radius * s
    as_np = lambda t: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)  # noqa: E731
    u, v, z, colors, background = as_np(u), as_np(v), as_np(z), as_np(colors), as_np(background)
    us, vs, zs = np.empty_like(u), np.empty_like(u), np.empty_like(u)
    ps = np.empty(u.shape, np.int32)
    rgb = np.empty((n_frames, 3, height, width), np.float32)
    mask = np.empty((n_frames, height, width), np.float32)
    band = int(min(NUMBA_BAND_ROWS, max(1, _NUMBA_TASK_BYTES // (12 * width * k_max))))

    def order(f):
        return depth_order(z[f], u[f], v[f], height, width, r_px, us[f], vs[f], zs[f], ps[f])

    n_valid = thread_map(order, range(n_frames))

    def raster(task):
        f, y0 = task
        raster_band(u[f], v[f], colors, us[f], vs[f], zs[f], ps[f], n_valid[f], y0,
                    min(height, y0 + band), s * s, radius * radius, r_px, int(k_max), background,
                    rgb[f], mask[f])

    thread_map(raster, [(f, y0) for f in range(n_frames) for y0 in range(0, height, band)])
    return torch.from_numpy(rgb), torch.from_numpy(mask)[:, None]


def _render_pytorch3d(points, colors, K, w2c, height, width, radius, k_max, background):
    """pytorch3d's PointsRasterizer + AlphaCompositor called as the reference calls them."""
    from pytorch3d.renderer import (AlphaCompositor, PerspectiveCameras, PointsRasterizationSettings,
                                    PointsRasterizer)
    from pytorch3d.structures import Pointclouds

    dev, n = points.device, w2c.shape[0]
    pts, cols, K = points.float(), colors.float(), K.float()
    R, T = opencv_to_pytorch3d(w2c.double())
    cameras = PerspectiveCameras(
        focal_length=torch.stack([K[:, 0, 0], K[:, 1, 1]], -1),
        principal_point=K[:, :2, 2], R=R.float().to(dev), T=T.float().to(dev), in_ndc=False,
        image_size=torch.tensor([[height, width]] * n, device=dev), device=dev)
    settings = PointsRasterizationSettings(image_size=(height, width), radius=radius,
                                           points_per_pixel=k_max)
    cloud = Pointclouds(points=[pts] * n, features=[cols] * n)
    frags = PointsRasterizer(cameras=cameras, raster_settings=settings)(cloud)
    weights = 1.0 - frags.dists.permute(0, 3, 1, 2) / (radius * radius)
    compositor = AlphaCompositor(background_color=background.float().to(dev))
    rgb = compositor(frags.idx.long().permute(0, 3, 1, 2), weights,
                     cloud.features_packed().permute(1, 0))
    mask = (frags.zbuf[..., :1] == -1).permute(0, 3, 1, 2).float()
    return rgb.float(), mask
