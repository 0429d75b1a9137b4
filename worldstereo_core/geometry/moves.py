"""Primitive camera moves of the reference's trajectory vocabulary (its ``camera_utils``).

Every function takes and returns **camera-to-world** 4x4 poses (OpenCV axes, see
:mod:`worldstereo_core.cameras`) as float64 torch tensors; angles are in radians.

Sign semantics of the native orbit: ``phi > 0`` moves the camera to its left (-x) while turning it
to look right, ``phi < 0`` the opposite; ``theta < 0`` raises it (-y) and tilts it down,
``theta > 0`` lowers it and tilts it up. The pivot is the point at depth ``m`` on the optical axis.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.spatial.transform import Rotation, Slerp

from ..cameras import as_tensor, axis_angle_matrix, make_pose, rot_x, rot_y, world_up_vector
from ..errors import InputError


def _pose(c2w) -> torch.Tensor:
    return as_tensor(c2w, dtype=torch.float64)


def _translation(t: Sequence[float]) -> torch.Tensor:
    return make_pose(torch.eye(3, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))


def native_camera_rotation(c2w, median_depth: float, phi: float, theta: float) -> torch.Tensor:
    """Orbit the pivot at depth ``median_depth`` on the optical axis: ``c2w T(0,0,m) Ry(phi) Rx(theta) T(0,0,-m)``."""
    m = float(median_depth)
    local = _translation((0.0, 0.0, m)) @ make_pose(rot_y(phi) @ rot_x(theta), torch.zeros(3)) \
        @ _translation((0.0, 0.0, -m))
    return _pose(c2w) @ local


def camera_backward_forward(c2w, distance: float) -> torch.Tensor:
    """Move the centre by ``distance`` along the camera's z axis (positive = forward)."""
    out = _pose(c2w).clone()
    out[:3, 3] += float(distance) * out[:3, 2]
    return out


def camera_left_right(c2w, distance: float) -> torch.Tensor:
    """Move the centre by ``distance`` along the camera's x axis (positive = right)."""
    out = _pose(c2w).clone()
    out[:3, 3] += float(distance) * out[:3, 0]
    return out


def rotate_cam2world_around_axis(c2w, axis, angle: float, point) -> torch.Tensor:
    """Left-multiply ``[R | p - R p]``: rotate the whole pose by ``angle`` about ``axis`` through ``point``."""
    R = axis_angle_matrix(axis, angle)
    p = as_tensor(point)
    return make_pose(R, p - R @ p) @ _pose(c2w)


def camera_rotation(c2w, median_depth: float, phi: float, theta: float, *, up=None) -> torch.Tensor:
    """Azimuth/elevation move: the reference dispatcher, or an azimuth about a world up axis.

    ``up=None`` is the reference behaviour: when ``c2w[2,3] != 0`` and ``phi != 0`` the pose is
    rotated by ``-phi`` about world +z through ``(c2w (0,0,m,1)).xy`` (z = 0) and ``theta`` is not
    used (the world-z branch, meant for z-up panorama frames); otherwise it is the native orbit.

    ``up`` = a world up vector (:func:`cameras.world_up_vector`):
    elevation by the native orbit, then azimuth by ``-phi`` about ``up`` through the pivot. For a
    camera with no pitch this equals the native orbit; for a pitched one it adds no roll.
    """
    c2w = _pose(c2w)
    m = float(median_depth)
    if up is None:
        if float(c2w[2, 3]) != 0.0 and phi != 0.0:
            pivot = (c2w @ torch.tensor([0.0, 0.0, m, 1.0], dtype=torch.float64))[:3].clone()
            pivot[2] = 0.0
            return rotate_cam2world_around_axis(c2w, world_up_vector("panorama"), -phi, pivot)
        return native_camera_rotation(c2w, m, phi, theta)
    if theta != 0.0:
        c2w = native_camera_rotation(c2w, m, 0.0, theta)
    if phi != 0.0:
        pivot = (c2w @ torch.tensor([0.0, 0.0, m, 1.0], dtype=torch.float64))[:3]
        c2w = rotate_cam2world_around_axis(c2w, up, -phi, pivot)
    return c2w


def interpolate_poses(poses, n_out: int) -> torch.Tensor:
    """Resample N poses (N,4,4) to ``n_out``: uniform t in [0,1], SLERP rotations, linear translations."""
    poses = _pose(poses)
    if poses.dim() != 3 or poses.shape[1:] != (4, 4) or len(poses) == 0:
        raise InputError(f"interpolate_poses needs (N, 4, 4) poses with N >= 1, got {tuple(poses.shape)}")
    if n_out < 1:
        raise InputError(f"interpolate_poses: n_out must be >= 1, got {n_out}")
    if len(poses) == 1:
        return poses.expand(n_out, 4, 4).clone()
    arr = poses.cpu().numpy()
    t_in, t_out = np.linspace(0.0, 1.0, len(arr)), np.linspace(0.0, 1.0, n_out)
    R = Slerp(t_in, Rotation.from_matrix(arr[:, :3, :3]))(t_out).as_matrix()
    t = np.stack([np.interp(t_out, t_in, arr[:, i, 3]) for i in range(3)], axis=-1)
    return make_pose(torch.from_numpy(R), torch.from_numpy(t))


def compute_lookat_xy_angle(c2w_R) -> torch.Tensor:
    """Degrees between the optical axis and the world xy-plane: ``arcsin(|R[2,2]| / |R[:,2]|)``."""
    R = as_tensor(c2w_R, dtype=torch.float64)
    z = R[..., :, 2]
    return torch.rad2deg(torch.arcsin((z[..., 2].abs() / z.norm(dim=-1)).clamp(max=1.0)))
