"""Named camera-move presets for :func:`trajectories.trajectory_from_moves` (data, not code).

Each preset is a list of ``get_c2w`` move dicts (plus the chain keys ``frames`` / ``pivot``).
Angles are degrees, translations are fractions of ``air_bound`` (default: the scene scale m),
eloop radii fractions of m. Directions are as seen by the viewer of the start image; the orbit
pivot is the point at depth m on the optical axis (see the sign notes in :mod:`.moves`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Preset:
    """A named list of moves and the sentence shown to users."""

    doc: str
    moves: tuple[dict, ...]


PRESETS: dict[str, Preset] = {
    "orbit_left": Preset(
        "Circle 45 deg to the left around the subject at depth m, keeping it centred.",
        ({"type": "normal", "rotation": [45.0, 0.0]},)),
    "orbit_right": Preset(
        "Circle 45 deg to the right around the subject at depth m, keeping it centred.",
        ({"type": "normal", "rotation": [-45.0, 0.0]},)),
    "orbit_up": Preset(
        "Rise 30 deg over the subject, tilting down to keep it centred.",
        ({"type": "normal", "rotation": [0.0, -30.0]},)),
    "dolly_in": Preset(
        "Move straight forward by half the scene depth.",
        ({"type": "normal", "backward-forward": 0.5},)),
    "dolly_out": Preset(
        "Move straight backward by half the scene depth.",
        ({"type": "normal", "backward-forward": -0.5},)),
    "truck_left": Preset(
        "Slide sideways to the left by 0.3 of the scene depth, looking straight ahead.",
        ({"type": "normal", "left-right": -0.3},)),
    "truck_right": Preset(
        "Slide sideways to the right by 0.3 of the scene depth, looking straight ahead.",
        ({"type": "normal", "left-right": 0.3},)),
    "pan_left": Preset(
        "Turn the camera 40 deg to the left in place (no translation).",
        ({"type": "normal", "rotation": [-40.0, 0.0], "pivot": 0.0},)),
    "pan_right": Preset(
        "Turn the camera 40 deg to the right in place (no translation).",
        ({"type": "normal", "rotation": [40.0, 0.0], "pivot": 0.0},)),
    "eloop": Preset(
        "Closed ellipse in the image plane (0.3 m wide, 0.4 m high) looking at the subject; ends "
        "where it starts (the reconstruction traj_eloop).",
        ({"type": "eloop", "radius_x": 0.3, "radius_y": 0.4},)),
    "aerial_up": Preset(
        "Rise 20 deg over the subject, then circle 40 deg to the left around it.",
        ({"type": "aerial", "rotation": [40.0, -20.0]},)),
    "forward_then_orbit_left": Preset(
        "Walk forward by 0.3 of the scene depth, then circle 30 deg left around the subject.",
        ({"type": "normal", "backward-forward": 0.3, "frames": 10},
         {"type": "normal", "rotation": [30.0, 0.0], "pivot": 0.7, "frames": 10})),
}


def preset_moves(name: str) -> list[dict]:
    """A fresh copy of the move list of preset ``name``."""
    if name not in PRESETS:
        raise InputError(f"unknown trajectory preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(list(PRESETS[name].moves))
