"""Brute-force reference of the warp renderer semantics, for tests only (slow, float64, numpy).

Written directly from the specification (spec/geometry.md §5, fixtures/render/README.md), sharing
no code with worldstereo_core: for every pixel, every point is tested; the covering points are
ordered by (view z, point index), the first K are alpha-composited front to back.
"""
from __future__ import annotations

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def project(points, K, w2c):
    """Pinhole projection: u, v, z of shape (F, N), float64 (OpenCV axes, pixel units)."""
    X = np.asarray(points, np.float64)
    K = np.asarray(K, np.float64)
    w2c = np.asarray(w2c, np.float64)
    cam = np.einsum("fij,nj->fni", w2c[:, :3, :3], X) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[:, 0, 0, None] * cam[..., 0] / z + K[:, 0, 1, None] * cam[..., 1] / z + K[:, 0, 2, None]
        v = K[:, 1, 1, None] * cam[..., 1] / z + K[:, 1, 2, None]
    return u, v, z


def render_brute_force(points, colors, K, w2c, height, width, radius, points_per_pixel,
                       background=0.0):
    """(rgb (F,3,H,W), mask (F,1,H,W)) float64 by testing every point against every pixel."""
    u, v, z = project(points, K, w2c)
    colors = np.asarray(colors, np.float64)
    s = min(height, width) / 2.0
    r2 = radius * radius
    n_frames = u.shape[0]
    rgb = np.zeros((n_frames, 3, height, width))
    mask = np.zeros((n_frames, 1, height, width))
    index = np.arange(u.shape[1])
    for f in range(n_frames):
        for j in range(height):
            for i in range(width):
                with np.errstate(invalid="ignore"):
                    d2 = ((u[f] - (i + 0.5)) ** 2 + (v[f] - (j + 0.5)) ** 2) / (s * s)
                    covering = np.nonzero((z[f] >= 0) & (d2 < r2))[0]
                if covering.size == 0:
                    mask[f, 0, j, i] = 1.0
                    rgb[f, :, j, i] = background
                    continue
                nearest = covering[np.lexsort((index[covering], z[f, covering]))][:points_per_pixel]
                transmittance, colour = 1.0, np.zeros(3)
                for p in nearest:
                    w = 1.0 - d2[p] / r2
                    colour += w * transmittance * colors[p]
                    transmittance *= 1.0 - w
                rgb[f, :, j, i] = colour
    return rgb, mask


def boundary_margin(points, K, w2c, height, width, radius):
    """Smallest |d - r| (NDC) over all point/pixel pairs in front of the cameras, per point (N,)."""
    u, v, z = project(points, K, w2c)
    s = min(height, width) / 2.0
    margin = np.full(u.shape[1], np.inf)
    for f in range(u.shape[0]):
        for j in range(height):
            dv = (v[f] - (j + 0.5)) / s
            for i in range(width):
                d = np.hypot((u[f] - (i + 0.5)) / s, dv)
                m = np.where(z[f] >= 0, np.abs(d - radius), np.inf)
                margin = np.minimum(margin, m)
    return margin


def pytorch3d_effective_w2c(w2c):
    """The OpenCV w2c that pytorch3d actually used in the reference's float32 camera recipe.

    spec §5: c2w = inverse(w2c) (float32), negate its first two columns, R = c2w'[:3, :3],
    T = inverse(c2w')[:3, 3]; pytorch3d maps X -> X R + T (row vectors) with +x left, +y up.
    Converting (R, T) back gives the camera that produced the golden renders, including the
    float32 rounding of the two matrix inversions.
    """
    import torch

    w = torch.as_tensor(np.asarray(w2c), dtype=torch.float32)
    c2w = torch.linalg.inv(w).clone()
    c2w[:, :3, :2] *= -1
    T = torch.linalg.inv(c2w)[:, :3, 3].double().numpy()
    R = c2w[:, :3, :3].double().numpy()
    flip = np.diag([-1.0, -1.0, 1.0])
    out = np.tile(np.eye(4), (len(R), 1, 1))
    out[:, :3, :3] = flip @ np.transpose(R, (0, 2, 1))
    out[:, :3, 3] = T @ flip
    return out


def ambiguous_pixels(points, K, w2c, height, width, radius, points_per_pixel,
                     position_tol=1e-6, depth_ulps=2.0):
    """Pixels whose result is not determined at float32 precision, as (F, H, W) bool arrays.

    * ``boundary``: some point lies within ``position_tol`` (NDC) of the radius circle around the
      pixel centre, so float32 rounding may flip its coverage.
    * ``order``: two of the pixel's first K+1 covering points (by depth) are closer in depth than
      the float32 rounding of their view z (``depth_ulps`` float32 ulps of the largest term of
      ``z = R_2 . X + t_2``), so the front-to-back order, and with it the colour, is arbitrary.
    """
    X = np.asarray(points, np.float64)
    w2c = np.asarray(w2c, np.float64)
    u, v, z = project(X, K, w2c)
    z_tol = depth_ulps * FLOAT32_EPS * (np.abs(np.einsum("fj,nj->fnj", w2c[:, 2, :3], X)).sum(-1)
                                         + np.abs(w2c[:, 2, 3])[:, None])
    s = min(height, width) / 2.0
    reach = int(np.ceil(radius * s + position_tol * s)) + 1
    n_frames = u.shape[0]
    boundary = np.zeros((n_frames, height, width), bool)
    order = np.zeros((n_frames, height, width), bool)
    offsets = np.arange(-reach, reach + 1)
    for f in range(n_frames):
        ok = np.isfinite(u[f]) & np.isfinite(v[f]) & (z[f] >= 0)
        p = np.nonzero(ok)[0]
        cols = np.floor(u[f, p])[:, None, None].astype(np.int64) + offsets[None, None, :]
        rows = np.floor(v[f, p])[:, None, None].astype(np.int64) + offsets[None, :, None]
        cols, rows = np.broadcast_arrays(cols, rows)
        pid = np.broadcast_to(p[:, None, None], cols.shape)
        d = np.hypot((u[f, pid] - cols - 0.5) / s, (v[f, pid] - rows - 0.5) / s)
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        near = inside & (np.abs(d - radius) <= position_tol)
        boundary[f, rows[near], cols[near]] = True
        cover = inside & (d < radius)
        rr, cc, pp = rows[cover], cols[cover], pid[cover]
        key = rr * width + cc
        srt = np.lexsort((pp, z[f, pp], key))
        key, pp = key[srt], pp[srt]
        start = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
        rank = np.arange(key.size) - np.repeat(start, np.diff(np.r_[start, key.size]))
        same = (key[1:] == key[:-1]) & (rank[1:] <= points_per_pixel)
        close = np.abs(z[f, pp[1:]] - z[f, pp[:-1]]) <= z_tol[f, pp[1:]] + z_tol[f, pp[:-1]]
        hit = key[1:][same & close]
        order[f].flat[hit] = True
    return boundary, order
