"""Socket type names of the pack (with their V3 socket classes, :class:`Socket`) and the small
containers that travel along those links.

ComfyUI never looks inside a custom-typed object; these dataclasses only bundle what the next
node needs. Core objects (``CameraTrajectory``, ``PointCloud``, ``MemoryBank``) are used as they
are wherever they suffice. Nodes never modify an object they received: they build a new one.
The names without the ``WORLDSTEREO_`` prefix predate it; saved workflows' links carry them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from comfy_api.latest import io

from ..worldstereo_core.geometry.pointcloud import PointCloud

# Socket types (upper-case strings; a link joins only identical names).
MOGE = "MOGE_MODEL"
DINOV2 = "DINOV2_MODEL"
DEPTH = "WORLDSTEREO_DEPTH"
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
class Depth:
    """A z-depth map of one view: ``depth`` (H, W) float32 (0 = invalid), optional ``mask``
    (H, W) bool, and pixel intrinsics ``K`` (3, 3) for that grid when the source estimated them."""

    depth: torch.Tensor
    mask: Optional[torch.Tensor] = None
    K: Optional[torch.Tensor] = None
    source: str = ""

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])


@dataclass(frozen=True)
class Scene:
    """A lifted view: the point ``cloud`` (world = OpenCV axes) and the start camera that saw it.

    ``K`` (3, 3) pixel intrinsics for ``width`` x ``height``, ``w2c`` (4, 4) the start camera,
    ``median_depth`` the scene scale m that trajectory moves are measured in, ``image`` the start
    view as uint8 (H, W, 3) when known.
    """

    cloud: PointCloud
    K: torch.Tensor
    w2c: torch.Tensor
    width: int
    height: int
    median_depth: float
    image: Optional[np.ndarray] = None
    label: str = ""


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
