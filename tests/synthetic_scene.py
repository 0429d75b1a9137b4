"""A synthetic scene with exact depth for cache and loop tests: the inside of an axis-aligned box.

Every camera placed inside sees a wall, the floor or the ceiling in every pixel, so depth is
valid everywhere. :meth:`BoxRoom.depth_fn` is a deterministic depth function with the
:data:`worldstereo_core.geometry.depth.DepthFn` signature (optionally with a per-call scale drift,
as monocular metric depth has); :meth:`BoxRoom.image` renders a textured view.
"""
from __future__ import annotations

import numpy as np
import torch

from worldstereo_core.cameras import as_tensor, invert_rigid, pixel_rays


class BoxRoom:
    """Interior of the box [lo, hi] (world units; any axis convention). ``checker`` False gives a
    smooth texture only (for comparisons of resampled images)."""

    def __init__(self, lo, hi, checker: bool = True) -> None:
        self.lo = torch.as_tensor(lo, dtype=torch.float64)
        self.hi = torch.as_tensor(hi, dtype=torch.float64)
        self.checker = checker

    def cast(self, origin, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ray parameter t (...), hit points (..., 3)) of rays origin + t dirs from inside the box."""
        origin = torch.as_tensor(origin, dtype=torch.float64)
        t = torch.full(dirs.shape[:-1], float("inf"), dtype=torch.float64)
        for bound in (self.lo, self.hi):
            for axis in range(3):
                step = dirs[..., axis]
                ta = (bound[axis] - origin[axis]) / torch.where(step.abs() < 1e-12, torch.full_like(step, 1e-12), step)
                t = torch.where((ta > 0) & (ta < t), ta, t)
        return t, origin + dirs * t[..., None]

    def _hits(self, K, w2c, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-depth (H,W), world hit points (H,W,3)) of the pixel-centre rays."""
        K, w2c = as_tensor(K), as_tensor(w2c)
        c2w = invert_rigid(w2c)
        rays = pixel_rays(K, height, width)  # camera frame, z = 1
        return self.cast(c2w[:3, 3], rays @ c2w[:3, :3].T)

    def depth(self, K, w2c, height: int, width: int) -> torch.Tensor:
        return self._hits(K, w2c, height, width)[0].float()

    def colour(self, points: torch.Tensor) -> torch.Tensor:
        """A smooth colour field plus (with ``checker``) a checker pattern (values in [0, 1])."""
        p = points / (self.hi - self.lo)
        base = 0.35 + 0.3 * torch.sin(3.0 * p + torch.tensor([0.0, 1.0, 2.0], dtype=p.dtype))
        if not self.checker:
            return base
        checker = ((torch.floor(p * 8).sum(-1) % 2) * 0.3).unsqueeze(-1)
        return (base + checker).clamp(0, 1)

    def equirect(self, height: int, width: int) -> tuple[np.ndarray, torch.Tensor]:
        """(RGB uint8 (H, W, 3), distance (H, W)) of a z-up equirectangular panorama taken at the
        origin, pixel centres at azimuth 2 pi (1 - (j + 0.5) / W), polar angle pi (i + 0.5) / H."""
        azimuth = 2 * np.pi * (1 - (torch.arange(width, dtype=torch.float64) + 0.5) / width)
        polar = np.pi * (torch.arange(height, dtype=torch.float64) + 0.5) / height
        a, p = azimuth[None, :].expand(height, width), polar[:, None].expand(height, width)
        dirs = torch.stack([p.sin() * a.cos(), p.sin() * a.sin(), p.cos()], dim=-1)
        t, pts = self.cast(torch.zeros(3), dirs)
        return (self.colour(pts) * 255).round().to(torch.uint8).numpy(), t

    def image(self, K, w2c, height: int, width: int) -> np.ndarray:
        _, pts = self._hits(K, w2c, height, width)
        return (self.colour(pts) * 255).round().to(torch.uint8).numpy()

    def surface_distance(self, points) -> torch.Tensor:
        """Distance of points inside the box to its nearest face."""
        p = torch.as_tensor(points, dtype=torch.float64)
        return torch.minimum((p - self.lo).abs(), (self.hi - p).abs()).amin(dim=-1)

    def depth_fn(self, drift=None):
        """A DepthFn returning the exact depth, times ``drift(call_index)`` when given."""
        calls = [0]

        def fn(image, K, w2c):
            h, w = np.asarray(image).shape[:2]
            d = self.depth(K, w2c, h, w)
            if drift is not None:
                d = d * float(drift(calls[0]))
            calls[0] += 1
            return d

        return fn


def room_for_scale(m: float) -> BoxRoom:
    """A room around cameras that orbit the point at depth ``m`` ahead of an origin camera."""
    return BoxRoom([-2.0 * m, -1.6 * m, -1.2 * m], [2.0 * m, 1.0 * m, 3.0 * m])


def panorama_room() -> BoxRoom:
    """A z-up room around a panorama centre at the origin: off-centre (every wall at another
    distance), smooth texture (resampled images compare to a level or two)."""
    return BoxRoom([-2.2, -1.7, -1.4], [1.9, 2.5, 1.3], checker=False)
