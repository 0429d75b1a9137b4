"""Trajectories placed in a start view's scene (:class:`.start_view.StartView`): a list of moves
whose sizes are in units of the view's scale m, the text of a JSON trajectory (moves or a whole
camera.json), and a loaded camera file fitted to the view."""
from __future__ import annotations

import json
from typing import Any, Sequence

from ..cameras import CameraTrajectory, anchor_w2c
from ..errors import InputError
from ..io.camera_json import camera_trajectory_from_dict
from .start_view import StartView
from .trajectories import trajectory_from_moves


def moves_trajectory(view: StartView, moves: Sequence[dict], nframe: int, scale: float = 1.0) -> CameraTrajectory:
    """``nframe`` cameras chained from the view's start camera (:func:`.trajectories.trajectory_from_moves`),
    move sizes in units of ``scale`` x m."""
    return trajectory_from_moves(view.w2c, view.K, moves, view.median_depth * scale, width=view.width,
                                 height=view.height, nframe=nframe)


def fit_to_view(traj: CameraTrajectory, view: StartView, *, nframe: int, anchor: bool, scale: float
                ) -> CameraTrajectory:
    """A loaded trajectory subsampled to ``nframe`` cameras (0 = all), K in pixels of the view's
    image and, with ``anchor``, moved so its first camera is the view's start camera (relative
    translations times ``scale``)."""
    if nframe:
        traj = traj.subsample(nframe)
    traj = traj.resized(view.height, view.width)
    if anchor:
        traj = traj.with_w2c(anchor_w2c(traj.w2c, view.w2c, scale))
    return traj


def parse_trajectory_json(json_text: str) -> Any:
    """The value of a JSON trajectory text: a moves list, ``{"moves": [...]}`` or a camera.json dict."""
    if not isinstance(json_text, str) or not json_text.strip():
        raise InputError("json_text is empty; give a list of moves or a camera.json object")
    try:
        value = json.loads(json_text)
    except json.JSONDecodeError as exc:
        raise InputError(f"json_text is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if isinstance(value, dict) and "moves" in value and "extrinsic" not in value:
        value = value["moves"]
    if isinstance(value, dict):
        if "extrinsic" not in value:
            raise InputError("json_text object must be a camera.json ({\"extrinsic\": [...], \"intrinsic\": [...]}) "
                             "or {\"moves\": [...]}")
        return value
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise InputError("json_text must be a non-empty list of move objects like {\"type\": \"normal\", "
                         "\"rotation\": [30, 0]}, or a camera.json object")
    return value


def json_trajectory(json_text: str, view: StartView, nframe: int, scale: float = 1.0) -> CameraTrajectory:
    """The trajectory of a JSON text (:func:`parse_trajectory_json`): moves from the view's start
    camera, or a camera.json anchored on it (translations times ``scale``)."""
    value = parse_trajectory_json(json_text)
    if isinstance(value, dict):
        traj = camera_trajectory_from_dict(value, source="json_text", default_size=(view.height, view.width))
        return fit_to_view(traj, view, nframe=nframe, anchor=True, scale=scale)
    return moves_trajectory(view, value, nframe, scale)
