"""Regional ``torch.compile``: compile the repeated blocks, not the whole model.

Each block's ``forward`` (main / SSM blocks, ControlNet blocks) is replaced by its compiled
version. Modes that record CUDA graphs (:data:`CUDA_GRAPH_MODES`) are refused together with block
swap or sharded weights, whose weights move between forwards. All blocks of a kind share code, so the graph is traced once per kind and input layout
and reused by the other blocks (their weights are graph inputs); compile time stays that of one
block. Module hooks stay outside the compiled region, so block swap and FSDP keep working.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Modes that record CUDA graphs. A graph replays the weight addresses it was recorded with, so these
#: modes cannot run blocks whose weights move between forwards (block swap, sharded weights).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def cuda_graph_conflict(mode: str, what: str) -> InputError:
    """The error for compiling with CUDA graphs (``mode``) together with ``what``."""
    return InputError(f"torch.compile mode {mode!r} records CUDA graphs, which replay fixed weight addresses, "
                      f"but {what} moves the transformer weights every forward; use compile mode 'default' or "
                      f"'max-autotune-no-cudagraphs' with {what}, or turn {what} off")


def check_no_cuda_graphs(model: nn.Module, what: str) -> None:
    """Raise :func:`cuda_graph_conflict` if a block of ``model`` is compiled with CUDA graphs."""
    for module in model.modules():
        mode = getattr(module, "_worldstereo_compile_mode", None)
        if mode in CUDA_GRAPH_MODES:
            raise cuda_graph_conflict(mode, what)


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
    if mode in CUDA_GRAPH_MODES and getattr(model, "placement", None) is not None:
        raise cuda_graph_conflict(mode, "block swap")
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
        block._worldstereo_compile_mode = mode
        block._worldstereo_eager_forward = original
        count += 1
    return count


def uncompile_blocks(model: nn.Module) -> None:
    """Restore the eager forwards."""
    for block in compile_targets(model):
        if getattr(block, "_worldstereo_compiled", False):
            block.forward = block._worldstereo_eager_forward
            del block._worldstereo_eager_forward, block._worldstereo_compile_mode
            block._worldstereo_compiled = False
