"""Optional numba CPU kernel for :mod:`worldstereo_core.geometry.renderer`.

Imported only when numba is available (it is not a hard dependency). Same semantics as the
PyTorch path: per pixel, the ``K`` fragments nearest in view z (ties: lower point index first),
coverage ``d2 < r2`` with ``d2 = (du*du + dv*dv) / s2`` (pixel units over ``s2 = (min(H,W)/2)^2``),
weight ``1 - d2 / r2``, front-to-back alpha compositing in float64.

Per frame, :func:`depth_order` puts the points that can reach the image in approximate
front-to-back order by a stable counting sort on depth buckets (equal depths share a bucket, so
ties stay in index order). :func:`raster_band` then handles one band of rows: it scans the ordered
points, inserts them into per-pixel depth-sorted lists of length ``K`` (thanks to the ordering,
mostly appends) and composites. No global fragment sort is needed and memory stays per band.
Both functions release the GIL, so the caller runs frames and bands on a plain thread pool (no
numba threading layer, hence no spin-waiting worker threads and no nested-parallelism limits).

They compile once per process (about a second) and are not cached on disk: numba's cache is keyed
by source file but records the module's import name, and this package is imported under different
names (``worldstereo_core`` by the CLI and tests, a path-derived name inside ComfyUI), so a cache
written under one name breaks the other with "No module named ...".
"""
from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True)
def depth_order(z, u, v, height, width, r_px, us, vs, zs, ps):  # pragma: no cover - compiled
    """Write the points that can cover a pixel (z >= 0, near the image) into us/vs/zs/ps, ordered
    by depth bucket and, within a bucket, by index. Returns their count."""
    umin, umax = -r_px - 1.0, width + r_px + 1.0
    vmin, vmax = -r_px - 1.0, height + r_px + 1.0
    n = z.shape[0]
    count = 0
    zmin, zmax = np.inf, -np.inf
    for p in range(n):
        if z[p] >= 0.0 and umin < u[p] < umax and vmin < v[p] < vmax:
            count += 1
            zmin = min(zmin, z[p])
            zmax = max(zmax, z[p])
    if count == 0:
        return 0
    n_buckets = max(1, count // 4)
    span = zmax - zmin
    scale = n_buckets / span if span > 0.0 and math.isfinite(span) else 0.0
    start = np.zeros(n_buckets + 1, np.int64)
    for p in range(n):
        if z[p] >= 0.0 and umin < u[p] < umax and vmin < v[p] < vmax:
            start[min(int((z[p] - zmin) * scale), n_buckets - 1) + 1] += 1
    for b in range(n_buckets):
        start[b + 1] += start[b]
    for p in range(n):
        if z[p] >= 0.0 and umin < u[p] < umax and vmin < v[p] < vmax:
            b = min(int((z[p] - zmin) * scale), n_buckets - 1)
            q = start[b]
            start[b] = q + 1
            us[q], vs[q], zs[q], ps[q] = u[p], v[p], z[p], p
    return count


@numba.njit(nogil=True)
def raster_band(u, v, colors, us, vs, zs, ps, n_valid, y0, y1, s2, r2, r_px, k_max, background,
                out_rgb, out_mask):  # pragma: no cover - compiled
    """Rasterise and composite rows y0..y1-1 of one frame.

    u, v: (N,) float64 pixel coordinates of the frame's points; colors: (N, 3) float64;
    us, vs, zs, ps: the first ``n_valid`` entries are the ordered points from :func:`depth_order`;
    background: (3,) float64; out_rgb: (3, H, W) float32 and out_mask: (H, W) float32 of the frame.
    """
    width = out_mask.shape[1]
    rows = y1 - y0
    zbuf = np.empty((rows, width, k_max), np.float64)
    ibuf = np.empty((rows, width, k_max), np.int32)
    count = np.zeros((rows, width), np.int32)
    # Candidate rows/cols from floor(c - 0.5 - r_px) to ceil(c - 0.5 + r_px): one more than
    # strictly needed on each side, so float rounding there can never drop a covered pixel.
    vmin = y0 - r_px - 1.0
    vmax = y1 + r_px + 1.0
    for q in range(n_valid):
        vp = vs[q]
        if not (vp > vmin and vp < vmax):
            continue
        up, zp, p = us[q], zs[q], ps[q]
        j_lo = max(int(math.floor(vp - 0.5 - r_px)), y0)
        j_hi = min(int(math.ceil(vp - 0.5 + r_px)), y1 - 1)
        i_lo = max(int(math.floor(up - 0.5 - r_px)), 0)
        i_hi = min(int(math.ceil(up - 0.5 + r_px)), width - 1)
        for j in range(j_lo, j_hi + 1):
            dv = vp - (j + 0.5)
            jj = j - y0
            for i in range(i_lo, i_hi + 1):
                du = up - (i + 0.5)
                d2 = (du * du + dv * dv) / s2
                if not d2 < r2:
                    continue
                c = count[jj, i]
                if c == k_max:
                    if zp >= zbuf[jj, i, k_max - 1]:
                        continue
                    pos = k_max - 1
                else:
                    pos = c
                    count[jj, i] = c + 1
                while pos > 0 and zbuf[jj, i, pos - 1] > zp:
                    zbuf[jj, i, pos] = zbuf[jj, i, pos - 1]
                    ibuf[jj, i, pos] = ibuf[jj, i, pos - 1]
                    pos -= 1
                zbuf[jj, i, pos] = zp
                ibuf[jj, i, pos] = p
    for jj in range(rows):
        j = y0 + jj
        for i in range(width):
            c = count[jj, i]
            if c == 0:
                out_mask[j, i] = 1.0
                for ch in range(3):
                    out_rgb[ch, j, i] = background[ch]
                continue
            out_mask[j, i] = 0.0
            trans = 1.0
            acc0 = 0.0
            acc1 = 0.0
            acc2 = 0.0
            for k in range(c):
                p = ibuf[jj, i, k]
                du = u[p] - (i + 0.5)
                dv = v[p] - (j + 0.5)
                w = 1.0 - ((du * du + dv * dv) / s2) / r2
                wt = w * trans
                acc0 += wt * colors[p, 0]
                acc1 += wt * colors[p, 1]
                acc2 += wt * colors[p, 2]
                trans = trans * (1.0 - w)
            out_rgb[0, j, i] = acc0
            out_rgb[1, j, i] = acc1
            out_rgb[2, j, i] = acc2
