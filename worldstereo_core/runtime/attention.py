"""Attention backend selection for the WorldStereo transformers.

Every attention of the models (Wan self/cross attention, the SSM joint attention, the ControlNet
attention) goes through diffusers' ``dispatch_attention_fn`` with its processor's
``_attention_backend`` (H4's hook; ``build_transformer(attention_backend=...)`` uses diffusers'
``set_attention_backend``). :func:`set_attention_backend` sets the same attribute on the model's
processors only (no process-wide default is changed), after checking that the backend can run:

* ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks the flash
  or memory-efficient kernel on CUDA by itself. ``sdpa-flash`` / ``sdpa-efficient`` /
  ``sdpa-cudnn`` / ``sdpa-math`` force one of its kernels.
* ``flash`` (flash-attn 2), ``flash3`` (flash-attn 3, Hopper), ``sage`` (SageAttention: int8 QK,
  approximate), ``xformers``: when the package is installed, CUDA only, half precision.
* ``auto``: what is installed and runs on the device (:func:`auto_backend`): ``flash3`` on Hopper
  (compute capability 9.x; its kernels are built for sm_90, not for Blackwell's 10.x/12.x),
  ``flash`` (flash-attn 2, Ampere and newer: >= 8.0, Blackwell included), else ``sdpa``. The
  ``pairs`` scope's mask keeps it on ``sdpa``; ``sage`` is approximate and only ever chosen by name.

The memory models' optional ``pairs`` attention scope needs a backend that takes a mask, and
sequence parallelism (:mod:`worldstereo_core.distributed`) one that diffusers can parallelise.
"""
from __future__ import annotations

import importlib.util
from typing import Collection

import torch
import torch.nn as nn

from ..errors import InputError

#: Our names -> diffusers ``AttentionBackendName`` values.
BACKENDS: dict[str, str] = {
    "sdpa": "native",
    "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient",
    "sdpa-cudnn": "_native_cudnn",
    "sdpa-math": "_native_math",
    "flash": "flash",
    "flash3": "_flash_3",
    "sage": "sage",
    "xformers": "xformers",
}
DEFAULT_BACKEND = "sdpa"
#: Backends that need a CUDA device and half-precision inputs.
CUDA_ONLY = ("sdpa-flash", "sdpa-cudnn", "flash", "flash3", "sage", "xformers")
#: Python package each optional backend imports, with the pip name to install.
PACKAGES: dict[str, tuple[str, str]] = {
    "flash": ("flash_attn", "flash-attn"),
    "flash3": ("flash_attn_interface", "flash-attn 3 (built from the hopper/ folder of flash-attention)"),
    "sage": ("sageattention", "sageattention"),
    "xformers": ("xformers", "xformers"),
}
#: Backends that accept an attention mask (needed by the memory models' ``pairs`` scope).
TAKES_MASK = ("sdpa", "sdpa-efficient", "sdpa-math", "xformers")


def _processors(model: nn.Module):
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            yield processor


def installed(name: str) -> bool:
    """Whether the package an optional backend needs is importable (always True for the SDPA ones)."""
    if name not in PACKAGES:
        return name in BACKENDS
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def auto_backend(capability: tuple[int, int] | None, available: Collection[str], *, needs_mask: bool = False,
                 half_precision: bool = True) -> str:
    """The ``auto`` choice for a CUDA device of compute ``capability`` (None: not a CUDA device)
    given the ``available`` optional backends (names of :data:`PACKAGES` that are installed);
    the flash kernels take fp16/bf16 only."""
    if capability is None or needs_mask or not half_precision:
        return DEFAULT_BACKEND
    if capability[0] == 9 and "flash3" in available:
        return "flash3"
    if capability >= (8, 0) and "flash" in available:
        return "flash"
    return DEFAULT_BACKEND


def resolve_backend(name: str, device: torch.device | str | None = None, *, needs_mask: bool = False,
                    half_precision: bool = True) -> str:
    """Our backend name for ``name`` (``auto`` resolved for ``device``); InputError if unknown."""
    name = (name or "auto").lower()
    if name == "auto":
        device = torch.device(device) if device is not None else None
        capability = None
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(device)
        return auto_backend(capability, [n for n in PACKAGES if installed(n)], needs_mask=needs_mask,
                            half_precision=half_precision)
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
    return name


def check_backend(name: str, device: torch.device | str | None = None, *, needs_mask: bool = False,
                  context_parallel: bool = False) -> None:
    """Raise InputError naming the fix when backend ``name`` cannot run here."""
    if name in PACKAGES and not installed(name):
        raise InputError(f"attention backend {name!r} needs the {PACKAGES[name][1]} package, which is not installed; "
                         f"install it or use --attention sdpa")
    device = torch.device(device) if device is not None else None
    if name in CUDA_ONLY and (device is None or device.type != "cuda"):
        raise InputError(f"attention backend {name!r} runs on CUDA devices only; use --attention sdpa on "
                         f"{device.type if device is not None else 'this device'}")
    if needs_mask and name not in TAKES_MASK:
        raise InputError(f"attention backend {name!r} takes no attention mask, which the 'pairs' attention scope "
                         f"needs; use one of {list(TAKES_MASK)} or the released 'full' scope")
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = AttentionBackendName(BACKENDS[name])
    if context_parallel and not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise InputError(f"attention backend {name!r} cannot run sequence parallel; use sdpa, sdpa-flash, "
                         "sdpa-cudnn, flash or sage")
    if name in PACKAGES:
        from diffusers.models.attention_dispatch import _check_attention_backend_requirements

        try:
            _check_attention_backend_requirements(backend)
        except RuntimeError as exc:  # installed, but a version diffusers cannot use
            raise InputError(f"attention backend {name!r}: {exc}") from exc


def set_attention_backend(model: nn.Module, name: str = "auto", device: torch.device | str | None = None) -> str:
    """Make every attention of ``model`` use backend ``name`` (checked for ``device``, default the
    model's); returns the resolved name."""
    if device is None:
        device = next(model.parameters()).device
    needs_mask = getattr(model, "attention_scope", "full") == "pairs"
    half = getattr(model, "compute_dtype", torch.bfloat16) in (torch.float16, torch.bfloat16)
    resolved = resolve_backend(name, device, needs_mask=needs_mask, half_precision=half)
    parallel = any(getattr(p, "_parallel_config", None) is not None for p in _processors(model))
    check_backend(resolved, device, needs_mask=needs_mask, context_parallel=parallel)
    from diffusers.models.attention_dispatch import AttentionBackendName

    backend = AttentionBackendName(BACKENDS[resolved])
    count = 0
    for processor in _processors(model):
        processor._attention_backend = backend
        count += 1
    if count == 0:
        raise InputError("the model has no diffusers attention processor to configure")
    return resolved


def attention_backend_of(model: nn.Module) -> str | None:
    """Our name of the backend the model's processors use (None: diffusers' process default)."""
    values = {getattr(p._attention_backend, "value", p._attention_backend) for p in _processors(model)}
    if len(values) != 1:
        return None
    value = values.pop()
    return next((k for k, v in BACKENDS.items() if v == value), None)
