"""worldstereo-camera sampling (the reference's KFPCDControllerPipeline).

Image + rendered point-cloud video, its mask and Plücker rays -> keyframes. UniPC flow matching
with the base model's shift (40 steps by default) and classifier-free guidance on the text only
(5.0 by default): the unconditional pass differs from the conditional one only in the prompt.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import KeyframePipeline
from .schedulers import SigmaGrid, UniPCFlowScheduler
from ..constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS
from ..errors import MissingWeightsError


class CameraPipeline(KeyframePipeline):
    """Camera-controlled keyframe generation with UniPC + text CFG.

    ``scheduler_config``: the base model's ``scheduler/scheduler_config.json`` as a dict.
    ``flow_shift`` overrides its shift; ``sigma_grid="reference"`` (default) uses the diffusers-0.36.0
    sigma grid the released weights were sampled with, ``"installed"`` the installed diffusers' grid.
    Other keyword arguments: see :class:`KeyframePipeline`.
    """

    def __init__(self, transformer: torch.nn.Module, vae, *, scheduler_config: Mapping[str, Any] | None,
                 flow_shift: float | None = None, sigma_grid: SigmaGrid = "reference", **kwargs: Any) -> None:
        super().__init__(transformer, vae, **kwargs)
        if scheduler_config is None:
            raise MissingWeightsError("the UniPC scheduler config is missing; load scheduler/scheduler_config.json "
                                      "from the Wan2.1-I2V base model folder")
        self.scheduler_config = dict(scheduler_config)
        self.flow_shift = flow_shift
        self.sigma_grid = sigma_grid

    def make_scheduler(self, num_inference_steps: int | None) -> UniPCFlowScheduler:
        return UniPCFlowScheduler(self.scheduler_config, num_inference_steps or DEFAULT_NUM_STEPS,
                                flow_shift=self.flow_shift, sigma_grid=self.sigma_grid, device=self.device)

    def default_guidance_scale(self) -> float:
        return DEFAULT_GUIDANCE_SCALE
