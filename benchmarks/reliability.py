"""Reliability of multi-trajectory runs under real kills and concurrent starts (tiny models, CPU).

Run: ``python benchmarks/reliability.py [--loops 4 --concurrent 4 --seed 0]``; writes
``benchmarks/results/reliability.json``.

Every run is the CLI in its own process (``python -m worldstereo_core multi-traj <scene> --task
reconstruction`` on a tiny checkpoint in the real models layout, 32x48, 2 steps, 9 frames), on the
first reconstruction scene of ``WORLDSTEREO_EXAMPLES`` (default ``../shared/examples``):

1. references: one uninterrupted run per seed (1024 and 7), into fresh folders, timing when the
   work starts (the run folder is locked, after the models loaded) and when the run ends;
2. ``--loops`` N interrupted-and-resumed loops: a run is killed with SIGKILL at a random moment
   between those two times (1 or 2 kills per loop, the later ones hitting the resumed runs), then
   rerun to completion. Found: whether every output file (results, memory inputs, renders, the
   WorldMirror folder) is byte-identical to the reference, whether the saved bank equals it,
   temporaries or locks left behind;
3. ``--concurrent`` M runs started together into one folder, alternating seeds 1024 and 7. Every
   run must end cleanly: finished (exit 0) or refused with a named error (exit 2: the folder is in
   use, or it holds a run with another seed), never a traceback; the folder must then equal the
   reference of the run that finished.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from hardware import environment  # noqa: E402
from tiny_models import write_models_root  # noqa: E402
from worldstereo_core.io.atomic import is_temporary, write_json_atomic  # noqa: E402
from worldstereo_core.io.run_lock import LOCK_NAME  # noqa: E402
from worldstereo_core.memory.bank import MemoryBank  # noqa: E402

MODEL = "worldstereo-memory"
SEEDS = (1024, 7)
FLAGS = ("--task", "reconstruction", "--size", "32x48", "--steps", "2", "--nframe", "9", "--align-nframe", "4")


def examples_scene() -> Path:
    root = Path(os.environ.get("WORLDSTEREO_EXAMPLES", REPO.parent / "shared" / "examples")) / "reconstruction"
    scenes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not scenes:
        sys.exit(f"no reconstruction scene under {root}; set WORLDSTEREO_EXAMPLES")
    return scenes[0]


def command(scene: Path, out: Path, models: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "worldstereo_core", "multi-traj", str(scene), "--out", str(out), "--models",
            str(models), "--seed", str(seed), *FLAGS]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = start(cmd)
    out, err = proc.communicate()
    return proc.returncode, out + err, time.monotonic() - t0


def reference_run(cmd: list[str], folder: Path) -> tuple[float, float]:
    """Run to the end; (seconds until the run folder was locked, i.e. the work began, total seconds)."""
    t0, locked = time.monotonic(), None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if locked is None and (folder / LOCK_NAME).exists():
            locked = time.monotonic() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit(f"reference run failed:\n{proc.stderr.read()[-3000:]}")
    total = time.monotonic() - t0
    return (locked if locked is not None else 0.0), total


def outputs(folder: Path) -> dict[str, bytes]:
    """Every output file of a run folder except the run state (compared through the loaded bank)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and f"{MODEL}_state" not in p.parts and p.name != LOCK_NAME}


def saved_bank(folder: Path) -> MemoryBank:
    import json

    state = folder / f"{MODEL}_state"
    return MemoryBank.load(state / json.loads((state / "state.json").read_text())["folder"] / "memory_bank")


def leftovers(folder: Path) -> dict:
    return {"temporaries": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if is_temporary(p.name)),
            "lock_left": (folder / LOCK_NAME).exists()}


def compare(folder: Path, reference: Path) -> dict:
    got, want = outputs(folder), outputs(reference)
    differing = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return {"identical_files": not differing, "differing": differing[:10], "files": len(want),
            "bank_equal": saved_bank(folder) == saved_bank(reference), **leftovers(folder)}


def killed_loop(index: int, rng: random.Random, scene: Path, models: Path, work: Path, reference: Path,
                window: tuple[float, float]) -> dict:
    """Kill runs at random moments of ``window`` (seconds after the start), then resume to the end."""
    out = work / f"loop{index}"
    cmd = command(scene, out, models, SEEDS[0])
    kills = []
    for _ in range(rng.choice((1, 2))):
        delay = rng.uniform(*window)
        proc = start(cmd)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        folder = out / scene.name
        kills.append({"after_s": round(delay, 2), "finished_before_kill": finished,
                      "temporaries_left": len(leftovers(folder)["temporaries"]) if folder.is_dir() else 0,
                      "lock_left": (folder / LOCK_NAME).exists()})
    code, text, seconds = run(cmd)
    result = {"kills": kills, "resume_exit_code": code, "resume_s": round(seconds, 1),
              "resume_statuses": [line.split(": ", 1)[1].split(" from ")[0].split(" -> ")[0]
                                  for line in text.splitlines() if line.startswith("renders/")]}
    if code == 0:
        result.update(compare(out / scene.name, reference))
    else:
        result["output_tail"] = text[-2000:]
    return result


def concurrent_starts(count: int, scene: Path, models: Path, work: Path, references: dict[int, Path]) -> dict:
    out = work / "concurrent"
    seeds = [SEEDS[i % 2] for i in range(count)]
    procs = [start(command(scene, out, models, seed)) for seed in seeds]
    runs = []
    for seed, proc in zip(seeds, procs):
        text = "".join(proc.communicate())
        kind = ("finished" if proc.returncode == 0 else
                "refused: folder in use" if proc.returncode == 2 and "in use by another run" in text else
                "refused: other settings" if proc.returncode == 2 and "other settings (seed)" in text else
                "unclean")
        runs.append({"seed": seed, "exit_code": proc.returncode, "outcome": kind, "traceback": "Traceback" in text,
                     **({"output_tail": text[-2000:]} if kind == "unclean" else {})})
    finished = [r["seed"] for r in runs if r["outcome"] == "finished"]
    result = {"runs": runs, "all_clean": all(r["outcome"] != "unclean" and not r["traceback"] for r in runs)}
    if finished and len(set(finished)) == 1:
        result["folder_vs_reference_of_seed"] = finished[0]
        result.update(compare(out / scene.name, references[finished[0]]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=4, help="interrupted-and-resumed loops (N)")
    parser.add_argument("--concurrent", type=int, default=4, help="runs started together (M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reliability.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scene = examples_scene()
    work = Path(tempfile.mkdtemp(prefix="worldstereo-reliability-"))
    try:
        models = write_models_root(work / "models", (MODEL,))
        references, timings = {}, []
        for seed in SEEDS:
            references[seed] = work / f"reference{seed}" / scene.name
            timings.append(reference_run(command(scene, work / f"reference{seed}", models, seed), references[seed]))
        # kill while the run works: from the moment it locks its folder (models loaded) to its end
        window = (min(t for t, _ in timings), max(total for _, total in timings))
        loops = [killed_loop(i, rng, scene, models, work, references[SEEDS[0]], window) for i in range(args.loops)]
        concurrent = concurrent_starts(args.concurrent, scene, models, work, references)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "resumes_identical": sum(bool(r.get("identical_files") and r.get("bank_equal")) for r in loops),
        "loops": len(loops), "kills": sum(len(r["kills"]) for r in loops),
        "temporaries_left_after_resume": sum(len(r.get("temporaries", [])) for r in loops),
        "concurrent_all_clean": concurrent["all_clean"],
        "concurrent_outcomes": sorted(r["outcome"] for r in concurrent["runs"]),
    }
    write_json_atomic(args.out, {
        "benchmark": "SIGKILL-and-resume loops and concurrent starts of the multi-trajectory CLI (tiny models)",
        "command": f"python benchmarks/reliability.py --loops {args.loops} --concurrent {args.concurrent} "
                   f"--seed {args.seed}",
        "scene": scene.name, "flags": list(FLAGS),
        "reference_runs": [{"seed": seed, "work_started_s": round(t, 1), "total_s": round(total, 1)}
                           for seed, (t, total) in zip(SEEDS, timings)],
        "kill_window_s": [round(window[0], 1), round(window[1], 1)],
        "summary": summary, "killed_loops": loops, "concurrent_starts": concurrent,
        "environment": environment(), "note": args.note,
    })
    print(summary)


if __name__ == "__main__":
    main()
