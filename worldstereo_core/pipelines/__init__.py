"""worldstereo_core.pipelines: schedulers, conditioning, keyframe VAE and the three samplers.

* :class:`CameraPipeline` (worldstereo-camera), :class:`MemoryPipeline` (worldstereo-memory),
  :class:`MemoryDMDPipeline` (worldstereo-memory-dmd); :func:`build_pipeline` picks one from a
  WorldStereo config.
* The parts besides the transformer (:class:`BaseComponents`) load with :mod:`..loading`.
"""
from __future__ import annotations

from typing import Any

import torch

from ..constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS
from ..errors import InputError
from ..loading.components import BaseComponents, check_widths
from .base import GenerationOutput, KeyframePipeline, ModelCall, ModelCallHook
from .camera import CameraPipeline
from .dmd import MemoryDMDPipeline
from .memory import MemoryPipeline
from .schedulers import DMDScheduler, UniPCFlowScheduler, make_generator

PIPELINE_CLASSES: dict[str, type[KeyframePipeline]] = {
    "worldstereo-camera": CameraPipeline,
    "worldstereo-memory": MemoryPipeline,
    "worldstereo-memory-dmd": MemoryDMDPipeline,
}


def build_pipeline(config: Any, transformer: torch.nn.Module, base: BaseComponents, **options: Any
                   ) -> KeyframePipeline:
    """The pipeline for ``config.model_type`` (a WorldStereoConfig or an object with the same fields).

    Takes ``negative_prompt``, ``latent_cond_mode`` and the DMD fields from ``config``; ``options``
    go to the pipeline (device, keep_on_device, clip_no_rescale, flow_shift, sigma_grid, ...). Text
    and image encoders whose widths do not fit the transformer are refused (:func:`check_widths`).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in PIPELINE_CLASSES:
        raise InputError(f"unknown WorldStereo model type {model_type!r}; expected one of {list(PIPELINE_CLASSES)}")
    check_widths(transformer, base)
    common = dict(text_encoder=base.text_encoder, tokenizer=base.tokenizer, image_encoder=base.image_encoder,
                  image_processor=base.image_processor, negative_prompt=getattr(config, "negative_prompt", ""),
                  latent_cond_mode=getattr(config, "latent_cond_mode", "full_vae"))
    common.update(options)
    if model_type == "worldstereo-memory-dmd":
        return MemoryDMDPipeline(transformer, base.vae, scheduler=DMDScheduler.from_worldstereo_config(config),
                                 **common)
    return PIPELINE_CLASSES[model_type](transformer, base.vae, scheduler_config=base.scheduler_config, **common)


__all__ = [
    "BaseComponents", "CameraPipeline", "DEFAULT_GUIDANCE_SCALE", "DEFAULT_NUM_STEPS", "DMDScheduler",
    "GenerationOutput", "KeyframePipeline", "MemoryDMDPipeline", "MemoryPipeline", "ModelCall",
    "ModelCallHook", "PIPELINE_CLASSES", "UniPCFlowScheduler", "build_pipeline", "make_generator",
]
