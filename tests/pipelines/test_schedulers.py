"""Schedulers: DMD generator schedule vs the golden fixtures, UniPC flow grid, seeds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fixtures_root
from tiny_components import reference_tiny_dirs
from worldstereo_core.errors import CheckpointError, InputError
from worldstereo_core.pipelines.schedulers import (DMDScheduler, UniPCFlowScheduler, initial_noise, make_generator,
                                                   reference_flow_sigmas)

DMD_DIRS = reference_tiny_dirs(fixtures_root() / "reference_tiny", "dmd_scheduler")
UNIPC_DIRS = [d for d in reference_tiny_dirs(fixtures_root() / "reference_tiny", "pipeline")
              if "config" in json.loads((d / "config.json").read_text()).get("scheduler", {})]
FLOW_CONFIG = {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
               "flow_shift": 5.0, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
               "lower_order_final": True, "final_sigmas_type": "zero"}


def _skip_if_none(dirs, what):
    if not dirs:
        pytest.skip(f"no {what} fixtures under {fixtures_root() / 'reference_tiny'} (set WORLDSTEREO_FIXTURES)")


@pytest.mark.parametrize("case", DMD_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_dmd_scheduler_matches_fixture_bit_exactly(case):
    _skip_if_none(DMD_DIRS, "dmd_scheduler")
    cfg = json.loads((case / "config.json").read_text())
    ref = load_file(str(next(case.glob("*.safetensors"))))
    # Build through the WorldStereo config field names, as the pipeline does.
    ws = {ws_name: cfg["scheduler_kwargs"][kw] for kw, ws_name in cfg["maps_from_worldstereo_config"].items()}
    sched = DMDScheduler.from_worldstereo_config(ws)
    assert sched.timesteps.dtype == torch.float32
    assert torch.equal(sched.timesteps, ref["timesteps"])
    assert torch.equal(sched.sigmas, ref["sigmas"])
    n = len(sched.timesteps)
    for i in range(n):
        out = sched.step(ref["model_output"], ref["sample"], sched.timesteps, i)
        assert torch.equal(out, ref[f"step_{i}_prev_sample"]), f"step {i}"


def test_dmd_schedule_values_and_euler_to_zero():
    sched = DMDScheduler(start_timesteps=250, num_train_timesteps=1000, shift=5.0, dmd_steps=4)
    assert torch.allclose(sched.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]), atol=1e-4)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    # Last step lands on sigma 0: x - sigma * v (the x0 estimate).
    assert torch.allclose(sched.advance(v, 3, x), x - 0.625 * v, atol=1e-6)
    assert torch.allclose(sched.advance(v, 0, x), x + (0.9375 - 1.0) * v, atol=1e-6)
    # Other settings (the held-out profile uses s=200, k=3): u = linspace(s, T, n)/T, shifted, descending.
    other = DMDScheduler(start_timesteps=200, num_train_timesteps=1000, shift=3.0, dmd_steps=3)
    u = np.linspace(0.2, 1.0, 3)[::-1]
    assert np.allclose(other.timesteps.numpy(), 1000 * 3 * u / (1 + 2 * u), atol=1e-3)


def _reference_dmd_timesteps(s: int, T: int, k: float, n: int) -> np.ndarray:
    """The reference's grid computed independently: each linspace point exactly (rational), rounded
    to float64 and then float32, then the shift in float32 arithmetic, one rounding per operation."""
    from fractions import Fraction

    f32 = np.float32
    grid = [f32(float(Fraction(s) + Fraction(i) * Fraction(T - s) / (n - 1))) for i in range(n)][::-1]
    out = []
    for t in grid:
        u = f32(t / f32(T))
        out.append(f32(f32(f32(k) * u) / f32(f32(1) + f32(f32(k - 1) * u))) * f32(T))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("s,T,k,n", [(200, 1000, 3.0, 4), (200, 1000, 3.0, 7), (100, 900, 3.0, 4),
                                     (100, 900, 2.0, 8), (250, 1000, 5.0, 4), (333, 1000, 7.0, 6)])
def test_dmd_timesteps_follow_the_reference_dtype_and_order(s, T, k, n):
    """Bit-exact for any start/end/shift, not only the public fixture's (a float32 linspace misses
    s=200, k=3 by one float32 step: 891.8919 instead of 891.8918)."""
    sched = DMDScheduler(start_timesteps=s, num_train_timesteps=T, shift=k, dmd_steps=n)
    assert sched.timesteps.dtype == torch.float32
    assert sched.timesteps.numpy().tobytes() == _reference_dmd_timesteps(s, T, k, n).tobytes()


def test_noise_after_earlier_draws_equals_one_shared_generator():
    shared = torch.Generator().manual_seed(5)
    draws = [torch.randn(2, 3, 4, generator=shared) for _ in range(3)]
    for k, expected in enumerate(draws):
        assert torch.equal(initial_noise((2, 3, 4), make_generator(5), "cpu", skip=k), expected)
    with pytest.raises(InputError, match="skip"):
        initial_noise((2,), make_generator(5), "cpu", skip=-1)


def test_dmd_rejects_bad_settings():
    with pytest.raises(InputError):
        DMDScheduler(dmd_steps=0)
    with pytest.raises(InputError):
        DMDScheduler(start_timesteps=1200, num_train_timesteps=1000)


def test_reference_grid_formula_and_spec_example():
    sigmas, timesteps = reference_flow_sigmas(2, 5.0, 1000)
    assert timesteps.tolist() == [999, 833]
    assert sigmas[-1] == 0.0 and len(sigmas) == 3
    assert np.allclose(sigmas[:2], [0.9998, 0.8331], atol=5e-5)
    for n, k in ((40, 5.0), (40, 3.0), (7, 1.0)):
        sig, ts = reference_flow_sigmas(n, k, 1000)
        s = (1 - 1 / 1000) * (1 - np.arange(n) / n)
        expect = k * s / (1 + (k - 1) * s)
        assert np.allclose(sig[:-1], expect, atol=1e-7)
        assert np.array_equal(ts, np.floor(expect * 1000 + 1e-9).astype(np.int64))
        assert np.all(np.diff(sig) < 0)


def test_unipc_sampler_grids_and_shift_override():
    ref = UniPCFlowScheduler(FLOW_CONFIG, 40)
    sig, ts = reference_flow_sigmas(40, 5.0)
    assert ref.timesteps.dtype == torch.int64 and ref.timesteps.tolist() == ts.tolist()
    assert torch.equal(ref.sigmas, torch.from_numpy(sig))
    from diffusers import UniPCMultistepScheduler
    stock = UniPCMultistepScheduler.from_config(FLOW_CONFIG)
    stock.set_timesteps(40)
    inst = UniPCFlowScheduler(FLOW_CONFIG, 40, sigma_grid="installed")
    assert torch.equal(inst.timesteps, stock.timesteps) and torch.equal(inst.sigmas, stock.sigmas)
    shifted = UniPCFlowScheduler(FLOW_CONFIG, 40, flow_shift=3.0)
    assert shifted.flow_shift == 3.0
    assert shifted.timesteps.tolist() == reference_flow_sigmas(40, 3.0)[1].tolist()
    with pytest.raises(InputError):
        UniPCFlowScheduler(FLOW_CONFIG, 4, sigma_grid="newest")


def test_unipc_rejects_non_flow_config():
    with pytest.raises(CheckpointError, match="flow"):
        UniPCFlowScheduler({"num_train_timesteps": 1000, "prediction_type": "epsilon"}, 4)


@pytest.mark.parametrize("case", UNIPC_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_unipc_timesteps_match_recorded_pipeline_calls(case):
    _skip_if_none(UNIPC_DIRS, "UniPC pipeline")
    cfg = json.loads((case / "config.json").read_text())
    sched_cfg = cfg["scheduler"]
    out = load_file(str(case / "outputs.safetensors"))
    per_step = cfg["transformer_calls_per_step"]
    scheduler = UniPCFlowScheduler(sched_cfg["config"], sched_cfg["num_inference_steps"])
    recorded = [out[f"call{k}_timestep"].item() for k in range(0, len(scheduler.timesteps) * per_step, per_step)]
    assert scheduler.timesteps.tolist() == recorded


def test_unipc_steps_follow_flow_ode_on_a_linear_field():
    # For x_t = (1-s) x0 + s n the exact velocity is n - x0; every solver must then land on x0.
    scheduler = UniPCFlowScheduler(FLOW_CONFIG, 6)
    x0, n = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    x = n * scheduler.sigmas[0] + x0 * (1 - scheduler.sigmas[0])
    for i in range(len(scheduler.timesteps)):
        x = scheduler.advance(n - x0, i, x)
    assert torch.allclose(x, x0, atol=1e-4)
    with pytest.raises(RuntimeError):
        scheduler.advance(n - x0, 0, x)


def test_generators_reproducible():
    a = initial_noise((2, 16, 3, 4, 6), make_generator(1024, "cpu"), "cpu")
    b = initial_noise((2, 16, 3, 4, 6), make_generator(1024, "cpu"), "cpu")
    c = initial_noise((2, 16, 3, 4, 6), make_generator(1025, "cpu"), "cpu")
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.randn((2, 16, 3, 4, 6), generator=torch.Generator().manual_seed(1024)))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 2, 5, 8])
def test_unipc_steps_equal_diffusers_bit_for_bit(order, steps):
    """The host-scalar UniPC steps against diffusers' UniPCMultistepScheduler (an independent
    implementation of the same solver) on the same grid: identical latents after every step."""
    from diffusers import UniPCMultistepScheduler

    config = dict(FLOW_CONFIG, solver_order=order)
    ours = UniPCFlowScheduler(config, steps, sigma_grid="installed")
    stock = UniPCMultistepScheduler.from_config(config)
    stock.set_timesteps(steps)
    stock.set_begin_index(0)
    g = torch.Generator().manual_seed(order * 10 + steps)
    x = torch.randn(1, 4, 2, 3, 5, generator=g)
    y = x.clone()
    for i in range(steps):
        v = torch.randn(x.shape, generator=g)
        x = ours.advance(v, i, x)
        y = stock.step(v, stock.timesteps[i], y, return_dict=False)[0]
        assert torch.equal(x, y), f"step {i}"


@pytest.mark.parametrize("field,value", [("solver_type", "bh1"), ("predict_x0", False), ("thresholding", True),
                                         ("disable_corrector", [0])])
def test_unipc_refuses_settings_it_does_not_implement(field, value):
    with pytest.raises(CheckpointError, match=field):
        UniPCFlowScheduler(dict(FLOW_CONFIG, **{field: value}), 4)
