"""Coloured point clouds and the reference's point utilities
(``statistical_outlier_removal``, ``voxel_downsample_fixed``).

:class:`PointCloud` stores torch tensors: ``xyz`` float32 (N, 3) in world units and ``rgb``
float32 (N, 3) in **[0, 1]**; optional ``normals`` (N, 3) and ``confidence`` (N,). The renderer
wants colours in [-1, 1]: use :attr:`PointCloud.rgb_signed`.

The array-level utilities (:func:`statistical_outlier_removal`, :func:`voxel_downsample_indices`,
:func:`adaptive_voxel_downsample`, :func:`compute_depth_percentile_map`) take numpy arrays or
torch tensors of any float dtype and compute in numpy (float64 stays float64), so they reproduce
the reference bit for bit; the :class:`PointCloud` methods wrap them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError

#: Voxel hash of the reference: key = A*i + B*j + k for the integer voxel (i, j, k).
VOXEL_HASH = (116101979, 104729, 1)
#: Reference defaults.
SOR_NEIGHBOURS = 20
SOR_STD_RATIO = 2.0
ADAPTIVE_VOXEL_DEFAULT_SIZE = 0.003
ADAPTIVE_VOXEL_MIN_SIZE = 1e-4
ADAPTIVE_VOXEL_TOLERANCE = 0.2
ADAPTIVE_VOXEL_ITERATIONS = 10
#: Points queried at once by knn_mean_distance.
KNN_QUERY_CHUNK = 1 << 14
#: Points whose voxel keys are computed at once (bounds the temporaries of voxel_key_tensor).
VOXEL_KEY_CHUNK = 1 << 16


def _np(x, dtype=None) -> np.ndarray:
    """Numpy view of a tensor / array (no copy for CPU tensors)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _points_array(points, name: str = "points") -> np.ndarray:
    p = _np(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"{name} must have shape (N, 3); got {tuple(p.shape)}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    return p


# --------------------------------------------------------------------------------------------
# Array-level utilities (reference behaviour)
# --------------------------------------------------------------------------------------------

def knn_mean_distance(points, k: int = SOR_NEIGHBOURS, workers: int = -1) -> np.ndarray:
    """Mean distance of every point to its ``k`` nearest neighbours, itself excluded (N,)."""
    from scipy.spatial import cKDTree

    p = _points_array(points)
    k = min(int(k), len(p) - 1)
    if k < 1:
        return np.zeros(len(p), dtype=np.float64)
    tree = cKDTree(p)
    out = np.empty(len(p), dtype=np.float64)
    for start in range(0, len(p), KNN_QUERY_CHUNK):  # bounds the (chunk, k + 1) distance/index arrays
        dist, _ = tree.query(p[start:start + KNN_QUERY_CHUNK], k=k + 1, workers=workers)
        out[start:start + KNN_QUERY_CHUNK] = dist[:, 1:].mean(axis=1)
    return out


def statistical_outlier_removal(points, k: int = SOR_NEIGHBOURS, std_ratio: float = SOR_STD_RATIO,
                                workers: int = -1) -> np.ndarray:
    """Inlier mask (N,) bool: mean kNN distance <= mean + ``std_ratio`` * std over all points.

    Uses a scipy cKDTree queried with ``workers`` threads (-1 = all cores). Clouds with fewer
    than two points are returned as all inliers.
    """
    mean_d = knn_mean_distance(points, k, workers)
    if len(mean_d) < 2:
        return np.ones(len(mean_d), dtype=bool)
    return mean_d <= mean_d.mean() + std_ratio * mean_d.std()


def voxel_key_tensor(points: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Reference voxel hash (N,) int64 of ``floor(p / voxel_size)`` on the points' device (collisions
    kept as in the reference), computed in chunks of :data:`VOXEL_KEY_CHUNK` points."""
    if not voxel_size > 0:
        raise InputError(f"voxel_size must be > 0; got {voxel_size}")
    weights = torch.tensor(VOXEL_HASH, dtype=torch.int64, device=points.device)
    keys = torch.empty(len(points), dtype=torch.int64, device=points.device)
    for start in range(0, len(points), VOXEL_KEY_CHUNK):
        cells = torch.floor(points[start:start + VOXEL_KEY_CHUNK] / voxel_size).long()
        keys[start:start + VOXEL_KEY_CHUNK] = (cells * weights).sum(dim=1)
    return keys


def voxel_keys(points, voxel_size: float) -> np.ndarray:
    """:func:`voxel_key_tensor` of any (N, 3) points, as a numpy array."""
    return voxel_key_tensor(torch.from_numpy(_points_array(points)), voxel_size).numpy()


def _sorted_in_place(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type == "cpu":
        keys.numpy().sort()  # numpy's vectorised sort is several times faster than torch.sort on CPU
        return keys
    return torch.sort(keys).values


def voxel_count(points, voxel_size: float) -> int:
    """Number of occupied voxels (distinct :func:`voxel_keys`) of (N, 3) points."""
    p = points if isinstance(points, torch.Tensor) else torch.from_numpy(_points_array(points))
    keys = _sorted_in_place(voxel_key_tensor(p, voxel_size))
    return int((keys[1:] != keys[:-1]).sum()) + 1 if len(keys) else 0


def stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``keys`` (N,), equal keys in index order. On the CPU through numpy, whose
    stable sort needs about 12 bytes per key where torch.sort needs about 30."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.sort(keys, stable=True).indices


def first_in_voxel(points: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """(N,) bool on the points' device: each point that comes first (lowest index) in its voxel."""
    keys = voxel_key_tensor(points, voxel_size)
    order = stable_argsort(keys)
    keys = keys.index_select(0, order)
    starts = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
    starts[1:] = keys[1:] != keys[:-1]
    del keys
    first = torch.zeros(len(order), dtype=torch.bool, device=order.device)
    first[order[starts]] = True
    return first


def voxel_downsample_indices(points, voxel_size: float) -> np.ndarray:
    """Indices of the first point of every voxel, ordered by ascending voxel key (reference order)."""
    _, first = np.unique(voxel_keys(points, voxel_size), return_index=True)
    return first


def voxel_downsample_fixed(points, colors, voxel_size: float):
    """Reference ``voxel_downsample_fixed``: (points, colors) of the first point per voxel."""
    idx = voxel_downsample_indices(points, voxel_size)
    return points[idx], colors[idx]


def adaptive_voxel_downsample_size(points, target: int) -> tuple[float, int]:
    """Voxel size whose downsampled count is near ``target``, and that count (reference search).

    With at most ``target`` points: (0.003, N). Otherwise bisection of the size on
    [1e-4, max extent / 100] for up to 10 steps, stopping once |count - target| / target <= 0.2;
    the last size tried is returned even when the search did not converge (reference behaviour).
    """
    p = points if isinstance(points, torch.Tensor) else torch.from_numpy(_points_array(points))
    if p.dim() != 2 or p.shape[1] != 3:
        raise InputError(f"points must have shape (N, 3); got {tuple(p.shape)}")
    if target < 1:
        raise InputError(f"target point count must be >= 1; got {target}")
    if len(p) <= target:
        return ADAPTIVE_VOXEL_DEFAULT_SIZE, len(p)
    lo, hi = ADAPTIVE_VOXEL_MIN_SIZE, float((p.amax(dim=0) - p.amin(dim=0)).max()) / 100.0
    size, count = lo, len(p)
    for _ in range(ADAPTIVE_VOXEL_ITERATIONS):
        size = (lo + hi) / 2.0
        count = voxel_count(p, size)
        if abs(count - target) / target <= ADAPTIVE_VOXEL_TOLERANCE:
            break
        if count > target:
            lo = size
        else:
            hi = size
    return size, count


def adaptive_voxel_downsample(points, colors, target: int):
    """Reference ``adaptive_voxel_downsample``: (points, colors, voxel_size)."""
    size, _ = adaptive_voxel_downsample_size(points, target)
    if len(points) <= target:
        return points, colors, size
    idx = voxel_downsample_indices(points, size)
    return points[idx], colors[idx], size


def compute_depth_percentile_map(depth, mask) -> np.ndarray:
    """Per-pixel percentile (0..100] of each depth among the masked depths; 0 outside the mask.

    percentile = 100 * rank / n with rank = number of masked depths <= d (searchsorted 'right').
    """
    d = _np(depth)
    m = _np(mask).astype(bool)
    if d.shape != m.shape:
        raise InputError(f"depth {d.shape} and mask {m.shape} must have the same shape")
    out = np.zeros(d.shape, dtype=np.float32)
    valid = np.sort(d[m])
    if len(valid) == 0:
        return out
    rank = np.searchsorted(valid, d, side="right")
    out[m] = (100.0 * rank[m] / len(valid)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# The point-cloud container
# --------------------------------------------------------------------------------------------

def _tensor(x, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


@dataclass
class PointCloud:
    """Coloured points: ``xyz`` float32 (N,3), ``rgb`` float32 (N,3) in [0,1], optional extras.

    ``rgb`` may be given as uint8 (0..255), which is converted. ``normals`` (N,3) and
    ``confidence`` (N,) are optional and follow every selection.
    """

    xyz: torch.Tensor
    rgb: torch.Tensor
    normals: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rgb_is_uint8 = (isinstance(self.rgb, torch.Tensor) and self.rgb.dtype == torch.uint8) or (
            isinstance(self.rgb, np.ndarray) and self.rgb.dtype == np.uint8)
        self.xyz = _tensor(self.xyz)
        self.rgb = _tensor(self.rgb) / 255.0 if rgb_is_uint8 else _tensor(self.rgb)
        n = self.xyz.shape[0] if self.xyz.dim() == 2 else -1
        if self.xyz.dim() != 2 or self.xyz.shape[1] != 3:
            raise InputError(f"PointCloud.xyz must have shape (N, 3); got {tuple(self.xyz.shape)}")
        if tuple(self.rgb.shape) != (n, 3):
            raise InputError(f"PointCloud.rgb must have shape ({n}, 3); got {tuple(self.rgb.shape)}")
        if self.normals is not None:
            self.normals = _tensor(self.normals)
            if tuple(self.normals.shape) != (n, 3):
                raise InputError(f"PointCloud.normals must have shape ({n}, 3); got {tuple(self.normals.shape)}")
        if self.confidence is not None:
            self.confidence = _tensor(self.confidence)
            if tuple(self.confidence.shape) != (n,):
                raise InputError(f"PointCloud.confidence must have shape ({n},); got {tuple(self.confidence.shape)}")

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @classmethod
    def empty(cls) -> "PointCloud":
        return cls(torch.zeros(0, 3), torch.zeros(0, 3))

    @property
    def rgb_signed(self) -> torch.Tensor:
        """Colours in [-1, 1] (the renderer's and the reference's colour space)."""
        return self.rgb * 2.0 - 1.0

    @property
    def rgb_uint8(self) -> np.ndarray:
        """Colours as uint8 (N, 3) numpy, rounded and clipped."""
        return np.clip(np.rint(self.rgb.cpu().numpy() * 255.0), 0, 255).astype(np.uint8)

    def _map(self, fn) -> "PointCloud":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self)})

    def select(self, index) -> "PointCloud":
        """Subset by a boolean mask or an index array (numpy or torch)."""
        idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))
        idx = idx.to(self.xyz.device)
        return self._map(lambda t: t[idx])

    def to(self, device) -> "PointCloud":
        return self._map(lambda t: t.to(device))

    # Reference utilities on the container -----------------------------------------------------

    def remove_outliers(self, k: int = SOR_NEIGHBOURS, std_ratio: float = SOR_STD_RATIO) -> "PointCloud":
        """Statistical outlier removal (reference: k = 20, 2 std)."""
        return self.select(statistical_outlier_removal(self.xyz, k, std_ratio))

    def voxel_downsample(self, voxel_size: float) -> "PointCloud":
        """First point per voxel (reference hash and order)."""
        return self.select(voxel_downsample_indices(self.xyz, voxel_size))

    def adaptive_downsample(self, target: int) -> tuple["PointCloud", float]:
        """Voxel-downsample to about ``target`` points; returns (cloud, voxel size used)."""
        size, _ = adaptive_voxel_downsample_size(self.xyz, target)
        return (self if len(self) <= target else self.voxel_downsample(size)), size


def concatenate(clouds: Sequence[PointCloud]) -> PointCloud:
    """Concatenate clouds; optional fields survive only if every cloud has them."""
    clouds = list(clouds)
    if not clouds:
        return PointCloud.empty()
    device = clouds[0].xyz.device
    out = {}
    for f in fields(PointCloud):
        parts = [getattr(c, f.name) for c in clouds]
        out[f.name] = None if any(p is None for p in parts) else torch.cat([p.to(device) for p in parts])
    return PointCloud(**out)
