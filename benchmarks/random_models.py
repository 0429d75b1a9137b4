"""Shared pieces of the runtime benchmarks: model configs, random weights, measurement helpers.

Weights are random (timing and memory only). ``real`` is the released 14B shape (the shipped
Wan2.1-I2V-14B-480P config) with a ControlNet assumed Uni3C-sized (the released width is not known
here: dim 1024, 16 heads, FFN 4096, 20 blocks); ``mid`` fits a CPU; ``tiny`` is the unit-test size.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from hardware import cpu_name, environment  # noqa: E402,F401  (re-exported for the scripts)
from worldstereo_core.models import build_transformer, shipped_base_config  # noqa: E402
from worldstereo_core.runtime.fp8 import FP8Linear, convert_worldstereo_fp8  # noqa: E402

CAMERA, MEMORY, MEMORY_DMD = "worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd"
MEMORY_EXTRA = {"update_ref": True, "ref_embedding": True, "main_camera_embedding": True, "camera_embedding_dim": 7}
REAL_CONTROLNET = {"dim": 1024, "num_heads": 16, "ffn_dim": 4096, "num_layers": 20, "conv_out_dim": 5120,
                   "time_embed_dim": 5120, "add_channels": 7, "mid_channels": 64, "mask_downsample": 1,
                   "interp": False}
MID_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 8, "attention_head_dim": 64, "in_channels": 36,
    "out_channels": 16, "text_dim": 256, "freq_dim": 256, "ffn_dim": 1536, "num_layers": 8,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 256,
    "added_kv_proj_dim": 512, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
MID_CONTROLNET = {"dim": 256, "num_heads": 4, "ffn_dim": 512, "num_layers": 4, "conv_out_dim": 512,
                  "time_embed_dim": 512, "add_channels": 7, "mid_channels": 32, "mask_downsample": 1, "interp": False}
#: Latent grid (frames, h, w) per config: real = 21 keyframes at 480x768.
GRIDS = {"real": (21, 60, 96), "mid": (21, 16, 24), "tiny": (3, 4, 6)}
#: Spec-sheet dense bf16 tensor throughput (TFLOP/s) of some GPUs, for the floor ratio.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "RTX 4090": 165.2, "L40S": 362.1,
                       "RTX 3090": 71.0, "A6000": 154.8}


def configs(name: str, model_type: str) -> tuple[dict, dict]:
    """(transformer config, controlnet_cfg) of a named size."""
    if name == "real":
        tcfg, ccfg = shipped_base_config("wan2.1-i2v-14b-480p"), dict(REAL_CONTROLNET)
    elif name == "mid":
        tcfg, ccfg = dict(MID_TRANSFORMER), dict(MID_CONTROLNET)
    elif name == "tiny":
        from tiny_checkpoints import tiny_controlnet_cfg, tiny_transformer_config

        tcfg = tiny_transformer_config()
        return tcfg, tiny_controlnet_cfg(model_type, tcfg)
    else:
        raise SystemExit(f"unknown config {name!r}: real, mid or tiny")
    if model_type != CAMERA:
        ccfg.update(MEMORY_EXTRA)
    return tcfg, ccfg


def _fill(shape, dtype, device, name: str, gen_device) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    std = 0.02 if len(shape) != 1 else 0.1
    if len(shape) >= 2:
        std = min(std, 1 / math.sqrt(math.prod(shape[1:])))
    return torch.empty(shape, dtype=dtype, device=gen_device).normal_(0, std).to(device)


def randomize(module: nn.Module) -> nn.Module:
    """Overwrite every parameter of ``module`` (allocated but not initialised, e.g. a ComfyUI model
    built with ``comfy.ops.disable_weight_init``) with random values, one tensor at a time."""
    gen_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(_fill(tuple(param.shape), param.dtype, param.device, name, gen_device))
    return module


def peak_host_mb() -> float:
    """Peak resident set of this process so far (MiB)."""
    return _status_mb("VmHWM")


def materialize(model: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every parameter still on the meta device random values on ``device`` (in its own dtype,
    or ``dtype``), one tensor at a time (generated on the GPU when there is one)."""
    device = torch.device(device)
    gen_device = torch.device("cuda") if torch.cuda.is_available() else device
    for module_name, module in model.named_modules():
        if isinstance(module, FP8Linear) and module.weight.is_meta:  # quantised where generated, then moved
            module.set_weight(_fill((module.out_features, module.in_features), module.compute_dtype, gen_device,
                                    "weight", gen_device))
            module.weight.data = module.weight.data.to(device)
            module.weight_scale = module.weight_scale.to(device)
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            module._parameters[name] = nn.Parameter(
                _fill(tuple(param.shape), dtype or param.dtype, device, f"{module_name}.{name}", gen_device),
                requires_grad=False)
    return model


def random_transformer(tcfg: dict, ccfg: dict, *, memory: bool, dtype: torch.dtype, device, fp8: str | None = None):
    """A transformer with random weights built tensor by tensor on ``device`` (fp8 block weights are
    quantised one matrix at a time, so the full-precision model never exists)."""
    model = build_transformer(tcfg, ccfg, memory=memory, device="meta", dtype=dtype)
    if fp8:
        convert_worldstereo_fp8(model, fp8)
    return materialize(model, device).to(device).eval()


def forward_inputs(model_type: str, tcfg: dict, ccfg: dict, grid, *, refs: int, batch: int, device, dtype):
    from tiny_checkpoints import tiny_inputs

    frames, h, w = grid
    ref_index = tuple(int(i) for i in torch.linspace(0, frames - 2, max(refs, 1)).round().long()) if refs else (0,)
    inputs = tiny_inputs(model_type if model_type == CAMERA else MEMORY, tcfg, ccfg, frames=frames, height=h, width=w,
                         ref_index=ref_index, batch=batch)
    out = {}
    for k, v in inputs.items():
        out[k] = v.to(device) if k == "ref_index" or not v.is_floating_point() else v.to(device, dtype)
    return out, ref_index


def nominal_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured dense GEMM throughput: the practical arithmetic ceiling of this device and dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    import time

    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the memory in use now (MiB)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak` (CUDA: allocated; CPU: resident set), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM")


def wait_result(proc, queue, what: str):
    """The result a child process puts on ``queue``; exits with a message if the child dies first."""
    import queue as queue_module

    while True:
        try:
            result = queue.get(timeout=5)
            proc.join()
            return result
        except queue_module.Empty:
            if not proc.is_alive():
                raise SystemExit(f"{what} failed (exit code {proc.exitcode}); see the traceback above")
