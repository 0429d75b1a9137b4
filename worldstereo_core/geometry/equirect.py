"""Equirectangular panoramas: the pixel <-> direction convention, seam-free sampling, perspective
crops (the 27-view panorama bank) and a panorama re-assembled from perspective views.

Convention (the one place for it; world +z up, the frame of the panorama bank; it is the
convention of MoGe's own panorama script):

* pixel (row i, column j) of an H x W panorama has its centre at u = (j + 0.5) / W, v = (i + 0.5) / H;
* azimuth (the bank's yaw) = atan2(d_y, d_x) = 2 pi (1 - u): the centre column looks along -x
  (yaw 180 deg, bank view 0000) and moving right in the image turns right (yaw decreases);
* polar angle = pi v: the top row looks up (+z); elevation (the bank's pitch) = pi / 2 - pi v;
* direction d = (sin(pi v) cos(yaw), sin(pi v) sin(yaw), cos(pi v)).

Sampling is bilinear (or nearest) with the panorama's true neighbours: columns wrap across the
0/360 deg seam, and the row beyond a pole is the first row on the other side of the pole (the same
row, half a turn further round), so nothing shows a seam. A panorama is 2:1 (width = 2 height,
within :data:`ASPECT_TOLERANCE`), with an even width and sides within :func:`sizes.check_image_size`
(at most 16384 x 8192 pixels).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..cameras import CameraTrajectory, as_tensor, pixel_rays
from ..constants import PANO_BANK_SIZE
from ..errors import InputError
from ..sizes import check_image_size
from .trajectories import panorama_bank_cameras

#: Accepted deviation of width / height from 2.
ASPECT_TOLERANCE = 0.01


def check_panorama_size(height: int, width: int, what: str = "panorama") -> tuple[int, int]:
    """(height, width) of a valid equirectangular panorama, or an InputError naming the fix."""
    height, width = check_image_size(height, width, what)
    if abs(width / height - 2.0) > 2.0 * ASPECT_TOLERANCE or width % 2:
        raise InputError(f"{what}: {width}x{height} is not an equirectangular panorama; it must be 2:1 "
                         "(width = 2 x height, even width), e.g. 4096x2048. Resize or pad it to 2:1")
    return height, width


# --------------------------------------------------------------------------------------------
# Pixel <-> direction
# --------------------------------------------------------------------------------------------

def uv_to_directions(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit directions (..., 3) of normalised panorama coordinates u, v in [0, 1]."""
    yaw, polar = 2.0 * math.pi * (1.0 - u), math.pi * v
    return torch.stack([polar.sin() * yaw.cos(), polar.sin() * yaw.sin(), polar.cos()], dim=-1)


def directions_to_uv(dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised panorama coordinates (u in [0, 1), v in [0, 1]) of directions (..., 3) (any length)."""
    d = dirs / dirs.norm(dim=-1, keepdim=True)
    u = torch.remainder(1.0 - torch.atan2(d[..., 1], d[..., 0]) / (2.0 * math.pi), 1.0)
    v = torch.arccos(d[..., 2].clamp(-1.0, 1.0)) / math.pi
    return u, v


def equirect_directions(height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit directions (H, W, 3) of the pixel centres of an H x W panorama."""
    v = (torch.arange(height, dtype=dtype) + 0.5) / height
    u = (torch.arange(width, dtype=dtype) + 0.5) / width
    return uv_to_directions(u[None, :].expand(height, width), v[:, None].expand(height, width))


def pixel_solid_angles(height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Solid angle (H,) of one pixel of each panorama row (they sum to 4 pi over the image)."""
    edges = torch.arange(height + 1, dtype=dtype) * (math.pi / height)
    return (edges[:-1].cos() - edges[1:].cos()) * (2.0 * math.pi / width)


# --------------------------------------------------------------------------------------------
# Seam-free sampling
# --------------------------------------------------------------------------------------------

def _pixels(panorama) -> torch.Tensor:
    """(H, W, C) tensor of a panorama given as (H, W), (H, W, C) array or tensor (any dtype)."""
    p = panorama if isinstance(panorama, torch.Tensor) else torch.from_numpy(np.require(panorama, requirements=("C", "W")))
    if p.dim() == 2:
        p = p[..., None]
    if p.dim() != 3:
        raise InputError(f"panorama must be (H, W) or (H, W, C); got shape {tuple(p.shape)}")
    check_panorama_size(p.shape[0], p.shape[1])
    return p


def _fetch(flat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixels at integer (rows, cols) with rows in [-1, H]: columns wrap, a row past a pole is the
    row on the other side of it, half a turn round."""
    over = (rows < 0) | (rows >= height)
    rows = torch.where(rows < 0, -1 - rows, torch.where(rows >= height, 2 * height - 1 - rows, rows))
    cols = torch.remainder(cols + over * (width // 2), width)
    return flat.index_select(0, (rows * width + cols).reshape(-1)).reshape(rows.shape + flat.shape[1:])


def sample_equirect(panorama, dirs, mode: str = "bilinear") -> torch.Tensor:
    """Sample a panorama (H, W[, C]) along world directions (..., 3); returns (..., C) float32
    (values in the panorama's own units, e.g. 0..255 for uint8), seam-free (module docstring)."""
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"mode must be 'bilinear' or 'nearest'; got {mode!r}")
    p = _pixels(panorama)
    height, width, channels = p.shape
    flat = p.reshape(-1, channels)
    u, v = directions_to_uv(as_tensor(dirs, dtype=torch.float64))
    x, y = u * width - 0.5, v * height - 0.5
    if mode == "nearest":
        rows = torch.round(y).long().clamp(0, height - 1)
        return _fetch(flat, rows, torch.round(x).long(), height, width).float()
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    c0, r0 = x0.long(), y0.long()
    out = 0.0
    for dr, wr in ((0, 1.0 - fy), (1, fy)):
        for dc, wc in ((0, 1.0 - fx), (1, fx)):
            out = out + (wr * wc) * _fetch(flat, r0 + dr, c0 + dc, height, width).double()
    return out.float()


def _as_output(values: torch.Tensor, like) -> np.ndarray | torch.Tensor:
    """uint8 panoramas give uint8 numpy crops (rounded); anything else float32 of the same kind."""
    if (isinstance(like, np.ndarray) and like.dtype == np.uint8) or (
            isinstance(like, torch.Tensor) and like.dtype == torch.uint8):
        u8 = values.round().clamp(0, 255).to(torch.uint8)
        return u8.numpy() if isinstance(like, np.ndarray) else u8
    return values.numpy() if isinstance(like, np.ndarray) else values


# --------------------------------------------------------------------------------------------
# Perspective crops
# --------------------------------------------------------------------------------------------

def perspective_from_equirect(panorama, cameras: CameraTrajectory, mode: str = "bilinear"):
    """Perspective views (F, H, W, C) of a panorama seen by ``cameras`` (size from the trajectory).

    Only the rotations are used: every camera sits at the panorama's centre. Pixel centres are
    (u + 0.5, v + 0.5) as everywhere in the pack. uint8 panoramas give uint8 views, others float32.
    """
    rays = pixel_rays(cameras.K, cameras.height, cameras.width)  # F, H, W, 3 (camera frame)
    R_c2w = cameras.w2c[:, :3, :3].transpose(-1, -2)
    views = [sample_equirect(panorama, rays[f] @ R_c2w[f].T, mode) for f in range(len(cameras))]
    return _as_output(torch.stack(views), panorama)


def panorama_bank_crops(panorama, width: int = PANO_BANK_SIZE[1], height: int = PANO_BANK_SIZE[0]
                        ) -> tuple[list[str], CameraTrajectory, np.ndarray | torch.Tensor]:
    """The 27 bank views of a panorama: (keys, cameras, images (27, height, width, C)).

    Cameras are :func:`trajectories.panorama_bank_cameras` (the release's pano_bank/cameras.json).
    """
    keys, cams = panorama_bank_cameras(width, height)
    return keys, cams, perspective_from_equirect(panorama, cams)


# --------------------------------------------------------------------------------------------
# Perspective views -> panorama
# --------------------------------------------------------------------------------------------

def project_directions(dirs: torch.Tensor, cameras: CameraTrajectory) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous pixel positions (F, ..., 2) of directions (..., 3) in each camera at the origin,
    and the cosine (F, ...) between each direction and the camera's optical axis."""
    d = dirs / dirs.norm(dim=-1, keepdim=True)
    R = cameras.w2c[:, :3, :3].to(d.dtype)
    K = cameras.K.to(d.dtype)
    cam = torch.einsum("fij,...j->f...i", R, d)
    z = cam[..., 2]
    safe = torch.where(z > 1e-9, z, torch.ones_like(z))
    shape = (len(R),) + (1,) * (d.dim() - 1)
    x = K[:, 0, 0].reshape(shape) * cam[..., 0] / safe + K[:, 0, 2].reshape(shape)
    y = K[:, 1, 1].reshape(shape) * cam[..., 1] / safe + K[:, 1, 2].reshape(shape)
    return torch.stack([x, y], dim=-1), z


def sample_image(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of a perspective image (H, W, C) at continuous pixel positions (..., 2)
    (pixel centres at +0.5), clamped at the border; returns (..., C) float64."""
    height, width, channels = image.shape
    flat = image.reshape(-1, channels)
    x, y = xy[..., 0] - 0.5, xy[..., 1] - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    out = 0.0
    for dr, wr in ((0, 1.0 - fy), (1, fy)):
        for dc, wc in ((0, 1.0 - fx), (1, fx)):
            r = (y0.long() + dr).clamp(0, height - 1)
            c = (x0.long() + dc).clamp(0, width - 1)
            out = out + (wr * wc) * flat.index_select(0, (r * width + c).reshape(-1)).reshape(
                r.shape + (channels,)).double()
    return out


def equirect_from_views(images, cameras: CameraTrajectory, height: int, width: int
                        ) -> tuple[np.ndarray | torch.Tensor, torch.Tensor]:
    """Re-assemble an H x W panorama from perspective views taken at its centre.

    ``images`` (F, h, w, C) seen by ``cameras`` (rotation only). Each panorama pixel takes the view
    whose optical axis is closest to its direction among the views that contain it (bilinear).
    Returns (panorama, covered (H, W) bool); uncovered pixels are 0. uint8 in, uint8 out.
    """
    height, width = check_panorama_size(height, width, "panorama size")
    imgs = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.require(images, requirements=("C", "W")))
    if imgs.dim() == 3:
        imgs = imgs[..., None]
    if imgs.dim() != 4 or len(imgs) != len(cameras) or imgs.shape[1:3] != (cameras.height, cameras.width):
        raise InputError(f"images must be ({len(cameras)}, {cameras.height}, {cameras.width}, C) like the cameras; "
                         f"got shape {tuple(imgs.shape)}")
    dirs = equirect_directions(height, width)
    xy, cos = project_directions(dirs, cameras)
    inside = (cos > 1e-6) & (xy[..., 0] >= 0) & (xy[..., 0] <= cameras.width) & (xy[..., 1] >= 0) \
        & (xy[..., 1] <= cameras.height)
    score = torch.where(inside, cos, torch.full_like(cos, -2.0))
    best = score.argmax(dim=0)
    covered = inside.any(dim=0)
    out = torch.zeros(height, width, imgs.shape[-1], dtype=torch.float64)
    for f in range(len(cameras)):
        sel = covered & (best == f)
        if bool(sel.any()):
            out[sel] = sample_image(imgs[f], xy[f][sel])
    return _as_output(out.float(), images), covered
