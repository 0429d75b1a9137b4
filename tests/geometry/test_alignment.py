"""Umeyama similarity alignment on known random transforms (no reference fixture exists)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worldstereo_core.cameras import axis_angle_matrix
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.alignment import Similarity, alignment_residuals, umeyama, umeyama_ransac


def _random_similarity(rng, scale=True) -> Similarity:
    R = axis_angle_matrix(rng.normal(size=3), float(rng.uniform(-np.pi, np.pi)))
    return Similarity(R, torch.from_numpy(rng.normal(size=3) * 5), float(rng.uniform(0.2, 5.0)) if scale else 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_recovers_exact_transform(seed):
    rng = np.random.default_rng(seed)
    T = _random_similarity(rng)
    src = rng.normal(size=(50, 3)) * 3
    dst = T.apply(src).numpy()
    est = umeyama(src, dst)
    assert torch.allclose(est.R, T.R, atol=1e-9) and abs(est.scale - T.scale) < 1e-9
    assert torch.allclose(est.t, T.t, atol=1e-8)
    assert abs(float(torch.linalg.det(est.R)) - 1.0) < 1e-12
    assert torch.allclose(est.matrix @ T.inverse().matrix, torch.eye(4, dtype=torch.float64), atol=1e-8)


def test_noisy_rigid_and_weights():
    rng = np.random.default_rng(7)
    T = _random_similarity(rng, scale=False)
    src = rng.normal(size=(400, 3)) * 4
    dst = T.apply(src).numpy() + rng.normal(size=(400, 3)) * 0.01
    est = umeyama(src, dst, with_scale=False)
    assert est.scale == 1.0
    assert float((est.R - T.R).abs().max()) < 5e-3 and float((est.t - T.t).abs().max()) < 5e-3
    # zero weight on corrupted points -> they are ignored entirely
    bad = dst.copy()
    bad[:40] += 100.0
    w = np.ones(400)
    w[:40] = 0.0
    est_w = umeyama(src, bad, weights=w)
    ref = umeyama(src[40:], bad[40:])
    assert torch.allclose(est_w.matrix, ref.matrix, atol=1e-10)


def test_reflection_guard():
    """dst is a mirror image of src: the best proper rotation must still have det +1."""
    rng = np.random.default_rng(11)
    src = rng.normal(size=(30, 3))
    dst = src * np.array([1.0, 1.0, -1.0])
    est = umeyama(src, dst)
    assert abs(float(torch.linalg.det(est.R)) - 1.0) < 1e-12
    assert float(alignment_residuals(est, src, dst).mean()) > 1e-3  # a reflection cannot fit exactly


@pytest.mark.parametrize("src, dst, msg", [
    (np.zeros((5, 3)), np.zeros((5, 3)), "degenerate"),
    (np.outer(np.arange(6.0), [1.0, 2.0, 3.0]), np.outer(np.arange(6.0), [3.0, 2.0, 1.0]), "collinear"),
    (np.ones((2, 3)), np.ones((2, 3)), "at least 3"),
    (np.ones((4, 3)), np.ones((5, 3)), "same shape"),
    (np.ones((4, 2)), np.ones((4, 2)), r"\(N, 3\)"),
    (np.full((4, 3), np.nan), np.ones((4, 3)), "NaN"),
])
def test_degenerate_inputs(src, dst, msg):
    with pytest.raises(InputError, match=msg):
        umeyama(src, dst)


def test_bad_weights():
    src = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(InputError, match="weights"):
        umeyama(src, src, weights=-np.ones(5))
    with pytest.raises(InputError, match="positive weight"):
        umeyama(src, src, weights=[1.0, 1.0, 0, 0, 0])


def test_ransac_rejects_outliers():
    rng = np.random.default_rng(21)
    T = _random_similarity(rng)
    src = rng.normal(size=(200, 3)) * 2
    dst = T.apply(src).numpy() + rng.normal(size=(200, 3)) * 1e-3
    out = rng.choice(200, 60, replace=False)
    dst[out] += rng.normal(size=(60, 3)) * 20
    plain = umeyama(src, dst)
    est, inliers = umeyama_ransac(src, dst, threshold=0.05 * T.scale, seed=1)
    expected_in = np.ones(200, bool)
    expected_in[out] = False
    assert np.array_equal(inliers.numpy(), expected_in)
    assert float((est.R - T.R).abs().max()) < 1e-3 < float((plain.R - T.R).abs().max())
    assert abs(est.scale - T.scale) < 1e-3 * T.scale
    with pytest.raises(InputError, match="RANSAC"):
        umeyama_ransac(src, rng.normal(size=(200, 3)) * 50, threshold=1e-6, iterations=20)


def test_ransac_scores_every_hypothesis_like_the_residual_norm():
    """The one-product scoring counts the same inliers as |s R x + t - d| < threshold."""
    from worldstereo_core.geometry.alignment import _inlier_counts

    rng = np.random.default_rng(4)
    src = torch.from_numpy(rng.normal(size=(3000, 3)))
    dst = 1.3 * src + torch.from_numpy(rng.normal(size=(3000, 3)) * 0.02)
    S = torch.from_numpy(rng.normal(size=(50, 3, 3)) * 0.01)
    R = torch.linalg.matrix_exp(S - S.transpose(1, 2))  # rotations near the identity
    scale = torch.from_numpy(rng.uniform(1.2, 1.4, 50))
    t = torch.from_numpy(rng.normal(size=(50, 3)) * 0.01)
    direct = ((scale[:, None, None] * src[None] @ R.transpose(1, 2) + t[:, None] - dst[None]).norm(dim=-1) < 0.05).sum(1)
    assert torch.equal(_inlier_counts(src, dst, scale[:, None, None] * R, t, 0.05), direct)
    assert 0 < int(direct.min()) and int(direct.max()) < 3000


def test_similarity_apply_keeps_tensor_dtype():
    T = Similarity(torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 0, 0], dtype=torch.float64), 2.0)
    out = T.apply(torch.ones(4, 3))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([3.0, 2.0, 2.0]).expand(4, 3))
    assert torch.allclose(T.inverse().apply(out), torch.ones(4, 3))
