"""ComfyUI's core ``VAE`` (the Wan2.1 VAE from Load VAE) as the keyframe VAE of
``worldstereo_core.pipelines.vae``, so keyframe encoding, the I2V image condition and keyframe
decoding are computed by the same functions as in the diffusers pipelines.

The core VAE places, casts and (when memory is short) tiles itself; it takes and gives pixels in
[0, 1] as [T, H, W, C] and raw latents (its Wan encoder returns the posterior mean, the mode the
release uses). Latent statistics are the Wan2.1 ones, as ComfyUI's ``Wan21`` latent format.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ...worldstereo_core.errors import InputError
from ...worldstereo_core.pipelines.vae import SPATIAL_FACTOR

#: The Wan2.1 VAE's latent channels.
LATENT_CHANNELS = 16


class _Posterior:
    def __init__(self, mode: torch.Tensor) -> None:
        self._mode = mode

    def mode(self) -> torch.Tensor:
        return self._mode


class _Encoded:
    def __init__(self, latent: torch.Tensor) -> None:
        self.latent_dist = _Posterior(latent)


class KeyframeVae:
    """A core ``VAE`` with the interface ``worldstereo_core.pipelines.vae`` uses (diffusers'
    ``AutoencoderKLWan``: videos [B, 3, T, H, W] in [-1, 1], ``encode(x).latent_dist.mode()``,
    ``decode(z, return_dict=False)[0]``)."""

    config = None  # latent statistics: the Wan2.1 defaults of worldstereo_core.pipelines.vae

    def __init__(self, vae) -> None:
        if getattr(vae, "latent_channels", None) != LATENT_CHANNELS or getattr(vae, "latent_dim", None) != 3 \
                or vae.spacial_compression_encode() != SPATIAL_FACTOR:
            raise InputError("the VAE is not the Wan2.1 VAE (16 latent channels, 8x spatial, causal video); load "
                             "wan_2.1_vae.safetensors with Load VAE")
        self.vae = vae

    def parameters(self) -> Iterator[torch.Tensor]:
        """Inputs stay on the CPU in float32: the core VAE moves them to its device and dtype."""
        yield torch.empty(0)

    def encode(self, video: torch.Tensor) -> _Encoded:
        pixels = ((video.float() + 1.0) / 2.0).permute(0, 2, 3, 4, 1)  # [B, T, H, W, C] in [0, 1]
        return _Encoded(torch.cat([self.vae.encode(clip) for clip in pixels]))

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        pixels = self.vae.decode(latents)  # [B, T, H, W, C] in [0, 1]
        return (pixels.permute(0, 4, 1, 2, 3) * 2.0 - 1.0,)
