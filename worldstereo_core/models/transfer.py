"""Host-to-device copies that do not wait for the device (the step loop must not sync)."""
from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: on CUDA through page-locked memory and an
    asynchronous copy (a plain ``.to`` waits for the device); the tensor itself if already there."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
