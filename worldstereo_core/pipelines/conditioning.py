"""Text and image conditioning: Wan prompt cleaning + UMT5, CLIP image embedding, input image.

As the reference pipelines' input preparation. Prompts are cleaned as Wan does (ftfy, double HTML unescape, whitespace
collapse), tokenised to 512 tokens and encoded by UMT5; hidden states past each prompt's real
length are zeroed. The image embedding is CLIP's penultimate hidden states on the PIL input image.
"""
from __future__ import annotations

import html
import re
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from PIL import Image

from ..constants import TEXT_SEQ_LEN
from ..errors import InputError
from ..image_processors import pixel_values
from .vae import SPATIAL_FACTOR

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy fix, HTML-unescape twice, collapse whitespace, strip."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _as_prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return prompts


def encode_prompt(tokenizer, text_encoder, prompt: str | Sequence[str], *,
                  max_length: int = TEXT_SEQ_LEN, device: torch.device | str | None = None) -> torch.Tensor:
    """UMT5 embeddings [B, max_length, d_model] (float32), zero past each prompt's token count."""
    prompts = [clean_prompt(p) for p in _as_prompt_list(prompt, "prompt")]
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    if device is None:
        device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state.float()
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
    return hidden * keep[..., None].to(hidden.dtype)


class PromptCache:
    """The last ``size`` text embeddings, so that trajectories sharing a prompt encode it once.

    An entry is used only for the same prompt text, the same tokenizer and encoder objects (held
    by weak references: an entry of a freed encoder is never matched by a new one at the same
    address), the encoder's parameter dtypes and weight versions (an in-place weight change, e.g.
    ``load_state_dict``, bumps them), the execution device and the token length: anything that
    changes the embedding misses. Where the encoder lives between runs (offloaded) does not matter.
    Weights created under ``torch.inference_mode`` (ComfyUI loads models so) carry no version: an
    in-place change to them inside inference mode is not seen; call :meth:`clear` after one.
    The pipelines share :data:`PROMPT_CACHE` and keep the embeddings on the CPU (8 MB each for
    UMT5-XXL), so separate pipelines over one encoder (ComfyUI's sampler node) share them too."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[weakref.ref, weakref.ref, torch.Tensor]] = OrderedDict()

    def get(self, prompt: str | Sequence[str], tokenizer, text_encoder: torch.nn.Module, device: torch.device,
            max_length: int, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The embedding of ``prompt`` by ``text_encoder``: kept from an earlier call, else ``encode()``."""
        tensors = [*text_encoder.parameters(), *text_encoder.buffers()]
        key = ((prompt,) if isinstance(prompt, str) else tuple(prompt), id(tokenizer), id(text_encoder),
               tuple(t.dtype for t in tensors), tuple(None if t.is_inference() else t._version for t in tensors),
               str(device), max_length)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tokenizer and entry[1]() is text_encoder:
            self._entries.move_to_end(key)
            return entry[2]
        embeds = encode()
        self._entries[key] = (weakref.ref(tokenizer), weakref.ref(text_encoder), embeds)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return embeds

    def clear(self) -> None:
        self._entries.clear()


#: The prompt cache of every pipeline of this process.
PROMPT_CACHE = PromptCache()


def to_pil_rgb(image: Any) -> Image.Image:
    """The input image as a PIL RGB image.

    Accepts a PIL image, a uint8 array [H,W,3], or a float array/tensor in [0,1] shaped [H,W,3],
    [3,H,W] or with a leading batch of 1 (as ComfyUI's IMAGE). Floats are rounded to uint8 first,
    so every path reaches CLIP and the VAE as the reference's PIL image would.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise InputError(f"image must be one RGB image ([H,W,3], [3,H,W] or [1,H,W,3]); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"image must be uint8 or float in [0,1]; got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise InputError("image contains NaN or infinite values")
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def clip_pixel_values(image_processor, image: Any, *, clip_no_rescale: bool = True) -> torch.Tensor:
    """CLIP pixel values [1,3,S,S] of ``image``.

    ``clip_no_rescale=True`` (default) is the reference's behaviour: the processor runs with
    ``do_rescale=False`` on the uint8 PIL image, so values are *not* divided by 255 (they reach
    about ±1000). The released weights were sampled (and probably trained) this way. ``False``
    gives standard CLIP preprocessing (values in roughly [-2, 2]). The processor supplies the
    settings; the pixels are computed as its PIL implementation does (:mod:`..image_processors`).
    """
    return pixel_values(image_processor, [to_pil_rgb(image)], do_rescale=not clip_no_rescale)


def encode_image(image_encoder, image_processor, image: Any, *, clip_no_rescale: bool = True,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """CLIP penultimate hidden states [1, tokens, hidden] (float32) of the input image."""
    if device is None:
        device = next(image_encoder.parameters()).device
    pixels = clip_pixel_values(image_processor, image, clip_no_rescale=clip_no_rescale)
    pixels = pixels.to(device=device, dtype=next(image_encoder.parameters()).dtype)
    out = image_encoder(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2].float()


def preprocess_image(image: Any, height: int, width: int) -> torch.Tensor:
    """The input image as [1,3,H,W] float32 in [-1,1] at the bucket size (diffusers VideoProcessor)."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=SPATIAL_FACTOR).preprocess(to_pil_rgb(image), height=height, width=width).float()
