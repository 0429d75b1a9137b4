"""worldstereo_core.cameras against fixtures/geometry/utilities.json plus independent checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import fixture_file
from worldstereo_core import cameras as C

ATOL = 1e-4  # fixture README: float32 reference, atol 1e-4 * max(1, scale); these scales are <= 2


def _utilities(key: str):
    data = json.loads(fixture_file("geometry", "utilities.json").read_text())
    if key not in data:
        pytest.skip(f"utilities.json has no '{key}' entry")
    return data[key]


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _random_rigid(gen: torch.Generator, n: int) -> torch.Tensor:
    q = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return C.make_pose(C.quaternion_to_matrix(q), torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3)


# ---------------------------------------------------------------------------------------------
# Fixture comparisons
# ---------------------------------------------------------------------------------------------

def test_matrix_to_quaternion_fixture():
    case = _utilities("matrix_to_quaternion(wxyz,w>=0)")
    got = C.matrix_to_quaternion(case["R"])
    assert got.shape == (len(case["R"]), 4)
    torch.testing.assert_close(got, _t(case["expected"]), atol=1e-5, rtol=0)


def test_camera_center_normalization_fixture():
    case = _utilities("camera_center_normalization(is_w2c=True)")
    w2c = _t(case["w2c"])
    assert len(w2c) == case["nframe"]
    torch.testing.assert_close(C.camera_center_normalization(w2c), _t(case["expected"]), atol=ATOL, rtol=0)


def test_unified_camera_normalization_fixture():
    case = _utilities("unified_camera_normalization")
    tgt, ref = C.unified_camera_normalization(case["w2c"], case["w2c_ref"], case["camera_scale"])
    torch.testing.assert_close(tgt, _t(case["expected_w2c"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(ref, _t(case["expected_w2c_ref"]), atol=ATOL, rtol=0)


def test_plucker_embedding_matches_get_camera_embedding():
    case = _utilities("get_camera_embedding(plucker,normalize,is_w2c)")
    emb = C.plucker_embedding(case["K"], case["w2c"], case["h"], case["w"])
    assert list(emb.shape) == case["expected_shape"]
    torch.testing.assert_close(emb, _t(case["expected"]), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Independent checks
# ---------------------------------------------------------------------------------------------

def test_invert_rigid_matches_linalg_inv():
    T = _random_rigid(torch.Generator().manual_seed(0), 16)
    torch.testing.assert_close(C.invert_rigid(T), torch.linalg.inv(T), atol=1e-12, rtol=0)
    torch.testing.assert_close(C.camera_centers(T), torch.linalg.inv(T)[:, :3, 3], atol=1e-12, rtol=0)
    assert C.rigidity_error(T) < 1e-12


def test_quaternion_round_trip_and_sign():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    back = C.matrix_to_quaternion(C.quaternion_to_matrix(q))
    assert bool((back[:, 0] >= 0).all())
    torch.testing.assert_close(back, torch.where(q[:, :1] < 0, -q, q), atol=1e-10, rtol=0)
    # A rotation by angle a about z has quaternion (cos a/2, 0, 0, sin a/2).
    a = 0.7
    torch.testing.assert_close(C.matrix_to_quaternion(C.rot_z(a)),
                               _t([math.cos(a / 2), 0, 0, math.sin(a / 2)]), atol=1e-12, rtol=0)


def test_axis_angle_agrees_with_elementary_rotations():
    for axis, fn in (((1, 0, 0), C.rot_x), ((0, 1, 0), C.rot_y), ((0, 0, 1), C.rot_z)):
        torch.testing.assert_close(C.axis_angle_matrix(axis, 0.4), fn(0.4), atol=1e-12, rtol=0)


def test_scale_intrinsics_rows():
    K = _t([[500.0, 0, 320], [0, 480.0, 240], [0, 0, 1]])
    out = C.scale_intrinsics(K, (480, 640), (240, 960))
    torch.testing.assert_close(out, _t([[750.0, 0, 480], [0, 240.0, 120], [0, 0, 1]]))


def test_unproject_project_round_trip():
    gen = torch.Generator().manual_seed(2)
    H, W = 12, 17
    K = _t([[20.0, 0, W / 2], [0, 22.0, H / 2], [0, 0, 1]])
    w2c = _random_rigid(gen, 1)[0]
    depth = 1 + torch.rand(H, W, generator=gen, dtype=torch.float64) * 4
    pts = C.unproject_depth(depth, K, C.invert_rigid(w2c))
    uv, z = C.project_points(pts.reshape(-1, 3), K, w2c)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    torch.testing.assert_close(uv, torch.stack([u + 0.5, v + 0.5], -1).reshape(-1, 2), atol=1e-9, rtol=0)
    torch.testing.assert_close(z, depth.reshape(-1), atol=1e-9, rtol=0)


def test_subsample_indices_81_to_21():
    assert C.subsample_indices(81, 21) == list(range(0, 81, 4))
    assert C.subsample_indices(10, 21) == list(range(10))


# ---------------------------------------------------------------------------------------------
# CameraTrajectory: immutable, always sized, inverted once; non-finite cameras refused
# ---------------------------------------------------------------------------------------------

def _trajectory(n: int = 4) -> C.CameraTrajectory:
    K = C.intrinsics_from_fov(64, 48, 60.0)
    return C.CameraTrajectory(w2c=_random_rigid(torch.Generator().manual_seed(3), n), K=K, width=64, height=48)


def test_trajectory_is_frozen_and_methods_return_new_objects():
    import dataclasses

    traj = _trajectory()
    for name, value in (("w2c", traj.w2c * 2), ("K", traj.K), ("width", 10), ("meta", {})):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(traj, name, value)
    w2c, K = traj.w2c.clone(), traj.K.clone()
    half = traj.resized(24, 32)
    moved = traj.with_w2c(traj.w2c.flip(0))
    picked = traj.select([2, 0])
    assert {id(half), id(moved), id(picked)}.isdisjoint({id(traj)})
    assert (traj.width, traj.height) == (64, 48) and torch.equal(traj.w2c, w2c) and torch.equal(traj.K, K)
    assert (half.width, half.height) == (32, 24) and torch.equal(half.K[:, 0, 0], K[:, 0, 0] / 2)
    assert torch.equal(moved.w2c, w2c.flip(0)) and torch.equal(picked.w2c, w2c[[2, 0]])


@pytest.mark.parametrize("size", [dict(), dict(width=64), dict(width=None, height=48), dict(width=0, height=48),
                                  dict(width=64.5, height=48), dict(width=True, height=48)])
def test_trajectory_size_is_mandatory(size):
    traj = _trajectory()
    with pytest.raises((TypeError, C.InputError)) as err:
        C.CameraTrajectory(w2c=traj.w2c, K=traj.K, **size)
    if err.type is C.InputError:
        assert "image width" in str(err.value) or "image height" in str(err.value)


def test_trajectory_c2w_is_computed_once(monkeypatch):
    traj = _trajectory()
    calls = []
    original = C.invert_rigid
    monkeypatch.setattr(C, "invert_rigid", lambda T: calls.append(1) or original(T))
    first = traj.c2w
    assert traj.c2w is first and traj.centers is not None and len(calls) == 1
    torch.testing.assert_close(first, torch.linalg.inv(traj.w2c), atol=1e-12, rtol=0)
    torch.testing.assert_close(traj.centers, C.camera_centers(traj.w2c), atol=0, rtol=0)


@pytest.mark.parametrize("field, index", [("w2c", (2, 0, 3)), ("K", (1, 0, 0))])
def test_non_finite_camera_raises_naming_input_and_frame(field, index):
    traj = _trajectory()
    w2c, K = traj.w2c.clone(), traj.K.clone()
    (w2c if field == "w2c" else K)[index] = math.nan
    with pytest.raises(C.InputError, match=rf"my_cameras: camera {index[0]} has NaN or infinite values in its "
                                           rf"{field}; fix the camera file"):
        C.plucker_embedding(K, w2c, 48, 64, name="my_cameras")


def test_singular_intrinsics_raise_instead_of_zero_rays():
    traj = _trajectory()
    K = traj.K.clone()
    K[3, 0, 0] = K[3, 1, 1] = 1e-320  # finite, but its inverse is not
    with pytest.raises(C.InputError, match="trajectory: camera 3 gives non-finite Plücker rays"):
        C.plucker_embedding(K, traj.w2c, 48, 64)
