"""Forward-input checks for the WorldStereo transformers: each wrong tensor fails with its name.

Conditioning tensors with batch size 1 are broadcast to the batch of ``hidden_states`` (exact),
so a classifier-free-guidance batch can share one set of render/reference conditions. Floating
inputs are cast to the model's compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import TEXT_SEQ_LEN
from ..errors import InputError
from .controlnet import MASK_PIXEL_STRIDE, MASK_TEMPORAL_PAD


def _batch(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise InputError(f"{name} has batch size {t.shape[0]} but hidden_states has {batch}; pass 1 or {batch}")


def _shape(t, name: str, expected: tuple, hint: str = "") -> torch.Tensor:
    """``expected`` entries: an int (exact) or None (any)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise InputError(f"{name} has shape {list(t.shape)}, expected {want}" + (f" ({hint})" if hint else ""))
    return t


@dataclass
class VideoInputs:
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_image: torch.Tensor | None
    render_latent: torch.Tensor
    render_mask: torch.Tensor
    camera_embedding: torch.Tensor | None


@dataclass
class MemoryInputs:
    reference_latent: torch.Tensor
    ref_index: torch.Tensor
    camera_qt: torch.Tensor | None
    camera_qt_ref: torch.Tensor | None


def check_video_inputs(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                       render_latent, render_mask, camera_embedding, extrinsics, intrinsics) -> VideoInputs:
    """Validate the camera-model inputs of ``model`` (a WorldStereoTransformer)."""
    cfg, dtype = model.config, model.patch_embedding.weight.dtype
    _shape(hidden_states, "hidden_states", (None, cfg.in_channels, None, None, None),
           "noisy latent 16 + I2V mask 4 + condition latent 16 channels")
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = cfg.patch_size
    if frames % p_t or height % p_h or width % p_w:
        raise InputError(f"hidden_states latent size {frames}x{height}x{width} must be divisible by the patch size "
                         f"{tuple(cfg.patch_size)} (pixel height and width divisible by 16)")
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor([timestep], device=hidden_states.device)
    if timestep.numel() not in (1, batch):
        raise InputError(f"timestep must have 1 or {batch} entries, got shape {list(timestep.shape)}")

    _shape(encoder_hidden_states, "encoder_hidden_states", (None, None, cfg.text_dim))
    if cfg.image_dim is not None:
        if encoder_hidden_states_image is None:
            raise InputError("encoder_hidden_states_image (CLIP penultimate hidden states) is required by this "
                             "image-to-video model")
        _shape(encoder_hidden_states_image, "encoder_hidden_states_image", (None, None, cfg.image_dim))
        if encoder_hidden_states.shape[1] != TEXT_SEQ_LEN:
            raise InputError(f"encoder_hidden_states must hold exactly {TEXT_SEQ_LEN} text tokens (zero-padded), "
                             f"got {encoder_hidden_states.shape[1]}")
        encoder_hidden_states_image = _batch(encoder_hidden_states_image, batch, "encoder_hidden_states_image")
        encoder_hidden_states_image = encoder_hidden_states_image.to(dtype)

    if render_latent is None or render_mask is None:
        raise InputError("render_latent and render_mask (the rendered point-cloud condition) are required")
    _shape(render_latent, "render_latent", (None, cfg.out_channels, frames, height, width),
           "keyframe VAE latent of the render video, same grid as hidden_states")
    pixel_h, pixel_w = height * MASK_PIXEL_STRIDE, width * MASK_PIXEL_STRIDE
    _shape(render_mask, "render_mask", (None, 1, None, pixel_h, pixel_w), "binary mask at pixel resolution")
    md, mask_frames = model.controlnet_cfg.mask_downsample, render_mask.shape[2]
    padded = mask_frames if md == 1 else mask_frames + MASK_TEMPORAL_PAD * (2 if model.controlnet_cfg.interp else 1)
    if padded < md or (padded - md) // md + 1 != frames:
        raise InputError(f"render_mask has {mask_frames} frames, which does not map to {frames} latent frames "
                         f"(mask_downsample {md})")
    n_cam = model.controlnet_cfg.add_channels - 1
    if n_cam == 0 and camera_embedding is not None:
        raise InputError("camera_embedding was given but this model's ControlNet takes the mask only "
                         "(controlnet_cfg.add_channels = 1)")
    if n_cam > 0:
        if camera_embedding is None:
            raise InputError(f"camera_embedding ({n_cam}-channel Plücker map) is required by this model")
        _shape(camera_embedding, "camera_embedding", (None, n_cam, mask_frames, pixel_h, pixel_w),
               "Plücker rays at pixel resolution, same frames as render_mask")
        camera_embedding = _batch(camera_embedding, batch, "camera_embedding").to(dtype)
    for name, value in (("extrinsics", extrinsics), ("intrinsics", intrinsics)):
        if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            raise InputError(f"{name} contains non-finite values (NaN/inf); check the camera file")
    return VideoInputs(
        hidden_states=hidden_states.to(dtype),
        timestep=timestep.reshape(-1).expand(batch),
        encoder_hidden_states=_batch(encoder_hidden_states, batch, "encoder_hidden_states").to(dtype),
        encoder_hidden_states_image=encoder_hidden_states_image,
        render_latent=_batch(render_latent, batch, "render_latent").to(dtype),
        render_mask=_batch(render_mask, batch, "render_mask").to(dtype),
        camera_embedding=camera_embedding,
    )


def check_memory_inputs(model, hidden_states: torch.Tensor, reference_latent, ref_index, camera_qt,
                        camera_qt_ref) -> MemoryInputs:
    """Validate the extra inputs of the memory models against the checked ``hidden_states``."""
    cfg, dtype = model.config, model.patch_embedding.weight.dtype
    batch, _, frames, height, width = hidden_states.shape
    if reference_latent is None or ref_index is None:
        raise InputError("reference_latent and ref_index are required by the memory models")
    _shape(reference_latent, "reference_latent", (None, cfg.in_channels, None, height, width),
           "keyframe latents laid out as ref 16 | ones 4 | ref 16, same grid as hidden_states")
    n_refs = reference_latent.shape[2]
    if n_refs == 0:
        raise InputError("reference_latent holds no reference frame; pass at least one (single-view runs use the "
                         "input image itself with ref_index [0])")
    ref_index = torch.as_tensor(ref_index)
    if ref_index.ndim != 1 or ref_index.numel() != n_refs or ref_index.is_floating_point():
        raise InputError(f"ref_index must be an integer tensor of shape [{n_refs}] (one entry per reference frame), "
                         f"got {ref_index.dtype} {list(ref_index.shape)}")
    if (int(ref_index.min()) < 0 or int(ref_index.max()) > frames - 2):
        raise InputError(f"ref_index values must lie in [0, {frames - 2}] (reference k is attached to target frame "
                         f"k+1), got {ref_index.tolist()}")
    if model.camera_embedding is not None:
        n_cam = model.controlnet_cfg.camera_embedding_dim
        if camera_qt is None or camera_qt_ref is None:
            raise InputError("camera_qt and camera_qt_ref (quaternion + translation per frame) are required")
        camera_qt = _batch(_shape(camera_qt, "camera_qt", (None, frames, n_cam)), batch, "camera_qt").to(dtype)
        camera_qt_ref = _batch(_shape(camera_qt_ref, "camera_qt_ref", (None, n_refs, n_cam)), batch,
                               "camera_qt_ref").to(dtype)
    return MemoryInputs(_batch(reference_latent, batch, "reference_latent").to(dtype), ref_index.long(),
                        camera_qt, camera_qt_ref)
