"""Trajectory builder vs fixtures/geometry (get_c2w, camera primitives, shared validations) plus
independent geometric checks of the reconstruction trajectories, presets, chaining and resampling."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import fixture_file, fixtures_root
from worldstereo_core.cameras import camera_centers, invert_rigid, make_pose, rigidity_error, rot_x, rot_y
from worldstereo_core.errors import InputError
from worldstereo_core.geometry import moves as M
from worldstereo_core.geometry.presets import PRESETS, preset_moves
from worldstereo_core.geometry.trajectories import (get_c2w, median_depth, panorama_bank_cameras,
                                                    reconstruction_trajectories, resample_trajectory,
                                                    start_pitch, trajectory_from_moves)

K = torch.tensor([[500.0, 0, 384], [0, 500.0, 256], [0, 0, 1]], dtype=torch.float64)


def _fixture_cases(name: str) -> list:
    path = fixtures_root() / "geometry" / name
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"fixture {path} not found"))]
    cases = json.loads(path.read_text())["cases"]
    return [pytest.param(c, id=f"{i}-{c.get('fn') or c['move']['type']}") for i, c in enumerate(cases)]


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _scene_points(spec):
    """``kdtree_points``: an explicit (N,3) list, or a text like "far sphere r=1000 (no obstacle)"."""
    if not isinstance(spec, str):
        return np.asarray(spec, dtype=np.float64)
    radius = re.search(r"r\s*=\s*([0-9.eE+]+)", spec)
    assert radius and "sphere" in spec, f"unrecognised kdtree_points description {spec!r}"
    n = 2000  # Fibonacci sphere of that radius around the origin
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    a = math.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z * z)
    return float(radius.group(1)) * np.stack([r * np.cos(a), r * np.sin(a), z], axis=-1)


# ---------------------------------------------------------------------------------------------
# Fixtures: get_c2w and the primitives
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", _fixture_cases("trajectories_get_c2w.json"))
def test_get_c2w_fixture(case):
    poses, iterations = get_c2w(case["c2w_start"], case["move"], case["median_depth"], case["air_bound"],
                                case["n_inter"], scene_points=_scene_points(case["kdtree_points"]))
    expected = _t(case["expected_c2ws"])
    assert poses.shape == expected.shape
    atol = 1e-4 * max(1.0, abs(case["median_depth"]))
    torch.testing.assert_close(poses, expected, atol=atol, rtol=0)
    assert iterations == case["expected_obs_iteration"]


def _primitive(case):
    fn = case["fn"]
    if fn == "native_camera_rotation":
        return M.native_camera_rotation(case["c2w"], case["medium_depth"], math.radians(case["phi_deg"]),
                                        math.radians(case["theta_deg"]))
    if fn == "camera_backward_forward":
        return M.camera_backward_forward(case["c2w"], case["distance"])
    if fn == "camera_left_right":
        return M.camera_left_right(case["c2w"], case["distance"])
    if fn == "rotate_cam2world_around_axis":
        return M.rotate_cam2world_around_axis(case["c2w"], case["axis"], case["angle_rad"], case["point"])
    if fn == "interpolate_poses":
        return M.interpolate_poses(case["poses"], case["M"])
    if fn == "compute_lookat_xy_angle":
        return M.compute_lookat_xy_angle(case["c2ws_R"])
    pytest.fail(f"camera_primitives.json case with unknown fn {fn!r}")


@pytest.mark.parametrize("case", _fixture_cases("camera_primitives.json"))
def test_camera_primitives_fixture(case):
    got, expected = _primitive(case), _t(case["expected"])
    assert got.shape == expected.shape
    if case["fn"] == "compute_lookat_xy_angle":
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # degrees
    else:
        scale = max([1.0] + [abs(float(case[k])) for k in ("medium_depth", "distance") if k in case])
        torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=0)


# ---------------------------------------------------------------------------------------------
# Shared-only validation that needs no example data (the rest is in test_example_scenes.py)
# ---------------------------------------------------------------------------------------------

def test_side_orbit_radius_matches_example_convention_checks():
    """For every listed scene, traj_left/right built from a start with the recorded pitch orbit the
    vertical axis at the radius ('depth_used') the reference files use."""
    checks = json.loads(fixture_file("geometry", "example_convention_checks.json").read_text())
    recon = {k: v for k, v in checks.items() if "pitch_down_deg" in v}
    assert recon, "example_convention_checks.json lists no reconstruction scene"
    for scene, c in recon.items():
        m, pitch = c["median_depth_from_eloop"], c["pitch_down_deg"]
        start = invert_rigid(make_pose(rot_x(-math.radians(pitch)), torch.zeros(3)))
        trajs = reconstruction_trajectories(start, K, 768, 512, m)
        for side in ("traj_left", "traj_right"):
            centres = trajs[side].centers
            radius = c[side]["depth_used"]  # axis through (0, *, radius)
            dist = torch.stack([centres[:, 0], centres[:, 2] - radius], -1).norm(dim=-1)
            torch.testing.assert_close(dist, torch.full_like(dist, radius), atol=1e-5 * max(1, m), rtol=0,
                                       msg=f"{scene} {side}")


# ---------------------------------------------------------------------------------------------
# Reconstruction trajectories: independent geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pitch_deg", [0.0, 15.0, 20.0])
def test_reconstruction_geometry(pitch_deg):
    m, a = 2.5, math.radians(pitch_deg)
    start_w2c = invert_rigid(make_pose(rot_x(-a), torch.zeros(3)))
    trajs = reconstruction_trajectories(start_w2c, K, 768, 512, m)
    assert list(trajs) == ["traj_eloop", "traj_up", "traj_left", "traj_right"]
    look_at = torch.tensor([0.0, m * math.sin(a), m * math.cos(a)], dtype=torch.float64)
    for name, t in trajs.items():
        assert len(t) == 21 and (t.width, t.height) == (768, 512)
        torch.testing.assert_close(t.w2c[0], start_w2c, atol=1e-12, rtol=0)
        torch.testing.assert_close(t.K, K.expand(21, 3, 3), atol=0, rtol=0)
        assert rigidity_error(t.w2c) < 1e-10
    for side, sign in (("traj_left", 1.0), ("traj_right", -1.0)):
        c2w = trajs[side].c2w
        # pitch preserved, heights unchanged, ends behind the look-at point looking back at it
        torch.testing.assert_close(c2w[:, 1, 2], torch.full((21,), math.sin(a), dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(c2w[:, 1, 3], torch.zeros(21, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(c2w[-1, :3, 3], _t([0.0, 0.0, 2 * m * math.cos(a)]), atol=1e-12, rtol=0)
        assert float(c2w[1, 0, 3]) * sign < 0  # left (+phi) moves to -x first
        # optical axis always passes through the look-at point
        to_target = look_at - c2w[:, :3, 3]
        cos = (to_target * c2w[:, :3, 2]).sum(-1) / to_target.norm(dim=-1)
        torch.testing.assert_close(cos, torch.ones(21, dtype=torch.float64), atol=1e-12, rtol=0)
    up = trajs["traj_up"].c2w
    assert float(up[-1, 1, 3]) == pytest.approx(-m * math.sin(math.radians(45)))  # risen by m sin 45
    assert math.degrees(start_pitch(up[-1])) == pytest.approx(pitch_deg + 45)
    eloop = trajs["traj_eloop"].c2w
    torch.testing.assert_close(eloop[-1], eloop[0], atol=1e-12, rtol=0)


def test_reconstruction_trajectories_follow_the_start_pose():
    """Moving the start camera by a yaw + translation moves all four trajectories rigidly with it."""
    m, a = 1.7, math.radians(12.0)
    base = make_pose(rot_x(-a), torch.zeros(3))
    T = make_pose(rot_y(0.8), _t([1.0, -0.3, 2.0]))
    ref = reconstruction_trajectories(invert_rigid(base), K, 768, 512, m, up_distance=1.3 * m)
    moved = reconstruction_trajectories(invert_rigid(T @ base), K, 768, 512, m, up_distance=1.3 * m)
    for name in ref:
        torch.testing.assert_close(moved[name].c2w, T @ ref[name].c2w, atol=1e-12, rtol=0)


def test_reconstruction_bad_input():
    with pytest.raises(InputError, match="median_depth"):
        reconstruction_trajectories(torch.eye(4), K, 768, 512, 0.0)
    with pytest.raises(InputError, match="up_distance"):
        reconstruction_trajectories(torch.eye(4), K, 768, 512, 1.0, up_distance=-1)


# ---------------------------------------------------------------------------------------------
# get_c2w: more independent checks (obstacles for every move type, eloop geometry, validation)
# ---------------------------------------------------------------------------------------------

def test_eloop_looks_at_the_pivot_and_closes():
    start = make_pose(rot_y(0.3) @ rot_x(0.2), _t([0.5, -1.0, 2.0]))
    m = 3.0
    poses, it = get_c2w(start, {"type": "eloop", "radius_x": 0.3, "radius_y": 0.4}, m)
    assert it == 0 and len(poses) == 20
    torch.testing.assert_close(poses[-1], start, atol=1e-12, rtol=0)
    local = invert_rigid(start) @ poses
    target = _t([0, 0, m])
    d = target - local[:, :3, 3]
    torch.testing.assert_close(d / d.norm(dim=-1, keepdim=True), local[:, :3, 2], atol=1e-12, rtol=0)
    assert float(local[:, 1, 3].min()) == pytest.approx(-0.8 * m)


def _wall(z: float, half: float = 2.0, step: float = 0.05) -> np.ndarray:
    g = np.arange(-half, half + step / 2, step)
    x, y = np.meshgrid(g, g)
    return np.stack([x.ravel(), y.ravel(), np.full(x.size, z)], -1)


def _clearance(poses: torch.Tensor, pts: np.ndarray) -> float:
    dense = M.interpolate_poses(poses, 80)[:, :3, 3].numpy()
    d = np.linalg.norm(dense[:, None] - pts[None], axis=-1)
    return float(np.sort(d, axis=1)[:, :5].mean(axis=1).min())


@pytest.mark.parametrize("move", [
    {"type": "eloop", "radius_x": 0.3, "radius_y": 0.4},
    {"type": "aerial", "rotation": [40.0, -30.0]},
    {"type": "normal", "backward-forward": 1.0},
])
def test_obstacles_shrink_every_move_type(move):
    m = 1.0
    free, _ = get_c2w(torch.eye(4), move, m)
    # A wall through the path: y = -0.3 for moves rising above it, z = 0.6 for the forward walk.
    wall = _wall(0.0, half=0.6, step=0.005)
    pts = wall + [0, 0, 0.6] if move["type"] == "normal" else wall[:, [0, 2, 1]] + [0, -0.3, 0]
    assert _clearance(free, pts) < 0.02
    poses, it = get_c2w(torch.eye(4), move, m, scene_points=pts)
    assert 1 <= it <= 5
    assert _clearance(poses, pts) >= 0.02 or it == 5
    if move["type"] == "eloop":  # halved radii it times
        assert float(poses[:, 1, 3].min()) == pytest.approx(-0.8 * m * 0.5 ** it)
    # obs_limit caps the number of shrinks (obs_limit + 1 at most)
    _, capped = get_c2w(torch.eye(4), move, m, scene_points=pts, obs_limit=0)
    assert capped == 1


def test_aerial_halves_only_the_colliding_part():
    m, up = 1.0, (0.0, -1.0, 0.0)
    move = {"type": "aerial", "rotation": [60.0, -30.0]}
    free, _ = get_c2w(torch.eye(4), move, m, up=up)
    # obstacle at the end of the azimuth phase only
    pts = free[-1, :3, 3].numpy() + np.random.default_rng(0).normal(scale=0.001, size=(50, 3))
    poses, it = get_c2w(torch.eye(4), move, m, scene_points=pts, up=up)
    assert it >= 1

    def yaw_pitch(c2w):
        z = c2w[:3, 2]
        return math.degrees(math.atan2(float(z[0]), float(z[2]))), math.degrees(math.asin(float(z[1])))

    assert yaw_pitch(free[-1]) == (pytest.approx(60.0), pytest.approx(30.0))
    yaw, pitch = yaw_pitch(poses[-1])
    assert pitch == pytest.approx(30.0)  # elevation untouched
    assert yaw == pytest.approx(60.0 * 0.5 ** it)  # azimuth halved each time


@pytest.mark.parametrize("move, match", [
    ({"type": "spiral"}, "type"),
    ({"type": "normal", "zoom": 1}, "unknown keys"),
    ({"type": "normal", "rotation": [1.0]}, "rotation"),
    ({"type": "normal", "left-right": float("nan")}, "finite"),
    ({"type": "eloop", "radius_x": 0.3}, "radius_y"),
    ({"type": "aerial"}, "rotation"),
])
def test_bad_moves_rejected(move, match):
    with pytest.raises(InputError, match=match):
        get_c2w(torch.eye(4), move, 1.0)


def test_normal_key_order_matters():
    a, _ = get_c2w(torch.eye(4), {"type": "normal", "rotation": [30.0, 0.0], "left-right": 0.5}, 2.0)
    b, _ = get_c2w(torch.eye(4), {"type": "normal", "left-right": 0.5, "rotation": [30.0, 0.0]}, 2.0)
    assert float((a - b).abs().max()) > 0.05


def test_up_azimuth_matches_native_for_level_cameras_and_keeps_roll_zero():
    start = make_pose(rot_y(0.4), _t([0.3, 0.1, -2.0]))
    for phi, theta in ((0.5, 0.0), (-0.7, -0.3)):
        native = M.native_camera_rotation(start, 2.0, phi, theta)
        torch.testing.assert_close(M.camera_rotation(start, 2.0, phi, theta, up=(0, -1, 0)), native,
                                   atol=1e-12, rtol=0)
    pitched = make_pose(rot_x(-0.5), torch.zeros(3))
    out = M.camera_rotation(pitched, 2.0, 0.8, 0.0, up=(0, -1, 0))
    assert abs(float(out[1, 0])) < 1e-12  # camera x stays horizontal: no roll
    assert float(out[1, 2]) == pytest.approx(math.sin(0.5))  # pitch kept


# ---------------------------------------------------------------------------------------------
# Chained moves, presets, resampling, scale
# ---------------------------------------------------------------------------------------------

def test_trajectory_from_moves_chains_and_counts():
    start = invert_rigid(make_pose(torch.eye(3), _t([0, 0, -2.0])))
    moves = [{"type": "normal", "backward-forward": 0.2, "frames": 8},
             {"type": "normal", "rotation": [20.0, 0.0]}]
    traj = trajectory_from_moves(start, K, moves, 2.0, width=768, height=512)
    assert len(traj) == 21 and traj.meta["moves"] == moves
    torch.testing.assert_close(traj.w2c[0], start)
    first, _ = get_c2w(traj.c2w[0], {"type": "normal", "backward-forward": 0.2}, 2.0, 2.0, 8, up=(0, -1, 0))
    torch.testing.assert_close(traj.c2w[1:9], first, atol=1e-12, rtol=0)
    second, _ = get_c2w(first[-1], {"type": "normal", "rotation": [20.0, 0.0]}, 2.0, 2.0, 12, up=(0, -1, 0))
    torch.testing.assert_close(traj.c2w[9:], second, atol=1e-12, rtol=0)
    # frames that do not add up are resampled to nframe, and kept with nframe=None
    long = [{"type": "normal", "rotation": [20.0, 0.0], "frames": 30}]
    assert len(trajectory_from_moves(start, K, long, 2.0, width=768, height=512)) == 21
    assert len(trajectory_from_moves(start, K, long, 2.0, width=768, height=512, nframe=None)) == 31
    with pytest.raises(InputError, match="at least one move"):
        trajectory_from_moves(start, K, [], 2.0, width=768, height=512)
    with pytest.raises(InputError, match="must be a dict"):
        trajectory_from_moves(start, K, ["orbit_left"], 2.0, width=768, height=512)
    with pytest.raises(InputError, match="frames"):
        trajectory_from_moves(start, K, [{"type": "eloop", "radius_x": 0.1, "radius_y": 0.1, "frames": 0}], 2.0,
                              width=768, height=512)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    assert PRESETS[name].doc and PRESETS[name].moves
    m = 2.0
    start = invert_rigid(make_pose(torch.eye(3), _t([0, 0, -m])))  # single-view world: pivot at origin
    traj = trajectory_from_moves(start, K, preset_moves(name), m, width=768, height=512)
    assert len(traj) == 21 and rigidity_error(traj.w2c) < 1e-9
    torch.testing.assert_close(traj.w2c[0], start)
    c = camera_centers(traj.w2c)
    assert float((c[1:] - c[:-1]).norm(dim=-1).max()) < m  # no jumps
    assert float((traj.c2w[1:] - traj.c2w[:1]).abs().max()) > 1e-3  # it moves


def test_preset_directions():
    m = 2.0
    start = invert_rigid(make_pose(torch.eye(3), _t([0, 0, -m])))

    def last(name):
        return trajectory_from_moves(start, K, preset_moves(name), m, width=768, height=512).c2w[-1]

    assert float(last("orbit_left")[0, 3]) < 0 < float(last("orbit_right")[0, 3])
    assert float(last("truck_left")[0, 3]) < 0 < float(last("truck_right")[0, 3])
    assert float(last("orbit_up")[1, 3]) < 0  # y down: rising is -y
    assert float(last("dolly_in")[2, 3]) > -m > float(last("dolly_out")[2, 3])
    for name, sign in (("pan_left", -1), ("pan_right", 1)):
        pose = last(name)
        torch.testing.assert_close(pose[:3, 3], start.inverse()[:3, 3])  # in place
        assert sign * float(pose[0, 2]) > 0  # looks to that side
    with pytest.raises(InputError, match="unknown trajectory preset"):
        preset_moves("barrel_roll")


def test_resample_trajectory_endpoints_and_k():
    traj = reconstruction_trajectories(torch.eye(4), K, 768, 512, 2.0)["traj_left"]
    traj.K[-1] = traj.K[-1] * 2
    traj.K[-1, 2, 2] = 1
    out = resample_trajectory(traj, 41)
    assert len(out) == 41
    torch.testing.assert_close(out.w2c[[0, -1]], traj.w2c[[0, -1]], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.w2c[::2], traj.w2c, atol=1e-9, rtol=0)  # knots kept exactly
    torch.testing.assert_close(out.K[0], traj.K[0])
    torch.testing.assert_close(out.K[-1], traj.K[-1])


def test_median_depth_lower_median_and_validation():
    d = torch.tensor([[4.0, 1.0, 0.0], [float("inf"), 3.0, 2.0]])
    assert median_depth(d) == 2.0  # valid: 1, 2, 3, 4 -> lower middle value
    assert median_depth(d, mask=torch.tensor([[True, False, True], [True, True, True]])) == 3.0
    assert median_depth(np.array([5.0, float("nan"), 7.0, 6.0])) == 6.0
    with pytest.raises(InputError, match="no valid pixels"):
        median_depth(torch.zeros(4, 4))


def test_panorama_bank_geometry():
    keys, bank = panorama_bank_cameras()
    assert keys == [f"{i:04d}" for i in range(27)] and (bank.width, bank.height) == (832, 480)
    torch.testing.assert_close(camera_centers(bank.w2c), torch.zeros(27, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    c2w = bank.c2w
    assert float(c2w[:, 2, 0].abs().max()) < 1e-12  # camera x horizontal (no roll) in the z-up world
    assert bool((c2w[:, 2, 1] <= 1e-12).all())  # image down has no upward component
    fov_x = 2 * math.degrees(math.atan(416 / float(bank.K[0, 0, 0])))
    fov_y = 2 * math.degrees(math.atan(240 / float(bank.K[0, 1, 1])))
    assert (fov_x, fov_y) == (pytest.approx(120.0), pytest.approx(90.0))
