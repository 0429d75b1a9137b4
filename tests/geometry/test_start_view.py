"""The start view lifted once (geometry/start_view.py): against the reference lifting fixture and
independent computations; the depth counts only under its validity mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixtures_root
from worldstereo_core.cameras import CameraTrajectory, intrinsics_from_fov, scale_intrinsics
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.depth import lift_depth
from worldstereo_core.geometry.start_view import (FRUSTUM_FRACTION, STAND_IN_DEPTH, STAND_IN_SIZE, ViewDepth,
                                                  lift_start_view, stand_in_view, start_intrinsics,
                                                  start_view_from_point_map)
from worldstereo_core.memory.cache import PointCache


def _fixtures() -> list:
    root = fixtures_root() / "geometry"
    return sorted(root.glob("pointcloud_from_depth*.npz")) if root.is_dir() else []


@pytest.mark.parametrize("path", _fixtures() or [None], ids=[p.stem for p in _fixtures()] or ["absent"])
def test_lift_start_view_matches_reference(path):
    if path is None:
        pytest.skip(f"no pointcloud_from_depth*.npz under {fixtures_root() / 'geometry'} (set WORLDSTEREO_FIXTURES)")
    with np.load(path, allow_pickle=False) as z:
        c = {k: z[k] for k in z.files}
    image = np.round((np.transpose(c["image"], (1, 2, 0)) + 1.0) * 127.5).astype(np.uint8)
    mask = c.get("valid_mask")
    depth_in = ViewDepth(torch.from_numpy(c["depth"]), None if mask is None else torch.from_numpy(mask))
    view = lift_start_view(image, depth_in, K=c["K"].reshape(3, 3), w2c=c["w2c"].reshape(4, 4),
                           sobel_threshold=float(c["sobel_threshold"]), contract=float(c["contract"]))
    depth = c["depth"]
    assert view.cloud.xyz.shape == c["expected_points"].shape
    tolerance = 1e-4 * max(1.0, float(np.median(depth[depth > 0])))  # the fixture README's
    assert np.abs(view.cloud.xyz.numpy() - c["expected_points"]).max() <= tolerance
    assert np.abs(view.cloud.rgb_signed.numpy() - c["expected_colors"]).max() <= 1.0 / 255 + 1e-6
    valid = (depth > 0) & (mask if mask is not None else True)
    assert view.median_depth == float(torch.from_numpy(depth[valid]).double().median())
    assert (view.height, view.width) == depth.shape and view.image is image


def _plane(h=12, w=16, z=2.0):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), torch.full((h, w), z)


def test_depth_counts_only_under_its_mask():
    image, depth = _plane()
    depth[:, :8] = 100.0  # values a mask marks invalid: no points, not in the median
    mask = torch.zeros_like(depth, dtype=torch.bool)
    mask[:, 8:] = True
    view = lift_start_view(image, ViewDepth(depth, mask), sobel_threshold=0.0)
    assert view.median_depth == 2.0 and bool((view.cloud.xyz[:, 2] - 2.0).abs().max() < 1e-5)
    expected = lift_depth(torch.where(mask, depth, torch.zeros_like(depth)), image, view.K, view.w2c,
                          sobel_threshold=0.0)
    assert torch.equal(view.cloud.xyz, expected.xyz) and torch.equal(view.cloud.rgb, expected.rgb)
    # a depth function's dict brings its mask along: the loop's and camera control's start cloud
    cache = PointCache.from_depth(image, {"depth": depth, "mask": mask}, view.K, view.w2c,
                                  settings=None, mode="release")
    assert cache.scale == 2.0


def test_camera_defaults_and_depth_resizing():
    image, depth = _plane(24, 32)
    view = lift_start_view(image, ViewDepth(depth[::2, ::2]), fov_deg=70.0)
    assert torch.equal(view.K, intrinsics_from_fov(32, 24, 70.0))  # no estimate: the field of view
    assert torch.equal(view.w2c, torch.eye(4, dtype=torch.float64)) and len(view.cloud) > 0
    with pytest.raises(InputError, match="fov_deg"):
        lift_start_view(image, ViewDepth(depth), fov_deg=180.0)
    norm = torch.tensor([[0.8, 0.0, 0.5], [0.0, 1.1, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    estimated = ViewDepth.of({"depth": depth[::2, ::2].numpy(), "mask": np.ones((12, 16), bool),
                              "intrinsics_normalised": norm})
    assert torch.equal(estimated.K, scale_intrinsics(norm, (1, 1), (12, 16)))
    assert torch.equal(start_intrinsics(estimated, 32, 24, fov_deg=500.0), scale_intrinsics(norm, (1, 1), (24, 32)))
    assert torch.equal(lift_start_view(image, estimated, fov_deg=70.0).K, scale_intrinsics(norm, (1, 1), (24, 32)))
    assert ViewDepth.of(estimated) is estimated and ViewDepth.of(depth).mask is None


def test_point_map_and_stand_in_views():
    h, w = 16, 20
    points = torch.rand(h, w, 3) + torch.tensor([0.0, 0.0, 1.0])
    points[0, 0] = float("nan")
    image = np.zeros((32, 40, 3), np.uint8)  # resized to the map
    view = start_view_from_point_map(image, points, fov_deg=50.0)
    z = points[..., 2].flatten()
    assert len(view.cloud) == h * w - 1 and view.image.shape == (h, w, 3)
    assert view.median_depth == float(z[torch.isfinite(z)].double().median())
    assert torch.equal(view.K, intrinsics_from_fov(w, h, 50.0))
    stand_in = stand_in_view()
    assert (stand_in.height, stand_in.width) == STAND_IN_SIZE and stand_in.median_depth == STAND_IN_DEPTH
    assert len(stand_in.cloud) == 0


def test_camera_segments_are_pyramids_a_tenth_of_m_deep():
    view = stand_in_view()
    segments = view.camera_segments()
    assert segments.shape == (8, 2, 3)
    corners = segments[:4, 1]  # centre -> image corners, at z-depth 0.1 m in front of the identity camera
    assert np.allclose(segments[:4, 0], 0.0) and np.allclose(corners[:, 2], FRUSTUM_FRACTION * view.median_depth)
    traj = CameraTrajectory(w2c=torch.eye(4, dtype=torch.float64).repeat(3, 1, 1), K=view.K, width=view.width,
                            height=view.height)
    assert np.array_equal(view.camera_segments(traj), np.concatenate([segments] * 3))
