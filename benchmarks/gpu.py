"""One GPU, the real 14B shape, random weights: the native ComfyUI path and the diffusers host.

Run on a machine with one CUDA GPU: ``python benchmarks/gpu.py`` (planned to finish in about 6
minutes on one H100: few steps and repeats, see below); writes ``benchmarks/results/gpu.json``
with the hardware named. Without CUDA it writes a result saying ``skipped: no CUDA`` and exits 0.
``--small`` runs every code path below at the unit-test size on the CPU, in one process (no cap,
timings meaningless; for tests), writing to ``--out`` only.

(a) **Native path** (``nodes/native``): ComfyUI's own ``WanModel`` built at the Wan2.1-I2V-14B-480P
config as ComfyUI builds it (``supported_models.WAN21_I2V``, weights allocated by ``comfy.ops``
and filled with random values), wrapped in a core ``ModelPatcher``; a WorldStereo variant (random
branches, ControlNet assumed Uni3C-sized as in random_models.py) applied by
``nodes.native.model.apply_variant``; sampled by ComfyUI's ``sample_custom`` (what
SamplerCustomAdvanced runs) with the release's schedules at 480x768, 21 keyframes, one reference:

* one DMD clip: worldstereo-memory-dmd, 4 euler steps on the DMD sigmas, no CFG;
* a 40-step clip: worldstereo-memory, the release UniPC with CFG 5 (ComfyUI batches the two
  halves), of which only the first ``--steps-40`` steps (default 3) run; ``clip_s`` extrapolates
  the median step to 40 steps.

Each clip runs uncapped and under a ``--cap-gib`` cap (default 24): ComfyUI is told to leave the
rest of the card free (``--reserve-vram``'s setting) and torch's allocator is capped
(``set_per_process_memory_fraction``), so ComfyUI loads the model partially and streams the rest.
A one-step run loads the model first; the timed run then gives the time, the per-step times, the
peak VRAM (torch's max allocated) and the process's peak RAM. The conditioning (text, CLIP, VAE
latents) is random at the real shapes: encoders and VAE are not part of these timings.

(b) **Diffusers host** (the CLI's): ``transformer_step.py``'s cases ``plain``, ``block_swap``,
``fp8`` and ``fp8_block_swap`` for the DMD model (one batch-1 forward = one step; warm-up + 2
repeats): step time, peak VRAM, pinned host memory and streamed bytes (block swap), the fp8
matmul path taken, peak RAM.

Every case runs in its own process (peaks do not mix); ``--parts`` picks ``native`` and/or
``diffusers``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_models as rm  # noqa: E402
import transformer_step  # noqa: E402

from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.models.inputs import MemoryInputs  # noqa: E402

OUT = rm.REPO / "benchmarks" / "results" / "gpu.json"
COMFYUI_DIR = rm.REPO.parent / "shared" / "comfyui" / "ComfyUI"
PACK_PACKAGE = "worldstereo_pack"
DIFFUSERS_CASES = ("plain", "block_swap", "fp8", "fp8_block_swap")
#: The 480P base's flow shift and the release's CFG scale (40-step clip).
FLOW_SHIFT, CFG = 3.0, 5.0
#: CLIP ViT-H/14 penultimate states as ComfyUI's Wan2.1 takes them.
CLIP_TOKENS, CLIP_WIDTH = 257, 1280


# ----- the native path -----------------------------------------------------------------------------
def import_comfy(comfy_dir: Path, *, cpu: bool, reserve_gib: float | None) -> SimpleNamespace:
    """ComfyUI's ``comfy`` (``reserve_gib``: its ``--reserve-vram``) and the pack's ``nodes/native``."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    args.reserve_vram = reserve_gib
    for name in ("model_management", "model_patcher", "sample", "samplers", "supported_models", "clip_vision"):
        importlib.import_module(f"comfy.{name}")
    # the pack as a package (its relative imports), without running its __init__ (node registration)
    for name, folder in ((PACK_PACKAGE, rm.REPO), (f"{PACK_PACKAGE}.nodes", rm.REPO / "nodes")):
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    native = SimpleNamespace(**{n: importlib.import_module(f"{PACK_PACKAGE}.nodes.native.{n}")
                                for n in ("conds", "model", "sampling")})
    return SimpleNamespace(comfy=comfy, native=native)


def wan_unet_config(tcfg: dict) -> dict:
    """ComfyUI's Wan2.1-I2V model config for a diffusers transformer config (what its detection reads)."""
    return {"image_model": "wan2.1", "model_type": "i2v", "patch_size": tuple(tcfg["patch_size"]),
            "in_dim": tcfg["in_channels"], "out_dim": tcfg["out_channels"],
            "dim": tcfg["num_attention_heads"] * tcfg["attention_head_dim"], "ffn_dim": tcfg["ffn_dim"],
            "num_heads": tcfg["num_attention_heads"], "num_layers": tcfg["num_layers"], "freq_dim": tcfg["freq_dim"],
            "text_dim": tcfg["text_dim"], "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
            "eps": tcfg["eps"]}


def core_model(env, tcfg: dict, dtype: torch.dtype):
    """A core Wan2.1-I2V MODEL as Load Diffusion Model returns it, with random weights."""
    comfy = env.comfy
    mm = comfy.model_management
    config = comfy.supported_models.WAN21_I2V(wan_unet_config(tcfg))
    config.set_inference_dtype(dtype, None)
    offload = mm.unet_offload_device()
    model = config.get_model({}, "", device=offload)
    rm.randomize(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=offload)


def write_variants(root: Path, tcfg: dict, ccfg: dict) -> dict[str, Path]:
    """memory-dmd and memory variant folders holding one set of random branch tensors."""
    from tiny_checkpoints import write_variant
    from worldstereo_core.models.config import ControlNetConfig
    from worldstereo_core.models.host import WorldStereoBranches

    with torch.device("meta"):
        branches = WorldStereoBranches(ControlNetConfig.from_dict(ccfg), memory=True, in_channels=tcfg["in_channels"],
                                       latent_channels=tcfg["out_channels"],
                                       inner_dim=tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
                                       patch_size=tcfg["patch_size"])
    tensors = rm.materialize(branches, "cpu", dtype=torch.bfloat16).state_dict()
    return {model_type: write_variant(root, model_type, tensors, controlnet_cfg=ccfg, base_model="random weights")
            for model_type in (rm.MEMORY_DMD, rm.MEMORY)}


def conditioning(env, native_model, tcfg: dict, grid, refs: int):
    """(positive, negative, noise): random conditioning of one clip at the real shapes, as the
    WorldStereo conditioning node makes it (image-condition latent, mask, CLIP output, model_conds)."""
    g = torch.Generator().manual_seed(0)
    frames, h, w = grid
    latent = (1, 16, frames, h, w)
    clip = env.comfy.clip_vision.Output()
    clip.penultimate_hidden_states = torch.randn(1, CLIP_TOKENS, CLIP_WIDTH, generator=g)
    i2v_mask = torch.zeros(1, 4, frames, h, w)
    i2v_mask[:, :, 0] = 1
    ref = torch.randn(1, 16, refs, h, w, generator=g)
    model_conds = env.native.conds.worldstereo_model_conds(
        torch.randn(latent, generator=g), (torch.rand(1, 1, frames, 8 * h, 8 * w, generator=g) > 0.3).float(),
        torch.randn(1, 6, frames, 8 * h, 8 * w, generator=g),
        MemoryInputs(reference_latent=torch.cat([ref, torch.ones(1, 4, refs, h, w), ref], dim=1),
                     ref_index=torch.linspace(0, frames - 2, refs).round().long(),
                     camera_qt=torch.randn(1, frames, 7, generator=g),
                     camera_qt_ref=torch.randn(1, refs, 7, generator=g)))
    options = {"concat_latent_image": native_model.model.latent_format.process_out(torch.randn(latent, generator=g)),
               "concat_mask": 1.0 - i2v_mask, "clip_vision_output": clip}

    def text():
        return [[torch.randn(1, 512, tcfg["text_dim"], generator=g), dict(options)]]

    with_conds = env.native.conds.with_model_conds
    return with_conds(text(), model_conds), with_conds(text(), model_conds), torch.randn(latent, generator=g)


def sample_clip(env, native_model, sigmas, sampler, cfg: float, positive, negative, noise, device) -> dict:
    """Time one ``sample_custom`` run: total and per-step seconds, peak VRAM, output finite."""
    marks = []

    def step_done(*_):
        rm.sync(device)
        marks.append(time.perf_counter())

    if device.type == "cuda":
        rm.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = env.comfy.sample.sample_custom(native_model, noise, cfg, sampler, sigmas, positive, negative,
                                             torch.zeros_like(noise), callback=step_done, disable_pbar=True, seed=0)
    rm.sync(device)
    steps = [b - a for a, b in zip([t0] + marks, marks)]
    result = {"steps": len(sigmas) - 1, "sample_s": round(time.perf_counter() - t0, 3),
              "step_s": [round(s, 3) for s in steps], "finite": bool(torch.isfinite(out).all())}
    if device.type == "cuda":
        result["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def native_case(spec: dict) -> dict:
    """Both clips on one core MODEL, uncapped or under ``spec["cap_gib"]``."""
    small, cap = spec["small"], spec["cap_gib"]
    device = torch.device("cpu" if small else "cuda")
    reserve = None
    if cap is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
        reserve = max(0.0, total / 2**30 - cap)
    env = import_comfy(Path(spec["comfy_dir"]), cpu=small, reserve_gib=reserve)
    from worldstereo_core.models.config import load_worldstereo_config

    config = "tiny" if small else "real"
    tcfg, ccfg = rm.configs(config, rm.MEMORY)
    grid = rm.GRIDS[config]
    dtype = torch.float32 if small else torch.bfloat16
    t0 = time.perf_counter()
    base = core_model(env, tcfg, dtype)
    variants = write_variants(Path(tempfile.mkdtemp(prefix="ws_gpu_bench_")), tcfg, ccfg)
    result = {"cap_gib": cap, "comfy_reserve_vram_gib": None if reserve is None else round(reserve, 2),
              "config": config, "dtype": str(dtype).replace("torch.", ""), "latent_grid": grid, "refs": spec["refs"],
              "build_s": round(time.perf_counter() - t0, 1)}
    sampling = env.native.sampling
    clips = {
        "dmd_clip": (rm.MEMORY_DMD, lambda folder: sampling.dmd_sigmas(load_worldstereo_config(folder)),
                     env.comfy.samplers.sampler_object("euler"), 1.0),
        "clip_40_steps": (rm.MEMORY, lambda folder: sampling.release_unipc_sigmas(40, FLOW_SHIFT),
                          sampling.release_unipc_sampler(2), CFG),
    }
    steps_run = {"dmd_clip": None, "clip_40_steps": spec["steps_40"]}
    for name, (model_type, make_sigmas, sampler, cfg) in clips.items():
        native_model = env.native.model.apply_variant(base, variants[model_type])
        positive, negative, noise = conditioning(env, native_model, tcfg, grid, spec["refs"])
        sigmas = make_sigmas(variants[model_type])
        if steps_run[name] is not None:  # the first steps of the schedule only
            sigmas = sigmas[:steps_run[name] + 1]
        t0 = time.perf_counter()  # loads the model (whole or partially) and warms the kernels
        sample_clip(env, native_model, sigmas[:2], sampler, cfg, positive, negative, noise, device)
        run = sample_clip(env, native_model, sigmas, sampler, cfg, positive, negative, noise, device)
        run.update(model_type=model_type, cfg=cfg, load_and_first_step_s=round(time.perf_counter() - t0
                                                                                 - run["sample_s"], 2))
        if name == "clip_40_steps":
            run["clip_s"] = round(40 * statistics.median(run["step_s"]), 2)
            run["note"] = f"first {run['steps']} of 40 steps run; clip_s = 40 x median step"
        else:
            run["clip_s"] = run["sample_s"]
        loaded = env.comfy.model_management.loaded_models()
        run["comfy_loaded_gib"] = round(sum(m.loaded_size() for m in loaded) / 2**30, 2) if loaded else 0.0
        result[name] = run
    result["peak_ram_gib"] = round(rm.peak_host_mb() / 1024, 2)
    return result


# ----- the diffusers host --------------------------------------------------------------------------
def diffusers_args(small: bool) -> SimpleNamespace:
    config = "tiny" if small else "real"
    tcfg, _ = rm.configs(config, rm.MEMORY_DMD)
    return SimpleNamespace(device="cpu" if small else "cuda", dtype="float32" if small else "bfloat16",
                           model=rm.MEMORY_DMD, config=config, refs=1, attention="auto", compile_mode="default",
                           block_swap=max(2, tcfg["num_layers"] // 2), repeats=1 if small else 2)


def diffusers_case(spec: dict) -> dict:
    queue = SimpleNamespace(result=None)
    queue.put = lambda value: setattr(queue, "result", value)
    transformer_step._run_case(spec["case"], diffusers_args(spec["small"]), queue)
    return queue.result


# ----- driver --------------------------------------------------------------------------------------
def _child(function_name: str, spec: dict, queue) -> None:
    queue.put(globals()[function_name](spec))


def run_case(function_name: str, spec: dict, *, isolated: bool) -> dict:
    """``function(spec)`` in a fresh process (``isolated``) or in this one."""
    print(f"{function_name} {json.dumps({k: v for k, v in spec.items() if k != 'comfy_dir'})}", flush=True)
    if not isolated:
        result = globals()[function_name](spec)
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(function_name, spec, queue))
        proc.start()
        result = rm.wait_result(proc, queue, function_name)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="unit-test size on the CPU, one process")
    parser.add_argument("--parts", default="native,diffusers")
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--steps-40", type=int, default=3, help="steps run of the 40-step clip")
    parser.add_argument("--refs", type=int, default=1)
    parser.add_argument("--comfyui-dir", type=Path, default=COMFYUI_DIR)
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {OUT}; --small: none)")
    args = parser.parse_args()
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:])
    out = args.out or (None if args.small else OUT)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - {"native", "diffusers"}:
        raise SystemExit(f"--parts takes native and/or diffusers, got {args.parts!r}")
    record = {"benchmark": "gpu", "command": command, "environment": rm.environment()}
    if not args.small and not torch.cuda.is_available():
        record["result"] = "skipped: no CUDA"
        print("gpu.py needs a CUDA device; writing a 'skipped' result")
    else:
        t0 = time.perf_counter()
        isolated = not args.small
        common = {"small": args.small, "refs": args.refs}
        if "native" in parts:
            caps = [None] if args.small else [None, args.cap_gib]
            record["native"] = [run_case("native_case", {**common, "cap_gib": cap, "steps_40": args.steps_40,
                                                         "comfy_dir": str(args.comfyui_dir)}, isolated=isolated)
                                for cap in caps]
        if "diffusers" in parts:
            record["diffusers"] = [run_case("diffusers_case", {**common, "case": case}, isolated=isolated)
                                   for case in DIFFUSERS_CASES]
        record["result"] = "measured" if not args.small else "small (code paths only, timings meaningless)"
        record["total_s"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        write_json_atomic(out, record)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
