"""Strict loading: the one key / shape check every loader uses, and the assignment after it.

Messages name the file, every missing, unexpected and wrongly shaped tensor, and the fix.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..progress import ProgressFn, report
from .safetensors_files import listing, require_weights

#: Byte alignment every CPU parameter gets (what torch's allocator gives fresh tensors).
ALIGNMENT = 64


def check_keys(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], *, source: str, hint: str,
               optional: Iterable[str] = ()) -> None:
    """Compare key -> shape maps; raise :class:`CheckpointError` naming ``source``, every missing,
    unexpected and wrongly shaped tensor, and
    ``hint`` (the fix). Keys in ``optional`` may be missing."""
    optional = set(optional)
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} (model expects {list(expected[k])})"
             for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    problems = [f"{what} tensors: {listing(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems) + f". {hint}")


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state dict (``model.state_dict(keep_vars=True)`` for a model's own)."""
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _prepare(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if t.device.type == "cpu" and t.data_ptr() % ALIGNMENT:
        # safetensors hands out tensors at arbitrary offsets; SIMD kernels then take other code
        # paths, so results would depend on where the bytes sat in the file.
        t = t.clone()
    return t


def assign_tensors(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], device: torch.device | str | None,
                   progress: ProgressFn | None = None, total: int = 0) -> None:
    """Fill ``model`` (meta or real) from checked ``(name, tensor)`` pairs, one tensor at a time.

    Each tensor is cast to its entry's dtype and moved as it arrives, so peak memory is the model
    plus one tensor."""
    params = model.state_dict(keep_vars=True)
    if any(p.is_meta for p in model.parameters()):
        ready = {}
        for done, (name, tensor) in enumerate(items, 1):
            ready[name] = _prepare(tensor, params[name].dtype, device)
            report(progress, done, total)
        model.load_state_dict(ready, strict=True, assign=True)
    else:
        with torch.no_grad():
            for done, (name, tensor) in enumerate(items, 1):
                params[name].copy_(tensor)
                report(progress, done, total)
    if device is not None:
        model.to(device)  # buffers (RoPE tables) follow the parameters


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                           hint: str = "check that the checkpoint belongs to this model type and config",
                           device: torch.device | str | None = None) -> nn.Module:
    """Load a complete state dict: zero missing, unexpected or wrongly shaped keys, floating-point
    weights without NaN / inf (:func:`check_keys`, :func:`.safetensors_files.require_weights`).

    A meta-device model takes the tensors themselves (cast to each entry's dtype, moved to
    ``device`` if given); a real model copies them. Raises :class:`CheckpointError` naming ``source``."""
    own = model.state_dict(keep_vars=True)
    check_keys(tensor_shapes(own), tensor_shapes(state_dict), source=source, hint=hint)
    require_weights(own, state_dict, source)
    assign_tensors(model, state_dict.items(), device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors of the model are not in its state dict and were not "
                              f"built ({listing(left)}); build the model on a real device, not on meta")
    return model
