"""benchmarks/gpu.py: its ``--small`` mode runs every measured code path (the native ComfyUI path
with both clips, the diffusers host with and without block swap and fp8) and records what the GPU
run reports; without CUDA the default run writes a 'skipped' result. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from comfy_native_env import COMFYUI_DIR
from conftest import REPO, integration_unavailable

SCRIPT = REPO / "benchmarks" / "gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_small_mode_runs_every_code_path(tmp_path):
    if not (COMFYUI_DIR / "comfy" / "model_patcher.py").is_file():
        integration_unavailable(f"ComfyUI not found at {COMFYUI_DIR} (set COMFYUI_DIR to a ComfyUI checkout)")
    out = tmp_path / "gpu.json"
    proc = _run("--small", "--out", str(out), "--comfyui-dir", str(COMFYUI_DIR))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["environment"]["cpu"] and record["result"].startswith("small")
    (native,) = record["native"]
    assert native["dmd_clip"]["steps"] == 4 and native["dmd_clip"]["model_type"] == "worldstereo-memory-dmd"
    assert native["clip_40_steps"]["steps"] == 3 and native["clip_40_steps"]["cfg"] == 5.0
    for clip in ("dmd_clip", "clip_40_steps"):
        assert native[clip]["finite"] and len(native[clip]["step_s"]) == native[clip]["steps"]
    assert native["peak_ram_gib"] > 0
    cases = {case["case"]: case for case in record["diffusers"]}
    assert set(cases) == {"plain", "block_swap", "fp8", "fp8_block_swap"}
    for name in ("block_swap", "fp8_block_swap"):
        stats = cases[name]["block_swap_stats"]
        assert stats["streamed_bytes"] > 0 and stats["misses"] == 0 and "pinned_bytes" in stats
    for name in ("fp8", "fp8_block_swap"):
        assert sum(cases[name]["fp8_matmul_paths"].values()) > 0
    assert all(case["peak_host_memory_mb"] > 0 and case["step_s_min"] > 0 for case in cases.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_without_cuda_writes_skipped(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["result"] == "skipped: no CUDA" and "gpu" in record["environment"]
