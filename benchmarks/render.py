"""Warp renderer speed at the reference setting: 480x832, ~400k points, 21 frames, r=0.008, K=20.

Run: ``python benchmarks/render.py [--repeats 2] [--backends numba torch]``; writes
``benchmarks/results/render.json``. Target (issue 2): <= 150 ms/frame on 2 CPU cores.

Scene: a 480x832 depth map (smooth surface 1.5-6.5 units away, slanted floor, small noise) lifted
through the frame-0 camera, one point per pixel (399,360 points) with random colours, rendered
into an elliptic look-at loop with a slow forward drift (camera shifts up to ~0.45 units and
turns up to ~12 degrees), like the reconstruction eloop. Each timing renders all 21 frames;
reported: min / median / max wall ms per frame and process CPU ms per frame (the minimum wall
time is the cost itself; the median also carries whatever else loads the machine, see
``load_average``), plus the CPU ms per frame of a run with torch and numba on one thread, which
measures the work without thread spin-waits or other processes' load.

Brute force (tests/render_reference.py: every point tested against every pixel in float64) is
timed on a small problem and extrapolated two ways: (a) per pixel-point test, its actual cost
model (time / (frames * pixels * points), times the same product at full size); (b) per fragment
(time / fragments of the small problem, times the fragments of the full problem), a much lower,
optimistic bound. The speed ratio uses (a).
"""
from __future__ import annotations

import argparse
import math
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
from render_reference import render_brute_force  # noqa: E402
from worldstereo_core.cameras import (invert_rigid, look_at_rotation, make_pose,  # noqa: E402
                                      project_points, unproject_depth)
from worldstereo_core.constants import RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC  # noqa: E402
from worldstereo_core.geometry.renderer import (numba_available, pytorch3d_available,  # noqa: E402
                                                render_point_cloud)
from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402

HEIGHT, WIDTH, FRAMES = 480, 832, 21


def lifted_scene(height: int, width: int, seed: int = 0):
    """Points (H*W, 3) float32, colours in [-1, 1], and the frame-0 K (float64)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[0.6 * width, 0, width / 2], [0, 0.6 * width, height / 2], [0, 0, 1]],
                     dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height, dtype=torch.float64),
                            torch.linspace(0, 1, width, dtype=torch.float64), indexing="ij")
    depth = 3.0 + 1.5 * torch.sin(3 * xx) * torch.cos(2 * yy) + 2.0 * yy ** 2
    depth = depth + 0.02 * torch.rand(height, width, generator=g, dtype=torch.float64)
    points = unproject_depth(depth, K, torch.eye(4, dtype=torch.float64)).reshape(-1, 3).float()
    colors = torch.rand(points.shape, generator=g) * 2 - 1
    return points, colors, K, float(depth.median())


def loop_cameras(n: int, m: float) -> torch.Tensor:
    """w2c (n, 4, 4): ellipse (0.12 m, 0.15 m) in the image plane plus a forward drift, looking at
    the point at depth m (frame 0 is the identity)."""
    poses = []
    for k in range(n):
        a = 2 * math.pi * k / (n - 1)
        center = torch.tensor([0.12 * m * math.sin(a), 0.15 * m * (math.cos(a) - 1), 0.05 * m * k / n],
                              dtype=torch.float64)
        R = look_at_rotation(center, torch.tensor([0.0, 0.0, m], dtype=torch.float64))
        poses.append(invert_rigid(make_pose(R, center)))
    return torch.stack(poses)


def fragment_count(points, K, w2c, height, width, radius) -> int:
    """Number of (pixel, point) coverages, counted in numpy (for the per-fragment extrapolation)."""
    uv, z = project_points(points.double(), K, w2c)
    s = min(height, width) / 2
    reach = int(math.ceil(radius * s)) + 1
    total = 0
    for f in range(len(w2c)):
        u, v = uv[f, :, 0].numpy(), uv[f, :, 1].numpy()
        ok = z[f].numpy() >= 0
        for dj in range(-reach, reach + 1):
            for di in range(-reach, reach + 1):
                i, j = np.floor(u) + di, np.floor(v) + dj
                d2 = ((u - i - 0.5) ** 2 + (v - j - 0.5) ** 2) / (s * s)
                total += int((ok & (d2 < radius * radius) & (i >= 0) & (i < width)
                              & (j >= 0) & (j < height)).sum())
    return total


def time_backend(backend, points, colors, K, w2c, repeats, sync=lambda: None) -> dict:
    t0 = time.perf_counter()
    render_point_cloud(points, colors, K[:1], w2c[:1], HEIGHT, WIDTH, backend=backend)  # warm-up / JIT
    sync()
    first_call_s = time.perf_counter() - t0
    runs, cpu0 = [], time.process_time()
    for _ in range(repeats):
        t0 = time.perf_counter()
        rgb, mask = render_point_cloud(points, colors, K, w2c, HEIGHT, WIDTH, backend=backend)
        sync()
        runs.append((time.perf_counter() - t0) * 1e3 / len(w2c))
    cpu = (time.process_time() - cpu0) * 1e3 / (repeats * len(w2c))
    return {"min_ms_per_frame": min(runs), "median_ms_per_frame": statistics.median(runs),
            "max_ms_per_frame": max(runs), "cpu_ms_per_frame": cpu, "first_call_s": first_call_s,
            "hole_fraction": float(mask.float().mean()), "_out": (rgb.cpu(), mask.cpu())}


def single_thread_cpu(backend, points, colors, K, w2c) -> float:
    """Process CPU ms per frame with one thread (torch's thread count also sizes the numba
    backend's thread pool): the work itself, free of thread spin-waits and of other processes'
    load. On an idle machine the 2-thread wall time of the numba backend is roughly half."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu0 = time.process_time()
        render_point_cloud(points, colors, K, w2c, HEIGHT, WIDTH, backend=backend)
        return (time.process_time() - cpu0) * 1e3 / len(w2c)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", nargs="*", default=None,
                        help="subset of numba torch pytorch3d (default: all available)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "render.json"))
    args = parser.parse_args()

    points, colors, K0, m = lifted_scene(HEIGHT, WIDTH)
    w2c = loop_cameras(FRAMES, m)
    K = K0.expand(FRAMES, 3, 3)
    backends = args.backends or (["numba"] if numba_available() else []) + ["torch"] + (
        ["pytorch3d"] if pytorch3d_available() else [])

    results, outputs = {}, {}
    for name in backends:
        res = time_backend(name, points, colors, K, w2c, args.repeats)
        outputs[name] = res.pop("_out")
        res["single_thread_cpu_ms_per_frame"] = single_thread_cpu(name, points, colors, K, w2c)
        results[f"{name}_cpu"] = res
        print(name, {k: round(v, 3) for k, v in res.items()}, flush=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        res = time_backend("torch", points.to(dev), colors.to(dev), K.to(dev), w2c.to(dev),
                           args.repeats, sync=torch.cuda.synchronize)
        outputs["torch_cuda"] = res.pop("_out")
        results["torch_cuda"] = res | {"device": torch.cuda.get_device_name(0)}
        print("torch cuda", results["torch_cuda"], flush=True)
    names = list(outputs)
    agreement = {f"{a}_vs_{b}": {"mask_mismatch_pixels": int((outputs[a][1] != outputs[b][1]).sum()),
                                 "max_colour_diff": float((outputs[a][0] - outputs[b][0]).abs().max())}
                 for a, b in zip(names, names[1:])}

    # brute force on a small problem of the same kind, extrapolated (see module docstring)
    bh, bw, bf = 48, 80, 2
    small_pts, small_cols, small_K, small_m = lifted_scene(bh, bw, seed=1)
    small_w2c = loop_cameras(FRAMES, small_m)[[5, 10]]
    small_K = small_K.expand(bf, 3, 3)
    radius = RENDER_RADIUS_NDC * min(HEIGHT, WIDTH) / min(bh, bw)  # same radius in pixels (1.92)
    t0 = time.perf_counter()
    render_brute_force(small_pts.double().numpy(), small_cols.double().numpy(), small_K.numpy(),
                       small_w2c.numpy(), bh, bw, radius, RENDER_POINTS_PER_PIXEL)
    brute_s = time.perf_counter() - t0
    pair_tests_small = bf * bh * bw * len(small_pts)
    pair_tests_full = FRAMES * HEIGHT * WIDTH * len(points)
    frags_small = fragment_count(small_pts, small_K, small_w2c, bh, bw, radius)
    frags_full = fragment_count(points, K, w2c, HEIGHT, WIDTH, RENDER_RADIUS_NDC)
    brute_per_frame_ms = brute_s / pair_tests_small * pair_tests_full / FRAMES * 1e3
    brute = {"small_problem": {"frames": bf, "height": bh, "width": bw, "points": len(small_pts),
                               "radius": radius, "seconds": brute_s, "fragments": frags_small},
             "full_problem_fragments": frags_full,
             "extrapolated_ms_per_frame_per_pixel_point_test": brute_per_frame_ms,
             "extrapolated_ms_per_frame_per_fragment": brute_s / frags_small * frags_full / FRAMES * 1e3}
    ratios = {k: brute_per_frame_ms / v["min_ms_per_frame"] for k, v in results.items()}

    report = {
        "benchmark": "point-cloud warp renderer",
        "command": "python benchmarks/render.py " + " ".join(sys.argv[1:]),
        "problem": {"height": HEIGHT, "width": WIDTH, "frames": FRAMES, "points": len(points),
                    "radius_ndc": RENDER_RADIUS_NDC, "points_per_pixel": RENDER_POINTS_PER_PIXEL,
                    "median_depth": m},
        "target_ms_per_frame": 150,
        "results": results,
        "backend_agreement": agreement,
        "brute_force": brute,
        "speed_ratio_vs_brute_force": ratios,
        "hardware": {"cpu_model": cpu_name(), "cpu_count": os.cpu_count(),
                     "threads": torch.get_num_threads(),  # torch's, also the numba thread pool
                     "torch_version": torch.__version__, "numba_version": _numba_version(),
                     "python": platform.python_version(),
                     "platform": platform.platform(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average": list(os.getloadavg()),
    }
    write_json_atomic(args.out, report)
    print("wrote", args.out)


def _numba_version():
    if not numba_available():
        return None
    import numba

    return numba.__version__


if __name__ == "__main__":
    main()
