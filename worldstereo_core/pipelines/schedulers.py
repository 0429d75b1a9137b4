"""Sampling schedules: UniPC flow matching (camera, memory) and the 4-step DMD generator schedule.

Both are wrapped as a :class:`Scheduler`: ``timesteps`` (what the transformer receives at each step) and
``advance(noise_pred, index, latents) -> latents``. The shared sampling loop only sees that.

UniPC: diffusers' ``UniPCMultistepScheduler`` does the update rule. Its flow-sigma grid changed
after diffusers 0.36.0, the version the released weights were sampled with, so by default the grid
is set here to the 0.36.0 one:
``sigma_i = shift((1 - 1/T) * (1 - i/N))`` for i < N, then a final 0; model timesteps are
``int64(sigma_i * T)`` (truncated). ``sigma_grid="installed"`` keeps whatever the installed
diffusers computes instead.

DMD (the reference's ``models/dmd_scheduler.py``): float32 timesteps
``shift(linspace(s, T, n)[::-1] / T) * T``, plain Euler steps on the flow ODE, the last one
landing on sigma = 0. The grid is computed as the reference does, to the last bit: numpy's
linspace (float64, then rounded to float32), then float32 tensor arithmetic.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Protocol

import numpy as np
import torch

from ..constants import DEFAULT_NUM_STEPS, DMD_END_STEPS, DMD_SHIFT, DMD_START_STEPS, DMD_STEPS
from ..errors import CheckpointError, InputError
from ..hub import WAN_BASE_REPO

SigmaGrid = Literal["reference", "installed"]
SIGMA_GRIDS: tuple[str, ...] = ("reference", "installed")


class Scheduler(Protocol):
    """What the sampling loop needs from a schedule."""

    timesteps: torch.Tensor

    def advance(self, noise_pred: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        """Latents after step ``index`` given the model's velocity prediction."""


def shift_sigmas(sigmas, shift: float):
    """Flow-matching timestep shift ``k*s / (1 + (k-1)*s)`` (numpy or torch, dtype kept)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def reference_flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The diffusers-0.36.0 UniPC flow grid: (sigmas float32 [N+1] ending in 0, timesteps int64 [N])."""
    if num_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_steps}")
    unshifted = 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)  # 0 .. 1-1/T
    sigmas = np.flip(shift_sigmas(unshifted, shift))[:-1].copy()                  # descending, no 0
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)                    # truncation
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


def _check_flow_config(config: Mapping[str, Any]) -> None:
    if config.get("prediction_type") != "flow_prediction" or not config.get("use_flow_sigmas", False):
        raise CheckpointError(
            "scheduler config must be a flow-matching UniPC config (prediction_type "
            f"'flow_prediction', use_flow_sigmas true); got prediction_type={config.get('prediction_type')!r}, "
            f"use_flow_sigmas={config.get('use_flow_sigmas')!r}. Use the scheduler/ folder of a "
            f"Wan2.1-I2V Diffusers repo (e.g. {WAN_BASE_REPO})."
        )


#: UniPC settings the host-side scheduler implements (the Wan2.1 scheduler configs use these).
UNIPC_SUPPORTED = {"predict_x0": (True,), "solver_type": ("bh2",), "thresholding": (False,),
                   "disable_corrector": ([],), "solver_p": (None,)}


def _check_unipc_config(config: Mapping[str, Any]) -> None:
    for key, allowed in UNIPC_SUPPORTED.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"scheduler config: {key}={value!r} is not supported by the WorldStereo UniPC "
                                  f"scheduler (supported: {list(allowed)}); use the scheduler/ folder of a Wan2.1-I2V "
                                  "Diffusers repo")


class UniPCFlowScheduler:
    """A fresh UniPC flow-matching schedule for one run.

    ``config`` is the base model's ``scheduler/scheduler_config.json`` (a dict); ``flow_shift``
    overrides its shift. ``sigma_grid="reference"`` (default) reproduces diffusers 0.36.0.

    diffusers' ``UniPCMultistepScheduler`` sets the grid; the steps (UniPC predictor + corrector,
    x0 prediction, ``bh2``, any ``solver_order``, ``lower_order_final``) run here with every coefficient a
    float32 scalar on the CPU, computed by the same operations as diffusers' on the same float32
    sigmas, so a step launches kernels on the latents only: no host copy, no device sync (diffusers
    moves each sigma to the device and solves the order-2 system there, a sync per step). On the
    CPU the results equal diffusers' to the bit.
    """

    def __init__(self, config: Mapping[str, Any], num_steps: int = DEFAULT_NUM_STEPS, *,
                 flow_shift: float | None = None, sigma_grid: SigmaGrid = "reference",
                 device: torch.device | str | None = None) -> None:
        from diffusers import UniPCMultistepScheduler

        if sigma_grid not in SIGMA_GRIDS:
            raise InputError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {sigma_grid!r}")
        if num_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_steps}")
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        _check_flow_config(config)
        _check_unipc_config(config)
        if flow_shift is not None:
            config["flow_shift"] = float(flow_shift)
        scheduler = UniPCMultistepScheduler.from_config(config)
        scheduler.set_timesteps(num_steps, device=device)
        sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
        if sigma_grid == "reference":
            ref_sigmas, ref_timesteps = reference_flow_sigmas(
                num_steps, float(scheduler.config.flow_shift), int(scheduler.config.num_train_timesteps))
            sigmas, timesteps = torch.from_numpy(ref_sigmas), torch.from_numpy(ref_timesteps).to(device)
        self.timesteps: torch.Tensor = timesteps
        self.sigmas: torch.Tensor = sigmas.to("cpu", torch.float32)
        self.flow_shift = float(scheduler.config.flow_shift)
        self.order = int(scheduler.config.solver_order)
        self.lower_order_final = bool(scheduler.config.lower_order_final)
        self._x0: list[torch.Tensor] = []      # x0 predictions of the last steps, newest last
        self._last: torch.Tensor | None = None  # the (corrected) sample the last predictor started from
        self._last_order = 0
        self._step = 0

    def _coefficients(self, base: int, order: int):
        """Scalars of the update from sigma[base] to sigma[base + 1] using ``order`` x0 predictions.

        Returns (sigma ratio, alpha_t * h_phi_1, alpha_t * B(h), r_k of the older predictions, R, b),
        with B(h) = h_phi_1 (``bh2``)."""
        def alpha_lambda(i):
            sigma = self.sigmas[i]
            alpha = 1 - sigma
            return alpha, torch.log(alpha) - torch.log(sigma)

        alpha_t, lambda_t = alpha_lambda(base + 1)
        _, lambda_s0 = alpha_lambda(base)
        h = lambda_t - lambda_s0
        rks = [(alpha_lambda(base - k)[1] - lambda_s0) / h for k in range(1, order)]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        powers, rhs = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        r = torch.stack([*rks, torch.ones(())])
        for i in range(1, order + 1):
            powers.append(torch.pow(r, i - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        ratio = self.sigmas[base + 1] / self.sigmas[base]
        return ratio, alpha_t * h_phi_1, alpha_t * b_h, rks, torch.stack(powers), torch.stack(rhs)

    def _update(self, x: torch.Tensor, base: int, order: int, x0: list[torch.Tensor],
                corrected: torch.Tensor | None) -> torch.Tensor:
        """One UniPC update from ``x`` at sigma[base]; ``x0`` newest last, ending with the one at ``base``.
        ``corrected``: the x0 prediction at sigma[base + 1] (corrector), None for the predictor."""
        ratio, a_phi, a_bh, rks, powers, rhs = self._coefficients(base, order)
        m0 = x0[-1]
        diffs = [(x0[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
        out = ratio * x - a_phi * m0
        if corrected is None:
            if not diffs:
                return out
            rhos = [0.5] if order == 2 else torch.linalg.solve(powers[:-1, :-1], rhs[:-1]).unbind()
            return out - a_bh * sum(rho * d for rho, d in zip(rhos, diffs))
        rhos = [0.5] if order == 1 else torch.linalg.solve(powers, rhs).unbind()
        res = rhos[-1] * (corrected - m0)
        if diffs:
            res = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + res
        return out - a_bh * res

    def advance(self, noise_pred: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        if index != self._step:
            raise RuntimeError(f"UniPC steps must run in order: expected step {self._step}, got {index}")
        x0 = latents - self.sigmas[index] * noise_pred
        if self._last is not None:  # correct the last prediction with this step's x0 (UniC)
            latents = self._update(self._last, index - 1, self._last_order, self._x0, x0)
        self._x0 = (self._x0 + [x0])[-self.order:]
        order = min(self.order, len(self.timesteps) - index) if self.lower_order_final else self.order
        order = min(order, len(self._x0))
        self._last, self._last_order = latents, order
        self._step += 1
        return self._update(latents, index, order, self._x0, None)


class DMDScheduler:
    """The DMD generator schedule of worldstereo-memory-dmd (the reference's FlowGeneratorScheduler).

    Timesteps are float32 and passed to the model unrounded (e.g. 1000, 937.5, 833.33, 625 for
    s=250, T=1000, k=5, n=4).
    """

    def __init__(self, start_timesteps: float = DMD_START_STEPS, num_train_timesteps: float = DMD_END_STEPS,
                 shift: float = DMD_SHIFT, dmd_steps: int = DMD_STEPS) -> None:
        if dmd_steps < 1:
            raise InputError(f"dmd_steps must be >= 1, got {dmd_steps}")
        if not 0 <= start_timesteps <= num_train_timesteps or num_train_timesteps <= 0:
            raise InputError(
                f"DMD schedule needs 0 <= dmd_start_steps <= dmd_end_steps and dmd_end_steps > 0; "
                f"got {start_timesteps}, {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        grid = np.linspace(start_timesteps, num_train_timesteps, dmd_steps, dtype=np.float32)[::-1].copy()
        u = shift_sigmas(torch.from_numpy(grid) / num_train_timesteps, shift)
        self.timesteps: torch.Tensor = u * num_train_timesteps
        self.sigmas: torch.Tensor = self.timesteps / num_train_timesteps

    @classmethod
    def from_worldstereo_config(cls, cfg: Any) -> "DMDScheduler":
        """Build from a WorldStereo config (attributes or mapping with dmd_start_steps, dmd_end_steps,
        gen_shift, dmd_steps)."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(start_timesteps=get("dmd_start_steps", DMD_START_STEPS),
                   num_train_timesteps=get("dmd_end_steps", DMD_END_STEPS), shift=get("gen_shift", DMD_SHIFT),
                   dmd_steps=get("dmd_steps", DMD_STEPS))

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, idx: int
             ) -> torch.Tensor:
        """One Euler step from ``timesteps[idx]`` to ``timesteps[idx+1]`` (sigma 0 after the last);
        ``timesteps`` on the CPU (the step size is a host scalar)."""
        sigma = timesteps[idx] / self.num_train_timesteps
        if idx + 1 < len(timesteps):
            sigma_next = timesteps[idx + 1] / self.num_train_timesteps
        else:
            sigma_next = torch.zeros_like(sigma)
        return sample + (sigma_next - sigma) * model_output  # a CPU scalar: no copy to the device

    def advance(self, noise_pred: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        return self.step(noise_pred, latents, self.timesteps, index)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device``. A CPU generator gives the same noise on every machine."""
    return torch.Generator(device=device).manual_seed(int(seed))


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str, *,
                  skip: int = 0) -> torch.Tensor:
    """float32 standard normal noise drawn with ``generator`` (on its device), moved to ``device``.

    ``skip`` earlier draws of the same shape are made first and dropped: the ``skip + 1``-th clip
    of a generator shared by several clips (the release seeds one for a whole multi-trajectory run)."""
    if skip < 0:
        raise InputError(f"noise skip must be >= 0, got {skip}")
    gen_device = generator.device if generator is not None else torch.device(device)
    for _ in range(skip + 1):
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device)
