"""The layer classes the WorldStereo branches are built from, as an injectable namespace.

The default is plain ``torch.nn``. A host passes its own namespace with the same class names and
constructor signatures (ComfyUI passes a ``comfy.ops`` class, whose layers cast and offload their
weights with the rest of the model).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch.nn as nn

#: Class names every ops namespace must provide.
OP_NAMES = ("Linear", "Conv3d", "LayerNorm", "RMSNorm", "GroupNorm", "Embedding")

TORCH_OPS = SimpleNamespace(**{name: getattr(nn, name) for name in OP_NAMES})


def check_ops(ops: Any) -> Any:
    """``ops`` itself, after checking it has every class the branches use."""
    missing = [name for name in OP_NAMES if not hasattr(ops, name)]
    if missing:
        raise TypeError(f"ops namespace {ops!r} lacks {missing}; it must provide {list(OP_NAMES)}")
    return ops
