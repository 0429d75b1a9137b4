"""Camera-trajectory nodes: presets, an editable JSON string, camera.json import, and the four
reconstruction trajectories. Output type ``CAMERA_TRAJECTORY`` (a core ``CameraTrajectory`` in the
scene's world, K in pixels of the scene's image size).

Every node implements ``preview_trajectory`` (a classmethod over its widget values) so the web
extension draws the trajectory while it is edited; without a connected scene that preview uses a
stand-in start camera (:func:`worldstereo_core.geometry.start_view.stand_in_view`). After execution
the node's ``ui`` carries the real trajectory over a sample of the scene's points.
"""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..worldstereo_core.cameras import CameraTrajectory
from ..worldstereo_core.constants import NFRAME
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.geometry.presets import PRESETS, preset_moves
from ..worldstereo_core.geometry.start_view import STAND_IN_SIZE, StartView, stand_in_view
from ..worldstereo_core.geometry.trajectories import reconstruction_trajectories
from ..worldstereo_core.geometry.view_trajectories import (fit_to_view, json_trajectory, moves_trajectory,
                                                           parse_trajectory_json)
from ..worldstereo_core.io.camera_json import load_camera_json
from ..worldstereo_core.io.scene_layout import ELOOP_TRAJ, LEFT_TRAJ, RIGHT_TRAJ, UP_TRAJ
from . import files, types
from ._comfy import node_errors
from .trajectory_preview import preview_ui, trajectory_entry

CATEGORY = "WorldStereo/trajectory"
MAX_FRAMES = 1024
PRESET_NAMES = sorted(PRESETS)
DEFAULT_PRESET = "orbit_left" if "orbit_left" in PRESETS else PRESET_NAMES[0]
#: The Reconstruction Trajectories node's outputs, in order.
RECONSTRUCTION_NAMES = (ELOOP_TRAJ, UP_TRAJ, LEFT_TRAJ, RIGHT_TRAJ)
EXAMPLE_MOVES = json.dumps([{"type": "normal", "rotation": [30.0, 0.0], "frames": 10},
                            {"type": "normal", "backward-forward": 0.3, "frames": 10}], indent=1)


def _frames(frames: int) -> int:
    if not isinstance(frames, int) or isinstance(frames, bool) or not 2 <= frames <= MAX_FRAMES:
        raise InputError(f"frames must be a whole number in 2..{MAX_FRAMES}, got {frames!r}")
    return frames


def _scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or not 0 < float(scale) < 1e6:
        raise InputError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def entry(traj: CameraTrajectory, view: StartView, label: str) -> dict:
    """Preview entry: the cameras over the scene's points (or its depth range when it has none)."""
    if len(view.cloud):
        return trajectory_entry(traj, label=label, points=view.cloud.xyz, colors=view.cloud.rgb)
    m = view.median_depth
    return trajectory_entry(traj, label=label, depth_range=(0.25 * m, 2.0 * m))


def result(trajs: list[tuple[str, CameraTrajectory]], view: StartView) -> io.NodeOutput:
    """A node's return value: the trajectories as outputs, their preview as ``ui``."""
    return io.NodeOutput(*(t for _, t in trajs), ui=preview_ui(*(entry(t, view, name) for name, t in trajs)))


def view_input(tooltip: str = "Start camera, size and scale m of the scene (a stand-in view when not "
                                "connected).") -> io.Input:
    return types.Socket.POINT_CLOUD.Input("point_cloud", optional=True, tooltip=tooltip)


def trajectory_output(name: str = "trajectory") -> io.Output:
    return types.Socket.TRAJECTORY.Output(display_name=name, tooltip="Cameras in the scene's world, K in pixels of "
                                                                      "the scene's image.")


class TrajectoryPreset(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Trajectory Preset"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoTrajectoryPreset", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="A named camera move (orbit, dolly, truck, pan, eloop, aerial ...) from the scene's start view.",
            inputs=[
                io.Combo.Input("preset", options=PRESET_NAMES, default=DEFAULT_PRESET,
                               tooltip=" | ".join(f"{k}: {PRESETS[k].doc}" for k in PRESET_NAMES)),
                io.Int.Input("frames", default=NFRAME, min=2, max=MAX_FRAMES, tooltip=
                             f"Cameras in the trajectory (the released models take {NFRAME} keyframes)."),
                io.Float.Input("scale", default=1.0, min=0.01, max=100.0, step=0.05, tooltip=
                               "Multiplies the scene scale m (median depth) the move sizes refer to."),
                view_input("Start camera, size and scale m of the scene."),
            ],
            outputs=[trajectory_output()],
        )

    @classmethod
    def build_trajectory(cls, preset, frames, scale, point_cloud=None):
        view = point_cloud or stand_in_view()
        return moves_trajectory(view, preset_moves(preset), _frames(frames), _scale(scale)), view

    @classmethod
    def preview_trajectory(cls, preset, frames, scale, point_cloud=None):
        traj, view = cls.build_trajectory(preset, frames, scale)
        return preview_ui(entry(traj, view, preset))

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, preset, frames, scale, point_cloud=None) -> io.NodeOutput:
        traj, view = cls.build_trajectory(preset, frames, scale, point_cloud)
        return result([(preset, traj)], view)


class TrajectoryFromJSON(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Trajectory From JSON"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoTrajectoryFromJSON", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("An editable trajectory: a JSON list of get_c2w moves (chained; optional 'frames' and "
                         "'pivot' per move), {\"moves\": [...]}, or a whole camera.json object. No browser needed."),
            inputs=[
                io.String.Input("json_text", default=EXAMPLE_MOVES, multiline=True, tooltip=
                                "Moves: {\"type\": \"normal\", \"rotation\": [phi, theta], \"backward-forward\": s, "
                                "\"left-right\": s} | {\"type\": \"eloop\", \"radius_x\", \"radius_y\"} | "
                                "{\"type\": \"aerial\", \"rotation\": [phi, theta]}; or a camera.json object."),
                io.Int.Input("frames", default=NFRAME, min=2, max=MAX_FRAMES, tooltip=
                             f"Cameras in the trajectory (the released models take {NFRAME} keyframes)."),
                io.Float.Input("scale", default=1.0, min=0.01, max=100.0, step=0.05, tooltip=
                               "Moves: multiplies the scene scale m. camera.json: multiplies its translations "
                               "relative to the first camera."),
                view_input(),
            ],
            outputs=[trajectory_output()],
        )

    @classmethod
    def validate_inputs(cls, json_text):
        return files.validation_message(parse_trajectory_json, json_text)

    @classmethod
    def build_trajectory(cls, json_text, frames, scale, point_cloud=None):
        view = point_cloud or stand_in_view()
        return json_trajectory(json_text, view, _frames(frames), _scale(scale)), view

    @classmethod
    def preview_trajectory(cls, json_text, frames, scale, point_cloud=None):
        traj, view = cls.build_trajectory(json_text, frames, scale)
        return preview_ui(entry(traj, view, "json"))

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, json_text, frames, scale, point_cloud=None) -> io.NodeOutput:
        traj, view = cls.build_trajectory(json_text, frames, scale, point_cloud)
        return result([("json", traj)], view)


class CameraJSONLoad(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Load camera.json"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoCameraJSONLoad", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Import a camera.json (reference format: 'extrinsic' w2c 4x4 and 'intrinsic' 3x3 per frame) "
                         "from input/. With a scene connected its K is rescaled to the scene size and, with anchor, "
                         "its first camera is placed on the scene's start camera."),
            inputs=[
                io.Combo.Input("camera_json", options=files.input_files((".json",)), tooltip=
                               "A camera.json in ComfyUI's input folder."),
                io.Int.Input("frames", default=NFRAME, min=0, max=MAX_FRAMES, tooltip=
                             "Keep this many cameras, evenly spaced (0 = all)."),
                io.Boolean.Input("anchor", default=True, tooltip="Start at the scene's start camera."),
                io.Float.Input("scale", default=1.0, min=0.01, max=100.0, step=0.05, tooltip=
                               "Multiplies translations relative to the first camera (with anchor)."),
                io.Int.Input("file_width", default=0, min=0, max=16384, tooltip=
                             "Image width the file's K refers to, if the file does not say (0: scene)."),
                io.Int.Input("file_height", default=0, min=0, max=16384, tooltip=
                             "Image height the file's K refers to, if the file does not say (0: scene)."),
                view_input(),
            ],
            outputs=[trajectory_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, camera_json, **_):
        return files.fingerprint_of(files.input_path, camera_json, "camera_json")

    @classmethod
    def validate_inputs(cls, camera_json):
        return files.validation_message(lambda: load_camera_json(files.input_path(camera_json, "camera_json"),
                                                                 default_size=STAND_IN_SIZE))  # any size: checks the file

    @classmethod
    def build_trajectory(cls, camera_json, frames, anchor, scale, file_width, file_height, point_cloud=None):
        view = point_cloud or stand_in_view()
        size = (file_height, file_width) if file_width and file_height else (view.height, view.width)
        traj = load_camera_json(files.input_path(camera_json, "camera_json"), default_size=size)
        return fit_to_view(traj, view, nframe=frames and _frames(frames), anchor=anchor,
                           scale=_scale(scale) if anchor else scale), view

    @classmethod
    def preview_trajectory(cls, camera_json, frames, anchor, scale, file_width, file_height, point_cloud=None):
        traj, view = cls.build_trajectory(camera_json, frames, anchor, scale, file_width, file_height)
        return preview_ui(entry(traj, view, camera_json))

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, camera_json, frames, anchor, scale, file_width, file_height, point_cloud=None) -> io.NodeOutput:
        traj, view = cls.build_trajectory(camera_json, frames, anchor, scale, file_width, file_height, point_cloud)
        return result([(camera_json, traj)], view)


class ReconstructionTrajectories(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Reconstruction Trajectories"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoReconstructionTrajectories", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("The four trajectories of the reconstruction task from the start view: an ellipse loop, "
                         "a 45 deg rise, and 180 deg orbits to the left and to the right."),
            inputs=[
                io.Int.Input("frames", default=NFRAME, min=2, max=MAX_FRAMES, tooltip=
                             f"Cameras per trajectory (the released models take {NFRAME} keyframes)."),
                io.Float.Input("up_distance", default=0.0, min=0.0, max=1e4, step=0.05, tooltip=
                               "Pivot distance of the rise, in units of m (0 = m)."),
                view_input(),
            ],
            outputs=[trajectory_output(name) for name in RECONSTRUCTION_NAMES],
        )

    @classmethod
    def build_trajectories(cls, frames, up_distance, point_cloud=None):
        view = point_cloud or stand_in_view()
        m = view.median_depth
        trajs = reconstruction_trajectories(view.w2c, view.K, view.width, view.height, m,
                                            up_distance=(up_distance * m) if up_distance > 0 else None,
                                            nframe=_frames(frames))
        return [(name, trajs[name]) for name in RECONSTRUCTION_NAMES], view

    @classmethod
    def preview_trajectory(cls, frames, up_distance, point_cloud=None):
        trajs, view = cls.build_trajectories(frames, up_distance)
        return preview_ui(*(entry(t, view, name) for name, t in trajs))

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, frames, up_distance, point_cloud=None) -> io.NodeOutput:
        trajs, view = cls.build_trajectories(frames, up_distance, point_cloud)
        return result(trajs, view)


NODE_CLASS_MAPPINGS = {
    "WorldStereoTrajectoryPreset": TrajectoryPreset,
    "WorldStereoTrajectoryFromJSON": TrajectoryFromJSON,
    "WorldStereoCameraJSONLoad": CameraJSONLoad,
    "WorldStereoReconstructionTrajectories": ReconstructionTrajectories,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
