"""Pixel values as transformers' PIL image processors compute them, whatever backend is installed.

Checked against the PIL implementation of the installed transformers (an independent
implementation; the CLIP fixtures in test_conditioning pin the reference's numbers) for CLIP's and
DINOv2's settings, and shown not to depend on whether the processor handed in is the torchvision one.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from worldstereo_core.errors import InputError
from worldstereo_core.image_processors import pixel_values

DINOV2_SETTINGS = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
SIZES = [(224, 224), (300, 517), (517, 300), (257, 255), (1024, 768)]  # (H, W)


def pil_processor_class(name: str) -> type:
    """transformers' PIL implementation: ``<name>Pil`` in 5.x, the plain ("slow") class in 4.x."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def torchvision_processor_class(name: str) -> type:
    """transformers' torchvision implementation (``<name>Fast``; in 5.x also the plain name)."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: there is no torchvision image processor to compare")
    return getattr(transformers, name + "Fast")


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("name, settings", [("CLIPImageProcessor", {}), ("BitImageProcessor", DINOV2_SETTINGS)],
                         ids=["clip", "dinov2"])
@pytest.mark.parametrize("do_rescale", [True, False])
def test_matches_the_pil_implementation(name, settings, do_rescale):
    processor = pil_processor_class(name)(**settings)
    for image in _images():
        expected = processor(images=[image], do_rescale=do_rescale, return_tensors="pt").pixel_values
        ours = pixel_values(processor, [image], do_rescale=do_rescale)
        assert ours.shape == expected.shape and ours.dtype == torch.float32
        assert torch.equal(ours, expected), f"{image.size}: max |diff| {(ours - expected).abs().max():.3g}"


def test_torchvision_processor_gives_the_pil_numbers():
    """Handing in the torchvision implementation (what a ComfyUI environment gets) changes nothing,
    although that implementation's own output differs."""
    fast = torchvision_processor_class("CLIPImageProcessor")()
    slow = pil_processor_class("CLIPImageProcessor")()
    images = _images(1)
    ours = pixel_values(fast, images, do_rescale=False)
    assert torch.equal(ours, pixel_values(slow, images, do_rescale=False))
    own = torch.cat([fast(images=[im], do_rescale=False, return_tensors="pt").pixel_values for im in images])
    assert not torch.equal(own, ours)  # the reason this module exists


def test_uint8_arrays_equal_pil_images_and_other_dtypes_are_refused():
    processor = pil_processor_class("BitImageProcessor")(**DINOV2_SETTINGS)
    images = _images(2)
    arrays = [np.asarray(im) for im in images]
    assert torch.equal(pixel_values(processor, arrays), pixel_values(processor, images))
    with pytest.raises(InputError, match="image 0: expected a PIL image or a uint8 array"):
        pixel_values(processor, [arrays[0].astype(np.float32) / 255])
