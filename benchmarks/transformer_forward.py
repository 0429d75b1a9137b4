"""Forward time and peak memory of a mid-size WorldStereo transformer (CPU, and CUDA when present).

Run: ``python benchmarks/transformer_forward.py [--repeats 3] [--device cpu|cuda|all]``; writes
``benchmarks/results/transformer_forward.json``.

Mid-size config: D = 512 (8 heads x 64), 8 main blocks, GGM ControlNet 256 wide with 4 blocks,
21 latent frames on a 16x24 latent grid (2016 video tokens, pixel conditions 128x192), 512 text
and 257 image tokens. Cases: the camera model, and the memory model with 4 references in the
released ``full`` attention and the restricted ``pairs`` scope. Weights are random (timing only).

Each case runs in its own process. On CPU, ``forward_peak_mb`` is the peak resident size during
the forwards (Linux ``VmHWM``, reset just before the first forward) minus the resident size at that
moment (model, inputs and interpreter), i.e. the activation memory. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward. Times: minimum and median wall time of ``--repeats`` runs after one
warm-up; the minimum is the estimate of the cost (the median also carries other load), and
``cpu_ms_per_call`` is the process CPU time per forward summed over torch's threads, which other
processes on a shared machine disturb much less than wall time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402

TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 8, "attention_head_dim": 64, "in_channels": 36,
    "out_channels": 16, "text_dim": 256, "freq_dim": 256, "ffn_dim": 1536, "num_layers": 8,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 256,
    "added_kv_proj_dim": 512, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
CONTROLNET = {
    "dim": 256, "num_heads": 4, "ffn_dim": 512, "num_layers": 4, "conv_out_dim": 512, "time_embed_dim": 512,
    "add_channels": 7, "mid_channels": 32, "mask_downsample": 1, "interp": False,
}
MEMORY_EXTRA = {"update_ref": True, "ref_embedding": True, "main_camera_embedding": True, "camera_embedding_dim": 7}
FRAMES, LATENT_H, LATENT_W = 21, 16, 24
REF_INDEX = (3, 8, 13, 18)
CASES = [("worldstereo-camera", "full"), ("worldstereo-memory", "full"), ("worldstereo-memory", "pairs")]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> float:
    """Reset the process's peak RSS (Linux clear_refs 5) and return the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _run_case(model_type: str, scope: str, device: str, dtype_name: str, repeats: int, queue) -> None:
    from tiny_checkpoints import tiny_inputs
    from worldstereo_core.models import build_transformer

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    memory = model_type != "worldstereo-camera"
    cn = {**CONTROLNET, **(MEMORY_EXTRA if memory else {})}
    model = build_transformer(TRANSFORMER, cn, memory=memory, device=device, dtype=dtype,
                              attention_scope=scope if memory else "full")
    for p in model.parameters():  # the zero-initialised branches would otherwise be skipped work
        if p.is_floating_point() and not p.any():
            p.normal_(0, 0.02)
    inputs = tiny_inputs(model_type, TRANSFORMER, cn, frames=FRAMES, height=LATENT_H, width=LATENT_W,
                         ref_index=REF_INDEX if memory else (1,))
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def forward():
        with torch.inference_mode():
            out = model(**inputs, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak()
    forward()  # warm-up
    times = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / repeats
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _status_mb("VmHWM") - before
    n_params = sum(p.numel() for p in model.parameters())
    queue.put({
        "model_type": model_type, "attention_scope": scope, "device": device, "dtype": dtype_name,
        "params_millions": round(n_params / 1e6, 2),
        "video_tokens": FRAMES * (LATENT_H // 2) * (LATENT_W // 2),
        "reference_tokens": len(REF_INDEX) * (LATENT_H // 2) * (LATENT_W // 2) if memory else 0,
        "min_ms": round(min(times), 1), "median_ms": round(statistics.median(times), 1),
        "cpu_ms_per_call": round(cpu_ms, 1), "torch_threads": torch.get_num_threads(),
        "forward_peak_mb": round(peak, 1), "repeats": repeats,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "transformer_forward.json")
    args = parser.parse_args()

    runs = []
    if args.device in ("cpu", "all"):
        runs.append(("cpu", "float32"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        runs += [("cuda", "float32"), ("cuda", "bfloat16")]
    ctx = mp.get_context("spawn")
    load_start = os.getloadavg()
    results = []
    for device, dtype_name in runs:
        for model_type, scope in CASES:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_case, args=(model_type, scope, device, dtype_name, args.repeats, queue))
            proc.start()
            try:
                result = queue.get(timeout=3600)
            except Exception as exc:  # the child died (e.g. out of memory) without a result
                raise SystemExit(f"{model_type}/{scope} on {device} failed (exit code {proc.exitcode})") from exc
            proc.join()
            print(json.dumps(result))
            results.append(result)

    write_json_atomic(args.out, {
        "benchmark": "transformer_forward",
        "command": "python benchmarks/transformer_forward.py " + " ".join(sys.argv[1:]),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
        },
        "config": {"transformer": TRANSFORMER, "controlnet_cfg": CONTROLNET, "memory_extra": MEMORY_EXTRA,
                   "latent": [FRAMES, LATENT_H, LATENT_W], "ref_index": REF_INDEX},
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
