"""Global 3D cache: merge time per trajectory at a realistic size (CPU).

Run: ``python benchmarks/cache.py [--height 480 --width 832 --cache-points 1500000 --repeats 2]``;
writes ``benchmarks/results/cache.json``.

Scene: a synthetic box room with exact depth (tests/synthetic_scene.py). The cache starts with
about ``--cache-points`` points on the room's walls; one trajectory update then folds in the 8
kept frames (sample_align_nframe(21, 8)) of a 180-degree orbit at 480x832, each with its own depth
scale drift, exactly as the loop does: depth edges, projective correspondences + RANSAC Umeyama,
hole render of the cache in that view, outlier removal and the voxel test. The time of the depth
function itself (MoGe's job in a real run) is measured separately and excluded. Also reported:
rendering the next trajectory's 21 frames from the merged cache.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hardware import cpu_name  # noqa: E402
from synthetic_scene import room_for_scale  # noqa: E402
from worldstereo_core.cameras import intrinsics_from_fov  # noqa: E402
from worldstereo_core.geometry.pointcloud import PointCloud  # noqa: E402
from worldstereo_core.geometry.renderer import numba_available, resolve_backend  # noqa: E402
from worldstereo_core.geometry.trajectories import reconstruction_trajectories  # noqa: E402
from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.memory.bank import sample_align_nframe  # noqa: E402
from worldstereo_core.memory.cache import CacheSettings, PointCache  # noqa: E402

M = 2.0


def wall_points(room, n: int, seed: int = 0) -> PointCloud:
    """About ``n`` points spread uniformly (by area) over the six faces of the room."""
    rng = np.random.default_rng(seed)
    lo, hi = room.lo.numpy(), room.hi.numpy()
    size = hi - lo
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]]).repeat(2)
    counts = rng.multinomial(n, areas / areas.sum())
    parts = []
    for face, count in enumerate(counts):
        axis, side = divmod(face, 2)
        p = lo + rng.random((count, 3)) * size
        p[:, axis] = hi[axis] if side else lo[axis]
        parts.append(p)
    xyz = torch.from_numpy(np.concatenate(parts))
    return PointCloud(xyz.float(), room.colour(xyz).float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--cache-points", type=int, default=1_500_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache.json")
    args = parser.parse_args()
    H, W = args.height, args.width

    room = room_for_scale(M)
    K = intrinsics_from_fov(W, H, 60.0)
    trajs = reconstruction_trajectories(torch.eye(4), K, W, H, M)
    right, left = trajs["traj_right"], trajs["traj_left"]
    keep = sample_align_nframe(21, 8)
    frames = [room.image(right.K[i], right.w2c[i], H, W) for i in keep]
    depths = [room.depth(right.K[i], right.w2c[i], H, W) for i in keep]
    drift = np.random.default_rng(0).uniform(0.8, 1.25, len(keep))
    start = wall_points(room, args.cache_points)
    settings = CacheSettings()

    depth_seconds = []

    def depth_fn(image, K_, w2c_):  # precomputed exact depth x drift; only the lookup is timed
        t0 = time.perf_counter()
        i = next(j for j, k in enumerate(keep) if torch.equal(w2c_, right.w2c[k]))
        d = depths[i] * float(drift[i])
        depth_seconds.append(time.perf_counter() - t0)
        return d

    runs = []
    for _ in range(args.repeats):
        cache = PointCache(start, M, settings=settings)
        depth_seconds.clear()
        t0 = time.perf_counter()
        record = cache.update(frames, right.w2c[keep], right.K[keep], depth_fn, label="traj_right")
        total = time.perf_counter() - t0
        runs.append({"update_s": total - sum(depth_seconds), "depth_fn_s": sum(depth_seconds),
                     "points_before": record.points_before, "points_after": record.points_after,
                     "frames_aligned": sum(f.skipped is None for f in record.frames),
                     "scale_error_max": max(abs(f.scale * d - 1) for f, d in zip(record.frames, drift)
                                            if f.scale is not None)})
    t0 = time.perf_counter()
    cache.render(left, torch.zeros(3, H, W), H, W)
    render_s = time.perf_counter() - t0

    update = [r["update_s"] for r in runs]
    result = {
        "benchmark": "cache merge per trajectory (8 kept frames)",
        "command": "python benchmarks/cache.py " + " ".join(sys.argv[1:]),
        "frame_size": [H, W],
        "kept_frames": len(keep),
        "cache_points_start": len(start),
        "runs": runs,
        "update_s_min": min(update),
        "update_s_median": statistics.median(update),
        "update_s_per_frame_min": min(update) / len(keep),
        "render_next_trajectory_21_frames_s": render_s,
        "render_backend": resolve_backend("auto"),
        "settings": {k: getattr(settings, k) for k in ("voxel_fraction", "align_threshold", "ransac_iterations",
                                                        "max_correspondences", "render_radius")},
        "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "numba": numba_available(), "python": platform.python_version(),
                     "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    write_json_atomic(args.out, result)
    print(f"cache update: {min(update):.2f} s per trajectory ({min(update) / len(keep):.2f} s per frame), "
          f"{runs[0]['points_before']} -> {runs[0]['points_after']} points; "
          f"next-trajectory render {render_s:.2f} s -> {args.out}")


if __name__ == "__main__":
    main()
