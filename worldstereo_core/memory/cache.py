"""The paper's global 3D cache (GGM memory), which the release leaves out.

The cache is a coloured point cloud in the world frame of the scene. It starts as the point cloud
of the start view (``lift_start_view``) and, in ``"global"`` mode, grows after every trajectory:

1. each kept frame of the generated clip (the frames the memory bank keeps) gets a depth map from
   a depth function (MoGe in real runs, a deterministic synthetic one in tests);
2. the cache is culled to the frame's frustum and projected into its camera once, in float32
   (:class:`.cache_view.CacheView`, used by steps 3 and 4, so a frame's work grows with the points
   in view, not with the cache); correspondences: the nearest cache point of every pixel is paired
   with the point lifted from the new depth at that point's pixel position (same camera, same
   ray), so no feature matching is involved;
3. a similarity (rotation, translation and **scale**, since monocular metric depth drifts from frame
   to frame) is fitted with RANSAC + Umeyama (:func:`geometry.alignment.umeyama_ransac`) and applied
   to the new points;
4. only new points that fill holes are added: pixels that no cache point in view covers by the
   warp renderer's rule (so the hole mask of a render); statistical outlier removal cleans them; a
   voxel test drops points whose voxel the cache (or an earlier new point) already occupies, so
   existing geometry is never thinned or shifted;
5. the next trajectory's render and mask come from the merged cloud (:meth:`PointCache.render`).

Past ``CacheSettings.max_points`` the cache is voxel-thinned once (the reference's adaptive voxel
search); from then on new points also need a free voxel of the size found, so it is not re-thinned
as a whole at every update. The cache and its merge live on the loop's device (the GPU when there
is one).

``"release"`` mode keeps the start-view cloud unchanged (the released code never updates it; its
multi-trajectory runs take pre-rendered warps from render folders as they are).

Frames whose alignment fails (too few correspondences, no RANSAC consensus, a degenerate fit) are
skipped and recorded, never merged unaligned. Everything is deterministic (seeded RANSAC), and
:meth:`PointCache.save` / :meth:`PointCache.load` round-trip exactly, so a resumed loop reproduces an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import CameraTrajectory, as_tensor, invert_rigid, unproject_pixels
from ..constants import RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC, SOBEL_EDGE_THRESHOLD
from ..errors import CheckpointError, InputError
from ..geometry.alignment import Similarity, umeyama_ransac
from ..geometry.depth import MIN_POINTS, DepthFn, depth_map, image_to_rgb01, keep_mask
from ..geometry.pointcloud import (ADAPTIVE_VOXEL_TOLERANCE, PointCloud, adaptive_voxel_downsample_size,
                                   first_in_voxel, stable_argsort, statistical_outlier_removal, voxel_key_tensor)
from ..geometry.renderer import render_warps
from ..geometry.start_view import ViewDepth, lift_start_view
from ..io.atomic import atomic_path
from ..io.images import load_image
from ..progress import ProgressFn, report
from ..threads import single_threaded_ops
from .cache_view import CELL_FRACTION, CacheView, CellIndex, cell_keys

CACHE_MODES = ("release", "global")
CACHE_FILE_VERSION = 1

def moge_depth_fn(model: torch.nn.Module, **estimate_kwargs: Any) -> DepthFn:
    """A :data:`geometry.depth.DepthFn` running MoGe (:func:`geometry.moge.estimate_depth`); cameras are ignored."""
    from ..geometry.moge import estimate_depth

    def fn(image: np.ndarray, K: torch.Tensor, w2c: torch.Tensor) -> dict:
        return estimate_depth(model, image, **estimate_kwargs)

    fn.resume_key = lambda: {"moge": getattr(model, "checkpoint_stamps", None), **estimate_kwargs}
    return fn


@dataclass(frozen=True)
class CacheSettings:
    """Tuning of the cache update. Lengths are fractions of the scene scale (start-view median depth)
    or of the camera-to-cache distance, so they do not depend on the scene's units."""

    #: Depth-edge threshold of the lifting (:func:`geometry.depth.keep_mask`; the reference's 0.35).
    #: The test is relative to the image's disparity range per pixel, so tiny images need a lower value.
    edge_threshold: float = SOBEL_EDGE_THRESHOLD
    #: Voxel edge used to refuse new points in occupied voxels, as a fraction of the scene scale.
    voxel_fraction: float = 0.002
    #: RANSAC inlier distance, as a fraction of the median camera-to-cache distance of the correspondences.
    align_threshold: float = 0.03
    ransac_iterations: int = 256
    #: Fewest correspondences (and fewest RANSAC inliers) for a frame to be merged.
    min_correspondences: int = 64
    #: Correspondences used per frame (a seeded random subset when there are more).
    max_correspondences: int = 8000
    #: Fewest inliers as a fraction of the correspondences.
    min_inlier_ratio: float = 0.25
    sor_neighbours: int = 20
    sor_std_ratio: float = 2.0
    #: When the cache grows beyond this many points it is voxel-thinned to about this many, then kept
    #: thinned as it grows (see the module docstring; None: never).
    max_points: int | None = 4_000_000
    #: Warp renderer settings (cache renders and the hole test of new points).
    render_radius: float = RENDER_RADIUS_NDC
    points_per_pixel: int = RENDER_POINTS_PER_PIXEL
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("edge_threshold", "voxel_fraction", "align_threshold", "render_radius")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"CacheSettings.{name} must be a positive number, got {value!r}")
        if not 0 < self.min_inlier_ratio <= 1:
            raise InputError(f"CacheSettings.min_inlier_ratio must be in (0, 1], got {self.min_inlier_ratio}")
        if self.ransac_iterations < 1:
            raise InputError(f"CacheSettings.ransac_iterations must be >= 1, got {self.ransac_iterations}")
        if self.min_correspondences < 3 or self.max_correspondences < self.min_correspondences:
            raise InputError("CacheSettings: need 3 <= min_correspondences <= max_correspondences")
        if self.max_points is not None and self.max_points < 1:
            raise InputError(f"CacheSettings.max_points must be >= 1 or None, got {self.max_points}")


@dataclass
class FrameUpdate:
    """What happened to one frame of an update."""

    name: str
    correspondences: int = 0
    inliers: int = 0
    #: The similarity applied to the frame's points (4x4, [sR | t]); None when the frame was skipped.
    transform: list | None = None
    scale: float | None = None
    #: Points added to the cache.
    added: int = 0
    skipped: str | None = None


@dataclass
class CacheUpdate:
    """Record of one :meth:`PointCache.update` (kept in :attr:`PointCache.history`)."""

    label: str
    points_before: int
    points_after: int
    frames: list[FrameUpdate] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheUpdate":
        return cls(d["label"], d["points_before"], d["points_after"], [FrameUpdate(**f) for f in d["frames"]])


# --------------------------------------------------------------------------------------------
# Correspondences and alignment of one frame
# --------------------------------------------------------------------------------------------

def _cameras(K, w2c) -> tuple[torch.Tensor, torch.Tensor]:
    K = as_tensor(K, dtype=torch.float64, device="cpu")
    w2c = as_tensor(w2c, dtype=torch.float64, device="cpu")
    if tuple(K.shape) != (3, 3) or tuple(w2c.shape) != (4, 4):
        raise InputError(f"a frame camera needs K (3,3) and w2c (4,4); got {tuple(K.shape)} and {tuple(w2c.shape)}")
    return K, w2c


def frame_correspondences(view: CacheView, xyz: torch.Tensor, depth: torch.Tensor, keep: torch.Tensor, K, w2c, *,
                          max_count: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (new point (M,3), cache point (M,3)) for one frame, float64 on the CPU.

    The nearest cache point of each covered pixel (:meth:`CacheView.nearest_per_pixel` of the
    frame's ``view`` of the cache ``xyz``) is paired with the point lifted on the same ray, at the
    new depth bilinearly sampled at the cache point's sub-pixel position. Only positions whose four
    neighbouring pixels are all in ``keep`` (valid, not a depth edge) are used. At most
    ``max_count`` pairs (a seeded subset).
    """
    K, w2c = _cameras(K, w2c)
    H, W = depth.shape
    idx, _, uv = view.nearest_per_pixel()
    uv = uv.double()
    grid = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], dim=-1)[None, None]
    maps = torch.stack([depth.to(torch.float64), keep.to(torch.float64)]).to(uv.device)[None]
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    d, inside = sampled[0], sampled[1] > 1 - 1e-9
    idx, uv, d = idx[inside], uv[inside], d[inside]
    if max_count is not None and len(idx) > max_count:
        pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_count].sort().values
        pick = pick.to(idx.device)
        idx, uv, d = idx[pick], uv[pick], d[pick]
    src = unproject_pixels(uv.cpu(), d.cpu(), K, invert_rigid(w2c))
    return src, xyz.index_select(0, idx).cpu().double()


def align_frame(xyz, depth: torch.Tensor, keep: torch.Tensor, K, w2c, settings: CacheSettings,
                name: str = "frame", *, view: CacheView | None = None) -> tuple[Similarity | None, FrameUpdate]:
    """Similarity taking the frame's lifted depth onto the cache points ``xyz``, or None with the reason.

    Projective correspondences (:func:`frame_correspondences`; ``view``: the frame's
    :class:`CacheView` of ``xyz`` when already culled) and a RANSAC + Umeyama fit with scale
    (:func:`geometry.alignment.umeyama_ransac`, inlier distance ``align_threshold`` times the
    median camera-to-cache distance). The correspondences pair points on the same camera ray, so
    the fit recovers what monocular depth gets wrong, the scale (a similarity centred on the
    camera), and rejects outlier depths; it does not correct errors of the camera pose itself.
    """
    K, w2c = _cameras(K, w2c)
    xyz = torch.as_tensor(xyz).float()
    if view is None:
        view = CacheView.cull(xyz, K, w2c, *depth.shape, margin=0.0)
    record = FrameUpdate(name)
    src, dst = frame_correspondences(view, xyz, depth, keep, K, w2c, max_count=settings.max_correspondences,
                                     seed=settings.seed)
    record.correspondences = len(src)
    if len(src) < settings.min_correspondences:
        record.skipped = (f"{len(src)} correspondences with the cache (need {settings.min_correspondences}); "
                          "the frame barely overlaps the cache")
        return None, record
    distance = float(torch.median((dst - invert_rigid(w2c)[:3, 3]).norm(dim=1)))
    try:
        T, inliers = umeyama_ransac(src, dst, threshold=settings.align_threshold * distance,
                                    iterations=settings.ransac_iterations,
                                    min_inlier_ratio=settings.min_inlier_ratio, seed=settings.seed)
    except InputError as exc:  # no consensus / degenerate geometry: skip the frame, keep the run going
        record.skipped = f"alignment failed: {exc}"
        return None, record
    record.inliers = int(inliers.sum())
    if record.inliers < settings.min_correspondences:
        record.skipped = f"only {record.inliers} RANSAC inliers (need {settings.min_correspondences})"
        return None, record
    record.transform, record.scale = T.matrix.tolist(), float(T.scale)
    return T, record


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    """Where a cache lives unless told: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PointCache:
    """The global point cache of a multi-trajectory run (see the module docstring).

    The points live on ``device`` (default :func:`default_device`), where the merge runs, grouped by
    the cells of a coarse grid (:class:`.cache_view.CellIndex`; the order of :attr:`cloud` is that
    grouping, not the order points were given in, followed by the points added since the last
    grouping). ``thin_size`` is the voxel size of the last thinning (None: never thinned).
    ``grouped_rows``: the first rows of ``cloud`` are already grouped (a saved cache's order, kept
    as it is); None groups them all."""

    def __init__(self, cloud: PointCloud, scale: float, *, mode: str = "global",
                 settings: CacheSettings | None = None, history: Sequence[CacheUpdate] = (),
                 thin_size: float | None = None, device: torch.device | str | None = None,
                 grouped_rows: int | None = None) -> None:
        if mode not in CACHE_MODES:
            raise InputError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"cache scene scale must be a positive number, got {scale!r}")
        self.device = default_device() if device is None else torch.device(device)
        self.scale = float(scale)
        self.mode = mode
        self.settings = settings or CacheSettings()
        self.history: list[CacheUpdate] = list(history)
        self.thin_size = thin_size
        self._n = len(cloud)
        self._xyz, self._rgb = cloud.xyz.to(self.device, torch.float32), cloud.rgb.to(self.device, torch.float32)
        with single_threaded_ops():
            self._index(grouped_rows)

    @property
    def cloud(self) -> PointCloud:
        """The cached points (xyz float32, rgb in [0, 1]) on the cache's device."""
        return PointCloud(self._xyz[: self._n], self._rgb[: self._n])

    def _index(self, grouped_rows: int | None = None, rows: torch.Tensor | None = None) -> None:
        """Keep ``rows`` (default all), group them by grid cell and index them
        (:class:`.cache_view.CellIndex`), or index the first ``grouped_rows`` rows as they are. The
        new storage has room to add points in place; the old one is freed array by array."""
        size = CELL_FRACTION * self.scale
        if grouped_rows is None:
            order = stable_argsort(cell_keys(self._xyz[: self._n], size, rows))
            rows = order if rows is None else rows.index_select(0, order)
        elif rows is None:
            rows = torch.arange(self._n, device=self.device)
        n = self._n = len(rows)
        capacity = n + n // 8 + 1024  # untouched pages cost no memory
        for name in ("_xyz", "_rgb"):
            storage = torch.empty(capacity, 3, dtype=torch.float32, device=self.device)
            torch.index_select(getattr(self, name), 0, rows, out=storage[:n])
            setattr(self, name, storage)
        self._cells = CellIndex.of(self._xyz[: n if grouped_rows is None else grouped_rows], size)

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PointCache):
            return NotImplemented
        a, b = self.cloud.to("cpu"), other.cloud.to("cpu")
        return (self.mode == other.mode and self.scale == other.scale and self.settings == other.settings
                and self.thin_size == other.thin_size
                and torch.equal(a.xyz, b.xyz) and torch.equal(a.rgb, b.rgb)
                and [asdict(h) for h in self.history] == [asdict(h) for h in other.history])

    __hash__ = None  # mutable

    @property
    def voxel_size(self) -> float:
        return self.settings.voxel_fraction * self.scale

    def _voxel_sizes(self) -> list[float]:
        """The voxel grids in which a new point needs a free voxel: the cache's own and, once
        thinned, the thinning's (so the thinned cloud keeps one point per voxel)."""
        return [self.voxel_size] + ([self.thin_size] if self.thin_size is not None else [])

    @classmethod
    def from_depth(cls, image, depth, K, w2c, *, mode: str = "global", settings: CacheSettings | None = None,
                   device: torch.device | str | None = None) -> "PointCache":
        """The start-view cloud (:func:`geometry.start_view.lift_start_view` of ``depth``, a map or a
        :data:`geometry.depth.DepthFn` output, with the settings' edge threshold) as a cache; the scene scale is the
        start view's median depth."""
        settings = settings or CacheSettings()
        view = lift_start_view(image, ViewDepth.of(depth), K=K, w2c=w2c, sobel_threshold=settings.edge_threshold)
        return cls(view.cloud, view.median_depth, mode=mode, settings=settings, device=device)

    # ------------------------------------------------------------------------------ rendering
    def render(self, trajectory: CameraTrajectory, image, height: int, width: int,
               progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp renders (F,3,H,W) in [-1,1] and hole masks (F,1,H,W) of the cache along ``trajectory``
        (on the CPU); frame 0 is ``image`` (3,H,W) in [-1,1] with mask 0 (:func:`geometry.renderer.render_warps`)."""
        cloud = self.cloud
        rgb, mask = render_warps(cloud.xyz, cloud.rgb_signed, trajectory, image, height, width, progress=progress,
                                 radius=self.settings.render_radius, points_per_pixel=self.settings.points_per_pixel)
        return rgb.cpu(), mask.cpu()

    # ------------------------------------------------------------------------------ growing
    def update(self, frames: Sequence, w2c, K, depth_fn: DepthFn | None, *, label: str = "update",
               names: Sequence[str] | None = None, progress: ProgressFn | None = None) -> CacheUpdate:
        """Fold generated frames into the cache (``"global"`` mode; ``"release"`` records and returns).

        ``frames``: RGB images (uint8 (H,W,3) or anything :func:`io.images.load_image` takes); ``w2c`` (n,4,4) and ``K`` (n,3,3 or 3,3) their cameras, K in pixels
        of the frame size. ``depth_fn`` (see :data:`geometry.depth.DepthFn`) is required in global mode.
        ``progress(done, n)`` after each frame; it may raise to stop (the cache then holds the
        frames folded in so far; the loop persists the cache only between trajectories).
        """
        n = len(frames)
        w2c_t = as_tensor(w2c, dtype=torch.float64, device="cpu").reshape(-1, 4, 4)
        K_t = as_tensor(K, dtype=torch.float64, device="cpu")
        K_t = K_t.expand(w2c_t.shape[0], 3, 3) if K_t.dim() == 2 else K_t.reshape(-1, 3, 3)
        names = list(names) if names is not None else [f"{label}/{i:04d}" for i in range(n)]
        if w2c_t.shape[0] != n or K_t.shape[0] != n or len(names) != n:
            raise InputError(f"cache update {label}: {n} frames but {w2c_t.shape[0]} w2c, {K_t.shape[0]} K and "
                             f"{len(names)} names; give one camera and name per frame")
        record = CacheUpdate(label, len(self), len(self))
        if self.mode == "release":
            record.frames = [FrameUpdate(nm, skipped="release mode: the cache is not updated") for nm in names]
            self.history.append(record)
            return record
        if depth_fn is None:
            raise InputError("the global cache needs a depth function (MoGe, or depth_fn=...) to lift new frames")
        with single_threaded_ops():  # small ops: a second intra-op thread only spins on a busy machine
            for i, (frame, name) in enumerate(zip(frames, names)):
                record.frames.append(self._add_frame(frame, K_t[i], w2c_t[i], depth_fn, name))
                report(progress, i + 1, n)
            self._thin()
            if len(self) - self._cells.sorted > self._cells.sorted // 8:  # regroup once the ungrouped tail is long
                self._index()
        record.points_after = len(self)
        self.history.append(record)
        return record

    def _add_frame(self, frame, K: torch.Tensor, w2c: torch.Tensor, depth_fn: DepthFn, name: str) -> FrameUpdate:
        frame = load_image(frame, name=f"cache frame {name}")
        rgb = image_to_rgb01(frame)
        H, W = rgb.shape[:2]
        depth = depth_map(depth_fn(frame, K, w2c))
        if tuple(depth.shape) != (H, W):
            raise InputError(f"depth function returned a {tuple(depth.shape)} map for a {H}x{W} frame ({name}); "
                             "it must return one depth per pixel")
        try:
            keep, d = keep_mask(depth, sobel_threshold=self.settings.edge_threshold)
        except InputError as exc:  # empty / broken depth for this frame: skip it
            return FrameUpdate(name, skipped=f"unusable depth: {exc}")
        xyz = self._xyz[: self._n]
        radius = self.settings.render_radius
        # margin: the renderer's (a point can cover pixels up to radius + 1 pixel outside the image);
        # reach: two voxels, so the view holds every cache point that can share a voxel with new points
        view = CacheView.cull(xyz, K, w2c, H, W, margin=radius * min(H, W) / 2 + 1.0,
                              reach=2.0 * max(self._voxel_sizes()), cells=self._cells)
        T, record = align_frame(xyz, d, keep, K, w2c, self.settings, name, view=view)
        if T is None:
            return record
        new = keep & view.holes(radius).cpu()
        if int(new.sum()) < MIN_POINTS:
            return record  # aligned, but the cache already covers this view
        rows, cols = new.nonzero().unbind(1)  # lift the hole pixels only, through their centres
        uv = torch.stack([cols, rows], dim=1).double() + 0.5
        world = unproject_pixels(uv, d[rows, cols].double(), K, invert_rigid(w2c))
        cloud = PointCloud(T.apply(world).float(), rgb[new])
        if len(cloud) > self.settings.sor_neighbours:
            cloud = cloud.select(statistical_outlier_removal(cloud.xyz, self.settings.sor_neighbours,
                                                             self.settings.sor_std_ratio, workers=1))
        cloud = cloud.select(self._free(cloud.xyz, view))
        del view
        record.added = len(cloud)
        self._append(cloud)
        return record

    def _free(self, xyz: torch.Tensor, view: CacheView) -> torch.Tensor:
        """Indices (ascending) of the new points ``xyz`` (CPU) whose voxel is free: no cache point
        in it and no earlier new point, in every grid of :meth:`_voxel_sizes`."""
        chosen = torch.arange(len(xyz))
        if not len(xyz):
            return chosen
        # Cache points that can share a voxel with a new point: in this view (when the new points
        # are inside its frustum, see CacheView.contains) and within two voxels of their bounding box.
        rows = view.index if view.contains(xyz) else torch.arange(len(self), device=self.device)
        near = self._xyz.index_select(0, rows)
        reach = 2.0 * max(self._voxel_sizes())
        lo, hi = (xyz.amin(0) - reach).to(self.device), (xyz.amax(0) + reach).to(self.device)
        near = near[((near >= lo) & (near <= hi)).all(dim=1)]
        for size in self._voxel_sizes():
            pts = xyz[chosen]
            keys = voxel_key_tensor(pts, size)
            wanted = torch.unique(keys).to(self.device)  # sorted
            found = voxel_key_tensor(near, size)
            at = torch.searchsorted(wanted, found).clamp_(max=len(wanted) - 1)
            taken = wanted.index_select(0, at[wanted.index_select(0, at) == found]).cpu()
            chosen = chosen[first_in_voxel(pts, size) & ~torch.isin(keys, taken)]
        return chosen

    def _append(self, cloud: PointCloud) -> None:
        """Add points at the end, in place while the storage has room (else it grows by at least 1/8)."""
        n, m = self._n, len(cloud)
        if not m:
            return
        if n + m > len(self._xyz):
            capacity = max(n + m, n + n // 8)
            for name in ("_xyz", "_rgb"):
                grown = torch.empty(capacity, 3, dtype=torch.float32, device=self.device)
                grown[:n] = getattr(self, name)[:n]
                setattr(self, name, grown)
        self._xyz[n:n + m] = cloud.xyz.to(self.device)
        self._rgb[n:n + m] = cloud.rgb.to(self.device)
        self._n = n + m

    def _thin(self) -> None:
        """Voxel-thin the cache to about ``max_points`` when it holds more (the reference's adaptive
        voxel search, first point of every voxel kept). Points added afterwards need a free voxel of
        that size, so later updates thin again only when the cache outgrows the search's tolerance
        (20%) above ``max_points``."""
        limit = self.settings.max_points
        if limit is None:
            return
        allowed = limit if self.thin_size is None else limit * (1 + ADAPTIVE_VOXEL_TOLERANCE)
        if len(self) <= allowed:
            return
        size, _ = adaptive_voxel_downsample_size(self._xyz[: self._n], limit)
        self._index(rows=first_in_voxel(self._xyz[: self._n], size).nonzero().squeeze(1))
        self.thin_size = size

    # ------------------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"version": CACHE_FILE_VERSION, "mode": self.mode, "scale": self.scale, "thin_size": self.thin_size,
                "grouped_rows": self._cells.sorted, "settings": asdict(self.settings),
                "history": [asdict(h) for h in self.history]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache atomically as ``.npz`` (xyz float32, rgb float32 in [0,1], JSON state)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"cache file must end in .npz, got {path.name}")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, xyz=self.cloud.xyz.cpu().numpy(), rgb=self.cloud.rgb.cpu().numpy(),
                     state=np.asarray(json.dumps(self.state())))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "PointCache":
        """Read a cache written by :meth:`save` (equal to the saved one) onto ``device`` (see ``PointCache``)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"point cache file {path} not found; start a new run or point to a saved cache")
        try:
            with np.load(path, allow_pickle=False) as z:
                xyz, rgb, state = z["xyz"], z["rgb"], json.loads(str(z["state"]))
            if state.get("version") != CACHE_FILE_VERSION:
                raise CheckpointError(f"{path}: unsupported cache version {state.get('version')!r} "
                                      f"(this build reads {CACHE_FILE_VERSION}); start a new run")
            settings = CacheSettings(**state["settings"])
            history = [CacheUpdate.from_dict(h) for h in state["history"]]
            return cls(PointCloud(xyz, rgb), state["scale"], mode=state["mode"], settings=settings, history=history,
                       thin_size=state.get("thin_size"), device=device, grouped_rows=state.get("grouped_rows"))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: point cache file is damaged ({exc!r}); delete it to start over") from exc
