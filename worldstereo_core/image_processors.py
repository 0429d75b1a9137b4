"""Pixel values of a transformers image processor, computed the way its PIL implementation does.

transformers runs an image processor on torchvision when torchvision is importable (5.x: the
plain class name is the torchvision one; 4.x: the "fast" classes), and torchvision's antialiased
tensor resize gives other pixels than the PIL resize behind the reference's numbers. Every ComfyUI
install has torchvision. So the processors (CLIP's, DINOv2's) only supply their settings, and
:func:`pixel_values` applies them itself, exactly as transformers' PIL ("slow") path does: PIL
resize of the shortest edge (long side truncated), centre crop, ``x * rescale_factor`` in float64
then float32, ``(x - mean) / std`` in float32. The result is the same with any transformers
version, with or without torchvision.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import InputError


def _get(settings: Any, key: str) -> Any:
    """A field of a processor's ``size`` / ``crop_size`` (a dict or transformers' SizeDict)."""
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def _resize_shortest_edge(image: Image.Image, shortest: int, resample: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    size = (shortest, new_long) if width <= height else (new_long, shortest)
    return image.resize(size, resample=Image.Resampling(int(resample)))


def _centre_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array[top:top + height, left:left + width]


def pixel_values(processor: Any, images: Sequence[Image.Image | np.ndarray], *,
                 do_rescale: bool | None = None) -> torch.Tensor:
    """[N, 3, H, W] float32 pixel values of RGB ``images`` (PIL or uint8 HWC arrays) with the
    settings of ``processor`` (``do_rescale`` overrides the processor's own)."""
    p = processor
    shortest = _get(p.size, "shortest_edge")
    crop_h, crop_w = _get(p.crop_size, "height"), _get(p.crop_size, "width")
    if p.do_resize and not shortest:
        raise InputError(f"{type(p).__name__}: only a 'shortest_edge' resize is supported, got size {p.size}")
    if p.do_center_crop and (not p.do_resize or shortest < max(crop_h, crop_w)):
        raise InputError(f"{type(p).__name__}: the centre crop {crop_h}x{crop_w} must fit in the resized image "
                         f"(shortest edge {shortest})")
    rescale = p.do_rescale if do_rescale is None else do_rescale
    mean = np.asarray(p.image_mean, dtype=np.float32)
    std = np.asarray(p.image_std, dtype=np.float32)
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            if getattr(image, "dtype", None) != np.uint8:
                raise InputError(f"image {i}: expected a PIL image or a uint8 array, got {getattr(image, 'dtype', type(image))}")
            image = Image.fromarray(image)
        pil = image.convert("RGB")
        if p.do_resize:
            pil = _resize_shortest_edge(pil, shortest, p.resample)
        x = np.asarray(pil)
        if p.do_center_crop:
            x = _centre_crop(x, crop_h, crop_w)
        x = (x.astype(np.float64) * p.rescale_factor).astype(np.float32) if rescale else x.astype(np.float32)
        if p.do_normalize:
            x = (x - mean) / std
        out.append(x.transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))
