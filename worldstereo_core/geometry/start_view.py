"""The start view lifted to a point cloud: the one place where the depth of the start image becomes
the scene's cloud, start camera and scale m (the Lift Depth node, camera control, the loop's
start-view cloud); also from a point map, and the stand-in view of previews without a scene.

The depth counts only under its validity mask: invalid pixels make no points and do not enter the
median depth m that trajectory moves and the cache are measured in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..cameras import CameraTrajectory, as_tensor, intrinsics_from_fov, invert_rigid, scale_intrinsics
from ..constants import DEPTH_CONTRACT_FACTOR, FALLBACK_FOV_DEG, SOBEL_EDGE_THRESHOLD
from ..errors import InputError
from ..io.images import resize_bicubic
from ..io.pointcloud_files import camera_frustum_segments
from .depth import depth_map, lift_depth, points_from_pointmap, resize_depth
from .pointcloud import PointCloud
from .trajectories import median_depth


@dataclass(frozen=True)
class ViewDepth:
    """A z-depth map of one view: ``depth`` (H, W) float32 (0 = invalid), optional ``mask`` (H, W)
    bool, and ``K_normalised`` (3, 3) when the source estimated the camera: intrinsics relative to
    the image size (row 0 divided by the width, row 1 by the height), as MoGe gives them."""

    depth: torch.Tensor
    mask: Optional[torch.Tensor] = None
    K_normalised: Optional[torch.Tensor] = None

    @property
    def height(self) -> int:
        return int(self.depth.shape[0])

    @property
    def width(self) -> int:
        return int(self.depth.shape[1])

    @property
    def K(self) -> Optional[torch.Tensor]:
        """Pixel intrinsics (3, 3) float64 for the map's grid, when known."""
        return None if self.K_normalised is None else start_intrinsics(self, self.width, self.height)

    @property
    def median_depth(self) -> float:
        """The scene scale m: the median of the valid depth under the mask (:func:`.trajectories.median_depth`)."""
        return median_depth(self.depth, self.mask)

    @classmethod
    def of(cls, output: Any) -> "ViewDepth":
        """A depth function's output (:data:`.depth.DepthFn`: a map, or MoGe's dict with its mask and
        normalised intrinsics); a ViewDepth as it is."""
        if isinstance(output, ViewDepth):
            return output
        depth = depth_map(output)
        if not isinstance(output, dict):
            return cls(depth)
        mask, K = output.get("mask"), output.get("intrinsics_normalised")
        return cls(depth, None if mask is None else as_tensor(mask, dtype=torch.bool, device="cpu"),
                   None if K is None else as_tensor(K, device="cpu"))

    def resized(self, height: int, width: int) -> "ViewDepth":
        """The map on a (height, width) grid (nearest, so valid depth never blends with zeros)."""
        if (self.height, self.width) == (height, width):
            return self
        mask = None if self.mask is None else resize_depth(self.mask.float(), height, width) > 0.5
        return ViewDepth(resize_depth(self.depth, height, width), mask, self.K_normalised)


#: Depth of the camera pyramids drawn with a view's cloud, as a fraction of its scale m.
FRUSTUM_FRACTION = 0.1


@dataclass(frozen=True)
class StartView:
    """A lifted start view: the point ``cloud`` (world = OpenCV axes) and the camera that saw it.

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

    def camera_segments(self, trajectory: Optional[CameraTrajectory] = None) -> np.ndarray:
        """Line segments drawing the start camera, or the cameras of ``trajectory``, as pyramids
        :data:`FRUSTUM_FRACTION` x m deep (:func:`..io.pointcloud_files.camera_frustum_segments`)."""
        depth = FRUSTUM_FRACTION * self.median_depth
        if trajectory is None:
            return camera_frustum_segments(invert_rigid(self.w2c)[None], self.K[None], self.width, self.height, depth)
        return camera_frustum_segments(trajectory.c2w, trajectory.K, trajectory.width, trajectory.height, depth)


def start_intrinsics(depth: ViewDepth, width: int, height: int, fov_deg: float = FALLBACK_FOV_DEG) -> torch.Tensor:
    """The start camera's pixel K for a ``width`` x ``height`` image: the depth source's estimate, or
    a centred pinhole with horizontal field of view ``fov_deg``."""
    if depth.K_normalised is not None:
        return scale_intrinsics(depth.K_normalised.double(), (1, 1), (height, width))
    if not 1.0 < fov_deg < 179.0:
        raise InputError(f"fov_deg must be between 1 and 179 degrees, got {fov_deg}")
    return intrinsics_from_fov(width, height, fov_deg)


def lift_start_view(image: np.ndarray, depth: ViewDepth, *, K=None, w2c=None, fov_deg: float = FALLBACK_FOV_DEG,
                    sobel_threshold: float = SOBEL_EDGE_THRESHOLD,
                    contract: float | None = DEPTH_CONTRACT_FACTOR) -> StartView:
    """Lift ``depth`` seen from the start camera with the colours of ``image`` (uint8 (H, W, 3)).

    The depth (and its mask) is resized to the image when their sizes differ. ``K``: pixel
    intrinsics for the image (None: :func:`start_intrinsics`); ``w2c``: the start camera (None:
    identity). ``contract`` None or 0: no depth contraction (see :func:`.depth.lift_depth`).
    """
    height, width = image.shape[:2]
    depth = depth.resized(height, width)
    K = start_intrinsics(depth, width, height, fov_deg) if K is None else as_tensor(K, dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64) if w2c is None else as_tensor(w2c, dtype=torch.float64)
    cloud = lift_depth(depth.depth, image, K, w2c, mask=depth.mask, sobel_threshold=sobel_threshold,
                       contract=contract or None)
    return StartView(cloud=cloud, K=K, w2c=w2c, width=width, height=height,
                     median_depth=depth.median_depth, image=image)


def start_view_from_point_map(image: np.ndarray, points: torch.Tensor, fov_deg: float = FALLBACK_FOV_DEG) -> StartView:
    """The start view of a per-pixel point map (H, W, 3) (:func:`.depth.points_from_pointmap`),
    coloured by ``image`` (resized to the map when needed); m is the median of its finite z."""
    height, width = points.shape[:2]
    if image.shape[:2] != (height, width):
        image = resize_bicubic(image, (height, width))
    return StartView(cloud=points_from_pointmap(points, image), K=intrinsics_from_fov(width, height, fov_deg),
                     w2c=torch.eye(4, dtype=torch.float64), width=width, height=height,
                     median_depth=median_depth(points[..., 2]), image=image)


#: The stand-in start view of trajectory previews without a scene: 768x480, m = 2.
STAND_IN_SIZE = (480, 768)
STAND_IN_DEPTH = 2.0


def stand_in_view() -> StartView:
    """A start camera without points (identity pose, :data:`FALLBACK_FOV_DEG` horizontal field of view)."""
    height, width = STAND_IN_SIZE
    return StartView(cloud=PointCloud.empty(), K=intrinsics_from_fov(width, height, FALLBACK_FOV_DEG),
                     w2c=torch.eye(4, dtype=torch.float64), width=width, height=height, median_depth=STAND_IN_DEPTH)
