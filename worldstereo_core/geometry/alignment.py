"""Similarity alignment of 3D correspondences (Umeyama 1991), weighted and robust.

Absent from the reference release (it has no Umeyama or ICP step): used here to bring newly lifted
geometry into the frame of an existing cache. :func:`umeyama` solves
``dst ~= s * R @ src + t`` in the least-squares sense with R a proper rotation (det +1);
:func:`umeyama_ransac` adds RANSAC over minimal 3-point samples plus a final inlier refit.
Computation is float64 torch; inputs may be numpy arrays or tensors (N, 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

#: Relative singular-value floor below which correspondences are treated as collinear.
_RANK_TOL = 1e-9


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * R @ x + t`` with R (3,3) a rotation, t (3,), scale > 0 (float64)."""

    R: torch.Tensor
    t: torch.Tensor
    scale: float = 1.0

    @property
    def matrix(self) -> torch.Tensor:
        """The 4x4 homogeneous matrix [s R | t]."""
        M = torch.eye(4, dtype=torch.float64)
        M[:3, :3] = self.scale * self.R
        M[:3, 3] = self.t
        return M

    def apply(self, points) -> torch.Tensor:
        """Transform points (..., 3); the result has the input's float dtype (float64 for numpy)."""
        p = _points(points, "points", min_count=0, flat=False)
        out = self.scale * p @ self.R.T + self.t
        return out.to(points.dtype) if isinstance(points, torch.Tensor) and points.is_floating_point() else out

    def inverse(self) -> "Similarity":
        Rt = self.R.T
        return Similarity(Rt, -(Rt @ self.t) / self.scale, 1.0 / self.scale)


def _points(x, name: str, min_count: int = 3, flat: bool = True) -> torch.Tensor:
    t = x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    if t.shape[-1:] != (3,) or (flat and t.dim() != 2):
        raise InputError(f"{name} must have shape (N, 3); got {tuple(t.shape)}")
    if flat and t.shape[0] < min_count:
        raise InputError(f"{name} needs at least {min_count} correspondences; got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values; drop those correspondences first")
    return t


def _weights(weights, n: int) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = weights.detach().to(torch.float64) if isinstance(weights, torch.Tensor) else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if tuple(w.shape) != (n,):
        raise InputError(f"weights must have shape ({n},); got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError("weights must be finite and >= 0")
    total = w.sum()
    if float(total) <= 0 or int((w > 0).sum()) < 3:
        raise InputError("at least 3 correspondences need a positive weight")
    return w / total


def _solve_batched(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, with_scale: bool):
    """Batched weighted Umeyama: src, dst (B,M,3), w (B,M) summing to 1 ->
    (R (B,3,3), t (B,3), scale (B,), ok (B,) bool: non-degenerate with a positive scale)."""
    mu_s, mu_d = (w[..., None] * src).sum(1), (w[..., None] * dst).sum(1)
    xs, xd = src - mu_s[:, None], dst - mu_d[:, None]
    var_s = (w * (xs * xs).sum(-1)).sum(1)
    cov = (xd * w[..., None]).transpose(1, 2) @ xs  # sum_i w_i (d_i - mu_d)(s_i - mu_s)^T
    U, D, Vt = torch.linalg.svd(cov)
    S = torch.ones_like(D)
    S[:, 2] = torch.where(torch.linalg.det(U) * torch.linalg.det(Vt) < 0, -1.0, 1.0)  # det(R) = +1
    R = U @ torch.diag_embed(S) @ Vt
    ok = (var_s > 0) & (D[:, 1] > _RANK_TOL * D[:, 0].clamp_min(1e-300))
    scale = (D * S).sum(1) / var_s.clamp_min(1e-300) if with_scale else torch.ones_like(var_s)
    ok &= scale > 0
    t = mu_d - scale[:, None] * (R @ mu_s[..., None])[..., 0]
    return R, t, scale, ok


def _solve(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, with_scale: bool) -> Similarity:
    R, t, scale, ok = _solve_batched(src[None], dst[None], w[None], with_scale)
    if not bool(ok[0]):
        raise InputError("correspondences are degenerate (all coincident or collinear, or matched with a "
                         "reflection-only fit): the transform is undetermined; use at least 3 non-collinear, "
                         "correctly matched points")
    return Similarity(R[0], t[0], float(scale[0]))


def umeyama(src, dst, *, with_scale: bool = True, weights=None) -> Similarity:
    """Least-squares similarity (or rigid, ``with_scale=False``) mapping ``src`` (N,3) onto ``dst``.

    ``weights`` (N,) >= 0 weight each correspondence. Raises :class:`InputError` for mismatched
    shapes, fewer than 3 points, non-finite values or degenerate (collinear) configurations.
    """
    s, d = _points(src, "src"), _points(dst, "dst")
    if s.shape != d.shape:
        raise InputError(f"src {tuple(s.shape)} and dst {tuple(d.shape)} must have the same shape")
    return _solve(s, d, _weights(weights, s.shape[0]), with_scale)


def alignment_residuals(T: Similarity, src, dst) -> torch.Tensor:
    """Per-correspondence distances |T(src) - dst| (N,)."""
    return (T.apply(_points(src, "src", 0)) - _points(dst, "dst", 0)).norm(dim=-1)


def _inlier_counts(src: torch.Tensor, dst: torch.Tensor, A: torch.Tensor, t: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """Points with ``|A_b src + t_b - dst| < threshold`` for every hypothesis b (A (B,3,3) = s R, t (B,3)).

    The squared residual ``|A x|^2 + |t|^2 + |d|^2 + 2 x.(A^T t) - 2 t.d - 2 sum_ij A_ij d_i x_j``
    (``|A x|^2 = s^2 |x|^2``, R being a rotation) is a sum of products of one factor per
    hypothesis and one per point, so all hypotheses are scored by one matrix product (float64: the
    cancellation costs ~1e-14 of the squared coordinates, far below any useful threshold)."""
    n, B = len(src), len(A)
    per_point = torch.cat([(src * src).sum(1, keepdim=True), (dst * dst).sum(1, keepdim=True), src, dst,
                           (dst[:, :, None] * src[:, None, :]).reshape(n, 9)], dim=1)
    scale2 = (A * A).sum((1, 2)) / 3  # s^2
    per_hyp = torch.cat([scale2[:, None], torch.ones(B, 1, dtype=A.dtype), 2 * (A.transpose(1, 2) @ t[..., None])[..., 0],
                         -2 * t, -2 * A.reshape(B, 9)], dim=1)
    counts = torch.empty(B, dtype=torch.long)
    chunk = max(1, 4_000_000 // max(n, 1))
    for i in range(0, B, chunk):  # memory-bounded: (chunk, n) squared residuals at a time
        r2 = torch.addmm((t[i:i + chunk] * t[i:i + chunk]).sum(1, keepdim=True), per_hyp[i:i + chunk], per_point.T)
        counts[i:i + chunk] = (r2 < threshold * threshold).sum(1)
    return counts


def umeyama_ransac(src, dst, *, threshold: float, with_scale: bool = True, iterations: int = 200,
                   min_inlier_ratio: float = 0.1, seed: int = 0) -> tuple[Similarity, torch.Tensor]:
    """Robust similarity: RANSAC on 3-point samples, then :func:`umeyama` refit on the inliers.

    A correspondence is an inlier when its residual is below ``threshold`` (dst units). Returns
    (transform, inlier mask (N,) bool). Raises :class:`InputError` when fewer than
    ``min_inlier_ratio`` of the points (or fewer than 3) agree with any hypothesis.
    """
    s, d = _points(src, "src"), _points(dst, "dst")
    if s.shape != d.shape:
        raise InputError(f"src {tuple(s.shape)} and dst {tuple(d.shape)} must have the same shape")
    if not threshold > 0 or int(iterations) < 1:
        raise InputError(f"threshold must be > 0 and iterations >= 1; got {threshold}, {iterations}")
    n = s.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    # all hypotheses at once; samples with a repeated index are degenerate and get ok = False
    idx = torch.randint(n, (int(iterations), 3), generator=gen)
    R, t, scale, ok = _solve_batched(s[idx], d[idx], torch.full(idx.shape, 1.0 / 3, dtype=torch.float64), with_scale)
    counts = _inlier_counts(s, d, scale[:, None, None] * R, t, threshold)
    counts[~ok] = 0
    best = int(counts.argmax())
    best_count = int(counts[best])
    need = max(3, int(np.ceil(min_inlier_ratio * n)))
    if best_count < need:
        raise InputError(f"RANSAC found no transform agreeing with {need} of {n} correspondences within "
                         f"{threshold}; raise the threshold or check the matches")
    T = Similarity(R[best], t[best], float(scale[best]))
    for _ in range(2):  # refit on the inliers, then once more on the refit's own inliers
        mask = (T.apply(s) - d).norm(dim=-1) < threshold
        if int(mask.sum()) < 3:
            break
        T = _solve(s[mask], d[mask], _weights(None, int(mask.sum())), with_scale)
    return T, (T.apply(s) - d).norm(dim=-1) < threshold
