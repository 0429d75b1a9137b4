"""PLY point-cloud files: our writer / reader against trimesh's, on a 2M-point cloud (CPU).

Run: ``python benchmarks/ply_files.py [--points 2000000] [--repeats 3]``; writes
``benchmarks/results/ply_files.json``: the minimum wall time of each (the median also carries
whatever else loads the machine: see ``load_average``), the file sizes and trimesh's vertex layout.
Why it exists: :mod:`worldstereo_core.io.pointcloud_files` writes PLY itself instead of through
trimesh (issue 14), and these are the numbers behind that choice.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worldstereo_core.geometry.pointcloud import PointCloud  # noqa: E402
from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.io.pointcloud_files import read_ply, write_ply  # noqa: E402


def _times(fn, repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ply_files.json")
    args = parser.parse_args()
    import trimesh

    rng = np.random.default_rng(0)
    cloud = PointCloud(rng.normal(size=(args.points, 3)).astype(np.float32),
                       rng.integers(0, 256, size=(args.points, 3), dtype=np.uint8))
    folder = Path(tempfile.mkdtemp())
    ours, theirs = folder / "ours.ply", folder / "trimesh.ply"

    def trimesh_write() -> None:
        rgba = np.concatenate([cloud.rgb_uint8, np.full((len(cloud), 1), 255, np.uint8)], axis=1)
        theirs.write_bytes(trimesh.PointCloud(cloud.xyz.numpy(), colors=rgba).export(file_type="ply",
                                                                                         encoding="binary"))

    results = {
        "points": args.points, "repeats": args.repeats, "trimesh": trimesh.__version__,
        "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
        "write_ours": _times(lambda: write_ply(ours, cloud), args.repeats),
        "write_trimesh": _times(trimesh_write, args.repeats),
        "read_ours": _times(lambda: read_ply(ours), args.repeats),
        "read_trimesh": _times(lambda: trimesh.load(str(ours)), args.repeats),
        "bytes_ours": ours.stat().st_size, "bytes_trimesh": theirs.stat().st_size,
        "trimesh_header": theirs.read_bytes()[:400].split(b"end_header")[0].decode().splitlines(),
    }
    for path in (ours, theirs):
        path.unlink()
    folder.rmdir()
    write_json_atomic(args.out, results)
    print(results)


if __name__ == "__main__":
    main()
