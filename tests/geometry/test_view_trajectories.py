"""Trajectories placed in a start view (geometry/view_trajectories.py), checked against the
functions they build on and independent pose algebra."""
from __future__ import annotations

import json

import pytest
import torch

from worldstereo_core.cameras import CameraTrajectory, intrinsics_from_fov, invert_rigid
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.presets import preset_moves
from worldstereo_core.geometry.start_view import stand_in_view
from worldstereo_core.geometry.trajectories import trajectory_from_moves
from worldstereo_core.geometry.view_trajectories import (fit_to_view, json_trajectory, moves_trajectory,
                                                         parse_trajectory_json)
from worldstereo_core.io.camera_json import camera_json_dict

MOVES = [{"type": "normal", "rotation": [30.0, 0.0], "frames": 10},
         {"type": "normal", "backward-forward": 0.3, "frames": 10}]


def _file_trajectory(n=9, width=400, height=300):
    """A wandering camera path, every pose a valid rigid transform, K for width x height."""
    w2c = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    for i in range(n):
        a = 0.1 * i
        w2c[i, :3, :3] = torch.tensor([[1, 0, 0], [0, torch.cos(torch.tensor(a)), -torch.sin(torch.tensor(a))],
                                       [0, torch.sin(torch.tensor(a)), torch.cos(torch.tensor(a))]])
        w2c[i, :3, 3] = torch.tensor([0.3 * i, -0.1 * i, 0.05 * i])
    return CameraTrajectory(w2c=w2c, K=intrinsics_from_fov(width, height, 60.0), width=width, height=height)


def test_moves_are_measured_in_the_view_scale():
    view = stand_in_view()
    traj = moves_trajectory(view, preset_moves("orbit_left"), 21, scale=1.5)
    expected = trajectory_from_moves(view.w2c, view.K, preset_moves("orbit_left"), view.median_depth * 1.5,
                                     width=view.width, height=view.height, nframe=21)
    assert torch.equal(traj.w2c, expected.w2c) and torch.equal(traj.K, expected.K)
    assert (traj.height, traj.width) == (view.height, view.width)


def test_fit_to_view_subsamples_resizes_and_anchors():
    view = stand_in_view()
    src = _file_trajectory()
    fitted = fit_to_view(src, view, nframe=5, anchor=True, scale=2.0)
    assert len(fitted) == 5 and (fitted.height, fitted.width) == (view.height, view.width)
    assert torch.allclose(fitted.w2c[0], view.w2c)
    kept = src.subsample(5)
    for i in range(5):  # relative pose to the first camera kept, its translation doubled
        rel_src = kept.w2c[i] @ invert_rigid(kept.w2c[0])
        rel_fit = fitted.w2c[i] @ invert_rigid(fitted.w2c[0])
        assert torch.allclose(rel_fit[:3, :3], rel_src[:3, :3], atol=1e-12)
        assert torch.allclose(rel_fit[:3, 3], 2.0 * rel_src[:3, 3], atol=1e-12)
    assert torch.allclose(fitted.K[0, 0, 0], src.K[0, 0, 0] * view.width / 400)
    free = fit_to_view(src, view, nframe=0, anchor=False, scale=1.0)
    assert len(free) == len(src) and torch.equal(free.w2c, src.w2c)


def test_parse_trajectory_json():
    assert parse_trajectory_json(json.dumps(MOVES)) == MOVES
    assert parse_trajectory_json(json.dumps({"moves": MOVES})) == MOVES
    cam = camera_json_dict(_file_trajectory())
    assert parse_trajectory_json(json.dumps(cam)) == json.loads(json.dumps(cam))
    for text, msg in (("", "empty"), ("[1,", "not valid JSON"), ("{\"a\": 1}", "camera.json"), ("[]", "non-empty"),
                      ("[1, 2]", "non-empty")):
        with pytest.raises(InputError, match=msg):
            parse_trajectory_json(text)


def test_json_trajectory_moves_or_anchored_camera_file():
    view = stand_in_view()
    assert torch.equal(json_trajectory(json.dumps(MOVES), view, 21).w2c, moves_trajectory(view, MOVES, 21).w2c)
    cam = json.dumps(camera_json_dict(_file_trajectory()))
    traj = json_trajectory(cam, view, 4, scale=0.5)
    assert len(traj) == 4 and torch.allclose(traj.w2c[0], view.w2c)
