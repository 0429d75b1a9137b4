"""Forward-input checks for the WorldStereo models: each wrong tensor fails with its name.

The checks know a backbone only through a :class:`BackboneSpec`, so every host uses them.
Conditioning tensors with batch size 1 are broadcast to the batch of ``hidden_states`` (exact),
so a classifier-free-guidance batch can share one set of render/reference conditions. Floating
inputs are cast to the model's compute dtype; ``ref_index`` stays on the CPU (no device syncs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import TEXT_SEQ_LEN
from ..errors import InputError
from .config import ControlNetConfig
from .controlnet import MASK_PIXEL_STRIDE, MASK_TEMPORAL_PAD


@dataclass(frozen=True)
class BackboneSpec:
    """The backbone facts the input checks need.

    ``text_tokens``: the exact text length the model takes (512 for the reference layout, where
    text and image tokens travel in one sequence), or None for any length."""

    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    text_dim: int
    image_dim: int | None
    text_tokens: int | None = TEXT_SEQ_LEN


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
    render_mask: torch.Tensor | None
    camera_embedding: torch.Tensor | None
    #: The ControlNet's condition tokens (``GGMControlNet.embed_condition``), when precomputed.
    controlnet_condition: torch.Tensor | None = None


@dataclass
class MemoryInputs:
    reference_latent: torch.Tensor
    ref_index: torch.Tensor
    camera_qt: torch.Tensor | None
    camera_qt_ref: torch.Tensor | None


def check_video_inputs(spec: BackboneSpec, cn: ControlNetConfig, dtype: torch.dtype, hidden_states, timestep,
                       encoder_hidden_states, encoder_hidden_states_image, render_latent, render_mask,
                       camera_embedding, extrinsics=None, intrinsics=None, controlnet_condition=None) -> VideoInputs:
    """Validate the camera-model inputs; ``dtype`` is the compute dtype.

    ``controlnet_condition`` (precomputed condition tokens) may replace ``render_mask`` and
    ``camera_embedding``."""
    _shape(hidden_states, "hidden_states", (None, spec.in_channels, None, None, None),
           "noisy latent 16 + I2V mask 4 + condition latent 16 channels")
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = spec.patch_size
    if frames % p_t or height % p_h or width % p_w:
        raise InputError(f"hidden_states latent size {frames}x{height}x{width} must be divisible by the patch size "
                         f"{tuple(spec.patch_size)} (pixel height and width divisible by 16)")
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor([timestep], device=hidden_states.device)
    if timestep.numel() not in (1, batch):
        raise InputError(f"timestep must have 1 or {batch} entries, got shape {list(timestep.shape)}")

    _shape(encoder_hidden_states, "encoder_hidden_states", (None, None, spec.text_dim))
    if spec.image_dim is not None:
        if encoder_hidden_states_image is None:
            raise InputError("encoder_hidden_states_image (CLIP penultimate hidden states) is required by this "
                             "image-to-video model")
        _shape(encoder_hidden_states_image, "encoder_hidden_states_image", (None, None, spec.image_dim))
        if spec.text_tokens is not None and encoder_hidden_states.shape[1] != spec.text_tokens:
            raise InputError(f"encoder_hidden_states must hold exactly {spec.text_tokens} text tokens (zero-padded), "
                             f"got {encoder_hidden_states.shape[1]}")
        encoder_hidden_states_image = _batch(encoder_hidden_states_image, batch, "encoder_hidden_states_image")
        encoder_hidden_states_image = encoder_hidden_states_image.to(dtype)

    if render_latent is None:
        raise InputError("render_latent (the keyframe latent of the point-cloud render) is required")
    _shape(render_latent, "render_latent", (None, spec.out_channels, frames, height, width),
           "keyframe VAE latent of the render video, same grid as hidden_states")
    if controlnet_condition is not None:
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        _shape(controlnet_condition, "controlnet_condition", (None, tokens, cn.conv_out_dim),
               "the ControlNet's condition tokens of this clip (controlnet_condition())")
        if batch % controlnet_condition.shape[0]:
            raise InputError(f"controlnet_condition has batch size {controlnet_condition.shape[0]}, which does not "
                             f"divide the batch of hidden_states ({batch})")
    else:
        check_condition(spec, cn, frames, height, width, render_mask, camera_embedding)
        render_mask = _batch(render_mask, batch, "render_mask").to(dtype)
        if camera_embedding is not None:
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
        render_mask=render_mask,
        camera_embedding=camera_embedding,
        controlnet_condition=controlnet_condition,
    )


def check_condition(spec: BackboneSpec, cn: ControlNetConfig, frames: int, height: int, width: int,
                    render_mask, camera_embedding) -> None:
    """Validate the ControlNet's pixel-resolution condition for a ``frames`` x ``height`` x ``width`` latent."""
    if render_mask is None:
        raise InputError("render_mask (the rendered point cloud's visibility mask) is required")
    pixel_h, pixel_w = height * MASK_PIXEL_STRIDE, width * MASK_PIXEL_STRIDE
    _shape(render_mask, "render_mask", (None, 1, None, pixel_h, pixel_w), "binary mask at pixel resolution")
    md, mask_frames = cn.mask_downsample, render_mask.shape[2]
    padded = mask_frames if md == 1 else mask_frames + MASK_TEMPORAL_PAD * (2 if cn.interp else 1)
    if padded < md or (padded - md) // md + 1 != frames:
        raise InputError(f"render_mask has {mask_frames} frames, which does not map to {frames} latent frames "
                         f"(mask_downsample {md})")
    n_cam = cn.add_channels - 1
    if n_cam == 0 and camera_embedding is not None:
        raise InputError("camera_embedding was given but this model's ControlNet takes the mask only "
                         "(controlnet_cfg.add_channels = 1)")
    if n_cam > 0:
        if camera_embedding is None:
            raise InputError(f"camera_embedding ({n_cam}-channel Plücker map) is required by this model")
        _shape(camera_embedding, "camera_embedding", (None, n_cam, mask_frames, pixel_h, pixel_w),
               "Plücker rays at pixel resolution, same frames as render_mask")


def check_memory_inputs(spec: BackboneSpec, cn: ControlNetConfig, dtype: torch.dtype, hidden_states: torch.Tensor,
                        reference_latent, ref_index, camera_qt, camera_qt_ref) -> MemoryInputs:
    """Validate the extra inputs of the memory models against the checked ``hidden_states``."""
    batch, _, frames, height, width = hidden_states.shape
    if reference_latent is None or ref_index is None:
        raise InputError("reference_latent and ref_index are required by the memory models")
    _shape(reference_latent, "reference_latent", (None, spec.in_channels, None, height, width),
           "keyframe latents laid out as ref 16 | ones 4 | ref 16, same grid as hidden_states")
    n_refs = reference_latent.shape[2]
    if n_refs == 0:
        raise InputError("reference_latent holds no reference frame; pass at least one (single-view runs use the "
                         "input image itself with ref_index [0])")
    ref_index = torch.as_tensor(ref_index)
    if ref_index.ndim != 1 or ref_index.numel() != n_refs or ref_index.is_floating_point():
        raise InputError(f"ref_index must be an integer tensor of shape [{n_refs}] (one entry per reference frame), "
                         f"got {ref_index.dtype} {list(ref_index.shape)}")
    if ref_index.device.type != "cpu":
        raise InputError("ref_index must be a CPU tensor (it sets token positions; a device tensor would "
                         "stall every step waiting for the device)")
    if (int(ref_index.min()) < 0 or int(ref_index.max()) > frames - 2):
        raise InputError(f"ref_index values must lie in [0, {frames - 2}] (reference k is attached to target frame "
                         f"k+1), got {ref_index.tolist()}")
    if cn.main_camera_embedding:
        n_cam = cn.camera_embedding_dim
        if camera_qt is None or camera_qt_ref is None:
            raise InputError("camera_qt and camera_qt_ref (quaternion + translation per frame) are required")
        camera_qt = _batch(_shape(camera_qt, "camera_qt", (None, frames, n_cam)), batch, "camera_qt").to(dtype)
        camera_qt_ref = _batch(_shape(camera_qt_ref, "camera_qt_ref", (None, n_refs, n_cam)), batch,
                               "camera_qt_ref").to(dtype)
    return MemoryInputs(_batch(reference_latent, batch, "reference_latent").to(dtype), ref_index.long(),
                        camera_qt, camera_qt_ref)
