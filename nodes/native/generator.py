"""A clip generator (``worldstereo_core.tasks.generate.ClipGenerator``) on the native MODEL, so the
multi-trajectory loop runs on ComfyUI's own model and samplers as it runs on the diffusers
pipelines: each :class:`GenerationRequest` is encoded (core CLIP text encoder), conditioned
(:func:`.conditioning.worldstereo_conditioning`), sampled by the core sampler with the given
SIGMAS / SAMPLER and decoded keyframe by keyframe.

The initial noise is the release's: one CPU generator seeded with the request's seed, after
``noise_index`` draws of the clip's shape (every trajectory of a run draws from one generator).
Its :meth:`~NativeClipGenerator.resume_key` identifies the models by their weights and patches
(:mod:`.identity`) and the variant by its files, so a run resumes only with what it was made with.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import comfy.sample

from ...worldstereo_core.io.fingerprint import file_stamps
from ...worldstereo_core.pipelines.schedulers import initial_noise, make_generator
from ...worldstereo_core.pipelines.vae import decode_keyframes, frames_from_video, normalize_latents
from ...worldstereo_core.progress import ProgressFn, report
from ...worldstereo_core.tasks.generate import GenerationRequest, model_inputs
from .conditioning import worldstereo_conditioning
from .identity import patcher_identity
from .model import worldstereo_forward
from .vae import KeyframeVae


class NativeClipGenerator:
    """Clips of a native MODEL: ``clip`` the core CLIP (Load CLIP, type wan) that encodes the
    requests' prompts and ``negative_prompt`` (None: the variant's), ``vae`` / ``clip_vision`` the
    core ones, ``sigmas`` / ``sampler`` / ``cfg`` the sampling (e.g. the release's UniPC at CFG 5, or
    the DMD sigmas with euler at CFG 1)."""

    def __init__(self, model, clip, vae, clip_vision, *, sigmas: torch.Tensor, sampler, cfg: float,
                 negative_prompt: str | None = None) -> None:
        self.model, self.clip, self.vae, self.clip_vision = model, clip, vae, clip_vision
        self.forward = worldstereo_forward(model)
        self.config = self.forward.config
        self.sigmas, self.sampler, self.cfg = sigmas, sampler, float(cfg)
        self.negative_prompt = self.config.negative_prompt if negative_prompt is None else negative_prompt

    @property
    def memory(self) -> bool:
        return self.config.is_memory

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def resume_key(self) -> dict:
        """What shapes the clips besides the scene: the variant (its files by name, size and mtime,
        attention scope), the models' weights and patches (LoRAs) by :func:`.identity.patcher_identity`,
        the weight dtype, the schedule, sampler, CFG and negative prompt."""
        sampler = self.sampler
        patchers = {"model": self.model, "clip": self.clip.patcher, "vae": self.vae.patcher,
                    "clip_vision": self.clip_vision.patcher}
        return {
            "generator": "native",
            "variant": self.config.model_type,
            "variant_files": file_stamps(Path(self.forward.source).parent),
            "attention_scope": self.forward.attention_scope,
            "models": {name: patcher_identity(patcher) for name, patcher in patchers.items()},
            "dtype": str(self.model.model_dtype()),
            "sigmas": [round(float(s), 6) for s in self.sigmas],
            "sampler": getattr(sampler.sampler_function, "__name__", type(sampler).__name__),
            "sampler_options": {k: repr(v) for k, v in sorted(getattr(sampler, "extra_options", {}).items())},
            "cfg": self.cfg,
            "negative_prompt": self.negative_prompt,
        }

    def _text(self, prompt: str) -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))

    def __call__(self, request: GenerationRequest, progress: ProgressFn | None = None) -> np.ndarray:
        """The clip's frames, float32 [F, H, W, 3] in [0, 1]."""
        positive, negative, latent = worldstereo_conditioning(
            self._text(request.prompt), self._text(self.negative_prompt), self.vae, self.clip_vision, request.image,
            model_inputs(request, memory=self.memory), latent_cond_mode=self.config.latent_cond_mode)
        empty = latent["samples"]
        noise = initial_noise(tuple(empty.shape), make_generator(request.seed), "cpu", skip=request.noise_index)

        def callback(step, x0, x, total):
            report(progress, step + 1, total)

        samples = comfy.sample.sample_custom(self.model, noise, self.cfg, self.sampler, self.sigmas, positive,
                                             negative, empty, callback=callback, disable_pbar=True, seed=request.seed)
        keyframes = KeyframeVae(self.vae)
        video = decode_keyframes(keyframes, normalize_latents(samples, keyframes))
        return frames_from_video(video, "np")[0]
