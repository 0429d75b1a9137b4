"""Panoramic depth and the 360-degree point cloud of a panorama (the initial 3D cache of a
panorama scene). Panorama conventions are those of :mod:`.equirect`; world +z up, the panorama
centre at the origin (the frame of the panorama bank).

Depth follows the method of MoGe's own panorama inference (split into views, infer, merge):

1. **split**: perspective views of 90 x 90 deg looking at the 12 vertices of an icosahedron (they
   cover the sphere with overlap), world +z up in every view (:func:`split_cameras`);
2. **infer**: a depth function (:data:`geometry.depth.DepthFn`; MoGe told the views' field of view
   in real runs, :func:`moge_view_depth_fn`; the exact depth in tests) gives each view a z-depth,
   turned into distance along the pixel rays;
3. **merge** (:func:`merge_view_distances`): every view's log-distance is warped into the
   panorama; per panorama pixel the differences to the right (wrapping over the seam) and lower
   neighbour are averaged over the views that see both pixels, and the panorama log-distance is
   the least-squares fit to those differences plus a weak pull (:data:`MERGE_DATA_WEIGHT`) towards
   the views' mean log-distance. Differences alone are blind to per-view scale errors (no seams)
   but leave the overall scale free; the weak pull fixes it to the views' metric scale. Solved
   coarse to fine (sides halved down to :data:`MERGE_COARSEST`) by conjugate gradients.

Users may bring their own equirectangular distance map instead (:func:`load_panorama_distance`).

**Lifting** (:func:`panorama_points`) places each pixel at its distance along its direction, with
the single-view lifting's rules (:mod:`.depth`): far distances contracted, depth edges dropped
(Sobel test on the disparity, the seam wrapped), plus equal-area thinning: a row at polar angle
a keeps every k-th pixel, k = round(1 / sin a), so the cloud is not crowded at the poles.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_array, diags, vstack

from ..cameras import CameraTrajectory, as_tensor, intrinsics_from_fov, invert_rigid, look_at_rotation, make_pose, \
    pixel_rays, world_down_vector
from ..constants import DEPTH_CONTRACT_FACTOR, SOBEL_EDGE_THRESHOLD
from ..errors import InputError
from ..progress import ProgressFn, report
from .depth import (DepthFn, _check_count, _depth_tensor, boundary_mask, contract_depth, depth_map, load_depth_map,
                    resize_depth, valid_depth)
from .equirect import check_panorama_size, equirect_directions, perspective_from_equirect, project_directions, \
    sample_image
from .pointcloud import PointCloud

#: Split views: field of view (both axes, degrees) and side in pixels (MoGe's panorama script).
SPLIT_FOV_DEG = 90.0
SPLIT_SIZE = 512
#: The merge runs at most at this panorama width (MoGe's), then is resized to the panorama.
MERGE_MAX_WIDTH = 1920
#: Coarsest merge level: the longer side is at most this.
MERGE_COARSEST = 256
#: Weight of the pull towards the views' mean log-distance, relative to one difference equation.
MERGE_DATA_WEIGHT = 1e-3
#: Conjugate-gradient stopping rule per merge level.
MERGE_RTOL = 1e-7
MERGE_MAX_ITERATIONS = 2000


# --------------------------------------------------------------------------------------------
# Split views
# --------------------------------------------------------------------------------------------

def icosahedron_vertices() -> torch.Tensor:
    """The 12 unit vertices (12, 3) of a regular icosahedron, (0, +-1, +-g) and cyclic, g the golden ratio."""
    g = (1.0 + 5.0 ** 0.5) / 2.0
    base = [(0.0, a, b * g) for a in (1.0, -1.0) for b in (1.0, -1.0)]
    verts = torch.tensor([p[k:] + p[:k] for k in range(3) for p in base], dtype=torch.float64)
    return verts / verts.norm(dim=-1, keepdim=True)


def split_cameras(size: int = SPLIT_SIZE) -> CameraTrajectory:
    """The split views: at the origin, looking at the icosahedron vertices, camera y = world down."""
    look = icosahedron_vertices()
    R = look_at_rotation(torch.zeros_like(look), look, up=world_down_vector("panorama"))
    K = intrinsics_from_fov(size, size, SPLIT_FOV_DEG, SPLIT_FOV_DEG)
    return CameraTrajectory(w2c=invert_rigid(make_pose(R, torch.zeros_like(look))), K=K, width=size, height=size)


def moge_view_depth_fn(model: torch.nn.Module, **estimate_kwargs: Any) -> DepthFn:
    """A DepthFn running MoGe (:func:`.moge.estimate_depth`) with the view's known horizontal FoV."""
    from .moge import estimate_depth

    def fn(image: np.ndarray, K: torch.Tensor, w2c: torch.Tensor) -> dict:
        width = np.asarray(image).shape[1]
        fov_x = math.degrees(2.0 * math.atan(width / 2.0 / float(as_tensor(K)[0, 0])))
        return estimate_depth(model, image, fov_x=fov_x, **estimate_kwargs)

    fn.resume_key = lambda: {"moge": getattr(model, "checkpoint_stamps", None), "known_fov": True, **estimate_kwargs}
    return fn


def view_distances(views, cameras: CameraTrajectory, depth_fn: DepthFn, progress: ProgressFn | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance maps (F, h, w) float64 and validity (F, h, w) of views through ``depth_fn`` (z-depth)."""
    h, w = cameras.height, cameras.width
    norms = pixel_rays(cameras.K[0], h, w).norm(dim=-1)
    dist, valid = [], []
    for f in range(len(cameras)):
        z = depth_map(depth_fn(np.asarray(views[f]), cameras.K[f], cameras.w2c[f])).to(torch.float64)
        if tuple(z.shape) != (h, w):
            raise InputError(f"depth function returned a {tuple(z.shape)} map for a {h}x{w} panorama view; it must "
                             "return one z-depth per pixel of the image it is given")
        ok = torch.isfinite(z) & (z > 0)
        dist.append(torch.where(ok, z, torch.zeros_like(z)) * norms)
        valid.append(ok)
        report(progress, f + 1, len(cameras))
    return torch.stack(dist), torch.stack(valid)


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------

def _warp_logs(distances: torch.Tensor, valid: torch.Tensor, cameras: CameraTrajectory, height: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's log-distance sampled at the panorama's pixel directions (F, H, W), and where it
    is defined (inside the view, all four bilinear neighbours valid)."""
    dirs = equirect_directions(height, width)
    h, w = cameras.height, cameras.width
    logs = torch.zeros(len(cameras), height, width, dtype=torch.float64)
    seen = torch.zeros(len(cameras), height, width, dtype=torch.bool)
    for f in range(len(cameras)):
        xy, cos = project_directions(dirs, cameras.select([f]))
        xy, cos = xy[0], cos[0]
        inside = (cos > 0) & (xy[..., 0] >= 0.5) & (xy[..., 0] <= w - 0.5) & (xy[..., 1] >= 0.5) \
            & (xy[..., 1] <= h - 0.5)
        ok = valid[f]
        maps = torch.stack([torch.where(ok, distances[f].clamp_min(1e-30).log(), torch.zeros_like(distances[f])),
                            ok.to(torch.float64)], dim=-1)
        sampled = sample_image(maps, xy[inside])
        good = sampled[:, 1] > 1.0 - 1e-9
        idx = inside.nonzero(as_tuple=True)
        logs[f][idx] = torch.where(good, sampled[:, 0], torch.zeros_like(sampled[:, 0]))
        seen[f][idx] = good
    return logs, seen


def _difference_rows(p: np.ndarray, q: np.ndarray, n: int) -> csr_array:
    """Sparse rows x[q] - x[p]."""
    m = len(p)
    data = np.tile(np.array([-1.0, 1.0]), m)
    cols = np.stack([p, q], axis=1).reshape(-1)
    return csr_array((data, cols, np.arange(0, 2 * m + 1, 2)), shape=(m, n))


def _fuse(logs: torch.Tensor, seen: torch.Tensor, init: torch.Tensor | None, data_weight: float,
          progress: ProgressFn | None) -> torch.Tensor:
    """Least-squares log-distance (H, W) from the views' warped log-distances (module docstring)."""
    _, height, width = logs.shape
    n = height * width
    index = np.arange(n).reshape(height, width)
    L, V = logs.numpy(), seen.numpy()

    def mean_difference(a_L, a_V, b_L, b_V):
        both = a_V & b_V
        count = both.sum(0)
        return ((b_L - a_L) * both).sum(0) / np.maximum(count, 1), count > 0

    gx, okx = mean_difference(L, V, np.roll(L, -1, axis=2), np.roll(V, -1, axis=2))  # wraps over the seam
    gy, oky = mean_difference(L[:, :-1], V[:, :-1], L[:, 1:], V[:, 1:])
    D = vstack([_difference_rows(index[okx], np.roll(index, -1, axis=1)[okx], n),
                _difference_rows(index[:-1][oky], index[1:][oky], n)]).tocsr()
    g = np.concatenate([gx[okx], gy[oky]])
    count = V.sum(0)
    data = np.where(count > 0, (L * V).sum(0) / np.maximum(count, 1), 0.0).reshape(-1)
    weight = data_weight * (count > 0).reshape(-1)
    reference = float(data[weight > 0].mean()) if bool((weight > 0).any()) else 0.0
    eps = 1e-9  # keeps pixels no view sees determined (they end up masked out)
    A = (D.T @ D + diags(weight + eps)).tocsr()
    b = D.T @ g + weight * data + eps * reference
    x0 = np.where(weight > 0, data, reference) if init is None else init.numpy().reshape(-1)
    return conjugate_gradient(A, b, x0, progress=progress).reshape(height, width)


def conjugate_gradient(A: csr_array, b: np.ndarray, x0: np.ndarray, rtol: float = MERGE_RTOL,
                       max_iterations: int = MERGE_MAX_ITERATIONS, progress: ProgressFn | None = None) -> torch.Tensor:
    """Jacobi-preconditioned conjugate gradients for a symmetric positive definite sparse ``A``
    until |A x - b| <= rtol |b|. Written without BLAS vector calls, whose threads thrash on busy
    machines (scipy's cg was 50x slower there). ``progress(iteration, max_iterations)`` every 25
    iterations; it may raise to stop."""
    def dot(a: np.ndarray, c: np.ndarray) -> float:
        return float(np.multiply(a, c).sum())

    inv_diag = 1.0 / A.diagonal()
    x = x0.astype(np.float64).copy()
    r = b - A @ x
    z = inv_diag * r
    p, rz = z.copy(), dot(r, z)
    stop = rtol * math.sqrt(dot(b, b))
    for iteration in range(max_iterations):
        if math.sqrt(dot(r, r)) <= stop:
            break
        if iteration % 25 == 0:
            report(progress, iteration, max_iterations)
        Ap = A @ p
        alpha = rz / dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        z = inv_diag * r
        rz, rz_old = dot(r, z), rz
        p = z + (rz / rz_old) * p
    return torch.from_numpy(x)


def merge_view_distances(distances, valid, cameras: CameraTrajectory, height: int, width: int, *,
                         data_weight: float = MERGE_DATA_WEIGHT, coarsest: int = MERGE_COARSEST,
                         progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One equirectangular distance map (H, W) float32 and its mask from per-view distances.

    ``distances`` (F, h, w) along the pixel rays of ``cameras`` (views at the panorama centre),
    ``valid`` (F, h, w). Pixels no view sees validly are 0 and False in the mask.
    ``progress`` is called during the solve (see :func:`conjugate_gradient`) and may raise to stop.
    """
    height, width = check_panorama_size(height, width, "merged panorama size")
    distances = as_tensor(distances, dtype=torch.float64)
    valid = torch.as_tensor(valid, dtype=torch.bool)

    def level(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        init = None
        if max(h, w) > coarsest and h >= 4:
            coarse, _ = level(h // 2, 2 * (h // 2))
            init = F.interpolate(coarse[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        logs, seen = _warp_logs(distances, valid, cameras, h, w)
        return _fuse(logs, seen, init, data_weight, progress), seen.any(dim=0)

    log_distance, mask = level(height, width)
    return torch.where(mask, log_distance.exp(), torch.zeros_like(log_distance)).float(), mask


def panorama_distance(panorama, depth_fn: DepthFn, *, view_size: int = SPLIT_SIZE,
                      max_merge_width: int = MERGE_MAX_WIDTH, progress: ProgressFn | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance map (H, W) float32 (0 = unknown) and mask of a panorama (H, W, 3) by split/infer/merge.

    The merge runs at ``min(W, max_merge_width)`` wide and is resized to the panorama
    (log-bilinear distance, nearest mask). ``progress(done, views + 1)`` ticks once per view, then
    repeats ``(views, views + 1)`` during the merge; it may raise to stop.
    """
    height, width = check_panorama_size(*np.asarray(panorama).shape[:2])
    cams = split_cameras(view_size)
    views = perspective_from_equirect(panorama, cams)
    total = len(cams) + 1
    dist, valid = view_distances(views, cams, depth_fn, lambda i, _n: report(progress, i, total))
    merge_w = min(width, int(max_merge_width)) // 2 * 2
    distance, mask = merge_view_distances(dist, valid, cams, merge_w // 2, merge_w,
                                          progress=lambda _i, _n: report(progress, total - 1, total))
    if merge_w != width:
        logd = torch.where(mask, distance.double().clamp_min(1e-30).log(), torch.zeros_like(distance, dtype=torch.float64))
        logd = F.interpolate(logd[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        mask = resize_depth(mask.float(), height, width) > 0.5
        distance = torch.where(mask, logd.exp(), torch.zeros_like(logd)).float()
    report(progress, total, total)
    return distance, mask


def load_panorama_distance(source, height: int, width: int) -> torch.Tensor:
    """A user's equirectangular distance map (H, W) float32: an array/tensor or a .npy/.npz/16-bit
    .png file (:func:`.depth.load_depth_map`; PNG values in millimetres). Values are distances
    from the panorama centre along each pixel's direction; 0, NaN and inf mean unknown. A map of
    another 2:1 size is resized (nearest) to (height, width)."""
    if isinstance(source, (str, os.PathLike)):
        d = load_depth_map(source)
    else:
        d = _depth_tensor(source, "panorama depth")
    d = d.float()
    check_panorama_size(d.shape[0], d.shape[1], "panorama depth")
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    if bool((d < 0).any()):
        raise InputError("panorama depth has negative values; it must hold distances >= 0 (0 = unknown)")
    if tuple(d.shape) != (height, width):
        d = resize_depth(d, height, width)
    return d


# --------------------------------------------------------------------------------------------
# Lifting
# --------------------------------------------------------------------------------------------

def equal_area_mask(height: int, width: int) -> torch.Tensor:
    """(H, W) bool: row i keeps every k-th column, k = round(1 / sin(polar angle of row i))."""
    polar = (torch.arange(height, dtype=torch.float64) + 0.5) * (math.pi / height)
    stride = torch.clamp(torch.round(1.0 / polar.sin()), min=1).long()
    return (torch.arange(width)[None, :] % stride[:, None]) == 0


def panorama_surface(distance, mask=None, contract: float | None = DEPTH_CONTRACT_FACTOR
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every valid pixel's point (H, W, 3) float64 (world, z up) at its (contracted) distance, and
    the validity (H, W): the whole panoramic surface, which :func:`panorama_points` thins."""
    d, valid = valid_depth(distance, mask)
    check_panorama_size(d.shape[0], d.shape[1], "panorama depth")
    if contract:
        d = contract_depth(d, contract)
    return equirect_directions(*d.shape) * d.double()[..., None], valid


def panorama_points(panorama, distance, mask=None, *, edge_threshold: float = SOBEL_EDGE_THRESHOLD,
                    contract: float | None = DEPTH_CONTRACT_FACTOR, thin: bool = True) -> PointCloud:
    """Coloured 360-degree cloud of a panorama (H, W, 3) uint8 and its distance map (H, W).

    World frame: the panorama's (z up, centre at the origin). See the module docstring for the
    contraction, edge and thinning rules; ``contract`` None/0 keeps distances as they are. The
    edge test is relative to the disparity range per pixel, so small panoramas (a few hundred
    pixels wide) need a lower ``edge_threshold`` than the reference's 0.35.
    """
    rgb = torch.from_numpy(np.require(np.asarray(panorama), requirements=("C", "W")))
    height, width = check_panorama_size(rgb.shape[0], rgb.shape[1])
    if rgb.dim() != 3 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise InputError(f"panorama must be RGB uint8 (H, W, 3); got {tuple(rgb.shape)} {rgb.dtype}")
    surface, valid = panorama_surface(distance, mask, contract)
    if tuple(valid.shape) != (height, width):
        raise InputError(f"panorama depth {tuple(valid.shape)} and image {(height, width)} differ; resize the depth "
                         "(load_panorama_distance does)")
    radius = surface.norm(dim=-1)
    wrapped = torch.cat([radius[:, -1:], radius, radius[:, :1]], dim=1)  # neighbours across the 0/360 seam
    keep = valid & ~boundary_mask(wrapped, edge_threshold)[:, 1:-1]
    if thin:
        keep &= equal_area_mask(height, width)
    _check_count(int(keep.sum()), "panorama depth")
    return PointCloud(surface[keep].float(), rgb[keep])
