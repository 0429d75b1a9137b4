"""Global 3D cache: time and peak memory of one trajectory's merge (8 frames at 480x832), CPU.

Run: ``python benchmarks/cache.py [--cases 0.5 1.5 5 1.5+3.5 thin --threads 1 2 --impls new old --repeats 3]``;
writes ``benchmarks/results/cache.json``.

Scene: a synthetic box room with exact depth (tests/synthetic_scene.py). The cache starts with
0.5, 1.5 or 5 million points (the case's name) spread over the room's walls; one trajectory update
then folds in the 8 kept frames (sample_align_nframe(21, 8)) of a 180-degree orbit, each with its
own depth scale drift, exactly as the loop does (depth edges, correspondences + RANSAC Umeyama,
hole test, outlier removal, voxel test). The depth function's own time (MoGe's in a real run) is
excluded. These cases merge without thinning (``max_points=None``); ``1.5+3.5`` adds 3.5 M points
above the room, outside every view, to show that the time follows the points in view; ``thin`` is
the 5 M cache with the default ``max_points`` (4 M), so the update also thins it.

Every measurement runs in a fresh process (``--child``), so its peak memory is its own: peak resident
memory during the update minus the resident memory before it (Linux ``clear_refs``/``VmHWM``) and
minus the cache's own growth (24 bytes per point added), divided by the cache's points.
``--threads`` sets ``torch.set_num_threads`` in the child (the new merge runs its ops on one thread
whatever the setting; the old one uses them). ``prepare_s`` is what precedes the update: building
the new cache (grouping its rows by cell), nothing for the old one. Implementations (``new``: this
version; ``old``: the merge of commit 80f6f0b, tests/cache_80f6f0b.py), cases and thread counts are
interleaved within every repeat; medians over the repeats are reported with the load average
around the run.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hardware import environment  # noqa: E402
from synthetic_scene import room_for_scale  # noqa: E402
from worldstereo_core.cameras import intrinsics_from_fov  # noqa: E402
from worldstereo_core.geometry.pointcloud import PointCloud, concatenate  # noqa: E402
from worldstereo_core.geometry.trajectories import reconstruction_trajectories  # noqa: E402
from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.memory.bank import sample_align_nframe  # noqa: E402
from worldstereo_core.memory.cache import CacheSettings, PointCache  # noqa: E402
from worldstereo_core.memory.cache_view import CacheView  # noqa: E402

M = 2.0
H, W = 480, 832
#: Cases: name -> (million points on the walls, million points outside every view, max_points).
CASES = {"0.5": (0.5, 0.0, None), "1.5": (1.5, 0.0, None), "5": (5.0, 0.0, None),
         "1.5+3.5": (1.5, 3.5, None), "thin": (5.0, 0.0, CacheSettings().max_points)}


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


def out_of_view_points(room, n: int, seed: int = 1) -> PointCloud:
    """``n`` points on a plane far above the room (y down): outside the frustum of every camera."""
    rng = np.random.default_rng(seed)
    lo, hi = room.lo.numpy(), room.hi.numpy()
    p = lo + rng.random((n, 3)) * (hi - lo)
    p[:, 1] = lo[1] - 20 * M
    return PointCloud(torch.from_numpy(p).float(), torch.full((n, 3), 0.5))


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, case: str, threads: int) -> dict:
    """One timed update in this process; returns the measurement."""
    torch.set_num_threads(threads)
    wall, outside, max_points = CASES[case]
    room = room_for_scale(M)
    K = intrinsics_from_fov(W, H, 60.0)
    right = reconstruction_trajectories(torch.eye(4), K, W, H, M)["traj_right"]
    keep = sample_align_nframe(21, 8)
    frames = [room.image(right.K[i], right.w2c[i], H, W) for i in keep]
    drift = np.random.default_rng(0).uniform(0.8, 1.25, len(keep))
    depths = [room.depth(right.K[i], right.w2c[i], H, W) * float(d) for i, d in zip(keep, drift)]
    start = wall_points(room, int(wall * 1e6))
    if outside:
        start = concatenate([start, out_of_view_points(room, int(outside * 1e6))])
    settings = CacheSettings(max_points=max_points)
    depth_seconds = []

    def depth_fn(image, K_, w2c_):  # precomputed exact depth x drift; only the lookup is timed
        t0 = time.perf_counter()
        d = depths[next(j for j, k in enumerate(keep) if torch.equal(w2c_, right.w2c[k]))]
        depth_seconds.append(time.perf_counter() - t0)
        return d

    # warm-up on a small cache (numba kernels load, first-call allocations), then the timed update
    warm = wall_points(room, 20000)
    run = _runner(impl, settings)
    run(warm, frames[:2], right.w2c[keep[:2]], right.K[keep[:2]], depth_fn)
    t0 = time.perf_counter()
    state = run.prepare(start)
    prepare_s = time.perf_counter() - t0
    depth_seconds.clear()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so the peak counts it again
    rss_before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident memory (VmHWM)
    t0, c0 = time.perf_counter(), time.process_time()
    added = run(state, frames, right.w2c[keep], right.K[keep], depth_fn)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak_extra = (_memory_kib("VmHWM") - rss_before) * 1024
    grown = sum(added) * 24  # the cache's own growth (xyz + rgb float32) is not extra memory
    out = {"impl": impl, "case": case, "threads": threads, "cache_points": len(start),
           "update_s": wall_s - sum(depth_seconds), "cpu_s": cpu_s, "prepare_s": prepare_s,
           "peak_extra_bytes": peak_extra, "peak_extra_bytes_per_point": (peak_extra - grown) / len(start),
           "points_added": sum(added)}
    if impl == "new":
        inview = [len(CacheView.cull(start.xyz, right.K[k], right.w2c[k], H, W, margin=1.0 + 0.008 * H / 2))
                  for k in keep]
        out["points_in_view_mean"] = float(np.mean(inview))
    return out


def _runner(impl: str, settings: CacheSettings):
    """``run(cache_or_cloud, frames, w2c, K, depth_fn) -> points added per frame`` and
    ``run.prepare(cloud)`` (what is built before the update: the new cache's cell index)."""
    if impl == "new":
        def run(cache, frames, w2c, K, depth_fn):
            cache = cache if isinstance(cache, PointCache) else PointCache(cache, M, settings=settings, device="cpu")
            record = cache.update(frames, w2c, K, depth_fn)
            return [f.added for f in record.frames]

        run.prepare = lambda cloud: PointCache(cloud, M, settings=settings, device="cpu")
    else:
        from cache_80f6f0b import merge_80f6f0b

        def run(cloud, frames, w2c, K, depth_fn):
            return merge_80f6f0b(cloud, M, settings, frames, w2c, K, depth_fn)[1]

        run.prepare = lambda cloud: cloud
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--impls", nargs="+", default=["new", "old"], choices=["new", "old"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache.json")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "CASE", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return

    load_before = os.getloadavg()
    runs = []
    for repeat in range(args.repeats):
        for case in args.cases:
            for threads in args.threads:
                for impl in args.impls:
                    proc = subprocess.run([sys.executable, __file__, "--child", impl, case, str(threads)],
                                          capture_output=True, text=True, check=True)
                    runs.append({"repeat": repeat, **json.loads(proc.stdout.splitlines()[-1])})
                    r = runs[-1]
                    print(f"[{repeat}] {case:8s} {impl} {threads}t: {r['update_s']:.2f} s, "
                          f"{r['peak_extra_bytes_per_point']:.1f} B/point", flush=True)
    summary = []
    for case in args.cases:
        for threads in args.threads:
            for impl in args.impls:
                mine = [r for r in runs if (r["case"], r["threads"], r["impl"]) == (case, threads, impl)]
                summary.append({
                    "case": case, "impl": impl, "threads": threads, "cache_points": mine[0]["cache_points"],
                    "update_s_median": statistics.median(r["update_s"] for r in mine),
                    "update_s_min": min(r["update_s"] for r in mine),
                    "cpu_s_median": statistics.median(r["cpu_s"] for r in mine),
                    "prepare_s_median": statistics.median(r["prepare_s"] for r in mine),
                    "peak_extra_bytes_per_point_max": max(r["peak_extra_bytes_per_point"] for r in mine),
                    "points_added": mine[0]["points_added"],
                    **({"points_in_view_mean": mine[0]["points_in_view_mean"]} if impl == "new" else {})})
    result = {
        "benchmark": "cache merge per trajectory (8 kept frames of 480x832)",
        "command": "python benchmarks/cache.py " + " ".join(sys.argv[1:]),
        "cases": {k: {"wall_million": v[0], "outside_million": v[1], "max_points": v[2]} for k, v in CASES.items()
                  if k in args.cases},
        "summary": summary,
        "runs": runs,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "hardware": environment(),
    }
    write_json_atomic(args.out, result)
    for s in summary:
        print(f"{s['case']:8s} {s['impl']} {s['threads']}t: median {s['update_s_median']:.2f} s, "
              f"peak +{s['peak_extra_bytes_per_point_max']:.1f} B/point")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
