"""Stand-in for ``comfy.model_management`` (v0.3.64 signatures), CPU only, for unit tests.

Calls to the memory functions are recorded in :data:`calls` so tests can check that the node
layer frees memory before big loads. :func:`interrupt_current_processing` sets the same flag the
real ``POST /interrupt`` sets.
"""
from __future__ import annotations

import threading

import torch

#: (function name, args) of every memory-management call, in order (stub only).
calls: list[tuple[str, tuple]] = []

OOM_EXCEPTION = torch.cuda.OutOfMemoryError


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value: bool = True) -> None:
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted() -> bool:
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return torch.device("cpu")


def vae_device() -> torch.device:
    return torch.device("cpu")


def is_device_cpu(device) -> bool:
    return torch.device(device).type == "cpu"


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    return False


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    return False


def get_free_memory(dev=None, torch_free_too=False):
    return 16 * 1024 ** 3


def free_memory(memory_required, device, keep_loaded=[]):  # noqa: B006 (real signature)
    calls.append(("free_memory", (memory_required, device)))
    return []


def unload_all_models() -> None:
    calls.append(("unload_all_models", ()))


def soft_empty_cache(force: bool = False) -> None:
    calls.append(("soft_empty_cache", (force,)))
