"""ComfyUI nodes: thin adapters over worldstereo_core, one module per stage.

Each stage module exports ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; this package
merges them (a node id defined twice is an error) and, inside ComfyUI, registers the model
folders and the trajectory-preview route. The native nodes (``nodes/native``) run on ComfyUI's own
model code (``comfy.ldm``), so they join wherever that exists: in every ComfyUI, not in the test
stub (their tests import the real ComfyUI).
"""
from __future__ import annotations

import importlib.util

from . import export, geometry, loaders, loop, memory, render, trajectory
from ._comfy import in_comfyui
from .trajectory_preview import register_routes

_STAGES = (loaders, geometry, trajectory, render, memory, loop, export)


def _has_comfy_models() -> bool:
    try:
        return importlib.util.find_spec("comfy.ldm") is not None
    except ModuleNotFoundError:
        return False


if _has_comfy_models():
    from .native import nodes as native_nodes

    _STAGES += (native_nodes,)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _stage in _STAGES:
    _clash = NODE_CLASS_MAPPINGS.keys() & _stage.NODE_CLASS_MAPPINGS.keys()
    if _clash:
        raise RuntimeError(f"node ids defined twice: {sorted(_clash)} (in {_stage.__name__})")
    NODE_CLASS_MAPPINGS.update(_stage.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_stage.NODE_DISPLAY_NAME_MAPPINGS)


def register_with_comfy() -> None:
    """Register model folders and HTTP routes with the running ComfyUI (idempotent)."""
    loaders.register_model_folders()
    register_routes()


if in_comfyui():
    register_with_comfy()
