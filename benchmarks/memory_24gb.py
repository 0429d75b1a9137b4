"""Does a DMD clip (worldstereo-memory-dmd, 480x768, 21 keyframes) fit a 24 GB card at the real 14B shape?

Run on a CUDA machine: ``python benchmarks/memory_24gb.py [--cap-gib 24] [--block-swap 20] [--no-fp8]
[--refs 1] [--uncapped]``; writes ``benchmarks/results/memory_24gb.json``.

Every component has the released shape and random weights: the transformer (Wan2.1-I2V-14B +
a ControlNet assumed Uni3C-sized, see random_models.py), the Wan2.1 VAE, CLIP ViT-H/14 and UMT5-XXL
(the shipped configs in loading/single_file_configs). The 24 GB recipe is applied through
:class:`worldstereo_core.runtime.options.RuntimeOptions`: fp8 blocks, block swap, encoders and VAE
offloaded to CPU memory, UMT5 in bf16, VAE tiling. The process is capped with
``torch.cuda.set_per_process_memory_fraction`` at ``--cap-gib`` and runs the whole pipeline
(text, CLIP, keyframe VAE encode, 4 DMD steps, keyframe decode). ``--uncapped`` adds a run
without the cap and without block swap / fp8, timed against the arithmetic floor.

Without CUDA it writes a result saying ``skipped: no CUDA`` and exits 0. ``--smoke`` runs the same
code path at the unit-test size on any device (no cap, no results file) to check the plumbing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_models as rm  # noqa: E402

from worldstereo_core.io.atomic import write_json_atomic  # noqa: E402
from worldstereo_core.runtime.flops import transformer_flops  # noqa: E402

OUT = rm.REPO / "benchmarks" / "results" / "memory_24gb.json"
HEIGHT, WIDTH, KEYFRAMES = 480, 768, 21


def _real_components(dtype: torch.dtype):
    """Random Wan2.1 VAE, CLIP ViT-H/14, UMT5-XXL (bf16) and a character tokenizer, on the CPU."""
    from diffusers import AutoencoderKLWan
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config,
                              UMT5EncoderModel)

    from tiny_components import _write_tokenizer
    from worldstereo_core.loading.components import BaseComponents, tie_umt5_embeddings
    from worldstereo_core.loading.single_file import shipped_config

    def clean(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    vae = AutoencoderKLWan(**clean(shipped_config("wan2.1_vae"))).to(dtype).eval().requires_grad_(False)
    clip = CLIPVisionModel(CLIPVisionConfig(**clean(shipped_config("clip_vit_h_14")))).eval().requires_grad_(False)
    processor = CLIPImageProcessor(**clean(shipped_config("clip_image_processor")))
    with torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(**clean(shipped_config("umt5_xxl"))))
    rm.materialize(text, "cpu", dtype=torch.bfloat16)
    tie_umt5_embeddings(text)
    from transformers import PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="ws_tok_"))
    _write_tokenizer(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return BaseComponents(vae=vae, text_encoder=text.eval().requires_grad_(False), tokenizer=tokenizer,
                          image_encoder=clip, image_processor=processor)


def _smoke_components():
    from tiny_components import write_tiny_base
    from worldstereo_core.loading import load_base_components

    return load_base_components(write_tiny_base(Path(tempfile.mkdtemp(prefix="ws_base_"))), scheduler=False)


def _inputs(height: int, width: int, frames: int, refs: int) -> dict:
    g = torch.Generator().manual_seed(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    image = ((np.stack([np.sin(3 * xx), np.cos(2 * yy), np.sin(xx * yy)], -1) + 1) * 127.5).astype(np.uint8)
    ref_index = torch.linspace(0, frames - 2, refs).round().long()
    return {
        "image": image,
        "render_video": torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1,
        "render_mask": (torch.rand(1, 1, frames, height, width, generator=g) > 0.3).float(),
        "camera_embedding": torch.randn(1, 6, frames, height, width, generator=g),
        "reference_video": torch.rand(1, 3, refs, height, width, generator=g) * 2 - 1,
        "ref_index": ref_index,
        "camera_qt": torch.randn(1, frames, 7, generator=g),
        "camera_qt_ref": torch.randn(1, refs, 7, generator=g),
        "prompt": "a quiet street with trees, photorealistic",
    }


def _run(args, *, smoke: bool, recipe: bool) -> dict:
    from worldstereo_core.pipelines import DMDScheduler, MemoryDMDPipeline
    from worldstereo_core.runtime.options import RuntimeOptions, apply_runtime

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = "tiny" if smoke else "real"
    tcfg, ccfg = rm.configs(config, rm.MEMORY_DMD)
    frames, h, w = rm.GRIDS[config]
    height, width = 8 * h, 8 * w
    options = (RuntimeOptions(block_swap=args.block_swap, fp8=None if args.no_fp8 else "channel", offload=True,
                              text_encoder_dtype="bf16", vae_tiling=True, attention=args.attention)
               if recipe else RuntimeOptions(attention=args.attention))
    t0 = time.perf_counter()
    transformer = rm.random_transformer(tcfg, ccfg, memory=True, dtype=dtype,
                                        device="cpu" if options.block_swap else device, fp8=options.fp8)
    components = _smoke_components() if smoke else _real_components(dtype)
    if not recipe:
        for name in ("vae", "text_encoder", "image_encoder"):
            getattr(components, name).to(device)
    kwargs = apply_runtime(transformer, options, device, components=components)
    build_s = time.perf_counter() - t0
    pipe = MemoryDMDPipeline(transformer, components.vae, scheduler=DMDScheduler(), text_encoder=components.text_encoder,
                             tokenizer=components.tokenizer, image_encoder=components.image_encoder,
                             image_processor=components.image_processor, **kwargs)
    inputs = _inputs(height, width, frames, args.refs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = pipe(**inputs, num_frames=4 * (frames - 1) + 1, output_type="np")
    result = {
        "recipe": options.__dict__ if recipe else "plain (no block swap, no fp8, no offload)",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "config": config,
        "height": height, "width": width, "keyframes": frames, "refs": args.refs,
        "build_s": round(build_s, 1), "timings": {k: (round(v, 3) if isinstance(v, float) else
                                                       [round(x, 3) for x in v]) for k, v in out.timings.items()},
        "frames_shape": list(out.frames.shape), "finite": bool(np.isfinite(out.frames).all()),
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    placement = getattr(transformer, "placement", None)
    if placement is not None:
        result["block_swap_stats"] = placement.stats()
    flops = transformer_flops(tcfg, ccfg, latent_frames=frames, latent_height=h, latent_width=w, memory=True,
                              ref_index=tuple(inputs["ref_index"].tolist())).total
    steps = out.timings.get("step_s", [])
    if steps:
        result["flops_per_step"] = flops
        result["achieved_tflops_per_step"] = round(flops / min(steps) / 1e12, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--block-swap", type=int, default=20, help="resident transformer blocks (of 40)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--refs", type=int, default=1)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--uncapped", action="store_true", help="also time a plain, uncapped run")
    parser.add_argument("--smoke", action="store_true", help="unit-test size on any device; no results file")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    command = "python benchmarks/memory_24gb.py " + " ".join(sys.argv[1:])

    if args.smoke:
        args.block_swap = min(args.block_swap, 2)
        print(json.dumps(_run(args, smoke=True, recipe=True)))
        return
    if not torch.cuda.is_available():
        print("memory_24gb needs a CUDA device; writing a 'skipped' result")
        write_json_atomic(args.out, {"benchmark": "memory_24gb", "command": command, "result": "skipped: no CUDA",
                                     "environment": rm.environment()})
        return
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, args.cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    record = {"benchmark": "memory_24gb", "command": command, "environment": rm.environment(),
              "cap_gib": args.cap_gib, "memory_fraction": round(fraction, 4)}
    try:
        record["capped"] = _run(args, smoke=False, recipe=True)
        record["result"] = "fits"
    except torch.OutOfMemoryError as exc:
        record["result"] = f"out of memory under the cap: {exc}".splitlines()[0]
    torch.cuda.empty_cache()
    if args.uncapped:
        torch.cuda.set_per_process_memory_fraction(1.0)
        plain = _run(args, smoke=False, recipe=False)
        gemm = rm.matmul_tflops(torch.device("cuda"), torch.bfloat16)
        floor = plain["flops_per_step"] / (gemm * 1e12)
        plain["floor_step_s_at_measured_gemm"] = round(floor, 3)
        plain["ratio_to_floor"] = round(min(plain["timings"]["step_s"]) / floor, 3)
        nominal = rm.nominal_tflops(torch.device("cuda"))
        if nominal:
            plain["ratio_to_spec_sheet_floor"] = round(min(plain["timings"]["step_s"])
                                                       / (plain["flops_per_step"] / (nominal * 1e12)), 3)
        record["uncapped"] = plain
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
