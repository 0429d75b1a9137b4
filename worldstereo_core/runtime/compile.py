"""Regional ``torch.compile``: compile the repeated blocks, not the whole model.

The blocks are the ones the model declares in diffusers' ``_repeated_blocks`` (main / SSM blocks,
ControlNet blocks); diffusers' ``ModelMixin.compile_repeated_blocks`` compiles each in place. All
blocks of a kind share code, so the graph is traced once per kind and input layout and reused by
the other blocks (their weights are graph inputs); compile time stays that of one block. What
diffusers does not know is kept here: modes that record CUDA graphs (:data:`CUDA_GRAPH_MODES`) are
refused together with block swap or sharded weights, whose weights move between forwards.
A compiled block's whole call is compiled, module hooks included: block swap's hooks are
``torch.compiler.disable``'d and FSDP2 disables dynamo in its own, so both run eagerly around the blocks.
"""
from __future__ import annotations

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
    """Raise :func:`cuda_graph_conflict` if ``model``'s blocks are compiled with CUDA graphs."""
    mode = getattr(model, "compile_mode", None)
    if mode in CUDA_GRAPH_MODES:
        raise cuda_graph_conflict(mode, what)


def compile_blocks(model: nn.Module, *, mode: str = "default", backend: str = "inductor") -> None:
    """Compile ``model``'s repeated blocks in place (``compile_repeated_blocks``) and record ``mode`` as
    ``model.compile_mode``."""
    if mode not in COMPILE_MODES:
        raise InputError(f"torch.compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if not getattr(model, "_repeated_blocks", None):
        raise InputError(f"torch.compile: {type(model).__name__} declares no repeated blocks to compile (not a "
                         "WorldStereo / Wan transformer)")
    if mode in CUDA_GRAPH_MODES and getattr(model, "placement", None) is not None:
        raise cuda_graph_conflict(mode, "block swap")
    model.compile_repeated_blocks(mode=mode, backend=backend)
    model.compile_mode = mode
