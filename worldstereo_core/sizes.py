"""Image sizes: accepted input range, working-resolution buckets and 16-pixel alignment.

Sizes are always given as (height, width), like the reference's ``scale_map`` entries.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from .constants import DEFAULT_SCALE_MAP
from .errors import InputError

#: Smallest and largest accepted image side in pixels (inputs outside are rejected as absurd).
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 16384
#: Largest accepted image area: 2**27 pixels (134 megapixels: a 16384 x 8192 equirectangular
#: panorama; 403 MB as RGB uint8).
MAX_IMAGE_PIXELS = 2**27

#: Working sizes must be multiples of this (VAE stride 8 x patch 2 of the video model).
SIZE_MULTIPLE = 16


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_image_side(value, what: str = "image", name: str = "side") -> int:
    """One image side (``name`` = "width", "height" ...) as an int in the supported range."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise InputError(f"{what}: {name} must be a whole number of pixels, got {value!r}")
    if not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE:
        raise InputError(
            f"{what}: {name} {value} px is outside the supported range "
            f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]; resize or crop the input to a sensible size"
        )
    return int(value)


def check_image_size(height, width, what: str = "image") -> tuple[int, int]:
    """Return ``(height, width)`` as ints, or raise InputError naming ``what`` when absurd
    (a side outside [16, 16384] px or more than :data:`MAX_IMAGE_PIXELS` pixels)."""
    height, width = check_image_side(height, what, "height"), check_image_side(width, what, "width")
    if height * width > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{what}: {width}x{height} is {height * width / 1e6:.1f} megapixels, more than the supported "
            f"{MAX_IMAGE_PIXELS / 1e6:.1f} (e.g. 16384x8192); downscale it (WorldStereo works at about 480x832)"
        )
    return height, width


def validate_scale_map(scale_map: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Check a list of (H, W) buckets: non-empty, positive multiples of 16."""
    buckets = tuple(tuple(b) for b in scale_map)
    if not buckets:
        raise InputError("scale_map is empty; give at least one [height, width] bucket")
    for b in buckets:
        if len(b) != 2 or not all(_is_int(v) and v > 0 and v % SIZE_MULTIPLE == 0 for v in b):
            raise InputError(
                f"scale_map entry {list(b)!r} must be [height, width] with positive multiples of "
                f"{SIZE_MULTIPLE}"
            )
    return buckets  # type: ignore[return-value]


def assign_scale(h: int, w: int, scale_map: Iterable[Sequence[int]] | None = DEFAULT_SCALE_MAP) -> tuple[int, int]:
    """Working size (H, W): the bucket whose H/W is closest to ``h/w`` (first one on ties).

    ``scale_map`` None means the release default :data:`constants.DEFAULT_SCALE_MAP`.
    """
    check_image_size(h, w, "assign_scale input")
    buckets = validate_scale_map(DEFAULT_SCALE_MAP if scale_map is None else scale_map)
    ratio = h / w
    errors = [abs(bh / bw - ratio) for bh, bw in buckets]
    return buckets[errors.index(min(errors))]


def adjust_image_size(h: int, w: int) -> tuple[int, int]:
    """Round h and w up to multiples of 16, then widen w by 16 until (h/16)(w/16) % 8 == 0."""
    if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
        raise InputError(f"adjust_image_size needs positive integer sizes, got h={h!r}, w={w!r}")
    h16 = math.ceil(h / SIZE_MULTIPLE) * SIZE_MULTIPLE
    w16 = math.ceil(w / SIZE_MULTIPLE) * SIZE_MULTIPLE
    while ((h16 // SIZE_MULTIPLE) * (w16 // SIZE_MULTIPLE)) % 8:
        w16 += SIZE_MULTIPLE
    return h16, w16
