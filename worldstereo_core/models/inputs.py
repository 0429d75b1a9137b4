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


def describe(x) -> str:
    """A value's shape for an error message: ``[1, 3, 5]`` for a tensor, else its type name."""
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def batched(t: torch.Tensor, batch: int, name: str, of: str = "hidden_states") -> torch.Tensor:
    """``t`` with batch size ``batch`` (a batch of 1 is broadcast), or an InputError naming ``name``."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise InputError(f"{name} has batch size {t.shape[0]} but {of} has {batch}; pass 1 or {batch}")


def _check_shape(t, name: str, expected: tuple, hint: str = "") -> torch.Tensor:
    """``t`` if its shape matches ``expected`` (entries: an int, exact, or None, any), else an InputError."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {describe(t)}")
    if t.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise InputError(f"{name} has shape {describe(t)}, expected {want}" + (f" ({hint})" if hint else ""))
    return t


def check_ref_index(ref_index: torch.Tensor, n_refs: int, frames: int) -> torch.Tensor:
    """``ref_index`` as a long tensor if it is [n_refs] integers in [0, frames - 2], else an InputError."""
    if not isinstance(ref_index, torch.Tensor) or ref_index.ndim != 1 or ref_index.numel() != n_refs \
            or ref_index.is_floating_point():
        raise InputError(f"ref_index must be an integer tensor of shape [{n_refs}] (one entry per reference frame), "
                         f"got {getattr(ref_index, 'dtype', type(ref_index).__name__)} {describe(ref_index)}")
    if n_refs and (int(ref_index.min()) < 0 or int(ref_index.max()) > frames - 2):
        raise InputError(f"ref_index values must lie in [0, {frames - 2}] (reference k is attached to target frame "
                         f"k+1), got {ref_index.tolist()}")
    return ref_index.long()


def check_finite(**named) -> None:
    """An InputError naming the first of ``named`` (tensors or None) that holds NaN/inf."""
    for name, value in named.items():
        if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            raise InputError(f"{name} contains non-finite values (NaN/inf); check the camera file")


@dataclass(frozen=True)
class VideoInputs:
    """The inputs of one WorldStereo forward (:func:`.host.run_worldstereo`)."""

    hidden_states: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_image: torch.Tensor | None
    render_latent: torch.Tensor | None
    render_mask: torch.Tensor | None = None
    camera_embedding: torch.Tensor | None = None
    #: The ControlNet's condition tokens (``GGMControlNet.embed_condition``), when precomputed.
    controlnet_condition: torch.Tensor | None = None


@dataclass(frozen=True)
class MemoryInputs:
    """The memory models' extra inputs: reference latents, ``ref_index`` (on the CPU) and poses."""

    reference_latent: torch.Tensor | None
    ref_index: torch.Tensor | None
    camera_qt: torch.Tensor | None = None
    camera_qt_ref: torch.Tensor | None = None


def check_video_inputs(spec: BackboneSpec, cn: ControlNetConfig, dtype: torch.dtype, inp: VideoInputs) -> VideoInputs:
    """``inp`` validated, batched and cast to the compute ``dtype``.

    ``inp.controlnet_condition`` (precomputed condition tokens) may replace ``render_mask`` and
    ``camera_embedding``."""
    hidden_states, timestep = inp.hidden_states, inp.timestep
    encoder_hidden_states, encoder_hidden_states_image = inp.encoder_hidden_states, inp.encoder_hidden_states_image
    render_latent, render_mask, camera_embedding = inp.render_latent, inp.render_mask, inp.camera_embedding
    controlnet_condition = inp.controlnet_condition
    _check_shape(hidden_states, "hidden_states", (None, spec.in_channels, None, None, None),
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

    _check_shape(encoder_hidden_states, "encoder_hidden_states", (None, None, spec.text_dim))
    if spec.image_dim is not None:
        if encoder_hidden_states_image is None:
            raise InputError("encoder_hidden_states_image (CLIP penultimate hidden states) is required by this "
                             "image-to-video model")
        _check_shape(encoder_hidden_states_image, "encoder_hidden_states_image", (None, None, spec.image_dim))
        if spec.text_tokens is not None and encoder_hidden_states.shape[1] != spec.text_tokens:
            raise InputError(f"encoder_hidden_states must hold exactly {spec.text_tokens} text tokens (zero-padded), "
                             f"got {encoder_hidden_states.shape[1]}")
        encoder_hidden_states_image = batched(encoder_hidden_states_image, batch, "encoder_hidden_states_image")
        encoder_hidden_states_image = encoder_hidden_states_image.to(dtype)

    if render_latent is None:
        raise InputError("render_latent (the keyframe latent of the point-cloud render) is required")
    _check_shape(render_latent, "render_latent", (None, spec.out_channels, frames, height, width),
           "keyframe VAE latent of the render video, same grid as hidden_states")
    if controlnet_condition is not None:
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        _check_shape(controlnet_condition, "controlnet_condition", (None, tokens, cn.conv_out_dim),
               "the ControlNet's condition tokens of this clip (controlnet_condition())")
        if batch % controlnet_condition.shape[0]:
            raise InputError(f"controlnet_condition has batch size {controlnet_condition.shape[0]}, which does not "
                             f"divide the batch of hidden_states ({batch})")
    else:
        check_condition(spec, cn, frames, height, width, render_mask, camera_embedding)
        render_mask = batched(render_mask, batch, "render_mask").to(dtype)
        if camera_embedding is not None:
            camera_embedding = batched(camera_embedding, batch, "camera_embedding").to(dtype)
    return VideoInputs(
        hidden_states=hidden_states.to(dtype),
        timestep=timestep.reshape(-1).expand(batch),
        encoder_hidden_states=batched(encoder_hidden_states, batch, "encoder_hidden_states").to(dtype),
        encoder_hidden_states_image=encoder_hidden_states_image,
        render_latent=batched(render_latent, batch, "render_latent").to(dtype),
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
    _check_shape(render_mask, "render_mask", (None, 1, None, pixel_h, pixel_w), "binary mask at pixel resolution")
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
        _check_shape(camera_embedding, "camera_embedding", (None, n_cam, mask_frames, pixel_h, pixel_w),
               "Plücker rays at pixel resolution, same frames as render_mask")


def check_memory_inputs(spec: BackboneSpec, cn: ControlNetConfig, dtype: torch.dtype, hidden_states: torch.Tensor,
                        mem: MemoryInputs) -> MemoryInputs:
    """``mem`` validated against the checked ``hidden_states``, batched and cast to ``dtype``."""
    batch, _, frames, height, width = hidden_states.shape
    reference_latent, camera_qt, camera_qt_ref = mem.reference_latent, mem.camera_qt, mem.camera_qt_ref
    if reference_latent is None or mem.ref_index is None:
        raise InputError("reference_latent and ref_index are required by the memory models")
    _check_shape(reference_latent, "reference_latent", (None, spec.in_channels, None, height, width),
           "keyframe latents laid out as ref 16 | ones 4 | ref 16, same grid as hidden_states")
    n_refs = reference_latent.shape[2]
    if n_refs == 0:
        raise InputError("reference_latent holds no reference frame; pass at least one (single-view runs use the "
                         "input image itself with ref_index [0])")
    ref_index = torch.as_tensor(mem.ref_index)
    if ref_index.device.type != "cpu":
        raise InputError("ref_index must be a CPU tensor (it sets token positions; a device tensor would "
                         "stall every step waiting for the device)")
    ref_index = check_ref_index(ref_index, n_refs, frames)
    if cn.main_camera_embedding:
        n_cam = cn.camera_embedding_dim
        if camera_qt is None or camera_qt_ref is None:
            raise InputError("camera_qt and camera_qt_ref (quaternion + translation per frame) are required")
        camera_qt = batched(_check_shape(camera_qt, "camera_qt", (None, frames, n_cam)), batch, "camera_qt").to(dtype)
        camera_qt_ref = batched(_check_shape(camera_qt_ref, "camera_qt_ref", (None, n_refs, n_cam)), batch,
                                "camera_qt_ref").to(dtype)
    return MemoryInputs(batched(reference_latent, batch, "reference_latent").to(dtype), ref_index,
                        camera_qt, camera_qt_ref)
