"""Camera conventions: the one place that defines them.

* Axes are OpenCV: +x right, +y down, +z forward.
* World up (:data:`WORLD_UP`): -y in single-view and reconstruction worlds, +z in panorama worlds.
* ``w2c`` (world-to-camera) 4x4 is what every WorldStereo camera file stores; ``c2w`` is its inverse.
* ``K`` is a 3x3 pixel intrinsic matrix for a given image size; rescaling multiplies row 0 by
  W'/W and row 1 by H'/H (no half-pixel correction).
* Depth unprojection samples pixel centres (u + 0.5, v + 0.5); the Plücker ray map uses the
  reference's asymmetric grid (u - 0.5, v + 0.5), which is what the released weights saw.
* Quaternions are (w, x, y, z) with w >= 0 unless a function says otherwise.

Everything here works on torch tensors (any float dtype, optional leading batch dims) and also
accepts numpy arrays or nested lists, which are converted with :func:`as_tensor`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from .constants import CAMERA_SCALE
from .errors import InputError

#: World up directions by name, as unit vectors in world coordinates.
UP_VECTORS: dict[str, tuple[float, float, float]] = {
    "-y": (0.0, -1.0, 0.0), "+z": (0.0, 0.0, 1.0), "+y": (0.0, 1.0, 0.0),
}
#: Up direction of each kind of world: single-view and reconstruction worlds are OpenCV camera
#: frames (y down, so up is -y); panorama worlds are z-up.
WORLD_UP: dict[str, str] = {"reconstruction": "-y", "panorama": "+z"}


def world_up_vector(kind: str) -> tuple[float, float, float]:
    """Unit up vector of a kind of world (a key of :data:`WORLD_UP`)."""
    return UP_VECTORS[WORLD_UP[kind]]


def world_down_vector(kind: str) -> tuple[float, float, float]:
    """Unit down vector of a kind of world: where an unrolled camera's +y points."""
    return tuple(-c for c in world_up_vector(kind))


def as_tensor(x, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Convert ``x`` (tensor, ndarray or nested list) to a tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype, device=device if device is not None else x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Rigid transforms
# --------------------------------------------------------------------------------------------

def invert_rigid(T) -> torch.Tensor:
    """Inverse of rigid 4x4 transform(s) ``[R|t]`` as ``[R^T | -R^T t]`` (batched)."""
    T = as_tensor(T, dtype=T.dtype if isinstance(T, torch.Tensor) and T.is_floating_point() else torch.float64)
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    Rt = R.transpose(-1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def make_pose(R, t) -> torch.Tensor:
    """Assemble 4x4 pose(s) from rotation(s) (...,3,3) and translation(s) (...,3)."""
    R = as_tensor(R)
    t = as_tensor(t, dtype=R.dtype, device=R.device)
    T = torch.zeros(R.shape[:-2] + (4, 4), dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def camera_centers(w2c) -> torch.Tensor:
    """Camera centres in world coordinates, ``-R^T t`` (..., 3)."""
    w2c = as_tensor(w2c, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) else torch.float64)
    R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
    return (-R.transpose(-1, -2) @ t)[..., 0]


def rigidity_error(T) -> float:
    """Max deviation of ``T`` from a rigid transform: |R^T R - I|, |det R - 1|, bottom row."""
    T = as_tensor(T)
    R = T[..., :3, :3]
    eye = torch.eye(3, dtype=T.dtype)
    orth = (R.transpose(-1, -2) @ R - eye).abs().amax().item() if T.numel() else 0.0
    det = (torch.linalg.det(R) - 1).abs().amax().item() if T.numel() else 0.0
    bottom = (T[..., 3, :] - torch.tensor([0, 0, 0, 1.0], dtype=T.dtype)).abs().amax().item() if T.numel() else 0.0
    return max(orth, det, bottom)


# --------------------------------------------------------------------------------------------
# Elementary rotations (right-handed: a positive angle turns counter-clockwise seen from the axis tip)
# --------------------------------------------------------------------------------------------

def rot_x(theta: float, dtype=torch.float64) -> torch.Tensor:
    """Rotation about +x by ``theta`` radians: [[1,0,0],[0,c,-s],[0,s,c]]."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=dtype)


def rot_y(phi: float, dtype=torch.float64) -> torch.Tensor:
    """Rotation about +y by ``phi`` radians: [[c,0,s],[0,1,0],[-s,0,c]]."""
    c, s = math.cos(phi), math.sin(phi)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=dtype)


def rot_z(psi: float, dtype=torch.float64) -> torch.Tensor:
    """Rotation about +z by ``psi`` radians: [[c,-s,0],[s,c,0],[0,0,1]]."""
    c, s = math.cos(psi), math.sin(psi)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=dtype)


def axis_angle_matrix(axis, angle: float, dtype=torch.float64) -> torch.Tensor:
    """Right-hand rotation by ``angle`` radians about unit ``axis`` (Rodrigues)."""
    a = as_tensor(axis, dtype=dtype)
    a = a / a.norm()
    x, y, z = a.tolist()
    K = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=dtype)
    return torch.eye(3, dtype=dtype) + math.sin(angle) * K + (1 - math.cos(angle)) * (K @ K)


def look_at_rotation(center, target, up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """Camera-to-world rotation looking from ``center`` at ``target`` (OpenCV axes).

    Columns: z = normalise(target - center), x = normalise(up x z), y = normalise(z x x); if x
    degenerates (up parallel to z), x = normalise(y x z) with y = up.
    """
    center, target = as_tensor(center), as_tensor(target)
    up = as_tensor(up, dtype=center.dtype)
    z = target - center
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(up.expand_as(z), z, dim=-1)
    xn = x.norm(dim=-1, keepdim=True)
    degenerate = xn < 1e-5
    if bool(degenerate.any()):  # up parallel to the view direction: pick x from another axis
        alt = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=z.dtype).expand_as(z), z, dim=-1)
        alt = torch.where(alt.norm(dim=-1, keepdim=True) < 1e-5,
                          torch.tensor([1.0, 0.0, 0.0], dtype=z.dtype).expand_as(z), alt)
        x = torch.where(degenerate, alt, x)
        xn = x.norm(dim=-1, keepdim=True)
    x = x / xn
    y = torch.linalg.cross(z, x, dim=-1)
    y = y / y.norm(dim=-1, keepdim=True)
    return torch.stack([x, y, z], dim=-1)


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------

def scale_intrinsics(K, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Rescale pixel intrinsics from image size ``src_hw`` (H, W) to ``dst_hw`` (H', W')."""
    K = as_tensor(K, dtype=K.dtype if isinstance(K, torch.Tensor) and K.is_floating_point() else torch.float64).clone()
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    K[..., 0, :] = K[..., 0, :] * sx
    K[..., 1, :] = K[..., 1, :] * sy
    return K


def intrinsics_from_fov(width: int, height: int, fov_x_deg: float, fov_y_deg: float | None = None) -> torch.Tensor:
    """Centred pinhole K from horizontal (and optionally vertical) field of view in degrees."""
    fx = (width / 2) / math.tan(math.radians(fov_x_deg) / 2)
    fy = fx if fov_y_deg is None else (height / 2) / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor([[fx, 0, width / 2], [0, fy, height / 2], [0, 0, 1]], dtype=torch.float64)


def subsample_indices(n: int, nframe: int) -> list[int]:
    """Indices ``floor(linspace(0, n-1, nframe))`` used to subsample per-frame arrays to ``nframe``."""
    if n <= nframe:
        return list(range(n))
    return np.floor(np.linspace(0, n - 1, nframe)).astype(int).tolist()


# --------------------------------------------------------------------------------------------
# Projection / unprojection
# --------------------------------------------------------------------------------------------

def world_to_camera(points, w2c) -> torch.Tensor:
    """Transform world points (N,3) into each camera: returns (..., N, 3) for w2c (..., 4, 4)."""
    points = as_tensor(points, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) else torch.float64)
    w2c = as_tensor(w2c, dtype=points.dtype, device=points.device)
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    return points @ R.transpose(-1, -2) + t.unsqueeze(-2)


def project_points(points, K, w2c) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into pixel coordinates.

    Returns ``(uv, z)`` with ``uv`` (..., N, 2) in continuous pixel units (pixel i spans
    [i, i+1), its centre at i + 0.5) and ``z`` (..., N) the view depth.
    """
    cam = world_to_camera(points, w2c)
    K = as_tensor(K, dtype=cam.dtype, device=cam.device)
    z = cam[..., 2]
    x, y = cam[..., 0] / z, cam[..., 1] / z
    u = K[..., 0, 0, None] * x + K[..., 0, 1, None] * y + K[..., 0, 2, None]
    v = K[..., 1, 1, None] * y + K[..., 1, 2, None]
    return torch.stack([u, v], dim=-1), z


def pixel_rays(K, height: int, width: int, offset: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """Camera-frame rays ``K^-1 (u + ox, v + oy, 1)`` for every pixel, shape (..., H, W, 3)."""
    K = as_tensor(K, dtype=K.dtype if isinstance(K, torch.Tensor) and K.is_floating_point() else torch.float64)
    v, u = torch.meshgrid(
        torch.arange(height, dtype=K.dtype, device=K.device),
        torch.arange(width, dtype=K.dtype, device=K.device),
        indexing="ij",
    )
    pix = torch.stack([u + offset[0], v + offset[1], torch.ones_like(u)], dim=-1)  # H,W,3
    Kinv = torch.linalg.inv(K)
    return torch.einsum("...ij,hwj->...hwi", Kinv, pix)


def unproject_depth(depth, K, c2w) -> torch.Tensor:
    """World points (H, W, 3) of a z-depth map through pixel centres (u + 0.5, v + 0.5)."""
    depth = as_tensor(depth, dtype=depth.dtype if isinstance(depth, torch.Tensor) and depth.is_floating_point() else torch.float64)
    K = as_tensor(K, dtype=depth.dtype, device=depth.device)
    c2w = as_tensor(c2w, dtype=depth.dtype, device=depth.device)
    H, W = depth.shape[-2:]
    cam = pixel_rays(K, H, W) * depth[..., None]
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


# --------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------

def matrix_to_quaternion(R) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) to unit quaternions (w, x, y, z) with w >= 0."""
    R = as_tensor(R, dtype=R.dtype if isinstance(R, torch.Tensor) and R.is_floating_point() else torch.float64)
    m = R.reshape(R.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    q_abs = torch.sqrt(torch.clamp(torch.stack([
        1.0 + m00 + m11 + m22,
        1.0 + m00 - m11 - m22,
        1.0 - m00 + m11 - m22,
        1.0 - m00 - m11 + m22,
    ], dim=-1), min=0.0))
    cands = torch.stack([
        torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
    ], dim=-2)
    cands = cands / (2.0 * q_abs[..., None].clamp_min(0.1))
    best = q_abs.argmax(dim=-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q) -> torch.Tensor:
    """Unit quaternions (w, x, y, z) to rotation matrices (..., 3, 3)."""
    q = as_tensor(q, dtype=q.dtype if isinstance(q, torch.Tensor) and q.is_floating_point() else torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


# --------------------------------------------------------------------------------------------
# Camera normalisation, pose tokens and Plücker maps (model conditioning)
# --------------------------------------------------------------------------------------------

def _center_and_scale(w2c: torch.Tensor, stats_w2c: torch.Tensor, scale: float) -> torch.Tensor:
    """Shift camera centres by the mean inlier centre of ``stats_w2c`` and scale translations.

    Both inputs are already expressed relative to the first target camera (identity).
    """
    centers = camera_centers(stats_w2c)
    median = centers.median(dim=0).values  # torch.median: lower middle value
    dist = (centers - median).norm(dim=-1)
    thresh = min(10.0 * torch.quantile(dist, 0.97).item(), 1e6)
    valid = dist <= thresh
    mean = centers[valid].mean(dim=0) if bool(valid.any()) else centers.mean(dim=0)
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    t = t + (R @ mean[:, None])[..., 0]  # centre c -> c - mean  <=>  t -> t + R mean
    c0 = mean.norm()  # centre of frame 0 (origin) after the shift is -mean
    factor = scale if torch.isclose(c0, torch.zeros_like(c0), atol=1e-5) else scale / c0
    out = w2c.clone()
    out[..., :3, 3] = t * factor
    return out


def camera_center_normalization(w2c, scale: float = CAMERA_SCALE) -> torch.Tensor:
    """Normalise a w2c sequence (F,4,4): frame 0 -> identity, centre on inlier mean, |c0| -> scale."""
    w2c = as_tensor(w2c, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) and w2c.is_floating_point() else torch.float64)
    rel = w2c @ invert_rigid(w2c[0])
    return _center_and_scale(rel, rel, scale)


def unified_camera_normalization(w2c, w2c_ref, scale: float = CAMERA_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise targets and references jointly; statistics and scale come from the targets only."""
    w2c = as_tensor(w2c, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) and w2c.is_floating_point() else torch.float64)
    w2c_ref = as_tensor(w2c_ref, dtype=w2c.dtype, device=w2c.device)
    c2w0 = invert_rigid(w2c[0])
    rel, rel_ref = w2c @ c2w0, w2c_ref @ c2w0
    both = torch.cat([rel, rel_ref], dim=0)
    out = _center_and_scale(both, rel, scale)
    return out[: len(rel)], out[len(rel):]


def camera_qt(w2c) -> torch.Tensor:
    """Pose tokens (F, 7) = [q_w, q_x, q_y, q_z, t_x, t_y, t_z] of (already normalised) w2c."""
    w2c = as_tensor(w2c, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) and w2c.is_floating_point() else torch.float64)
    return torch.cat([matrix_to_quaternion(w2c[..., :3, :3]), w2c[..., :3, 3]], dim=-1)


def plucker_embedding(K, w2c, height: int, width: int, normalize: bool = True,
                      scale: float = CAMERA_SCALE, name: str = "trajectory") -> torch.Tensor:
    """Per-pixel Plücker rays ``[d, o x d]`` of shape (1, 6, F, H, W) (reference layout).

    ``K`` (F,3,3) is in pixels of the (H, W) grid; the grid is (u - 0.5, v + 0.5) as in the
    reference. With ``normalize`` the cameras first go through :func:`camera_center_normalization`.
    A camera with NaN/inf values, or one whose rays are not finite (singular K), raises an
    InputError naming ``name`` and the frame.
    """
    w2c = as_tensor(w2c, dtype=w2c.dtype if isinstance(w2c, torch.Tensor) and w2c.is_floating_point() else torch.float64)
    K = as_tensor(K, dtype=w2c.dtype, device=w2c.device)
    if K.dim() == 2:
        K = K.expand(w2c.shape[0], 3, 3)
    for what, value in (("w2c", w2c), ("K", K)):
        bad = ~torch.isfinite(value).flatten(1).all(dim=1)
        if bool(bad.any()):
            raise InputError(f"{name}: camera {int(bad.nonzero()[0])} has NaN or infinite values in its {what}; "
                             "fix the camera file or the trajectory that made it")
    if normalize:
        w2c = camera_center_normalization(w2c, scale)
    c2w = invert_rigid(w2c)
    dirs = pixel_rays(K, height, width, offset=(-0.5, 0.5))  # F,H,W,3 camera frame
    dirs = torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], dirs)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = c2w[:, None, None, :3, 3].expand_as(dirs)
    emb = torch.cat([dirs, torch.linalg.cross(origin, dirs, dim=-1)], dim=-1)  # F,H,W,6
    emb = emb.permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    bad = ~torch.isfinite(emb[0]).flatten(2).all(dim=2).all(dim=0)
    if bool(bad.any()):
        raise InputError(f"{name}: camera {int(bad.nonzero()[0])} gives non-finite Plücker rays (a singular "
                         "intrinsic matrix K, or cameras too far apart to normalise); check its K and pose")
    return emb


# --------------------------------------------------------------------------------------------
# PyTorch3D camera convention (for optional comparison with pytorch3d's renderer)
# --------------------------------------------------------------------------------------------

def opencv_to_pytorch3d(w2c) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) for ``pytorch3d.renderer.PerspectiveCameras`` from OpenCV w2c (row-vector convention)."""
    c2w = invert_rigid(as_tensor(w2c))
    c2w[..., :3, 0:2] *= -1
    w2c_p3d = invert_rigid(c2w)
    return c2w[..., :3, :3], w2c_p3d[..., :3, 3]


# --------------------------------------------------------------------------------------------
# A camera sequence (what a camera.json holds)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CameraTrajectory:
    """A sequence of pinhole cameras: w2c (F,4,4) and pixel K (F,3,3) for a ``height`` x ``width`` image.

    Immutable: the fields cannot be reassigned and every method returns a new trajectory (do not
    modify the tensors in place either: :attr:`c2w` is computed once and kept). ``meta`` keeps
    every other field of the source file (``motion_list``, ``id``, ``type``, ``eloop_rotation``
    ...) so a round trip through camera.json preserves it.
    """

    w2c: torch.Tensor
    K: torch.Tensor
    width: int
    height: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        w2c = as_tensor(self.w2c)
        K = as_tensor(self.K)
        if K.dim() == 2:
            K = K.expand(w2c.shape[0], 3, 3).clone()
        if w2c.dim() != 3 or w2c.shape[1:] != (4, 4) or K.shape != (w2c.shape[0], 3, 3):
            raise InputError(f"a camera trajectory needs w2c (F,4,4) and K (F,3,3) or (3,3); got "
                             f"{tuple(w2c.shape)} and {tuple(K.shape)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InputError(f"a camera trajectory needs its image {name} (a positive whole number of pixels "
                                 f"its K refers to); got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "w2c", w2c)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "meta", dict(self.meta))

    def __len__(self) -> int:
        return int(self.w2c.shape[0])

    @cached_property
    def c2w(self) -> torch.Tensor:
        """Camera-to-world poses (F,4,4), inverted once per trajectory."""
        return invert_rigid(self.w2c)

    @property
    def centers(self) -> torch.Tensor:
        return self.c2w[..., :3, 3]

    def select(self, indices: Sequence[int]) -> "CameraTrajectory":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return replace(self, w2c=self.w2c[idx].clone(), K=self.K[idx].clone())

    def subsample(self, nframe: int) -> "CameraTrajectory":
        """Keep ``floor(linspace(0, F-1, nframe))`` frames (no-op when F <= nframe)."""
        return self.select(subsample_indices(len(self), nframe))

    def resized(self, height: int, width: int) -> "CameraTrajectory":
        """The same cameras with K rescaled to a (height, width) image."""
        if (height, width) == (self.height, self.width):
            return self
        K = scale_intrinsics(self.K, (self.height, self.width), (height, width))
        out = replace(self, K=K, width=width, height=height)
        if "c2w" in self.__dict__:  # the same poses: keep their inverse
            out.__dict__["c2w"] = self.__dict__["c2w"]
        return out

    def with_w2c(self, w2c) -> "CameraTrajectory":
        """The same intrinsics, size and meta with other poses."""
        return replace(self, w2c=w2c)


# --------------------------------------------------------------------------------------------
# Unprojection of arbitrary pixel positions
# --------------------------------------------------------------------------------------------

def unproject_pixels(uv, depth, K, c2w) -> torch.Tensor:
    """World points (..., N, 3) of continuous pixel positions ``uv`` (..., N, 2) at z-depth ``depth``.

    ``uv`` uses the same continuous pixel units as :func:`project_points` (no half-pixel offset is
    added: pass u + 0.5 for a pixel centre, (0, 0) / (W, H) for the image corners). ``K`` (..., 3, 3),
    ``c2w`` (..., 4, 4); ``depth`` broadcasts against (..., N).
    """
    uv = as_tensor(uv, dtype=uv.dtype if isinstance(uv, torch.Tensor) and uv.is_floating_point() else torch.float64)
    K = as_tensor(K, dtype=uv.dtype, device=uv.device)
    c2w = as_tensor(c2w, dtype=uv.dtype, device=uv.device)
    depth = as_tensor(depth, dtype=uv.dtype, device=uv.device)
    pix = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    cam = pix @ torch.linalg.inv(K).transpose(-1, -2) * depth[..., None]
    return cam @ c2w[..., :3, :3].transpose(-1, -2) + c2w[..., None, :3, 3]


# --------------------------------------------------------------------------------------------
# Re-anchoring a trajectory
# --------------------------------------------------------------------------------------------

def anchor_w2c(w2c, first_w2c, translation_scale: float = 1.0) -> torch.Tensor:
    """Move a trajectory so that its first camera becomes ``first_w2c``, keeping every camera's
    pose relative to the first; relative translations are multiplied by ``translation_scale``.

    ``w2c`` (F, 4, 4), ``first_w2c`` (4, 4). With ``T_i = w2c_i @ inv(w2c_0)`` (camera 0 -> camera
    i) the result is ``T_i' @ first_w2c``, where ``T_i'`` has its translation scaled.
    """
    w2c = as_tensor(w2c)
    first = as_tensor(first_w2c, dtype=w2c.dtype, device=w2c.device)
    rel = w2c @ invert_rigid(w2c[0])
    rel[..., :3, 3] = rel[..., :3, 3] * float(translation_scale)
    return rel @ first
