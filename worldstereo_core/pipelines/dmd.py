"""worldstereo-memory-dmd sampling (the reference's RefKFDMDGeneratorPipeline).

Memory conditions as in :mod:`.memory`, but a distilled 4-step generator: the DMD schedule
(float32 timesteps, plain Euler to sigma = 0), one transformer call per step and no CFG.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import KeyframePipeline
from .schedulers import DMDScheduler


class MemoryDMDPipeline(KeyframePipeline):
    """Few-step memory-conditioned generation. ``scheduler`` defaults to the spec's code defaults
    (250, 1000, shift 5, 4 steps); build it with :meth:`DMDScheduler.from_worldstereo_config`."""

    uses_references = True
    supports_cfg = False

    def __init__(self, transformer: torch.nn.Module, vae, *, scheduler: DMDScheduler | None = None,
                 **kwargs: Any) -> None:
        super().__init__(transformer, vae, **kwargs)
        self.scheduler = scheduler or DMDScheduler()

    def make_scheduler(self, num_inference_steps: int | None) -> DMDScheduler:
        steps = len(self.scheduler.timesteps)
        if num_inference_steps is not None and num_inference_steps != steps:
            raise InputError(f"the DMD generator runs exactly its dmd_steps={steps} steps; "
                             f"num_inference_steps={num_inference_steps} is not supported")
        return self.scheduler
