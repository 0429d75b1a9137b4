"""Camera frustums as retrieval sees them: the axis-aligned box around each frustum's corners (the
four image corners at ray length ``near`` and ``far``) and the viewing direction (the c2w z axis),
in float32 like the reference, since exact score ties depend on that rounding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cameras import as_tensor
from ..constants import FRUSTUM_FAR, FRUSTUM_NEAR
from ..errors import InputError

#: Dtype of every retrieval score (the reference's precision; ties depend on it).
SCORE_DTYPE = torch.float32


def frustum_corners(w2c, K, width: int, height: int, near: float = FRUSTUM_NEAR,
                    far: float = FRUSTUM_FAR) -> torch.Tensor:
    """World positions (..., 8, 3) of the frustum corners: 4 near then 4 far, float32.

    Image corners (0,0), (W,0), (W,H), (0,H) are unprojected with ``K^-1``, normalised to unit
    rays and placed at ray length ``near`` / ``far``.
    """
    w2c = as_tensor(w2c, dtype=SCORE_DTYPE)
    K = as_tensor(K, dtype=SCORE_DTYPE)
    pix = torch.tensor([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=SCORE_DTYPE)
    rays = pix @ torch.linalg.inv(K).transpose(-1, -2)  # (..., 4, 3)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    pts = torch.cat([rays * near, rays * far], dim=-2)
    # A general float32 inverse, not cameras.invert_rigid: the reference scores in float32 this way,
    # and exact score ties (argmax / top-k order) depend on that rounding (fixture-checked).
    c2w = torch.linalg.inv(w2c)
    return pts @ c2w[..., :3, :3].transpose(-1, -2) + c2w[..., None, :3, 3]


def view_directions(w2c) -> torch.Tensor:
    """Unit viewing directions (c2w z axes) of w2c (..., 4, 4), float32 (general inverse, see above)."""
    return torch.linalg.inv(as_tensor(w2c, dtype=SCORE_DTYPE))[..., :3, 2]


@dataclass
class FrustumSet:
    """Frustum boxes and viewing directions of N cameras (float32)."""

    mins: torch.Tensor  # (N, 3)
    maxs: torch.Tensor  # (N, 3)
    dirs: torch.Tensor  # (N, 3)

    @classmethod
    def from_cameras(cls, w2c, K, width: int, height: int, near: float = FRUSTUM_NEAR,
                     far: float = FRUSTUM_FAR) -> "FrustumSet":
        w2c = as_tensor(w2c, dtype=SCORE_DTYPE).reshape(-1, 4, 4)
        K = as_tensor(K, dtype=SCORE_DTYPE)
        K = K.expand(w2c.shape[0], 3, 3) if K.dim() == 2 else K.reshape(-1, 3, 3)
        if K.shape[0] != w2c.shape[0]:
            raise InputError(f"cameras: got {w2c.shape[0]} w2c but {K.shape[0]} intrinsics; pass one K per camera")
        corners = frustum_corners(w2c, K, width, height, near, far)
        return cls(corners.amin(dim=-2), corners.amax(dim=-2), view_directions(w2c))

    @classmethod
    def empty(cls) -> "FrustumSet":
        z = torch.zeros(0, 3, dtype=SCORE_DTYPE)
        return cls(z, z.clone(), z.clone())

    def __len__(self) -> int:
        return int(self.mins.shape[0])

    def __getitem__(self, idx) -> "FrustumSet":
        idx = torch.as_tensor(idx, dtype=torch.long) if not isinstance(idx, slice) else idx
        return FrustumSet(self.mins[idx], self.maxs[idx], self.dirs[idx])

    def cat(self, other: "FrustumSet") -> "FrustumSet":
        return FrustumSet(torch.cat([self.mins, other.mins]), torch.cat([self.maxs, other.maxs]),
                          torch.cat([self.dirs, other.dirs]))
