"""A probe that makes host syncs fail inside a region of code (the pipelines' denoising loop).

On every device it patches the tensor methods that wait for the device or copy to the host:
``item``, ``tolist``, ``numpy``, ``cpu`` and ``to`` / ``copy_`` towards the CPU from another device
or, for ``to``, naming the CPU at all (on a CPU-only machine every tensor is a host tensor, so a
``.to("cpu")`` in the loop stands for the device-to-host copy it would be on a GPU). On CUDA it
also turns on ``torch.cuda.set_sync_debug_mode("error")``, which catches every synchronising CUDA
call (blocking copies in either direction, ``bool``/``int`` of a device tensor, ...).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch


class HostSyncError(AssertionError):
    """A host sync was made inside a probed region."""


def _names_cpu(value) -> bool:
    if isinstance(value, (str, torch.device)):
        return torch.device(value).type == "cpu"
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _refusing(name: str, original, applies=lambda *a, **k: True):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if applies(self, *args, **kwargs):
            raise HostSyncError(f"Tensor.{name} inside the step loop (a host sync on a GPU)")
        return original(self, *args, **kwargs)
    return method


def _to_cpu(self, *args, **kwargs) -> bool:
    return any(_names_cpu(v) for v in (*args[:1], kwargs.get("device")))


def _copy_across(self, src, *args, **kwargs) -> bool:
    return isinstance(src, torch.Tensor) and src.device != self.device and self.device.type == "cpu"


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside the block, the calls listed in the module docstring raise :class:`HostSyncError`."""
    patches = {name: _refusing(name, getattr(torch.Tensor, name)) for name in ("item", "tolist", "numpy", "cpu")}
    patches["to"] = _refusing("to (towards the CPU)", torch.Tensor.to, _to_cpu)
    patches["copy_"] = _refusing("copy_ (device to host)", torch.Tensor.copy_, _copy_across)
    originals = {name: getattr(torch.Tensor, name) for name in patches}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    for name, method in patches.items():
        setattr(torch.Tensor, name, method)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)


def probe_step_loop(monkeypatch, pipeline_class) -> list[int]:
    """Run every ``_step_loop`` of ``pipeline_class`` (the denoising loop) under :func:`no_host_sync`;
    returns a list that gets one entry per probed loop."""
    original = pipeline_class._step_loop
    probed: list[int] = []

    def step_loop(self, *args, **kwargs):
        with no_host_sync():
            result = original(self, *args, **kwargs)
        probed.append(1)
        return result

    monkeypatch.setattr(pipeline_class, "_step_loop", step_loop)
    return probed
