"""Point-cloud utilities (spec/geometry.md §10) against the reference fixture, plus the container."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixtures_root
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.pointcloud import (
    PointCloud, adaptive_voxel_downsample, adaptive_voxel_downsample_size, compute_depth_percentile_map,
    concatenate, statistical_outlier_removal, voxel_downsample_fixed,
    voxel_downsample_indices, voxel_keys,
)


def _util_fixtures() -> list:
    root = fixtures_root() / "geometry"
    return sorted(root.glob("point_utils*.npz")) if root.is_dir() else []


@pytest.fixture(params=_util_fixtures() or [None], ids=[p.stem for p in _util_fixtures()] or ["absent"])
def utils_case(request):
    if request.param is None:
        pytest.skip(f"no point_utils*.npz under {fixtures_root() / 'geometry'} (set WORLDSTEREO_FIXTURES)")
    with np.load(request.param, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_sor_matches_reference(utils_case):
    mask = statistical_outlier_removal(utils_case["sor_points"])
    assert np.array_equal(mask, utils_case["sor_expected_inlier_mask"])


def test_voxel_downsample_matches_reference(utils_case):
    pts, cols = voxel_downsample_fixed(utils_case["sor_points"], utils_case["sor_colors"],
                                       float(utils_case["vox_voxel_size"]))
    assert np.array_equal(pts, utils_case["vox_expected_points"])
    assert np.array_equal(cols, utils_case["vox_expected_colors"])


def test_percentile_map_matches_reference(utils_case):
    got = compute_depth_percentile_map(utils_case["pct_depth"], utils_case["pct_mask"])
    assert got.dtype == np.float32
    assert np.abs(got - utils_case["pct_expected"]).max() <= 1e-4


def test_adaptive_voxel_matches_reference(utils_case):
    size, count = adaptive_voxel_downsample_size(utils_case["avd_points"], int(utils_case["avd_target"]))
    assert count == int(utils_case["avd_expected_count"])
    assert abs(size - float(utils_case["avd_expected_voxel_size"])) <= 1e-9
    colors = np.zeros_like(utils_case["avd_points"])
    pts, _, size2 = adaptive_voxel_downsample(utils_case["avd_points"], colors, int(utils_case["avd_target"]))
    assert size2 == size and len(pts) == count


def test_sor_independent_bruteforce():
    rng = np.random.default_rng(3)
    pts = np.concatenate([rng.normal(size=(150, 3)), rng.normal(size=(4, 3)) * 0.1 + 12.0])
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    mean_knn = np.sort(d, axis=1)[:, 1:21].mean(1)
    expected = mean_knn <= mean_knn.mean() + 2 * mean_knn.std()
    got = statistical_outlier_removal(torch.from_numpy(pts))
    assert np.array_equal(got, expected) and not got[150:].any()


def test_voxel_first_point_per_voxel_independent():
    pts = np.array([[0.1, 0.1, 0.1], [0.2, 0.3, 0.4], [1.5, 0.0, 0.0], [-0.1, 0.0, 0.0], [1.9, 0.9, 0.2]])
    idx = voxel_downsample_indices(pts, 1.0)
    # voxels: (0,0,0)->0,1 ; (1,0,0)->2,4 ; (-1,0,0)->3 ; keys ascending: (-1..) < (0..) < (1..)
    assert idx.tolist() == [3, 0, 2]
    with pytest.raises(InputError):
        voxel_downsample_indices(pts, 0.0)


def test_adaptive_small_cloud_unchanged():
    pts = np.random.default_rng(0).normal(size=(50, 3))
    out, _, size = adaptive_voxel_downsample(pts, pts, 100)
    assert size == 0.003 and out is pts


def test_pointcloud_container():
    rgb8 = np.array([[255, 0, 128], [0, 255, 0]], np.uint8)
    pc = PointCloud(np.array([[0.0, 1, 2], [3, 4, 5]]), rgb8, confidence=[0.5, 1.0])
    assert pc.xyz.dtype == torch.float32 and pc.rgb.dtype == torch.float32
    assert np.array_equal(pc.rgb_uint8, rgb8)
    assert torch.allclose(pc.rgb_signed[0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    sub = pc.select(np.array([False, True]))
    assert len(sub) == 1 and sub.confidence.tolist() == [1.0]
    with pytest.raises(InputError, match=r"rgb"):
        PointCloud(np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"xyz"):
        PointCloud(np.zeros((3, 2)), np.zeros((3, 3)))


def test_concatenate_keeps_shared_fields():
    a = PointCloud([[0.05, 0.05, 0.05], [5.0, 5.0, 5.0]], [[1.0, 0, 0], [1.0, 0, 0]], confidence=[1.0, 1.0])
    b = PointCloud([[0.06, 0.04, 0.01], [9.0, 9.0, 9.0]], [[0, 0, 1.0], [0, 0, 1.0]])
    both = concatenate([a, b])
    assert len(both) == 4 and both.confidence is None  # b has no confidence
    assert both.rgb[:2].tolist() == a.rgb.tolist() and both.xyz[2:].tolist() == b.xyz.tolist()
    assert len(concatenate([])) == 0


def test_remove_outliers_and_downsample_on_container():
    rng = np.random.default_rng(5)
    xyz = np.concatenate([rng.normal(size=(300, 3)), [[40.0, 40.0, 40.0]]])
    pc = PointCloud(xyz, rng.uniform(size=(301, 3)))
    clean = pc.remove_outliers()
    assert len(clean) < 301 and not (clean.xyz.abs() > 30).any()
    down, size = pc.adaptive_downsample(100)
    assert size > 0 and len(down) < 301


def test_voxel_count_and_first_in_voxel_match_numpy_unique():
    from worldstereo_core.geometry.pointcloud import first_in_voxel, voxel_count, voxel_key_tensor

    pts = torch.from_numpy(np.random.default_rng(3).normal(size=(5000, 3))).float()
    for size in (0.05, 0.3):
        keys = voxel_keys(pts.numpy(), size)
        assert torch.equal(voxel_key_tensor(pts, size), torch.from_numpy(keys))
        unique, first = np.unique(keys, return_index=True)
        assert voxel_count(pts, size) == len(unique)
        assert torch.equal(first_in_voxel(pts, size).nonzero()[:, 0], torch.from_numpy(np.sort(first)))
