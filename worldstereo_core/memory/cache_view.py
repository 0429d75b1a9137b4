"""The global cache as one camera sees it: one frustum cull and one float32 projection per frame.

:class:`CacheView` holds the cache points near a frame's frustum (widened by a pixel margin and a
world-space reach) with their projection, computed once and shared by the per-frame tests of the
merge (:mod:`.cache`):

* :meth:`CacheView.nearest_per_pixel`: the front cache point of every pixel (alignment);
* :meth:`CacheView.holes`: the pixels no cache point covers, by the warp renderer's coverage rule,
  so it equals the hole mask of a render of the cache (:mod:`geometry.renderer`);
* :attr:`CacheView.index` with :meth:`CacheView.contains`: every cache point that can share a voxel
  with the frame's new points (the voxel test).

The cache rows are kept grouped by the cells of a coarse grid (:class:`CellIndex`), so the cull
first drops the cells whose bounding box lies outside the frustum and then tests only the points of
the others (a numba kernel on the CPU when numba is installed, torch otherwise): the work of a frame
grows with the points near its view, not with the size of the cache. Everything stays on the cache's
device.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.pointcloud import VOXEL_KEY_CHUNK

#: Edge of the grid cells the cache rows are grouped by, as a fraction of the scene scale.
CELL_FRACTION = 0.25
#: Rows culled per task (bounds the temporary memory of the cull).
CULL_CHUNK = 1 << 19


@functools.cache
def _numba_cull():
    """The numba cull kernel, or None when numba is not installed."""
    try:
        from .cull_numba import cull_rows
    except ImportError:
        return None
    return cull_rows


# --------------------------------------------------------------------------------------------
# Rows grouped by grid cell
# --------------------------------------------------------------------------------------------

def cell_keys(xyz: torch.Tensor, size: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """int64 key of the cell of edge ``size`` of each point (of the ``rows`` of ``xyz``, default
    all), computed in chunks; a stable sort by key groups the points by cell."""
    count = len(xyz) if rows is None else len(rows)
    keys = torch.empty(count, dtype=torch.long, device=xyz.device)
    if not count:
        return keys
    lo = torch.floor(xyz.amin(dim=0) / size).long()
    span = torch.floor(xyz.amax(dim=0) / size).long() - lo + 1
    for start in range(0, count, VOXEL_KEY_CHUNK):
        stop = start + VOXEL_KEY_CHUNK
        part = xyz[start:stop] if rows is None else xyz.index_select(0, rows[start:stop])
        cells = torch.floor(part / size).long() - lo
        keys[start:stop] = (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]
    return keys


@dataclass
class CellIndex:
    """Rows ``[0, sorted)`` of the cache grouped by grid cell (:func:`cell_keys`): cell c holds rows
    ``start[c]:stop[c]`` inside the box ``lo[c]..hi[c]`` of its points. Rows from ``sorted`` on were
    added later and are not grouped."""

    start: torch.Tensor
    stop: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    sorted: int

    @classmethod
    def of(cls, xyz: torch.Tensor, size: float) -> "CellIndex":
        """The index of rows ``xyz`` already grouped by cells of edge ``size``."""
        cell, counts = torch.unique_consecutive(cell_keys(xyz, size), return_inverse=True, return_counts=True)[1:]
        stop = counts.cumsum(0)
        lo = torch.full((len(counts), 3), math.inf, device=xyz.device).scatter_reduce(
            0, cell[:, None].expand(-1, 3), xyz, reduce="amin")
        hi = torch.full((len(counts), 3), -math.inf, device=xyz.device).scatter_reduce(
            0, cell[:, None].expand(-1, 3), xyz, reduce="amax")
        return cls(stop - counts, stop, lo, hi, len(xyz))


# --------------------------------------------------------------------------------------------
# The camera of a cull
# --------------------------------------------------------------------------------------------

def _side_planes(K: torch.Tensor, height: int, width: int, margin: float) -> torch.Tensor:
    """Unit normals (4, 3) in camera coordinates of the planes through the camera centre bounding
    ``-margin < u < width + margin`` and ``-margin < v < height + margin`` (inside: positive)."""
    fx, skew, cx, fy, cy = K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]
    zero = torch.zeros_like(fx)
    n = torch.stack([torch.stack([fx, skew, cx + margin]), torch.stack([-fx, -skew, width + margin - cx]),
                     torch.stack([zero, fy, cy + margin]), torch.stack([zero, -fy, height + margin - cy])])
    return n / n.norm(dim=1, keepdim=True)


@dataclass
class _Camera:
    """float32 camera of a cull, in the layout of the numba kernel; the torch methods use the
    kernel's operations in its order (one rounding per operation), so both give identical results."""

    rotation: torch.Tensor  # (3, 3) w2c rotation
    translation: torch.Tensor  # (3,)
    planes: torch.Tensor  # (4, 3), see _side_planes
    intrinsics: torch.Tensor  # (5,) fx, skew, cx, fy, cy

    @classmethod
    def of(cls, K: torch.Tensor, w2c: torch.Tensor, height: int, width: int, margin: float) -> "_Camera":
        K, w2c = K.double().cpu(), w2c.double().cpu()
        return cls(w2c[:3, :3].float(), w2c[:3, 3].float(), _side_planes(K, height, width, margin).float(),
                   torch.stack([K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]]).float())

    def to_camera(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        R, t = self.rotation.to(xyz.device), self.translation.to(xyz.device)
        px, py, pz = xyz.unbind(-1)
        return tuple(R[i, 0] * px + R[i, 1] * py + R[i, 2] * pz + t[i] for i in range(3))

    def inside(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, reach: float) -> torch.Tensor:
        """Within ``reach`` of the frustum: every plane value (and z) above ``-reach``."""
        limit = torch.tensor(-reach, dtype=torch.float32, device=x.device)
        ok = z > limit
        for n in self.planes.to(x.device):
            ok &= n[0] * x + n[1] * y + n[2] * z > limit
        return ok

    def project(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fx, skew, cx, fy, cy = self.intrinsics.to(x.device)
        return torch.stack([(fx * x + skew * y) / z + cx, fy * y / z + cy], dim=1)

    def boxes_near(self, lo: torch.Tensor, hi: torch.Tensor, reach: float) -> torch.Tensor:
        """(C,) bool: boxes ``lo..hi`` (C, 3) that may hold a point within ``reach`` of the frustum
        (a box is dropped when all its corners lie beyond ``reach`` outside one plane)."""
        corners = torch.stack([torch.stack([(hi if (c >> a) & 1 else lo)[:, a] for a in range(3)], dim=-1)
                               for c in range(8)], dim=1)  # (C, 8, 3)
        x, y, z = self.to_camera(corners)
        limit = -reach - 1e-4 * float((hi - lo).amax()) if len(lo) else 0.0  # slack for float32 rounding
        near = (z > limit).any(dim=1)
        for n in self.planes.to(lo.device):
            near &= (n[0] * x + n[1] * y + n[2] * z > limit).any(dim=1)
        return near


def _tasks(start: torch.Tensor, stop: torch.Tensor, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row ranges ``start[i]:stop[i]`` regrouped into tasks of about ``size`` rows (long ranges split)."""
    tasks, first, last, rows = [], [], [], 0
    for a, b in zip(start.tolist(), stop.tolist()):
        while a < b:
            take = min(b - a, size - rows)
            first.append(a)
            last.append(a + take)
            a, rows = a + take, rows + take
            if rows == size:
                tasks.append((np.array(first, np.int64), np.array(last, np.int64)))
                first, last, rows = [], [], 0
    if first:
        tasks.append((np.array(first, np.int64), np.array(last, np.int64)))
    return tasks


# --------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------

def _dilate(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(H, W) bool: True within ``steps`` pixels (a square window) of a True pixel of ``mask``."""
    out = mask
    for dim in (0, 1):
        grown = out.clone()
        for step in range(1, min(steps, out.shape[dim] - 1) + 1):
            n = out.shape[dim] - step
            grown.narrow(dim, step, n).logical_or_(out.narrow(dim, 0, n))
            grown.narrow(dim, 0, n).logical_or_(out.narrow(dim, step, n))
        out = grown
    return out


@dataclass
class CacheView:
    """Cache points near one camera's view and their projection (float32, on the cache's device).

    ``index`` (M,) ascending cache rows of the points within ``reach`` (world units) of the frustum
    widened by ``margin`` pixels; ``uv`` (M, 2) their continuous pixel positions and ``z`` (M,) their
    view depth (:func:`cameras.project_points` in float32; meaningful where z > 0); ``pad``: the
    margin in whole pixels.
    """

    index: torch.Tensor
    uv: torch.Tensor
    z: torch.Tensor
    height: int
    width: int
    pad: int
    camera: _Camera

    @classmethod
    def cull(cls, xyz: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor, height: int, width: int, *,
             margin: float, reach: float = 0.0, cells: CellIndex | None = None) -> "CacheView":
        """Cull the rows of ``xyz`` (N, 3) float32 to the camera (``K`` in pixels of the height x width
        frame, ``w2c``). ``cells``: the index of the rows (None: test every row)."""
        camera = _Camera.of(K, w2c, height, width, margin)
        if cells is None:
            start, stop = torch.zeros(1, dtype=torch.long), torch.tensor([len(xyz)])
        else:
            near = camera.boxes_near(cells.lo, cells.hi, reach).cpu()
            start = torch.cat([cells.start.cpu()[near], torch.tensor([cells.sorted])])
            stop = torch.cat([cells.stop.cpu()[near], torch.tensor([len(xyz)])])
        tasks = _tasks(start, stop, CULL_CHUNK)
        kernel = _numba_cull() if xyz.device.type == "cpu" else None
        if kernel is not None:
            points = xyz.contiguous().numpy()
            args = [t.numpy() for t in (camera.rotation, camera.translation, camera.planes)]
            args += [np.float32(reach), camera.intrinsics.numpy()]

            def cull_task(task):
                rows = int((task[1] - task[0]).sum())
                index, uv, z = np.empty(rows, np.int64), np.empty((rows, 2), np.float32), np.empty(rows, np.float32)
                count = kernel(points, *task, *args, index, uv, z)
                return torch.from_numpy(index[:count]), torch.from_numpy(uv[:count]), torch.from_numpy(z[:count])
        else:
            def cull_task(task):
                first, last = (torch.from_numpy(t).to(xyz.device) for t in task)
                counts = last - first
                rows = torch.repeat_interleave(first - (counts.cumsum(0) - counts), counts) + torch.arange(
                    int(counts.sum()), device=xyz.device)
                x, y, z = camera.to_camera(xyz.index_select(0, rows))
                keep = camera.inside(x, y, z, reach).nonzero().squeeze(1)
                x, y, z = (c.index_select(0, keep) for c in (x, y, z))
                return rows.index_select(0, keep), camera.project(x, y, z), z

        parts = [cull_task(task) for task in tasks]
        if not parts:
            parts = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0))]
        index, uv, z = (torch.cat(p).to(xyz.device) for p in zip(*parts))
        return cls(index, uv, z, height, width, math.ceil(margin), camera)

    def __len__(self) -> int:
        return len(self.index)

    def contains(self, points: torch.Tensor) -> bool:
        """True when every point (N, 3) lies in front of the camera inside the widened frustum: then
        every cache point within ``reach`` of them is in this view."""
        x, y, z = self.camera.to_camera(points.float())
        return bool(((z > 0) & self.camera.inside(x, y, z, 0.0)).all())

    @functools.cached_property
    def _pixel_cells(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions in the view, column, row) of the points in front of the camera whose pixel
        lies in the image grown by ``pad`` pixels on every side."""
        pad = self.pad
        col, row = (c.floor() for c in self.uv.unbind(1))
        ok = (self.z > 0) & (col >= -pad) & (col < self.width + pad) & (row >= -pad) & (row < self.height + pad)
        local = ok.nonzero().squeeze(1)
        return local, col.index_select(0, local).long(), row.index_select(0, local).long()

    def nearest_per_pixel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every pixel holding a point in front of the camera, the point nearest in view depth
        (exact depth ties: the lower cache row): ``(cache row (P,), pixel v * width + u (P,),
        projected position uv (P, 2) float32)``, ordered by pixel."""
        n_pix = self.height * self.width
        local, col, row = self._pixel_cells
        inside = ((col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)).nonzero().squeeze(1)
        local = local.index_select(0, inside)
        pix = row.index_select(0, inside) * self.width + col.index_select(0, inside)
        z = self.z.index_select(0, local)
        zbuf = torch.full((n_pix,), math.inf, device=z.device).scatter_reduce(0, pix, z, reduce="amin")
        front = z == zbuf.index_select(0, pix)
        local, pix = local[front], pix[front]
        best = torch.full((n_pix,), len(self), device=pix.device).scatter_reduce(0, pix, local, reduce="amin")
        pix = (best < len(self)).nonzero().squeeze(1)
        best = best.index_select(0, pix)
        return self.index.index_select(0, best), pix, self.uv.index_select(0, best)

    def holes(self, radius: float) -> torch.Tensor:
        """(H, W) bool: the pixels that no point in front of the camera covers, where a point covers
        pixel (i, j) when ``((u - i - 0.5)**2 + (v - j - 0.5)**2) / s**2 < radius**2`` with
        ``s = min(H, W) / 2`` (the renderer's rule, evaluated in float64).

        Pixel offsets from a point's own pixel fall in three classes: always covered (the farthest
        corner of the own pixel is within the radius), never covered, or to be checked. The first
        class is a shift of the map of occupied pixels; the third is evaluated, one offset at a
        time, only for the points whose pixel at that offset is still uncovered."""
        H, W = self.height, self.width
        s2, r2 = (min(H, W) / 2.0) ** 2, radius * radius
        r2_px = r2 * s2
        reach = math.ceil(math.sqrt(r2_px) + 0.5) - 1  # farthest pixel offset a point can cover
        always, check = [], []
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                far = (abs(dx) + 0.5) ** 2 + (abs(dy) + 0.5) ** 2
                near = max(abs(dx) - 0.5, 0.0) ** 2 + max(abs(dy) - 0.5, 0.0) ** 2
                if far < r2_px * (1 - 1e-6):
                    always.append((dx, dy))
                elif near < r2_px * (1 + 1e-6):
                    check.append((dx, dy))
        if reach > self.pad:
            raise ValueError(f"coverage radius {radius} reaches beyond the view's margin")
        # Cells of the points within `reach` of the image, on a grid padded by 2 * reach so that a
        # cell shifted by any offset stays on it (no wrapping between rows).
        P = 2 * reach
        Wc = W + 2 * P
        local, col, row = self._pixel_cells
        near = ((col >= -reach) & (col < W + reach) & (row >= -reach) & (row < H + reach)).nonzero().squeeze(1)
        local = local.index_select(0, near)
        cell = (row.index_select(0, near) + P) * Wc + col.index_select(0, near) + P
        occupied = torch.zeros(H + 2 * P, Wc, dtype=torch.bool, device=self.z.device)
        occupied.view(-1)[cell] = True
        covered = torch.zeros(H, W, dtype=torch.bool, device=self.z.device)
        for dx, dy in always:
            covered |= occupied[P - dy:P - dy + H, P - dx:P - dx + W]
        holes = torch.zeros_like(occupied)  # the pixels still uncovered
        holes[P:P + H, P:P + W] = ~covered
        pick = _dilate(holes, reach).view(-1).index_select(0, cell).nonzero().squeeze(1)
        local, cell = local.index_select(0, pick), cell.index_select(0, pick)
        u, v = (c.index_select(0, local).double() for c in self.uv.unbind(1))
        flat = holes.view(-1)
        for dx, dy in check:
            todo = flat.index_select(0, cell + (dy * Wc + dx)).nonzero().squeeze(1)
            target = cell.index_select(0, todo) + (dy * Wc + dx)
            du = u.index_select(0, todo) - ((target % Wc - P).double() + 0.5)
            dv = v.index_select(0, todo) - ((torch.div(target, Wc, rounding_mode="floor") - P).double() + 0.5)
            flat[target[(du * du + dv * dv) / s2 < r2]] = False
        return holes[P:P + H, P:P + W].clone()
