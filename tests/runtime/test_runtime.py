"""Runtime options on CPU: block swap, fp8 weights, attention backends, regional compile, VAE tiling,
the FLOP counter and the option bundle the CLI uses.

Tolerances: block swap and compile change where weights sit, not the arithmetic: exact (block swap)
and <= 1e-5 (compile, other kernels). fp8: a model whose block weights were round-tripped through
fp8 is the exact reference; against the full-precision model each layer obeys the e4m3 bound
|y - y8| <= bound(W) @ |x| (2^-4 relative for normal numbers, 2^-10 of the scale below), and the
whole model's relative L2 error stays below 2^-4 (a loose bound: the per-weight worst case).
"""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from conftest import fixtures_root
from tiny_checkpoints import (CAMERA, MEMORY, random_state_dict, split_backbone, tiny_controlnet_cfg, tiny_inputs,
                              tiny_transformer_config, write_diffusers_base, write_variant)
from tiny_components import load_fixture_common, reference_tiny_dirs
from worldstereo_core.errors import InputError
from worldstereo_core.loading import load_state_dict_strict, load_worldstereo_transformer
from worldstereo_core.models import build_transformer
from worldstereo_core.runtime import attention, fp8
from worldstereo_core.runtime.block_swap import disable_block_swap, enable_block_swap, worldstereo_swap_groups
from worldstereo_core.runtime.compile import compile_blocks
from worldstereo_core.runtime.flops import transformer_flops
from worldstereo_core.runtime.offload import disable_vae_tiling, enable_vae_tiling, offload_components
from worldstereo_core.runtime.options import (RuntimeOptions, add_runtime_arguments, apply_runtime, load_device,
                                              load_kwargs, runtime_options_from_args)

TINY = fixtures_root() / "reference_tiny"
MODEL_CASES = [(CAMERA, {}), (MEMORY, {}), (MEMORY, {"update_ref": False})]
CASE_IDS = ["camera", "memory", "memory_noupdate"]


def _model(model_type: str, layers: int = 4, seed: int = 0, **cn_overrides):
    tcfg = tiny_transformer_config(num_layers=layers)
    ccfg = tiny_controlnet_cfg(model_type, tcfg, **cn_overrides)
    model = build_transformer(tcfg, ccfg, memory=model_type != CAMERA, device="meta", dtype=torch.float32)
    load_state_dict_strict(model, random_state_dict(model_type, tcfg, ccfg, seed=seed), source="random")
    return model.eval(), tiny_inputs(model_type, tcfg, ccfg, batch=2, seed=seed + 1)


def _run(model, inputs):
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def _forward_fixtures() -> list:
    dirs = reference_tiny_dirs(TINY, "transformer_forward")
    return dirs or [pytest.param(None, marks=pytest.mark.skip(reason=f"no transformer_forward fixtures in {TINY}"))]


def _fixture_model_and_call(folder):
    cfg = json.loads((folder / "config.json").read_text())
    model = build_transformer(cfg["transformer"], cfg["controlnet_cfg"], memory=cfg["model_type"] != CAMERA,
                              device="meta", dtype=torch.float32)
    load_state_dict_strict(model, load_file(str(folder / "model.safetensors")), source=str(folder))
    call = dict(load_file(str(folder / "inputs.safetensors")))
    call.update(json.loads((folder / "inputs.json").read_text()).get("non_tensor_args", {}))
    call.pop("return_dict", None)
    return model.eval(), call, load_file(str(folder / "outputs.safetensors"))["sample"]


# ------------------------------------------------------------------------------------------------
# Block swap
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("resident", [1, 2, 3, 5])
def test_block_swap_exact_order_and_residency(case, resident):
    model_type, overrides = case
    model, inputs = _model(model_type, layers=5, **overrides)
    expected = _run(model, inputs)
    groups = worldstereo_swap_groups(model)
    trace: list = []
    swap = enable_block_swap(model, resident, trace=trace)
    at_rest = [{p.data_ptr() for m in g for p in m.parameters()} for g in groups]
    seen_on_device = []

    def check_loaded(i):
        def hook(module, args):  # registered after the swap's own hook: the group must be loaded now
            ptrs = {p.data_ptr() for m in groups[i] for p in m.parameters()}
            seen_on_device.append(i)
            assert not ptrs & at_rest[i], f"group {i} runs on its resting CPU copy"
            assert swap.resident_now() <= resident
        return hook

    handles = [g[0].register_forward_pre_hook(check_loaded(i)) for i, g in enumerate(groups)]
    with swap("cpu"):
        first, second = _run(model, inputs), _run(model, inputs)
    for h in handles:
        h.remove()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert seen_on_device == list(range(len(groups))) * 2
    # after the placement every weight points at its CPU copy again
    assert [{p.data_ptr() for m in g for p in m.parameters()} for g in groups] == at_rest
    assert swap.resident_now() == 0

    stats = swap.stats()
    assert stats["max_resident"] <= resident
    assert stats["permanent"] == (len(groups) if resident >= len(groups) else max(resident - 2, 0))
    runs = [i for what, i in trace if what == "run"]
    assert runs == list(range(len(groups))) * 2
    loaded: set[int] = set()
    for what, i in trace:  # replay: every run finds its group loaded, releases only drop loaded groups
        if what == "load":
            assert i not in loaded
            loaded.add(i)
        elif what == "run":
            assert i in loaded or stats["misses"] > 0
        else:
            loaded.discard(i)
    if resident >= 2:  # the next streamed group is always copied before it is needed
        assert stats["misses"] == 0
        for k, (what, i) in enumerate(trace):
            if what == "run" and i in swap.streamed:
                assert ("load", i) in trace[:k]
    disable_block_swap(model)
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.parametrize("folder", _forward_fixtures())
def test_block_swap_reproduces_reference_fixtures(folder):
    model, call, reference = _fixture_model_and_call(folder)
    swap = enable_block_swap(model, 2)
    with swap("cpu"):
        out = _run(model, call)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4), (out - reference).abs().max()
    assert swap.stats()["loads"] >= len(model.blocks)


def test_block_swap_errors():
    model, _ = _model(CAMERA, layers=2)
    with pytest.raises(InputError, match="resident"):
        enable_block_swap(model, 0)
    enable_block_swap(model, 1)
    with pytest.raises(InputError, match="already enabled"):
        enable_block_swap(model, 1)
    with pytest.raises(InputError, match="blocks"):
        enable_block_swap(nn.Linear(2, 2), 1)


#: The released ControlNet width is unknown here; Uni3C's (the code it derives from) is assumed.
UNI3C_CONTROLNET = dict(dim=1024, num_heads=16, ffn_dim=4096, num_layers=20, conv_out_dim=5120, time_embed_dim=5120,
                        add_channels=7, mid_channels=64, mask_downsample=1)


def _meta_14b(fp8_mode=None):
    """The 14B memory model (bf16, optionally fp8 blocks) on the meta device: real shapes, no memory."""
    from worldstereo_core.models import shipped_base_config

    ccfg = tiny_controlnet_cfg(MEMORY, **UNI3C_CONTROLNET)
    model = build_transformer(shipped_base_config("wan2.1-i2v-14b-480p"), ccfg, memory=True, device="meta",
                              dtype=torch.bfloat16)
    if fp8_mode:
        fp8.convert_worldstereo_fp8(model, fp8_mode)
    return model


@pytest.mark.parametrize("fp8_mode", [None, "channel"])
def test_block_swap_plan_for_the_real_14b_shapes(fp8_mode):
    """24 GB recipe: 20 of 40 blocks resident. Pinned memory = the streamed groups' buffers only,
    within 5% of their tensor bytes (per-tensor pinning rounded each tensor up to a power of two)."""
    from worldstereo_core.runtime.block_swap import plan_block_swap

    model = _meta_14b(fp8_mode)
    plan = plan_block_swap(model, 20)
    groups = worldstereo_swap_groups(model)
    assert len(groups) == 40 and len(plan.permanent) == 18 and len(plan.streamed) == 22 and plan.slots == 2
    tensor_bytes = [sum(t.numel() * t.element_size() for m in g for t in [*m.parameters(), *m.buffers()])
                    for g in groups]
    assert plan.group_bytes == tuple(tensor_bytes)
    streamed = sum(tensor_bytes[i] for i in plan.streamed)
    assert plan.streamed_bytes == streamed and streamed <= plan.pinned_bytes <= 1.05 * streamed
    per_tensor_pow2 = sum(1 << (t.numel() * t.element_size() - 1).bit_length()
                          for i in plan.streamed for m in groups[i] for t in [*m.parameters(), *m.buffers()])
    assert per_tensor_pow2 > 1.3 * streamed  # what pinning tensor by tensor cost
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    slot = max(tensor_bytes[i] for i in plan.streamed)
    assert plan.device_bytes <= total - streamed + 2 * slot * 1.05
    if fp8_mode is None:  # bf16 14B + ControlNet + memory layers: about 33 GB, ~half of it streamed
        assert 30e9 < total < 36e9 and 0.45 * total < streamed < 0.6 * total


def test_block_swap_reuses_its_slots_and_pins_nothing_on_cpu():
    """Streamed groups always run from one of the `slots` device buffers allocated per placement:
    a finished group's memory is what the next load fills."""
    model, inputs = _model(MEMORY, layers=5)
    expected = _run(model, inputs)
    swap = enable_block_swap(model, 3)
    assert swap.stats()["pinned_bytes"] == 0 and swap.plan.slots == 2
    used = {}

    def record(i):
        def hook(module, args):
            used.setdefault(i, set()).add(next(module.parameters()).untyped_storage().data_ptr())
        return hook

    groups = worldstereo_swap_groups(model)
    handles = [g[0].register_forward_pre_hook(record(i)) for i, g in enumerate(groups)]
    with swap("cpu"):
        slots = {slot.buffer.untyped_storage().data_ptr() for slot in swap._slots}
        assert len(slots) == 2
        first, second = _run(model, inputs), _run(model, inputs)
    for h in handles:
        h.remove()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert set().union(*(used[i] for i in swap.streamed)) == slots
    assert not set().union(*(used[i] for i in swap.permanent)) & slots


def test_cuda_graph_compile_is_refused_with_block_swap_or_sharding():
    with pytest.raises(InputError, match="CUDA graphs.*block swap"):
        RuntimeOptions(block_swap=2, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(InputError, match="CUDA graphs.*sharded weights"):
        RuntimeOptions(shard_weights=True, compile=True, compile_mode="max-autotune")
    for mode in ("default", "max-autotune-no-cudagraphs"):
        RuntimeOptions(block_swap=2, compile=True, compile_mode=mode)
    compiled, _ = _model(CAMERA, layers=2)
    compile_blocks(compiled, mode="reduce-overhead", backend="eager")  # lazy: nothing is compiled yet
    with pytest.raises(InputError, match="CUDA graphs"):
        enable_block_swap(compiled, 1)
    swapped, _ = _model(CAMERA, layers=2)
    enable_block_swap(swapped, 1)
    with pytest.raises(InputError, match="CUDA graphs"):
        compile_blocks(swapped, mode="max-autotune", backend="eager")


# ------------------------------------------------------------------------------------------------
# fp8 weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", fp8.FP8_MODES)
def test_fp8_linear_exact_against_roundtrip_and_within_e4m3_bound(mode):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 24)
    with torch.no_grad():  # magnitudes over 6 decades: normal and subnormal e4m3 ranges both occur
        linear.weight.copy_(torch.randn(24, 48, generator=g) * torch.logspace(-4, 2, 48)[None])
    x = torch.randn(5, 48, generator=g)
    layer = fp8.FP8Linear.from_linear(linear, mode)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    y8 = layer(x)
    assert torch.equal(y8, torch.nn.functional.linear(x, fp8.fp8_roundtrip(linear.weight, mode), linear.bias))

    err = (fp8.fp8_roundtrip(linear.weight, mode) - linear.weight).abs()
    bound = fp8.fp8_error_bound(linear.weight, mode)
    assert (err <= bound * (1 + 1e-6)).all()
    # independent e4m3 arithmetic: 3 mantissa bits -> spacing 2^(e-3) for |v| in [2^e, 2^(e+1)), e >= -6
    v = (linear.weight / fp8.fp8_scale(linear.weight, mode)).abs().double()
    normal = v >= 2.0 ** -6
    spacing = torch.where(normal, 2.0 ** (torch.floor(torch.log2(v.clamp_min(1e-30))) - 3), torch.tensor(2.0 ** -9))
    q = (layer.weight.double().abs() - v).abs()
    assert (q <= spacing / 2 + 1e-12).all()
    y = linear(x)
    output_bound = x.abs() @ bound.T
    assert ((y8 - y).abs() <= output_bound * (1 + 1e-5) + 1e-5).all()


def test_fp8_linear_dtype_moves_and_state_dict_loading():
    linear = nn.Linear(8, 4)
    layer = fp8.FP8Linear.from_linear(linear)
    layer.to(torch.float64)
    assert layer.compute_dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64
    layer.to(torch.float32)
    other = nn.Linear(8, 4)
    layer.load_state_dict(other.state_dict())  # full-precision weights are quantised on load
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, fp8.fp8_roundtrip(other.weight), other.bias))
    with pytest.raises(InputError, match="fp8 mode"):
        fp8.FP8Linear.from_linear(linear, "row")


def _roundtripped(model: nn.Module, mode: str) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if type(module) is nn.Linear and fp8.worldstereo_fp8_filter(name, module):
                module.weight.copy_(fp8.fp8_roundtrip(module.weight, mode))
    return ref


@pytest.mark.parametrize("case", MODEL_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", fp8.FP8_MODES)
def test_fp8_model_exact_vs_roundtrip_and_close_to_full_precision(case, mode):
    model_type, overrides = case
    model, inputs = _model(model_type, **overrides)
    full = _run(model, inputs)
    reference = _run(_roundtripped(model, mode), inputs)
    n = fp8.convert_worldstereo_fp8(model, mode)
    linears_in_blocks = sum(1 for name, m in model.named_modules() if isinstance(m, fp8.FP8Linear))
    assert n == linears_in_blocks > 0
    out = _run(model, inputs)
    assert torch.equal(out, reference)
    rel = ((out - full).norm() / full.norm()).item()
    assert 0 < rel < fp8.E4M3_RELATIVE_ERROR, rel
    fp8_size, _ = fp8.fp8_bytes(model)
    assert fp8_size == sum(m.weight.numel() for m in model.modules() if isinstance(m, fp8.FP8Linear))  # 1 byte each
    # block swap streams the fp8 storage unchanged
    swap = enable_block_swap(model, 2)
    with swap("cpu"):
        assert torch.equal(_run(model, inputs), reference)


@pytest.mark.parametrize("device,mode,dtype,capability,path", [
    ("cpu", "channel", torch.bfloat16, None, "dequantize"),
    ("cuda", "tensor", torch.bfloat16, (8, 6), "dequantize"),   # Ampere: no fp8 tensor cores
    ("cuda", "tensor", torch.float16, (8, 9), "scaled_mm"),     # Ada: per-tensor scales
    ("cuda", "channel", torch.bfloat16, (8, 9), "dequantize"),  # ... but not row-wise ones
    ("cuda", "channel", torch.bfloat16, (9, 0), "scaled_mm"),   # Hopper
    ("cuda", "channel", torch.float16, (9, 0), "dequantize"),   # row-wise scales need bf16 output
    ("cuda", "channel", torch.bfloat16, (10, 0), "scaled_mm"),  # Blackwell
])
def test_fp8_matmul_path_per_capability(device, mode, dtype, capability, path):
    assert fp8.fp8_matmul_path(device, mode, dtype, capability=capability) == path


def test_fp8_dequantize_path_equals_float32_dequantization_and_is_reported(caplog):
    """The weight widened in place equals (q.float() * s).to(dtype) bit for bit (normal and
    subnormal e4m3 values), and the layer says which path it took."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 48, generator=gen) * torch.logspace(-4, 1, 48)  # spans e4m3 subnormals
    for mode in fp8.FP8_MODES:
        q, scale = fp8.quantize_weight(w, mode)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(fp8.dequantize_weight(q, scale, dtype), (q.float() * scale).to(dtype))
    fp8._resolved_path.cache_clear()
    layer = fp8.FP8Linear.from_linear(nn.Linear(48, 64).bfloat16())
    assert layer.matmul_path is None
    with caplog.at_level("INFO", logger="worldstereo_core.runtime.fp8"):
        layer(torch.randn(3, 48, dtype=torch.bfloat16))
        layer(torch.randn(3, 48, dtype=torch.bfloat16))
    assert layer.matmul_path == "dequantize"
    assert [r.getMessage() for r in caplog.records].count(
        "fp8 (channel scales, bfloat16 compute) on cpu: weights dequantised per call (no fp8 products on this device)") == 1


@pytest.mark.parametrize("mode", fp8.FP8_MODES)
def test_fp8_scaled_path_is_the_product_of_the_quantised_operands(mode):
    """torch._scaled_mm (it runs on the CPU too) against an independent float64 product of the
    quantised activations and weights; layers whose sizes it cannot take fall back."""
    gen = torch.Generator().manual_seed(7)
    linear = nn.Linear(64, 48).bfloat16()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * 0.1)
    model = nn.Sequential(fp8.FP8Linear.from_linear(linear, mode), fp8.FP8Linear.from_linear(nn.Linear(40, 8), mode))
    assert fp8.set_fp8_matmul(model, "scaled_mm") == 2
    layer = model[0]
    x = (torch.randn(2, 7, 64, generator=gen) * torch.linspace(0.01, 3, 64)).bfloat16()
    y = layer(x)
    rows = x.reshape(-1, 64).double()
    amax = rows.abs().amax(dim=1, keepdim=True) if mode == "channel" else rows.abs().amax()
    sx = (amax.float() / fp8.FP8_MAX).double()
    xq = (rows / sx).float().to(fp8.FP8_DTYPE).double() * sx
    wq = layer.weight.double() * layer.weight_scale.double()
    ref = (xq @ wq.T + linear.bias.double()).reshape(2, 7, 48)
    assert y.dtype == torch.bfloat16 and layer.matmul_path == "scaled_mm"
    assert torch.allclose(y.double(), ref, rtol=2 ** -7, atol=1e-3)
    full = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert (y.double() - full).abs().max() < 0.15 * full.abs().max()  # e4m3 on both operands
    model[1](torch.randn(3, 40))  # 40 is not a multiple of 16
    assert fp8.fp8_matmul_paths(model) == {"scaled_mm": 1, "dequantize": 1}
    with pytest.raises(InputError, match="fp8 matmul"):
        fp8.set_fp8_matmul(model, "fast")


def test_fp8_loader_quantises_while_reading(tmp_path):
    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(MEMORY, tcfg)
    state = random_state_dict(MEMORY, tcfg, ccfg, seed=3)
    backbone, extra = split_backbone(state)
    base = write_diffusers_base(tmp_path / "base", tcfg, backbone)
    variant = write_variant(tmp_path, MEMORY, extra, controlnet_cfg=ccfg)
    plain = load_worldstereo_transformer(variant, base=base, dtype=torch.float32)
    model = load_worldstereo_transformer(variant, base=base, dtype=torch.float32, fp8="channel")
    assert any("float8" in note for note in model.load_report.notes)
    layers = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and not m.weight_scale.is_meta for m in layers)
    inputs = tiny_inputs(MEMORY, tcfg, ccfg)
    assert torch.equal(_run(model, inputs), _run(_roundtripped(plain, "channel"), inputs))


# ------------------------------------------------------------------------------------------------
# Attention backends and regional compile
# ------------------------------------------------------------------------------------------------
def test_attention_backend_selection():
    assert attention.resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(InputError, match="unknown attention backend"):
        attention.resolve_backend("fast")
    with pytest.raises(InputError, match="CUDA"):
        attention.check_backend("sdpa-flash", "cpu")
    with pytest.raises(InputError, match="mask"):
        attention.check_backend("sdpa-flash", "cuda", needs_mask=True)
    with pytest.raises(InputError, match="sequence parallel"):
        attention.check_backend("sdpa-math", "cpu", context_parallel=True)
    for name in attention.PACKAGES:
        if not attention.installed(name):
            with pytest.raises(InputError, match="not installed"):
                attention.check_backend(name, "cuda")

    model, inputs = _model(MEMORY, layers=2)
    default = _run(model, inputs)
    assert attention.set_attention_backend(model, "sdpa-math", "cpu") == "sdpa-math"
    assert attention.attention_backend_of(model) == "sdpa-math"
    assert torch.allclose(_run(model, inputs), default, atol=1e-5)
    model.set_attention_scope("pairs")
    with pytest.raises(InputError, match="mask"):
        attention.set_attention_backend(model, "sdpa-flash", "cuda")


@pytest.mark.parametrize("case", MODEL_CASES[:2], ids=CASE_IDS[:2])
def test_regional_compile_matches_eager_with_block_swap(case):
    torch._dynamo.reset()
    model_type, overrides = case
    model, inputs = _model(model_type, layers=3, **overrides)
    expected = _run(model, inputs)
    compile_blocks(model, backend="aot_eager")
    compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
    blocks = [*model.blocks, *model.controlnet.controlnet_blocks]
    assert len(compiled) == len(blocks) and all(any(m is b for b in blocks) for m in compiled)
    counters.clear()
    assert torch.allclose(_run(model, inputs), expected, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks ran through dynamo (one graph per block kind)
    trace = []
    swap = enable_block_swap(model, 2, trace=trace)
    with swap("cpu"):
        assert torch.allclose(_run(model, inputs), expected, atol=1e-5)
    assert all(("release", i) in trace for i in swap.streamed)  # the swap hooks ran around the compiled blocks
    disable_block_swap(model)
    with pytest.raises(InputError, match="mode"):
        compile_blocks(model, mode="fastest")


# ------------------------------------------------------------------------------------------------
# VAE tiling and offload
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], dropout=0.0).eval()


def _smooth_video(frames=2, height=96, width=160):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    f = torch.arange(frames, dtype=torch.float32)[:, None, None]
    ch = [torch.sin(3 * xx + f) * torch.cos(2 * yy), 0.5 * torch.cos(4 * yy - f), torch.sin(xx * yy * 3 + f)]
    return torch.stack(ch)[None]


def test_vae_tiling_keyframes(tiny_vae, monkeypatch):
    from worldstereo_core.pipelines.vae import decode_keyframes, encode_keyframes

    video = _smooth_video()
    with torch.no_grad():
        z, d = encode_keyframes(tiny_vae, video), decode_keyframes(tiny_vae, encode_keyframes(tiny_vae, video))
        # a tile covering the frame: the switch changes nothing
        enable_vae_tiling(tiny_vae, tile=256, stride=192)
        assert torch.equal(encode_keyframes(tiny_vae, video), z)
        calls = {"encode": 0, "decode": 0}
        for kind in calls:
            original = getattr(tiny_vae, f"tiled_{kind}")

            def spy(*a, _kind=kind, _original=original, **k):
                calls[_kind] += 1
                return _original(*a, **k)

            monkeypatch.setattr(tiny_vae, f"tiled_{kind}", spy)
        # tiles smaller than the frame: the tiled path runs once per keyframe
        enable_vae_tiling(tiny_vae, tile=64, stride=48)
        zt = encode_keyframes(tiny_vae, video)
        dt = decode_keyframes(tiny_vae, z)
    disable_vae_tiling(tiny_vae)
    assert calls == {"encode": video.shape[2], "decode": video.shape[2]}
    assert zt.shape == z.shape and dt.shape == d.shape and torch.isfinite(dt).all()
    # Loose sanity bound: random weights are not smooth, so seams cost more than with the real VAE.
    assert ((zt - z).norm() / z.norm()) < 0.25 and ((dt - d).norm() / d.norm()) < 0.25
    with pytest.raises(InputError, match="multiples of 8"):
        enable_vae_tiling(tiny_vae, tile=60, stride=48)


def test_offload_components_moves_home_and_casts_text_encoder():
    parts = argparse.Namespace(text_encoder=nn.Linear(4, 4), image_encoder=nn.Linear(4, 4), vae=None)
    offload_components(parts, text_encoder_dtype=torch.bfloat16)
    assert parts.text_encoder.weight.dtype == torch.bfloat16 and parts.text_encoder.weight.device.type == "cpu"
    assert parts.image_encoder.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Pipelines with the runtime options (golden pipeline fixtures)
# ------------------------------------------------------------------------------------------------
def _pipeline_dirs() -> list:
    dirs = reference_tiny_dirs(TINY, "pipeline")
    return dirs or [pytest.param(None, marks=pytest.mark.skip(reason=f"no pipeline fixtures in {TINY}"))]


def _fixture_pipeline(case, common):
    from worldstereo_core.pipelines import CameraPipeline, DMDScheduler, MemoryDMDPipeline, MemoryPipeline

    cfg = json.loads((case / "config.json").read_text())
    folder = (case / cfg["transformer_fixture"].split()[0]).resolve()
    model, _, _ = _fixture_model_and_call(folder)
    parts = dict(image_encoder=common["clip"], image_processor=common["processor"])
    kind = cfg["pipeline_class"]
    if kind == "RefKFDMDGeneratorPipeline":
        kw = {k: v for k, v in cfg["scheduler"]["kwargs"].items()
              if k in ("start_timesteps", "num_train_timesteps", "shift", "dmd_steps")}
        pipe = MemoryDMDPipeline(model, common["vae"], scheduler=DMDScheduler(**kw), **parts)
    else:
        cls = MemoryPipeline if kind == "KFPCDControllerRefPipeline" else CameraPipeline
        pipe = cls(model, common["vae"], scheduler_config=cfg["scheduler"]["config"], **parts)
    inputs = load_file(str(case / "inputs.safetensors"))
    call = {k: inputs[k] for k in cfg["call_kwargs"] if k in inputs}
    call.update({k: v for k, v in cfg["call_kwargs"].items()
                 if k in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                          "latent_cond_mode")})
    from PIL import Image

    call["image"] = Image.fromarray(inputs["image_uint8_hwc"].numpy(), "RGB")
    return pipe, call, load_file(str(case / "outputs.safetensors"))


@pytest.mark.parametrize("case", _pipeline_dirs(), ids=lambda p: getattr(p, "name", "absent"))
def test_pipeline_with_block_swap_matches_plain_and_reference(case):
    common = load_fixture_common(TINY / "common")
    pipe, call, golden = _fixture_pipeline(case, common)
    plain = pipe(**call, output_type="latent").latents
    calls = []
    swap = enable_block_swap(pipe.transformer, 2, trace=calls)
    swapped = pipe(**call, output_type="latent").latents
    assert torch.equal(swapped, plain)
    assert ("run", len(pipe.transformer.blocks) - 1) in calls and swap.resident_now() == 0
    assert torch.allclose(swapped, golden["final_latents"], atol=1e-3)


def test_runtime_options_cli_flags_and_apply():
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    args = parser.parse_args(["--block-swap", "2", "--fp8", "--attention", "sdpa", "--vae-tiling", "--offload",
                              "--text-encoder-dtype", "bf16"])
    options = runtime_options_from_args(args)
    assert options == RuntimeOptions(block_swap=2, fp8="channel", attention="sdpa", vae_tiling=True, offload=True,
                                     text_encoder_dtype="bf16")
    assert load_kwargs(options, "cuda") == {"fp8": "channel", "device": torch.device("cpu")}
    assert load_device(options, "cuda") == torch.device("cpu")
    assert load_device(RuntimeOptions(), "cuda") == torch.device("cuda")
    assert runtime_options_from_args(parser.parse_args([])) == RuntimeOptions()
    with pytest.raises(InputError, match="block_swap"):
        RuntimeOptions(block_swap=0)
    with pytest.raises(InputError, match="fp8"):
        RuntimeOptions(fp8="int4")

    model, inputs = _model(CAMERA, layers=3)
    reference = _run(_roundtripped(model, "channel"), inputs)
    parts = argparse.Namespace(text_encoder=nn.Linear(2, 2), image_encoder=None, vae=None)
    kwargs = apply_runtime(model, RuntimeOptions(block_swap=2, fp8="channel", compile=True, compile_backend="eager",
                                                 offload=True, text_encoder_dtype="bf16"), "cpu", components=parts)
    assert kwargs == {"device": torch.device("cpu")}
    assert parts.text_encoder.weight.dtype == torch.bfloat16
    with model.placement("cpu"):
        assert torch.equal(_run(model, inputs), reference)
    with pytest.raises(InputError, match="torchrun"):
        apply_runtime(_model(CAMERA, layers=1)[0], RuntimeOptions(shard_weights=True), "cpu")


# ------------------------------------------------------------------------------------------------
# FLOP counter
# ------------------------------------------------------------------------------------------------
def _counted(model_type, tcfg, ccfg, *, frames, height, width, ref_index, batch=1, scope="full"):
    from torch.utils.flop_counter import FlopCounterMode

    from worldstereo_core.models.ssm import PairGroups

    model = build_transformer(tcfg, ccfg, memory=model_type != CAMERA, device="meta", dtype=torch.bfloat16,
                              attention_scope=scope)
    model.to("meta")
    inputs = tiny_inputs(model_type, tcfg, ccfg, frames=frames, height=height, width=width,
                         ref_index=ref_index or (0,), batch=batch)
    inputs = {k: v if k == "ref_index" else v.to("meta") for k, v in inputs.items()}
    build = PairGroups.build.__func__

    def build_on_cpu(cls, ref_index, num_frames, tokens_per_frame, device):  # bincount has no meta kernel
        g = build(cls, ref_index.cpu(), num_frames, tokens_per_frame, "cpu")
        return cls(g.index.to(device), None if g.key_mask is None else g.key_mask.to(device), g.inverse.to(device))

    original = PairGroups.build
    PairGroups.build = classmethod(build_on_cpu)
    try:
        with FlopCounterMode(display=False) as counter:
            model(**inputs, return_dict=False)
    finally:
        PairGroups.build = original
    return counter.get_total_flops()


@pytest.mark.parametrize("model_type,overrides,scope", [
    (CAMERA, {}, "full"), (CAMERA, {"dim": 24, "mask_downsample": 2}, "full"), (MEMORY, {}, "full"),
    (MEMORY, {"update_ref": False}, "full"), (MEMORY, {}, "pairs")])
def test_flop_formula_matches_torch_flop_counter(model_type, overrides, scope):
    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(model_type, tcfg, **overrides)
    refs = (1, 0, 0) if model_type == MEMORY else ()
    frames = 3
    counted = _counted(model_type, tcfg, ccfg, frames=frames, height=4, width=6, ref_index=refs, batch=2, scope=scope)
    formula = transformer_flops(tcfg, ccfg, latent_frames=frames, latent_height=4, latent_width=6, batch=2,
                                memory=model_type == MEMORY, ref_index=refs, attention_scope=scope)
    assert formula.total == counted


def test_flop_formula_at_the_real_14b_config():
    from worldstereo_core.models import shipped_base_config

    tcfg = shipped_base_config("wan2.1-i2v-14b-480p")
    ccfg = UNI3C_CONTROLNET
    counted = _counted(CAMERA, tcfg, ccfg, frames=21, height=60, width=96, ref_index=())
    formula = transformer_flops(tcfg, ccfg, latent_frames=21, latent_height=60, latent_width=96)
    assert formula.total == counted
    assert 1.5e15 < formula.total < 1.7e15  # the "about 1.6 PFLOP per forward" at 480x768, 21 keyframes


@pytest.mark.parametrize("capability,available,expected", [
    ((9, 0), {"flash3", "flash"}, "flash3"),     # Hopper (H100/H200)
    ((9, 0), {"flash"}, "flash"),
    ((9, 0), set(), "sdpa"),
    ((10, 0), {"flash3", "flash"}, "flash"),     # Blackwell datacenter: no flash-attn 3 kernels
    ((12, 0), {"flash3", "flash"}, "flash"),     # Blackwell desktop
    ((12, 0), {"flash3"}, "sdpa"),
    ((8, 9), {"flash3", "flash"}, "flash"),      # Ada
    ((8, 0), {"flash", "sage"}, "flash"),        # Ampere
    ((8, 6), {"sage", "xformers"}, "sdpa"),      # sage is approximate: never chosen by auto
    ((7, 5), {"flash3", "flash"}, "sdpa"),       # Turing: flash-attn 2 needs >= 8.0
    (None, {"flash3", "flash"}, "sdpa"),         # not a CUDA device
])
def test_auto_attention_backend_per_capability(capability, available, expected):
    assert attention.auto_backend(capability, available) == expected
    assert attention.auto_backend(capability, available, needs_mask=True) == "sdpa"
    assert attention.auto_backend(capability, available, half_precision=False) == "sdpa"
