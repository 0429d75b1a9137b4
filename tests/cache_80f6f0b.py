"""The global-cache merge as of commit 80f6f0b, kept only as the reference the current merge is
compared with (``tests/memory/test_cache.py``) and timed against (``benchmarks/cache.py``).

Per frame it projects the whole cache twice in float64 (alignment), renders the whole cache to find
holes, tests new points against the sorted voxel keys of the whole cache, and after the frames
re-thins the whole cloud (adaptive voxel search) whenever it holds more than ``max_points``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from worldstereo_core.cameras import as_tensor, invert_rigid, project_points, unproject_depth, unproject_pixels
from worldstereo_core.geometry.alignment import umeyama_ransac
from worldstereo_core.geometry.depth import MIN_POINTS, image_to_rgb01, keep_mask
from worldstereo_core.geometry.pointcloud import PointCloud, concatenate, statistical_outlier_removal, voxel_keys
from worldstereo_core.geometry.renderer import render_point_cloud
from worldstereo_core.io.images import load_image
from worldstereo_core.memory.cache import CacheSettings, depth_map


def nearest_points_per_pixel(pts: torch.Tensor, K, w2c, height: int, width: int):
    uv, z = project_points(pts, K, w2c)
    u, v = torch.floor(uv[:, 0]), torch.floor(uv[:, 1])
    ok = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    idx = ok.nonzero().squeeze(1)
    pix = (v[idx] * width + u[idx]).long()
    zbuf = torch.full((height * width,), math.inf, dtype=torch.float64).scatter_reduce(0, pix, z[idx], reduce="amin")
    front = z[idx] == zbuf[pix]
    idx, pix = idx[front], pix[front]
    best = torch.full((height * width,), len(pts), dtype=torch.long).scatter_reduce(0, pix, idx, reduce="amin")
    pix = (best < len(pts)).nonzero().squeeze(1)
    idx = best[pix]
    return idx, pix, uv[idx]


def align(xyz, d, keep, K, w2c, settings: CacheSettings):
    """(similarity or None, correspondences, inliers)."""
    H, W = d.shape
    pts = as_tensor(xyz, dtype=torch.float64)
    idx, _, uv = nearest_points_per_pixel(pts, K, w2c, H, W)
    grid = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], dim=-1)[None, None]
    maps = torch.stack([d.to(torch.float64), keep.to(torch.float64)])[None]
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    dd, inside = sampled[0], sampled[1] > 1 - 1e-9
    idx, uv, dd = idx[inside], uv[inside], dd[inside]
    if len(idx) > settings.max_correspondences:
        gen = torch.Generator().manual_seed(settings.seed)
        pick = torch.randperm(len(idx), generator=gen)[:settings.max_correspondences].sort().values
        idx, uv, dd = idx[pick], uv[pick], dd[pick]
    src, dst = unproject_pixels(uv, dd, K, invert_rigid(w2c)), pts[idx]
    if len(src) < settings.min_correspondences:
        return None, len(src), 0
    distance = float(torch.median((dst - invert_rigid(w2c)[:3, 3]).norm(dim=1)))
    T, inliers = umeyama_ransac(src, dst, threshold=settings.align_threshold * distance,
                                iterations=settings.ransac_iterations, min_inlier_ratio=settings.min_inlier_ratio,
                                seed=settings.seed)
    count = int(inliers.sum())
    return (T if count >= settings.min_correspondences else None), len(src), count


def merge_80f6f0b(cloud: PointCloud, scale: float, settings: CacheSettings, frames: Sequence, w2c, K,
                  depth_fn) -> tuple[PointCloud, list[int]]:
    """The merged cloud and the points added per frame (0 for skipped frames)."""
    voxel = settings.voxel_fraction * scale
    w2c_t = as_tensor(w2c, dtype=torch.float64).reshape(-1, 4, 4)
    K_t = as_tensor(K, dtype=torch.float64)
    K_t = K_t.expand(len(w2c_t), 3, 3) if K_t.dim() == 2 else K_t
    render_kwargs = {"radius": settings.render_radius, "points_per_pixel": settings.points_per_pixel}
    occupied = np.sort(voxel_keys(cloud.xyz, voxel)) if len(cloud) else np.zeros(0, np.int64)
    added = []
    for frame, K_i, w2c_i in zip(frames, K_t, w2c_t):
        frame = load_image(frame)
        rgb = image_to_rgb01(frame)
        H, W = rgb.shape[:2]
        depth = depth_map(depth_fn(frame, K_i, w2c_i))
        keep, d = keep_mask(depth, sobel_threshold=settings.edge_threshold)
        T, _, _ = align(cloud.xyz, d, keep, K_i, w2c_i, settings)
        if T is None:
            added.append(0)
            continue
        _, mask = render_point_cloud(cloud.xyz, cloud.rgb_signed, K_i[None], w2c_i[None], H, W, **render_kwargs)
        new = keep & (mask[0, 0] > 0.5)
        if int(new.sum()) < MIN_POINTS:
            added.append(0)
            continue
        world = unproject_depth(d.to(torch.float64), K_i, invert_rigid(w2c_i))[new]
        fresh = PointCloud(T.apply(world).float(), rgb[new])
        if len(fresh) > settings.sor_neighbours:
            fresh = fresh.select(statistical_outlier_removal(fresh.xyz, settings.sor_neighbours, settings.sor_std_ratio))
        keys, first = np.unique(voxel_keys(fresh.xyz, voxel), return_index=True)
        pos = np.searchsorted(occupied, keys).clip(max=max(len(occupied) - 1, 0))
        free = occupied[pos] != keys if len(occupied) else np.ones(len(keys), bool)
        occupied = np.sort(np.concatenate([occupied, keys[free]]), kind="stable")
        fresh = fresh.select(np.sort(first[free]))
        added.append(len(fresh))
        if len(fresh):
            cloud = concatenate([cloud, fresh])
    if settings.max_points is not None and len(cloud) > settings.max_points:
        cloud = cloud.adaptive_downsample(settings.max_points)[0]
    return cloud, added
