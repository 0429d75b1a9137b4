"""The node layer's single bridge to ComfyUI: progress, interruption, memory and errors.

ComfyUI modules (``folder_paths``, ``comfy.*``, ``server``) are imported inside the functions,
never at module import, so this file imports anywhere (plain Python, the test stub, real
ComfyUI). Inside ComfyUI they are always importable: ``main.py`` imports them before it loads
custom nodes.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch

from ..worldstereo_core.errors import Interrupted, WorldStereoError
from ..worldstereo_core.progress import ProgressFn


def in_comfyui() -> bool:
    """True inside a ComfyUI process (or the test stub): ``folder_paths`` is already imported."""
    return "folder_paths" in sys.modules


def model_management():
    import comfy.model_management

    return comfy.model_management


# --- progress and interruption -------------------------------------------------------------

def check_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` if the user pressed Cancel."""
    model_management().throw_exception_if_processing_interrupted()


def comfy_progress(total: int = 1, node_id: Optional[str] = None) -> ProgressFn:
    """A core ``ProgressFn`` that checks for interruption, then moves a ``comfy.utils.ProgressBar``.

    ``node_id`` (the node's hidden ``UNIQUE_ID``) is optional: inside a running prompt ComfyUI
    attributes the bar to the executing node by itself.
    """
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)

    def progress(done: int, total: int) -> None:
        check_interrupt()
        bar.update_absolute(int(done), max(1, int(total)))

    return progress


# --- devices and memory --------------------------------------------------------------------

def torch_device() -> torch.device:
    """The compute device ComfyUI chose (respects ``--cpu``, ``--directml`` ...)."""
    return model_management().get_torch_device()


def offload_device() -> torch.device:
    """Where idle weights should live (CPU unless ``--highvram``/``--gpu-only``)."""
    return model_management().unet_offload_device()


def free_memory(num_bytes: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    """Make ComfyUI evict its own models: enough for ``num_bytes``, or all of them when None."""
    mm = model_management()
    if num_bytes is None:
        mm.unload_all_models()
    else:
        mm.free_memory(int(num_bytes), device if device is not None else mm.get_torch_device())
    mm.soft_empty_cache()


def soft_empty_cache() -> None:
    model_management().soft_empty_cache()


def module_bytes(*modules: Optional[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (None entries ignored)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def on_compute_device(module: torch.nn.Module) -> Iterator[torch.device]:
    """Run ``module`` on ComfyUI's compute device: make room for it, move it there, and move it
    back to where it was (and empty the cache) afterwards, also on errors and interrupts."""
    device = torch_device()
    home = next(iter(module.parameters()), torch.empty(0)).device
    if torch.device(device).type != "cpu" and home != torch.device(device):
        free_memory(module_bytes(module), device)
    module.to(device)
    try:
        yield device
    finally:
        module.to(home)
        soft_empty_cache()


# --- errors --------------------------------------------------------------------------------

@contextlib.contextmanager
def node_errors(node_name: str) -> Iterator[None]:
    """Turn core errors into readable node errors; usable as ``with`` or as a decorator.

    * ComfyUI's ``InterruptProcessingException`` and every non-WorldStereo exception (CUDA OOM
      included, which ComfyUI handles itself) pass through untouched.
    * ``worldstereo_core.errors.Interrupted`` becomes ComfyUI's interrupt, so the run shows as
      cancelled rather than failed.
    * Other ``WorldStereoError``s are re-raised as the same class with the node name in front
      of the message (the original stays chained for the console traceback).
    """
    try:
        yield
    except WorldStereoError as err:
        if isinstance(err, Interrupted):
            raise model_management().InterruptProcessingException() from err
        message = str(err)
        if not message.startswith(node_name + ":"):
            message = f"{node_name}: {message}"
        try:
            wrapped = type(err)(message)
        except TypeError:
            wrapped = WorldStereoError(message)
        raise wrapped from err
