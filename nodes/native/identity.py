"""What a core ComfyUI model object is, for a run's resume key: a loaded MODEL, CLIP, VAE or
CLIP_VISION does not know the file it came from, so it is told apart by its weights.

:func:`patcher_identity` digests a ModelPatcher: a strided sample of every weight no patch
replaces (their values are the loaded file's and never change while the model is loaded, partly
loaded or offloaded), plus every weight patch (LoRAs, a variant's backbone: key, strengths and a
sample of the patch tensors) and object patch. Two files with different weights differ in
(practically) every sampled element; a LoRA of another file or strength changes the patches.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

#: Elements sampled from each tensor, evenly spaced over it.
SAMPLES_PER_TENSOR = 256


def _tensor(h, tensor: torch.Tensor) -> None:
    h.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    if tensor.is_meta or tensor.numel() == 0:  # no values yet (lazily built layers)
        return
    flat = tensor.detach().as_subclass(torch.Tensor).reshape(-1)  # plain tensor: quantized subclasses too
    sample = flat[::max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
    h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _value(h, value: Any) -> None:
    """Digest a patch value: tensors sampled, containers walked, adapters by type and weights."""
    if isinstance(value, torch.Tensor):
        _tensor(h, value)
    elif isinstance(value, (tuple, list)):
        h.update(b"[")
        for item in value:
            _value(h, item)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    else:  # a weight adapter (LoRAAdapter ...), a function
        h.update(type(value).__qualname__.encode())
        _value(h, getattr(value, "weights", getattr(value, "__qualname__", None)))


def patcher_identity(patcher) -> str:
    """SHA-256 (hex) of a ModelPatcher's base weights, weight patches and object patches."""
    h = hashlib.sha256()
    patched = set(patcher.patches) | set(patcher.object_patches)
    for key, tensor in sorted(patcher.model.state_dict().items()):
        if key not in patched:
            h.update(key.encode())
            _tensor(h, tensor)
    for key, patches in sorted(patcher.patches.items()):
        h.update(key.encode())
        _value(h, list(patches))
    for key, value in sorted(patcher.object_patches.items()):
        h.update(key.encode())
        _value(h, value)
    return h.hexdigest()
