"""Socket type names of the pack (with their V3 socket classes, :class:`Socket`) and the small
containers that travel along those links.

ComfyUI never looks inside a custom-typed object; :class:`Memory` only bundles what the next node
needs. Core objects (``ViewDepth``, ``StartView``, ``CameraTrajectory``, ``MemoryBank``) travel as
they are wherever they suffice. Nodes never modify an object they received: they build a new one.
The names without the ``WORLDSTEREO_`` prefix predate it; saved workflows' links carry them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from comfy_api.latest import io

# Socket types (upper-case strings; a link joins only identical names).
MOGE = "MOGE_MODEL"
DINOV2 = "DINOV2_MODEL"
#: A core ``geometry.start_view.ViewDepth``.
DEPTH = "WORLDSTEREO_DEPTH"
#: A core ``geometry.start_view.StartView``: the lifted start view, its camera and scale m.
POINT_CLOUD = "POINT_CLOUD"
TRAJECTORY = "CAMERA_TRAJECTORY"
MEMORY_BANK = "MEMORY_BANK"
MEMORY = "WORLDSTEREO_MEMORY"
#: A scene folder made by Panorama Scene From Image (``worldstereo_core.tasks.panorama_scene.PanoramaScene``).
PANORAMA_SCENE = "WORLDSTEREO_PANORAMA_SCENE"


class Socket:
    """V3 socket classes of the types above: ``Socket.MOGE.Input("moge", tooltip=...)``."""

    MOGE = io.Custom(MOGE)
    DINOV2 = io.Custom(DINOV2)
    DEPTH = io.Custom(DEPTH)
    POINT_CLOUD = io.Custom(POINT_CLOUD)
    TRAJECTORY = io.Custom(TRAJECTORY)
    MEMORY_BANK = io.Custom(MEMORY_BANK)
    MEMORY = io.Custom(MEMORY)
    PANORAMA_SCENE = io.Custom(PANORAMA_SCENE)


@dataclass(frozen=True)
class Memory:
    """Retrieved references for one target trajectory (what a memory model is conditioned on).

    ``frames`` (R, H, W, 3) uint8 at the generation size, ``ref_index`` (R,) long (reference r
    attaches to target frame ``ref_index[r] + 1``), ``w2c`` (R, 4, 4) their cameras.
    """

    frames: np.ndarray
    ref_index: torch.Tensor
    w2c: torch.Tensor
    retrieved: list = field(default_factory=list)
