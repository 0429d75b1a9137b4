"""Single-view camera control: the release's ``run_camera_control``.

Scene folder (``examples/images/<scene>``): ``image.png``, ``prompt.json`` (its ``"long caption"``)
and ``camera.json`` (w2c + K in pixels of image.png, usually 81 frames, subsampled to ``nframe``).
Steps: working size (``assign_scale``) -> bicubic resize -> depth of the working image (MoGe) ->
start-view point cloud (:func:`geometry.start_view.lift_start_view`) -> warp renders along the trajectory,
written as ``render.mp4`` / ``render_mask.mp4`` / ``camera.json`` and read back as the reference
does -> generation -> ``<out>/<scene>/<model>_result.mp4`` (16 fps) and its frames as PNG in
``<model>_frames/``. Memory models get the input frame as their only reference (``ref_index = [0]``).
:func:`validate_camera_scene` checks a scene folder without any model. The output folder
``<out>/<scene>/`` is held by one run at a time (:mod:`..io.run_lock`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..cameras import CameraTrajectory
from ..constants import DEFAULT_SCALE_MAP, DEFAULT_SEED, FPS, NFRAME, RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC
from ..errors import InputError
from ..geometry.depth import DepthFn
from ..geometry.renderer import render_warps
from ..geometry.start_view import ViewDepth, lift_start_view
from ..io.atomic import atomic_path, safe_join
from ..io.camera_json import load_camera_json
from ..io.images import load_image, resize_bicubic, to_tensor_m11
from ..io.render_folder import load_render_folder, save_render_folder
from ..io.run_lock import locked_run_folder
from ..io.scene_layout import CAMERA_FILE, PROMPT_FILE, START_IMAGE, result_video
from ..io.video import read_video, write_video
from ..progress import ProgressFn
from ..sizes import assign_scale
from .generate import ClipGenerator, GenerationRequest
from .ordering import read_prompt

PROMPT_KEY = "long caption"


@dataclass
class CameraControlResult:
    """Files written by :func:`run_camera_control`."""

    scene_out: Path
    result: Path
    frames_dir: Path
    size: tuple[int, int]
    num_frames: int


def read_caption(path: Path, key: str = PROMPT_KEY) -> str:
    """The ``key`` caption of a single-view ``prompt.json`` (the release uses the long caption)."""
    return read_prompt(path, "camera-control scene", key)


def _read_scene(scene_dir: Path, model_name: str, scale_map, nframe: int
                ) -> tuple[np.ndarray, str, CameraTrajectory, tuple[int, int]]:
    """(image, prompt, trajectory subsampled to ``nframe``, working size) of a scene folder."""
    if not scene_dir.is_dir():
        raise InputError(f"scene folder {scene_dir} not found; check the path")
    if any(c in model_name for c in "/\\") or not model_name:
        raise InputError(f"model_name must be a plain file-name prefix, got {model_name!r}")
    if not (isinstance(nframe, int) and nframe >= 2):
        raise InputError(f"nframe must be a whole number >= 2, got {nframe!r}")
    image = load_image(scene_dir / START_IMAGE)
    h0, w0 = image.shape[:2]
    prompt = read_caption(scene_dir / PROMPT_FILE)
    traj = load_camera_json(scene_dir / CAMERA_FILE, width=w0, height=h0).subsample(nframe)
    return image, prompt, traj, assign_scale(h0, w0, scale_map)


def validate_camera_scene(scene_dir: str | os.PathLike, *, model_name: str = "worldstereo-camera",
                          scale_map=DEFAULT_SCALE_MAP, nframe: int = NFRAME) -> None:
    """Check a camera-control scene folder (image.png, prompt.json, camera.json) without any model;
    raises InputError naming the problem and the fix."""
    _read_scene(Path(scene_dir), model_name, scale_map, nframe)


def run_camera_control(scene_dir: str | os.PathLike, out_dir: str | os.PathLike, clip_generator: ClipGenerator,
                       depth_fn: DepthFn, *, model_name: str = "worldstereo-camera",
                       scale_map=DEFAULT_SCALE_MAP, nframe: int = NFRAME, seed: int = DEFAULT_SEED,
                       render_radius: float = RENDER_RADIUS_NDC, points_per_pixel: int = RENDER_POINTS_PER_PIXEL,
                       progress: ProgressFn | None = None) -> CameraControlResult:
    """Generate one camera-controlled clip from a scene folder (see the module docstring).

    ``clip_generator``: a :data:`.generate.ClipGenerator`; ``depth_fn``: see :data:`geometry.depth.DepthFn`
    (called once, on the working-size image with its K and frame-0 w2c). ``progress`` is passed
    to the clip generator (one tick per sampling step). Raises RunFolderLocked when another run holds
    the output folder.
    """
    scene_dir = Path(scene_dir)
    image, prompt, traj, size = _read_scene(scene_dir, model_name, scale_map, nframe)
    H, W = size
    traj_sized = traj.resized(H, W)
    start = resize_bicubic(image, size)
    image_t = to_tensor_m11(start)
    with locked_run_folder(safe_join(out_dir, scene_dir.name)) as scene_out:
        depth = ViewDepth.of(depth_fn(start, traj_sized.K[0], traj_sized.w2c[0]))
        cloud = lift_start_view(start, depth, K=traj_sized.K[0], w2c=traj_sized.w2c[0]).cloud
        rgb, mask = render_warps(cloud.xyz, cloud.rgb_signed, traj_sized, image_t, H, W, radius=render_radius,
                                 points_per_pixel=points_per_pixel)
        save_render_folder(scene_out, rgb, mask, traj_sized)
        render, render_mask, _ = load_render_folder(scene_out, H, W, image_t)

        request = GenerationRequest(image=start, prompt=prompt, render=render, render_mask=render_mask,
                                    trajectory=traj_sized, seed=seed, name=scene_dir.name).with_start_reference()
        frames = np.asarray(clip_generator(request, progress))
        if frames.shape != (len(traj_sized), H, W, 3):
            raise InputError(f"the clip generator returned frames of shape {frames.shape}; expected "
                             f"({len(traj_sized)}, {H}, {W}, 3)")
        result = write_video(safe_join(scene_out, result_video(model_name)), frames, FPS)
        frames_dir = safe_join(scene_out, f"{model_name}_frames")
        for i, frame in enumerate(read_video(result)):
            with atomic_path(frames_dir / f"{i:04d}.png") as tmp:
                Image.fromarray(frame).save(tmp, format="PNG")
    return CameraControlResult(scene_out, result, frames_dir, size, len(traj_sized))
