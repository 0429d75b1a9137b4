"""The release's sampling as ComfyUI ``SIGMAS`` and ``SAMPLER``.

* worldstereo-camera / -memory: UniPC (bh2 corrector, x0 prediction, order 2 lowered for the last
  steps) on the diffusers-0.36 flow-sigma grid (:func:`release_unipc_sigmas`) with the model called
  at the release's integer timesteps ``int(sigma * 1000)``: :func:`sample_release_unipc`, wrapped
  as a ComfyUI sampler by :func:`release_unipc_sampler`. CFG stays the core guider's (on the text).
* worldstereo-memory-dmd: the 4-step DMD generator. Its step is a plain Euler step on the flow
  velocity, ``x + (sigma_next - sigma) * v``, and its model timesteps are ``sigma * 1000`` (not
  rounded), which is exactly ComfyUI's ``euler`` sampler on a flow model, so :func:`dmd_sigmas`
  with core ``euler`` and CFG 1 is the release's DMD sampling.

Samplers follow k-diffusion's convention: ``model(x, sigma)`` returns the x0 prediction
(``x - sigma * v`` for a flow model).
"""
from __future__ import annotations

import torch
from tqdm.auto import trange

from ...worldstereo_core.constants import DEFAULT_GUIDANCE_SCALE
from ...worldstereo_core.loading.single_file import default_scheduler_config
from ...worldstereo_core.models.config import WorldStereoConfig
from ...worldstereo_core.pipelines.schedulers import DMDScheduler, reference_flow_sigmas

#: Timesteps per unit sigma of the Wan flow models (ComfyUI's flow multiplier and the release's T).
NUM_TRAIN_TIMESTEPS = 1000


def dmd_sigmas(config: WorldStereoConfig) -> torch.Tensor:
    """The DMD schedule of ``config`` (dmd_start_steps, dmd_end_steps, gen_shift, dmd_steps) as
    SIGMAS: float32 ``t / T`` per step, then 0."""
    sigmas = DMDScheduler.from_worldstereo_config(config).sigmas
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def release_shift(config: WorldStereoConfig, shift: float = 0.0) -> float:
    """``shift``, or when it is 0 that of the variant's base (3 for 480P, 5 for 720P)."""
    return shift if shift > 0 else default_scheduler_config(base_model=config.base_model)["flow_shift"]


def release_sampling(config: WorldStereoConfig, steps: int, shift: float = 0.0) -> tuple[torch.Tensor, object, float]:
    """(SIGMAS, SAMPLER, CFG) the release samples ``config`` with: the DMD schedule with core euler
    at CFG 1, else ``steps`` UniPC steps (:func:`release_unipc_sigmas` at :func:`release_shift`)
    with :func:`release_unipc_sampler` at CFG 5."""
    import comfy.samplers

    if config.is_dmd:
        return dmd_sigmas(config), comfy.samplers.sampler_object("euler"), 1.0
    return (release_unipc_sigmas(steps, release_shift(config, shift)), release_unipc_sampler(),
            DEFAULT_GUIDANCE_SCALE)


def release_unipc_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The diffusers-0.36 UniPC flow grid the released weights were sampled with (float32, ending in 0)."""
    sigmas, _ = reference_flow_sigmas(steps, shift, NUM_TRAIN_TIMESTEPS)
    return torch.from_numpy(sigmas)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha / sigma) of a flow sigma (alpha = 1 - sigma)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _b_coefficients(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phi_1(-h) h, B(h), b) of the bh2 variant for a step of log-SNR length ``h``."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(b)


def _differences(sigmas, index: int, history: list, h: torch.Tensor, order: int):
    """Ratios r_k and scaled differences D_k of the x0 predictions before ``history[-1]``
    (taken at ``sigmas[index - k]``, ``history[-1]`` at ``sigmas[index]``)."""
    base, m0 = _lambda(sigmas[index]), history[-1]
    ratios, diffs = [], []
    for k in range(1, order):
        r = (_lambda(sigmas[index - k]) - base) / h
        ratios.append(r)
        diffs.append((history[-(k + 1)] - m0) / r)
    return torch.stack(ratios + [torch.ones_like(h)]), diffs


def _powers(ratios: torch.Tensor, order: int) -> torch.Tensor:
    return torch.stack([ratios ** k for k in range(order)])


def _predict(sigmas, i: int, history: list, x: torch.Tensor, order: int) -> torch.Tensor:
    """UniP step from ``sigmas[i]`` to ``sigmas[i + 1]``."""
    s0, t = sigmas[i], sigmas[i + 1]
    h = _lambda(t) - _lambda(s0)
    ratios, diffs = _differences(sigmas, i, history, h, order)
    h_phi_1, b_h, b = _b_coefficients(h, order)
    x_t = t / s0 * x - (1 - t) * h_phi_1 * history[-1]
    if diffs:
        rhos = [0.5] if order == 2 else torch.linalg.solve(_powers(ratios, order)[:-1, :-1], b[:-1])
        x_t = x_t - (1 - t) * b_h * sum(rho * d for rho, d in zip(rhos, diffs))
    return x_t


def _correct(sigmas, i: int, history: list, last_x: torch.Tensor, x0: torch.Tensor, order: int) -> torch.Tensor:
    """UniC correction of the sample at ``sigmas[i]`` (predicted from ``last_x`` at ``sigmas[i - 1]``)
    with its own x0 prediction ``x0``; ``history`` ends with the x0 prediction at ``sigmas[i - 1]``."""
    s0, t = sigmas[i - 1], sigmas[i]
    h = _lambda(t) - _lambda(s0)
    ratios, diffs = _differences(sigmas, i - 1, history, h, order)
    h_phi_1, b_h, b = _b_coefficients(h, order)
    rhos = [0.5] if order == 1 else torch.linalg.solve(_powers(ratios, order), b)
    m0 = history[-1]
    correction = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (x0 - m0)
    return t / s0 * last_x - (1 - t) * h_phi_1 * m0 - (1 - t) * b_h * correction


@torch.no_grad()
def sample_release_unipc(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None,
                         disable=None, solver_order: int = 2) -> torch.Tensor:
    """UniPC as the release samples (diffusers 0.36 ``UniPCMultistepScheduler``: flow prediction,
    bh2, predict_x0, lower_order_final, no disabled corrector) over ``sigmas`` (ending in 0).

    Like the release, it starts from the noise itself (ComfyUI hands it ``sigmas[0] * noise`` for an
    empty latent) and calls the model at ``int(sigma * 1000)``, using the true sigma for the update."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    x = x / sigmas[0]
    steps = len(sigmas) - 1
    history: list[torch.Tensor] = []  # x0 predictions of the last steps, newest last
    last_x, last_order = None, 0
    for i in trange(steps, disable=disable):
        sigma = sigmas[i]
        called = torch.floor(sigma * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
        denoised = model(x, called * s_in, **extra_args)
        x0 = x - sigma / called * (x - denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        if last_x is not None:
            x = _correct(sigmas, i, history, last_x, x0, last_order)
        history = (history + [x0])[-solver_order:]
        last_x, last_order = x, min(solver_order, steps - i, len(history))
        x = _predict(sigmas, i, history, x, last_order)
    return x


def release_unipc_sampler(solver_order: int = 2):
    """:func:`sample_release_unipc` as a ComfyUI ``SAMPLER``."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_release_unipc, extra_options={"solver_order": solver_order})
