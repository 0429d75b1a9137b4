"""Conversions between ComfyUI's IMAGE/MASK tensors and the core's frame tensors.

ComfyUI: ``IMAGE`` is float32 ``[B, H, W, C]`` in 0..1 on the CPU (a video is a batch of frames);
``MASK`` is float ``[B, H, W]`` (or ``[H, W]``) in 0..1. Core: frames are ``(F, 3, H, W)`` in
[-1, 1]; masks are ``(F, 1, H, W)`` float (1 = hole). Every function returns new tensors and
never modifies its input (ComfyUI caches and shares node outputs by reference).
"""
from __future__ import annotations

import torch

from ..worldstereo_core.errors import InputError


def _rgb(image: torch.Tensor, name: str) -> torch.Tensor:
    """Validated ``[B,H,W,3]`` view of an IMAGE (alpha dropped, grey repeated); no copy."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0:
        raise InputError(
            f"{name}: expected an IMAGE of shape [batch, height, width, 3], got {list(image.shape)}; "
            "connect an IMAGE output (Load Image, a video loader, ...)"
        )
    return image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:-1], 3)


def image_to_frames(image: torch.Tensor, name: str = "image", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` (or ``[H,W,C]``) 0..1 -> frames ``(B,3,H,W)`` in [-1,1].

    An alpha channel (C=4) is dropped and a grey image (C=1) is repeated to RGB.
    """
    rgb = _rgb(image, name)
    return rgb.permute(0, 3, 1, 2).to(dtype=dtype).mul(2.0).sub(1.0).clamp(-1.0, 1.0)


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``(F,3,H,W)`` in [-1,1] (any device/dtype) -> IMAGE ``[F,H,W,3]`` float32 0..1 on CPU."""
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames: expected shape (F, 3, H, W), got {list(frames.shape)}")
    out = frames.detach().to(device="cpu", dtype=torch.float32).add(1.0).mul(0.5).clamp(0.0, 1.0)
    return out.permute(0, 2, 3, 1).contiguous()


def mask_from_comfy(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """ComfyUI MASK ``[B,H,W]`` or ``[H,W]`` -> core mask ``(B,1,H,W)`` float32 in 0..1."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name}: expected a MASK tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[0] == 0:
        raise InputError(f"{name}: expected a MASK of shape [batch, height, width], got {list(mask.shape)}")
    return mask.detach().to(dtype=torch.float32).clamp(0.0, 1.0).unsqueeze(1)


def mask_to_comfy(mask: torch.Tensor) -> torch.Tensor:
    """Core mask ``(F,1,H,W)`` or ``(F,H,W)`` (bool or float) -> MASK ``[F,H,W]`` float32 on CPU."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise InputError(f"mask: expected shape (F, 1, H, W), got {list(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise InputError(f"mask: expected shape (F, 1, H, W) or (F, H, W), got {list(mask.shape)}")
    return mask.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).contiguous()


def image_to_uint8(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` 0..1 -> uint8 ``[B,H,W,3]`` (rounded), for file writers."""
    rgb = _rgb(image, name).detach().to(device="cpu", dtype=torch.float32)
    return rgb.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).contiguous()
