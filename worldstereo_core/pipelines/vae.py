"""The Wan VAE as WorldStereo uses it: keyframe latents, the I2V condition, latent layouts.

As the reference's ``src/vae_utils.py``: target, render and reference latents live in a *keyframe* space: every
frame is encoded (and decoded) on its own as a one-frame causal video, so f frames give f latent
frames. Only the I2V image condition uses the ordinary causal layout (image + black frames).
Latents are normalised per channel as ``(z - mean) * (1 / std)`` and always taken at the
posterior mode.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..constants import WAN_LATENTS_MEAN, WAN_LATENTS_STD
from ..errors import InputError

LatentCondMode = Literal["full_vae", "first_frame_only"]
LATENT_COND_MODES: tuple[str, ...] = ("full_vae", "first_frame_only")

#: Pixel-to-latent factors of the Wan2.1 VAE.
SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
I2V_MASK_CHANNELS = 4


def latent_frames(num_frames: int) -> int:
    """Latent frames of a causal ``num_frames`` video (81 -> 21)."""
    return (num_frames - 1) // TEMPORAL_FACTOR + 1


def latent_stats(vae, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) as float32 [1,C,1,1,1], from the VAE config or the Wan defaults."""
    config = getattr(vae, "config", None)
    mean = getattr(config, "latents_mean", None) or WAN_LATENTS_MEAN
    std = getattr(config, "latents_std", None) or WAN_LATENTS_STD
    shape = (1, len(mean), 1, 1, 1)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    mean, std = latent_stats(vae, z.device)
    return (z.float() - mean) * (1.0 / std)


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    mean, std = latent_stats(vae, z.device)
    return z.float() * std + mean


def _vae_device_dtype(vae) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


def _check_video(video: torch.Tensor, name: str) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        raise InputError(f"{name} must be a tensor [B,3,frames,H,W] in [-1,1]; got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    if video.shape[-1] % SPATIAL_FACTOR or video.shape[-2] % SPATIAL_FACTOR:
        raise InputError(f"{name} height and width must be multiples of {SPATIAL_FACTOR}; got {tuple(video.shape[-2:])}")


def encode_video(vae, video: torch.Tensor, *, name: str = "video") -> torch.Tensor:
    """Normalised posterior mode of one causal encode of ``video`` [B,3,T,H,W] -> [B,16,(T-1)/4+1,h,w]."""
    _check_video(video, name)
    device, dtype = _vae_device_dtype(vae)
    z = vae.encode(video.to(device=device, dtype=dtype)).latent_dist.mode()
    return normalize_latents(z, vae)


def encode_keyframes(vae, video: torch.Tensor, *, name: str = "video") -> torch.Tensor:
    """Keyframe latents: each frame of [B,3,f,H,W] encoded alone -> normalised [B,16,f,h,w]."""
    _check_video(video, name)
    device, dtype = _vae_device_dtype(vae)
    frames = [vae.encode(video[:, :, i:i + 1].to(device=device, dtype=dtype)).latent_dist.mode()
              for i in range(video.shape[2])]
    return normalize_latents(torch.cat(frames, dim=2), vae)


def decode_keyframes(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised keyframe latents [B,16,f,h,w] frame by frame -> float32 [B,3,f,H,W] in [-1,1]."""
    device, dtype = _vae_device_dtype(vae)
    z = denormalize_latents(latents, vae).to(device=device, dtype=dtype)
    frames = [vae.decode(z[:, :, i:i + 1], return_dict=False)[0].float() for i in range(z.shape[2])]
    return torch.cat(frames, dim=2).clamp(-1.0, 1.0)


def image_condition_latent(vae, image: torch.Tensor, num_frames: int,
                           mode: LatentCondMode = "full_vae") -> torch.Tensor:
    """The I2V image-condition latent [B,16,F,h,w] of ``image`` [B,3,H,W] in [-1,1].

    ``full_vae``: [image, black x (num_frames-1)] encoded as one causal video.
    ``first_frame_only``: the image encoded alone, then one black frame encoded alone repeated F-1 times.
    """
    if mode not in LATENT_COND_MODES:
        raise InputError(f"latent_cond_mode must be one of {LATENT_COND_MODES}, got {mode!r}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise InputError(f"image tensor must be [B,3,H,W] in [-1,1]; got {tuple(image.shape)}")
    frames = latent_frames(num_frames)
    if mode == "full_vae":
        black = image.new_zeros(image.shape[0], 3, num_frames - 1, *image.shape[2:])
        return encode_video(vae, torch.cat([image[:, :, None], black], dim=2), name="image condition")
    first = encode_video(vae, image[:, :, None], name="image")
    if frames == 1:
        return first
    black = encode_video(vae, torch.zeros_like(image[:, :, None]), name="black frame")
    return torch.cat([first, black.expand(-1, -1, frames - 1, -1, -1)], dim=2)


def i2v_mask(batch: int, frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """The I2V mask [B,4,F,h,w]: ones at latent frame 0, zeros elsewhere."""
    mask = torch.zeros(batch, I2V_MASK_CHANNELS, frames, height, width, device=device)
    mask[:, :, 0] = 1.0
    return mask


def reference_latent_layout(ref: torch.Tensor) -> torch.Tensor:
    """The 36-channel reference latent ``concat(r, ones4, r)`` of keyframe latents r [B,16,F_ref,h,w]."""
    ones = ref.new_ones(ref.shape[0], I2V_MASK_CHANNELS, *ref.shape[2:])
    return torch.cat([ref, ones, ref], dim=1)


def frames_from_video(video: torch.Tensor, output_type: str):
    """[B,3,F,H,W] in [-1,1] -> ``"pt"``: float [B,F,3,H,W] in [0,1]; ``"np"``: float32 array [B,F,H,W,3]."""
    frames = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()
    if output_type == "pt":
        return frames
    if output_type == "np":
        return frames.permute(0, 1, 3, 4, 2).cpu().numpy()
    raise InputError(f"output_type must be 'latent', 'pt' or 'np', got {output_type!r}")
