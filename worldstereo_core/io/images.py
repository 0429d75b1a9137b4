"""Image input: load or accept an image and return validated RGB uint8 (H, W, 3).

Accepted inputs: a file path, a PIL image, a numpy array or a torch tensor.

* Grayscale (L, 1-bit, 16-bit) is expanded to three equal channels.
* 16-bit data (PNG ``I;16``/``I`` modes, ``uint16`` arrays) is scaled to 8 bits by x/257, rounded.
* Palette images are expanded through their palette (with their transparency, if any).
* Alpha (RGBA, LA, PA, 4-channel arrays) is **dropped** by default, which is what PIL's
  ``convert("RGB")`` does and therefore what the reference's loaders see; ``alpha="white"`` or
  ``"black"`` composites over that background instead.
* Float arrays/tensors are taken as [0, 1] (ComfyUI's IMAGE convention), scaled by 255 and rounded.
* Arrays may be HWC, CHW, HW, or carry a leading batch dimension of 1.
* EXIF orientation of files is applied, so the pixels are the way viewers show the photo.
* Each side must lie in [16, 16384] pixels and the image hold at most 2**27 pixels (16384 x 8192)
  (:func:`sizes.check_image_size`); files are checked from their header, before decoding.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..sizes import MAX_IMAGE_PIXELS, check_image_size

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

_ALPHA_MODES = ("drop", "white", "black")


def load_image(source: ImageLike, *, alpha: str = "drop", name: str | None = None) -> np.ndarray:
    """Return ``source`` as a contiguous RGB uint8 array (H, W, 3); see the module docstring.

    ``name`` is used in error messages (defaults to the path or "image").
    """
    if alpha not in _ALPHA_MODES:
        raise InputError(f"alpha must be one of {_ALPHA_MODES}, got {alpha!r}")
    if isinstance(source, (str, os.PathLike)):
        what = name or str(source)
        arr = _pil_to_array(_open(Path(source)), what)
    elif isinstance(source, Image.Image):
        what = name or "image"
        arr = _pil_to_array(source, what)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        what = name or "image"
        arr = _array_to_hwc_uint8(source, what)
    else:
        raise InputError(
            f"{name or 'image'}: unsupported type {type(source).__name__}; pass a file path, PIL "
            "image, numpy array or torch tensor"
        )
    check_image_size(arr.shape[0], arr.shape[1], what)
    return _to_rgb(arr, alpha)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(f"image file {path} not found; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as img:
                check_image_size(img.height, img.width, str(path))  # from the header, before decoding
                img = ImageOps.exif_transpose(img)
                img.load()
                return img
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} is too large to decode ({exc}); the largest supported image has "
                         f"{MAX_IMAGE_PIXELS / 1e6:.1f} megapixels (e.g. 16384x8192): downscale it") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path} is not a readable image ({exc}); use a PNG, JPEG or WebP file") from exc


def _pil_to_array(img: Image.Image, what: str) -> np.ndarray:
    """PIL image of any common mode -> uint8 array with 1, 3 or 4 channels (H, W, C)."""
    mode = img.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        arr = np.asarray(img)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    elif mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode.startswith("I"):  # I;16, I;16B, I;16L, I (PIL's 16/32-bit integer grayscale)
        arr = _scale_16bit(np.asarray(img).astype(np.int64), what)
    elif mode == "F":
        arr = _float_to_uint8(np.asarray(img), what)
    else:  # CMYK, YCbCr, LAB, HSV ...
        arr = np.asarray(img.convert("RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def _scale_16bit(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise InputError(
            f"{what}: integer pixel values span [{arr.min()}, {arr.max()}], outside 16-bit range; "
            "save the image as 8- or 16-bit PNG"
        )
    return np.round(arr / 257.0).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{what}: contains NaN or infinite pixel values; fix the image data")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(
            f"{what}: float pixel values span [{lo:.4g}, {hi:.4g}] but [0, 1] is expected; "
            "rescale (for [-1, 1] tensors use from_tensor_m11)"
        )
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _array_to_hwc_uint8(x, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise InputError(f"{what}: got a batch of {arr.shape[0]} images; pass one image")
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"{what}: array shape {tuple(x.shape)} is not an image; expected (H, W), (H, W, C), "
            "(C, H, W) or (1, H, W, C) with C in 1, 3, 4"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return _scale_16bit(arr.astype(np.int64), what)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(
                f"{what}: integer values span [{arr.min()}, {arr.max()}]; use uint8 (0-255), "
                "uint16 (16-bit) or floats in [0, 1]"
            )
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_uint8(arr, what)
    raise InputError(f"{what}: unsupported pixel dtype {arr.dtype}; use uint8, uint16 or float")


def _to_rgb(arr: np.ndarray, alpha: str) -> np.ndarray:
    """(H, W, C) uint8 with C in 1 (L), 2 (LA), 3 (RGB), 4 (RGBA) -> (H, W, 3) uint8."""
    color, a = (arr[..., :-1], arr[..., -1:]) if arr.shape[-1] in (2, 4) else (arr, None)
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    if a is not None and alpha != "drop":
        bg = 255.0 if alpha == "white" else 0.0
        w = a.astype(np.float64) / 255.0
        color = np.round(color * w + bg * (1.0 - w)).astype(np.uint8)
    return np.ascontiguousarray(color)


def to_tensor_m11(img: ImageLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB image -> (3, H, W) tensor in [-1, 1] (x / 255 * 2 - 1)."""
    t = torch.from_numpy(load_image(img)).permute(2, 0, 1).to(torch.float64)
    return (t / 255.0 * 2.0 - 1.0).to(dtype)


def from_tensor_m11(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) tensor in [-1, 1] -> RGB uint8 (H, W, 3) (clamped, rounded)."""
    t = torch.as_tensor(t)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise InputError(f"from_tensor_m11 expects a (3, H, W) tensor, got shape {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError("from_tensor_m11: tensor contains NaN or infinite values")
    u8 = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(u8.permute(1, 2, 0).numpy())


def resize_bicubic(img: ImageLike, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to (H, W) with PIL bicubic (aspect may change, as in the reference)."""
    h, w = check_image_size(size_hw[0], size_hw[1], "resize target")
    arr = load_image(img)
    if arr.shape[:2] == (h, w):
        return arr.copy()
    return np.array(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
