"""Per-step and per-clip transformer time, peak memory and achieved TFLOP/s against the arithmetic floor,
plain and with block swap / fp8 / regional torch.compile.

Run: ``python benchmarks/transformer_step.py [--config real|mid|tiny] [--device cuda|cpu]
[--cases plain,block_swap,fp8,fp8_block_swap,compile] [--block-swap N] [--refs R] [--repeats 3]``;
writes ``benchmarks/results/transformer_step.json`` (``--out`` to change).

A step is what one sampling step costs in the transformer: the DMD model (memory-dmd) makes one
batch-1 forward per step for 4 steps; the camera / memory models one batch-2 forward (text CFG
batched) per step for 40 steps. The FLOPs come from :func:`worldstereo_core.runtime.flops.transformer_flops`
(checked here against ``torch.utils.flop_counter`` on a meta-device copy of the same model); the
floor is those FLOPs at the device's *measured* dense-GEMM rate in the run's dtype (and, for known
GPUs, at the spec-sheet bf16 rate). Defaults: the released 14B shape (ControlNet width assumed,
see random_models.py) at 480x768 with 21 keyframes on CUDA, bf16; the ``mid`` config in float32 on CPU.
Each case runs in its own process so peaks do not mix.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_models as rm  # noqa: E402

from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.runtime.flops import transformer_flops  # noqa: E402
from worldstereo_core.runtime.fp8 import fp8_matmul_paths  # noqa: E402

CASES = ("plain", "block_swap", "fp8", "fp8_block_swap", "compile")
STEPS = {rm.MEMORY_DMD: 4, rm.MEMORY: 40, rm.CAMERA: 40}


def _case_options(case: str, block_swap: int):
    return {"fp8": "channel" if case.startswith("fp8") else None,
            "block_swap": block_swap if case.endswith("block_swap") else None,
            "compile": case == "compile"}


def _run_case(case: str, args, queue) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    opts = _case_options(case, args.block_swap)
    memory = args.model != rm.CAMERA
    tcfg, ccfg = rm.configs(args.config, args.model)
    batch = 1 if args.model == rm.MEMORY_DMD else 2
    build_on = torch.device("cpu") if opts["block_swap"] else device
    t0 = time.perf_counter()
    model = rm.random_transformer(tcfg, ccfg, memory=memory, dtype=dtype, device=build_on, fp8=opts["fp8"])
    build_s = time.perf_counter() - t0
    inputs, ref_index = rm.forward_inputs(args.model, tcfg, ccfg, rm.GRIDS[args.config], refs=args.refs if memory else 0,
                                          batch=batch, device=device, dtype=dtype)
    from worldstereo_core.runtime.attention import set_attention_backend

    set_attention_backend(model, args.attention, device)
    if opts["compile"]:
        from worldstereo_core.runtime.compile import compile_blocks

        compile_blocks(model, mode=args.compile_mode)
    placement = None
    if opts["block_swap"]:
        from worldstereo_core.runtime.block_swap import enable_block_swap

        placement = enable_block_swap(model, opts["block_swap"])
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
                else torch.autocast(device.type, enabled=False))

    def forward():
        with torch.inference_mode(), autocast:
            model(**inputs, return_dict=False)
        rm.sync(device)

    with (placement(device) if placement else contextlib.nullcontext()):
        before = rm.reset_peak(device)
        t0 = time.perf_counter()
        forward()  # warm-up (and compilation)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
        peak = rm.peak_mb(device) - (0.0 if device.type == "cuda" else before)
    step = min(times)
    flops = transformer_flops(tcfg, ccfg, latent_frames=rm.GRIDS[args.config][0],
                              latent_height=rm.GRIDS[args.config][1], latent_width=rm.GRIDS[args.config][2],
                              batch=batch, memory=memory, ref_index=ref_index if memory else ()).total
    queue.put({
        "case": case, **{k: v for k, v in opts.items() if v}, "model_type": args.model, "config": args.config,
        "device": str(device), "dtype": args.dtype, "batch": batch, "build_s": round(build_s, 1),
        "first_call_s": round(first_s, 2), "step_s_min": round(step, 4),
        "step_s_median": round(statistics.median(times), 4), "steps_per_clip": STEPS[args.model],
        "clip_s": round(step * STEPS[args.model], 2), "flops_per_step": flops,
        "achieved_tflops": round(flops / step / 1e12, 3), "peak_memory_mb": round(peak, 1),
        "peak_host_memory_mb": round(rm.peak_host_mb(), 1),
        **({"block_swap_stats": placement.stats()} if placement else {}),
        **({"fp8_matmul_paths": fp8_matmul_paths(model)} if opts["fp8"] else {}),
    })


def _check_formula(args) -> dict:
    """FLOPs of the benchmarked shape: our formula and torch's counter on a meta-device model."""
    from torch.utils.flop_counter import FlopCounterMode

    from worldstereo_core.models import build_transformer

    memory = args.model != rm.CAMERA
    tcfg, ccfg = rm.configs(args.config, args.model)
    batch = 1 if args.model == rm.MEMORY_DMD else 2
    model = build_transformer(tcfg, ccfg, memory=memory, device="meta", dtype=torch.bfloat16).to("meta")
    inputs, ref_index = rm.forward_inputs(args.model, tcfg, ccfg, rm.GRIDS[args.config],
                                          refs=args.refs if memory else 0, batch=batch, device="cpu",
                                          dtype=torch.float32)
    inputs = {k: v if k == "ref_index" else v.to("meta") for k, v in inputs.items()}
    with FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)
    frames, h, w = rm.GRIDS[args.config]
    formula = transformer_flops(tcfg, ccfg, latent_frames=frames, latent_height=h, latent_width=w, batch=batch,
                                memory=memory, ref_index=ref_index if memory else ())
    return {"formula": formula.total, "torch_flop_counter": counter.get_total_flops(),
            "parts": formula.parts, "tokens": frames * (h // 2) * (w // 2),
            "reference_tokens": len(ref_index) * (h // 2) * (w // 2) if memory else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", choices=("real", "mid", "tiny"), default="real" if cuda else "mid")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16" if cuda else "float32")
    parser.add_argument("--model", choices=(rm.MEMORY_DMD, rm.MEMORY, rm.CAMERA), default=rm.MEMORY_DMD)
    parser.add_argument("--refs", type=int, default=1, help="reference frames of the memory models")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--block-swap", type=int, default=None, help="resident blocks (default: half of them)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=rm.REPO / "benchmarks" / "results" / "transformer_step.json")
    args = parser.parse_args()
    tcfg, _ = rm.configs(args.config, args.model)
    if args.block_swap is None:
        args.block_swap = max(2, tcfg["num_layers"] // 2)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {CASES}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    flops = _check_formula(args)
    print(json.dumps({k: v for k, v in flops.items() if k != "parts"}))
    gemm = rm.matmul_tflops(device, dtype)
    nominal = rm.nominal_tflops(device)
    ctx = mp.get_context("spawn")
    results = []
    for case in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(case, args, queue))
        proc.start()
        result = rm.wait_result(proc, queue, f"case {case}")
        floor_s = result["flops_per_step"] / (gemm * 1e12)
        result["floor_step_s_at_measured_gemm"] = round(floor_s, 4)
        result["ratio_to_floor"] = round(result["step_s_min"] / floor_s, 3)
        if nominal:
            result["ratio_to_spec_sheet_floor"] = round(result["step_s_min"] / (result["flops_per_step"] / (nominal * 1e12)),
                                                        3)
        print(json.dumps(result))
        results.append(result)

    write_json_atomic(args.out, {
        "benchmark": "transformer_step",
        "command": "python benchmarks/transformer_step.py " + " ".join(sys.argv[1:]),
        "environment": rm.environment(),
        "config": {"name": args.config, "model_type": args.model, "latent_grid": rm.GRIDS[args.config],
                   "refs": args.refs, "transformer": tcfg, "controlnet_cfg": rm.configs(args.config, args.model)[1]},
        "flops": flops,
        "measured_gemm_tflops": round(gemm, 3),
        "spec_sheet_bf16_tflops": nominal,
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
