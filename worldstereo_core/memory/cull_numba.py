"""Optional numba CPU kernel for :meth:`worldstereo_core.memory.cache_view.CacheView.cull`.

Imported only when numba is available. One pass over the given rows of the cache: camera
coordinates, the frustum test and the projection of the points kept, in float32 with the
operations of the torch path in the same order (no fused multiply-adds), so both give identical
results.
"""
from __future__ import annotations

import numba


@numba.njit(cache=True, error_model="numpy")
def cull_rows(xyz, first, last, rotation, translation, planes, reach, intrinsics, index, uv, z):  # pragma: no cover
    """Write the rows ``first[r]:last[r]`` of ``xyz`` (N, 3) float32 whose point lies within
    ``reach`` of the frustum into ``index`` (the row), ``uv`` and ``z``; returns their count.

    rotation (3, 3), translation (3,), planes (4, 3) float32 (see cache_view._side_planes);
    reach float32; intrinsics float32 (fx, skew, cx, fy, cy)."""
    fx, skew, cx, fy, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3], intrinsics[4]
    count = 0
    for r in range(first.shape[0]):
        for i in range(first[r], last[r]):
            px, py, pz = xyz[i, 0], xyz[i, 1], xyz[i, 2]
            cz = rotation[2, 0] * px + rotation[2, 1] * py + rotation[2, 2] * pz + translation[2]
            if not cz > -reach:
                continue
            cx_ = rotation[0, 0] * px + rotation[0, 1] * py + rotation[0, 2] * pz + translation[0]
            cy_ = rotation[1, 0] * px + rotation[1, 1] * py + rotation[1, 2] * pz + translation[1]
            inside = True
            for p in range(4):
                if not planes[p, 0] * cx_ + planes[p, 1] * cy_ + planes[p, 2] * cz > -reach:
                    inside = False
                    break
            if not inside:
                continue
            index[count] = i
            uv[count, 0] = (fx * cx_ + skew * cy_) / cz + cx
            uv[count, 1] = fy * cy_ / cz + cy
            z[count] = cz
            count += 1
    return count
