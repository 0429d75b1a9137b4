"""Panoramic depth (split into 12 views, infer, merge) and the 360-degree cloud.

The depth model is replaced by the exact z-depth of the synthetic room
(:func:`synthetic_scene.panorama_room`, a 64 x 128 panorama, 48-pixel split views). Stated
tolerances for the merged distance vs the known distance (measured: median 2.4e-4, 99th
percentile 8.2e-3, max 1.95e-2; the error is the bilinear interpolation of log-distance in the
48-pixel views, largest on the box's edges where the distance has a kink):

* relative error: median <= 5e-4, 99th percentile <= 1.5e-2, max <= 3e-2;
* per-view scale errors of up to +-10 % (as monocular depth has) leave no seam: neighbouring pixels
  of log(merged with errors / merged exact) differ by <= 2e-3 (measured 9e-4; averaging the views
  per pixel instead jumps by 0.1 at view borders), and the overall scale stays within the views' range.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from synthetic_scene import panorama_room
from tiny_moge import write_tiny_moge
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.equirect import equirect_directions, project_directions
from worldstereo_core.geometry.moge import estimate_depth, load_moge
from worldstereo_core.geometry.panorama_depth import (equal_area_mask, icosahedron_vertices, load_panorama_distance,
                                                      moge_view_depth_fn, panorama_distance, panorama_points,
                                                      split_cameras)

VIEW = 48
SCALES = (1.0, 1.08, 0.93, 1.05, 0.97, 1.1, 0.9, 1.02, 0.95, 1.06, 0.98, 1.04)


@pytest.fixture(scope="module")
def room_depth():
    room = panorama_room()
    pano, distance = room.equirect(64, 128)
    merged, mask = panorama_distance(pano, room.depth_fn(), view_size=VIEW)
    return room, pano, distance, merged, mask


def test_split_views_cover_the_sphere():
    verts = icosahedron_vertices()
    assert verts.shape == (12, 3) and torch.allclose(verts.norm(dim=1), torch.ones(12, dtype=torch.float64))
    cams = split_cameras(VIEW)
    xy, cos = project_directions(equirect_directions(32, 64), cams)
    inside = (cos > 0) & (xy[..., 0] > 1) & (xy[..., 0] < VIEW - 1) & (xy[..., 1] > 1) & (xy[..., 1] < VIEW - 1)
    assert bool(inside.any(dim=0).all())
    # image y points down the world (-z) in every view that is not looking straight up or down
    down = torch.linalg.inv(cams.w2c)[:, :3, 1]
    assert bool((down[:, 2] < 0).all())


def test_merged_depth_equals_known_depth(room_depth):
    _, _, distance, merged, mask = room_depth
    assert merged.shape == distance.shape and merged.dtype == torch.float32 and bool(mask.all())
    rel = ((merged.double() - distance).abs() / distance).flatten().numpy()
    assert np.median(rel) <= 5e-4
    assert np.percentile(rel, 99) <= 1.5e-2
    assert rel.max() <= 3e-2


def test_per_view_scale_errors_leave_no_seam(room_depth):
    room, pano, distance, merged, _ = room_depth
    drifted, _ = panorama_distance(pano, room.depth_fn(drift=lambda k: SCALES[k]), view_size=VIEW)
    q = (drifted.double() / merged.double()).log()
    jumps = max(float((q - q.roll(-1, dims=1)).abs().max()), float((q[1:] - q[:-1]).abs().max()))
    assert jumps <= 2e-3
    assert min(SCALES) <= float(q.mean().exp()) <= max(SCALES)
    assert float((drifted.double() / distance).max()) <= max(SCALES) * 1.03


def test_merge_at_a_coarser_size_is_resized(room_depth):
    room, pano, distance, _, _ = room_depth
    merged, mask = panorama_distance(pano, room.depth_fn(), view_size=VIEW, max_merge_width=64)
    assert merged.shape == (64, 128) and bool(mask.all())
    rel = ((merged.double() - distance).abs() / distance).flatten().numpy()
    assert np.median(rel) <= 5e-3


def test_unseen_pixels_are_masked():
    room = panorama_room()
    pano, _ = room.equirect(32, 64)

    def no_sky(image, K, w2c):  # views looking up (optical axis z > 0.5) see "sky": no depth
        d = room.depth(K, w2c, *np.asarray(image).shape[:2])
        return torch.zeros_like(d) if float(torch.linalg.inv(torch.as_tensor(w2c))[2, 2]) > 0.5 else d

    merged, mask = panorama_distance(pano, no_sky, view_size=32)
    assert not bool(mask[0].any()) and bool(mask[16].all())
    assert bool((merged[~mask] == 0).all()) and bool((merged[mask] > 0).all())


def test_lifted_cloud_lies_on_the_room(room_depth):
    room, pano, distance, _, _ = room_depth
    cloud = panorama_points(pano, distance.float(), edge_threshold=0.05, contract=None)
    assert 0 < len(cloud) < 0.9 * 64 * 128  # equal-area thinning drops pixels near the poles
    hit = room.surface_distance(cloud.xyz.double())
    assert float(hit.max()) <= 1e-5 * 4
    # colours are the panorama's pixels (at the thinned positions)
    keep = equal_area_mask(64, 128)
    assert bool(keep[32].all()) and int(keep[0].sum()) <= 128 // 20
    assert set(map(tuple, cloud.rgb_uint8.tolist())) <= set(map(tuple, pano.reshape(-1, 3).tolist()))


def test_edges_wrap_across_the_seam():
    """A depth step placed on the 0/360 seam is an edge on both sides; a smooth map has none there."""
    h, w = 32, 64
    d = torch.full((h, w), 2.0)
    pano = np.full((h, w, 3), 128, np.uint8)
    smooth = panorama_points(pano, d, thin=False, contract=None)
    assert len(smooth) == h * w
    d[:, :w // 2] = 4.0  # steps at column w/2 and across the seam (last -> first column)
    stepped = panorama_points(pano, d, thin=False, contract=None)
    radius = stepped.xyz.norm(dim=1)
    kept = torch.zeros(h, w, dtype=torch.bool)
    dirs = equirect_directions(h, w).reshape(-1, 3).float()
    for p in stepped.xyz:
        kept.view(-1)[int((dirs @ (p / p.norm())).argmax())] = True
    assert not bool(kept[:, 0].any()) and not bool(kept[:, -1].any())
    assert bool(kept[:, w // 4].all()) and len(radius) < h * w


def test_user_depth(tmp_path):
    d = torch.linspace(1.0, 3.0, 32 * 64).reshape(32, 64)
    np.save(tmp_path / "d.npy", d.numpy())
    assert torch.equal(load_panorama_distance(tmp_path / "d.npy", 32, 64), d)
    cv2.imwrite(str(tmp_path / "d.png"), (d.numpy() * 1000).round().astype(np.uint16))
    assert torch.allclose(load_panorama_distance(tmp_path / "d.png", 32, 64), d, atol=1e-3)
    big = load_panorama_distance(torch.repeat_interleave(torch.repeat_interleave(d, 2, 0), 2, 1), 32, 64)
    assert torch.equal(big, d)
    holes = d.clone()
    holes[0, 0], holes[1, 1] = float("nan"), float("inf")
    got = load_panorama_distance(holes.numpy(), 32, 64)
    assert got[0, 0] == 0 and got[1, 1] == 0 and got[2, 2] == d[2, 2]
    with pytest.raises(InputError, match="negative"):
        load_panorama_distance(-d, 32, 64)
    with pytest.raises(InputError, match="2:1"):
        load_panorama_distance(d[:, :48], 32, 64)


def test_moge_views_get_their_field_of_view(tmp_path):
    model = load_moge(write_tiny_moge(tmp_path / "model.pt"))
    image = np.random.default_rng(0).integers(0, 256, (42, 42, 3), dtype=np.uint8)
    K = split_cameras(42).K[0]
    out = moge_view_depth_fn(model)(image, K, torch.eye(4))
    fx = float(out["intrinsics_normalised"][0, 0])
    assert math.isclose(fx, 0.5 / math.tan(math.radians(45.0)), rel_tol=1e-4)
    free = estimate_depth(model, image)  # without a field of view MoGe estimates its own
    assert not math.isclose(float(free["intrinsics_normalised"][0, 0]), fx, rel_tol=1e-3)
    with pytest.raises(InputError, match="fov_x"):
        estimate_depth(model, image, fov_x=190.0)
