"""One clip's WorldStereo conditioning for the core samplers, computed the release's way with
ComfyUI's loaded VAE and CLIP vision.

:func:`worldstereo_conditioning` is the one place this happens: the conditioning node calls it,
and so can a generator that samples clips with the core samplers (the loop). Where a core node
would compute something else, it follows the release (``worldstereo_core.pipelines``):

* CLIP sees the start image as the reference's processor made it, uint8 pixels normalised
  without rescaling to [0, 1] (``clip_pixel_values``); core CLIP Vision Encode rescales;
* render and reference frames are encoded keyframe by keyframe (each frame a one-frame video),
  the I2V image condition as one causal video of the image and black frames
  (``image_condition_latent``); core Wan nodes encode the whole clip causally;
* the condition reaches the model as core Wan I2V conditioning does (``concat_latent_image``
  + ``concat_mask`` + ``clip_vision_output``), the WorldStereo inputs as ``model_conds``
  (:mod:`.conds`), one object shared by positive and negative, as the release conditions CFG on
  the text only.
"""
from __future__ import annotations

from typing import Any

import torch

import comfy.clip_vision
import comfy.model_management
import node_helpers

from ...worldstereo_core.errors import InputError
from ...worldstereo_core.models.inputs import MemoryInputs
from ...worldstereo_core.pipelines.base import ClipInputs
from ...worldstereo_core.pipelines.conditioning import clip_pixel_values, preprocess_image
from ...worldstereo_core.loading.single_file import clip_image_processor
from ...worldstereo_core.pipelines.vae import (LATENT_COND_MODES, SPATIAL_FACTOR, TEMPORAL_FACTOR,
                                               denormalize_latents, encode_keyframes, i2v_mask,
                                               image_condition_latent, reference_latent_layout)
from ...worldstereo_core.progress import ProgressFn, report
from .conds import with_model_conds, worldstereo_model_conds
from .vae import LATENT_CHANNELS, KeyframeVae


def clip_vision_output(clip_vision, image: Any) -> comfy.clip_vision.Output:
    """The core CLIP vision model's output for ``image`` on the release's (unrescaled) pixels."""
    processor = clip_image_processor(clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std)
    pixels = clip_pixel_values(processor, image, clip_no_rescale=True)
    comfy.model_management.load_models_gpu([clip_vision.patcher])
    last, penultimate, embeds, _ = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device),
                                                     intermediate_output=-2)
    device = comfy.model_management.intermediate_device()
    out = comfy.clip_vision.Output()
    out["last_hidden_state"], out["penultimate_hidden_states"] = last.to(device), penultimate.to(device)
    out["image_embeds"] = embeds.to(device)
    return out


def _keyframe_latents(keyframes: KeyframeVae, video: torch.Tensor, name: str, tick) -> torch.Tensor:
    """``encode_keyframes`` one keyframe at a time, with a progress tick after each."""
    latents = []
    for i in range(video.shape[2]):
        latents.append(encode_keyframes(keyframes, video[:, :, i:i + 1], name=name))
        tick()
    return torch.cat(latents, dim=2)


def conditioning_steps(inputs: ClipInputs) -> int:
    """Progress ticks of :func:`worldstereo_conditioning`: CLIP, the image condition, every keyframe."""
    references = 0 if inputs.reference_video is None else inputs.reference_video.shape[2]
    return 2 + inputs.render_video.shape[2] + references


def worldstereo_conditioning(positive: list, negative: list, vae, clip_vision, image: Any, inputs: ClipInputs, *,
                             latent_cond_mode: str = "full_vae", progress: ProgressFn | None = None
                             ) -> tuple[list, list, dict]:
    """(positive, negative, keyframe LATENT) of one clip.

    ``image``: the start image (uint8 [H, W, 3], PIL, or as ``to_pil_rgb`` takes it); ``inputs``:
    the clip's tensors as ``worldstereo_core.tasks.generate.model_inputs`` gives them (batch 1;
    the references only for memory variants). The LATENT is empty (zeros: the samplers start from
    noise) with F keyframes. ``progress(done, total)`` after each of the :func:`conditioning_steps`
    encodings (it may raise to stop)."""
    if latent_cond_mode not in LATENT_COND_MODES:
        raise InputError(f"latent_cond_mode must be one of {LATENT_COND_MODES}, got {latent_cond_mode!r}")
    total, done = conditioning_steps(inputs), [0]

    def tick() -> None:
        done[0] += 1
        report(progress, done[0], total)

    render = inputs.render_video
    batch, _, frames, height, width = render.shape
    keyframes = KeyframeVae(vae)
    clip = clip_vision_output(clip_vision, image)
    tick()
    start = preprocess_image(image, height, width)
    condition = image_condition_latent(keyframes, start, TEMPORAL_FACTOR * (frames - 1) + 1, latent_cond_mode)
    tick()
    render_latent = _keyframe_latents(keyframes, render, "render", tick)
    memory = None
    if inputs.reference_video is not None:
        memory = MemoryInputs(reference_latent_layout(_keyframe_latents(keyframes, inputs.reference_video,
                                                                        "references", tick)),
                              inputs.ref_index, inputs.camera_qt, inputs.camera_qt_ref)
    model_conds = worldstereo_model_conds(render_latent, inputs.render_mask, inputs.camera_embedding, memory)
    h, w = height // SPATIAL_FACTOR, width // SPATIAL_FACTOR
    values = {"concat_latent_image": denormalize_latents(condition, keyframes),
              "concat_mask": 1.0 - i2v_mask(1, frames, h, w), "clip_vision_output": clip}
    positive, negative = (with_model_conds(node_helpers.conditioning_set_values(c, values), model_conds)
                          for c in (positive, negative))
    latent = torch.zeros(batch, LATENT_CHANNELS, frames, h, w, device=comfy.model_management.intermediate_device())
    return positive, negative, {"samples": latent}
