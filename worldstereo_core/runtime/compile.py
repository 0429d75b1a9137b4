"""Regional ``torch.compile``: compile the repeated blocks, not the whole model.

Each block's ``forward`` (main / SSM blocks, ControlNet blocks) is replaced by its compiled
version. All blocks of a kind share code, so the graph is traced once per kind and input layout
and reused by the other blocks (their weights are graph inputs); compile time stays that of one
block. Module hooks stay outside the compiled region, so block swap and FSDP keep working.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a WorldStereo transformer (main blocks, then ControlNet blocks)."""
    targets = list(getattr(model, "blocks", []))
    cn = getattr(model, "controlnet", None)
    if cn is not None:
        targets += list(cn.controlnet_blocks)
    if not targets:
        raise InputError("torch.compile: the model has no `blocks` to compile (not a WorldStereo / Wan transformer)")
    return targets


def compile_blocks(model: nn.Module, *, mode: str = "default", backend: str = "inductor", fullgraph: bool = False,
                   dynamic: bool | None = None, options: dict[str, Any] | None = None) -> int:
    """Compile every block's forward in place; returns how many blocks. Idempotent."""
    if mode not in COMPILE_MODES:
        raise InputError(f"torch.compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    count = 0
    for block in compile_targets(model):
        if getattr(block, "_worldstereo_compiled", False):
            continue
        original = block.forward
        settings: dict[str, Any] = {"options": options} if options else {}
        if mode != "default":
            settings["mode"] = mode
        block.forward = torch.compile(original, backend=backend, fullgraph=fullgraph, dynamic=dynamic, **settings)
        block._worldstereo_compiled = True
        block._worldstereo_eager_forward = original
        count += 1
    return count


def uncompile_blocks(model: nn.Module) -> None:
    """Restore the eager forwards."""
    for block in compile_targets(model):
        if getattr(block, "_worldstereo_compiled", False):
            block.forward = block._worldstereo_eager_forward
            del block._worldstereo_eager_forward
            block._worldstereo_compiled = False
