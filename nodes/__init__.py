"""ComfyUI nodes: thin adapters over worldstereo_core, one module per stage.

Each stage module exports ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; this package
merges them (a node id defined twice is an error) and, inside ComfyUI, registers the model
folders and the trajectory-preview route. The native nodes (``nodes/native``) run on ComfyUI's own
model code and V3 node API, so they join where ComfyUI's ``comfy_api`` exists (every ComfyUI this
pack supports; not the test stub).
"""
from __future__ import annotations

import importlib.util

from . import export, geometry, loaders, loop, memory, render, sampling, trajectory
from ._comfy import in_comfyui
from .trajectory_preview import register_routes

_STAGES = (loaders, geometry, trajectory, render, memory, sampling, loop, export)
if importlib.util.find_spec("comfy_api") is not None:
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
