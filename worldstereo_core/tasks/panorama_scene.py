"""A panorama scene folder from one equirectangular image, in the release's layout (:mod:`..io.scene_layout`), so
the multi-trajectory loop runs it like a release scene.

Steps of :func:`make_panorama_scene`:

1. the panorama (2:1) is area-downsampled to at most ``max_width`` for the crops and to
   ``cloud_width`` for the depth and the cloud;
2. depth: the user's equirectangular distance map, or MoGe's split/infer/merge
   (:func:`geometry.panorama_depth.panorama_distance`) with ``depth_fn``;
3. the 360-degree cloud (:func:`geometry.panorama_depth.panorama_points`): the initial 3D cache;
4. trajectories: :func:`geometry.wander.plan_wander`;
5. files (every write atomic)::

       pano_bank/cameras.json, pano_bank/images/0000.png ... 0026.png    the 27 bank crops
       <group>/start_frame.png                                           crop at the group's start
       <group>/<traj>/camera.json, traj_caption.json                     {"prompt": prompt + motion}
       <group>/<traj>/render.mp4, render_mask.mp4                        warps of the cloud (``renders``)
       panorama.png, panorama_distance.npy (float32, 0 = unknown), panorama_cloud.ply
       panorama_scene.json                                               settings, plan numbers, "complete"

``panorama_scene.json`` is written first (``"complete": false``) and again last: a rerun with the
same image and settings returns the finished folder as it is, or rebuilds an interrupted one; a
folder built from something else, or one this function did not make, is refused rather than
overwritten. A build holds the folder's run lock (:mod:`..io.run_lock`), so a second build of the
same folder is refused at once, and the loop refuses a scene whose build has not finished
(:func:`check_made_scene`).

The multi-trajectory loop renders a made scene's trajectories from its cloud where it has no
warps, and starts its global 3D cache from it (:func:`panorama_cache`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ..cameras import CameraTrajectory
from ..constants import PANO_BANK_SIZE, RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC, SOBEL_EDGE_THRESHOLD
from ..errors import InputError
from ..geometry.depth import DepthFn
from ..geometry.equirect import check_panorama_size, panorama_bank_crops, perspective_from_equirect
from ..geometry.panorama_depth import (SPLIT_SIZE, load_panorama_distance, panorama_distance, panorama_points,
                                       split_cameras)
from ..geometry.pointcloud import PointCloud
from ..geometry.renderer import render_point_cloud, render_warps
from ..geometry.wander import PlannedTrajectory, WanderOptions, WanderPlan, plan_wander
from ..io.atomic import atomic_path, safe_join, write_json_atomic
from ..io.camera_json import load_camera_json, save_bank_cameras, save_camera_json
from ..io.images import ImageLike, load_image, to_tensor_m11
from ..io.pointcloud_files import read_ply, write_ply
from ..io.render_folder import save_render_folder
from ..io.run_lock import LOCK_NAME, locked_run_folder
from ..io.scene_layout import (CAMERA_FILE, CAMERAS_FILE, DISTANCE_FILE, GROUP_START_IMAGE, IMAGES_DIR, PANO_BANK,
                               PANORAMA_CLOUD, PANORAMA_FILE, PANORAMA_MANIFEST, TRAJ_CAPTION, bank_image)
from ..memory.cache import CacheSettings, PointCache
from ..progress import ProgressFn, report

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PanoramaSceneOptions:
    """Sizes and switches of :func:`make_panorama_scene` (bank size: the release's ``PANO_BANK_SIZE``)."""

    bank_width: int = PANO_BANK_SIZE[1]
    bank_height: int = PANO_BANK_SIZE[0]
    #: Widest panorama used for the crops (wider inputs are area-downsampled: no aliasing).
    max_width: int = 4096
    #: Panorama width of the depth map and the cloud.
    cloud_width: int = 2048
    #: Side of MoGe's split views.
    view_size: int = SPLIT_SIZE
    #: Depth-edge threshold of the lifting (lower it for panoramas a few hundred pixels wide).
    edge_threshold: float = SOBEL_EDGE_THRESHOLD
    #: Write render.mp4 / render_mask.mp4 warps of the cloud (the loop's release mode needs them).
    renders: bool = True
    render_radius: float = RENDER_RADIUS_NDC
    points_per_pixel: int = RENDER_POINTS_PER_PIXEL
    wander: WanderOptions = field(default_factory=WanderOptions)

    def __post_init__(self) -> None:
        for name in ("bank_width", "bank_height", "max_width", "cloud_width", "view_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 16 <= value <= 16384):
                raise InputError(f"PanoramaSceneOptions.{name} must be an integer in 16..16384, got {value!r}")
        if self.bank_width % 2 or self.bank_height % 2:
            raise InputError("PanoramaSceneOptions: bank_width and bank_height must be even (video encoding)")
        if self.cloud_width > self.max_width:
            raise InputError("PanoramaSceneOptions: cloud_width must not exceed max_width")


@dataclass
class PanoramaScene:
    """What :func:`make_panorama_scene` made (or found finished in ``folder``)."""

    folder: Path
    cloud: PointCloud
    distance: torch.Tensor
    summary: dict
    plan: WanderPlan | None = None

    @property
    def reused(self) -> bool:
        return self.plan is None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _area_resize(image: np.ndarray, width: int) -> np.ndarray:
    """A 2:1 panorama at most ``width`` wide (area averaging; never enlarged)."""
    if image.shape[1] <= width:
        return image
    return cv2.resize(image, (width, width // 2), interpolation=cv2.INTER_AREA)


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _start_frame(panorama: np.ndarray, planned: PlannedTrajectory) -> np.ndarray:
    cams = planned.trajectory
    return perspective_from_equirect(panorama, CameraTrajectory(cams.w2c[:1], cams.K[:1], cams.width, cams.height))[0]


def _caption(prompt: str, planned: PlannedTrajectory) -> str:
    return f"{prompt.strip()} {planned.caption}".strip()


def _read_manifest(folder: Path) -> dict | None:
    """``panorama_scene.json`` of ``folder``, None when there is none."""
    manifest = folder / PANORAMA_MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = str(exc)
    else:
        if isinstance(data, dict):
            return data
        problem = "not a JSON object"
    raise InputError(f"{manifest} is damaged ({problem}); delete {folder} and make the scene again")


def _check_folder(folder: Path, signature: dict) -> dict | None:
    """The manifest of a finished scene with this signature, None to (re)build, or an error."""
    data = _read_manifest(folder)
    if data is not None:
        if data.get("signature") != signature:
            raise InputError(f"{folder} holds a panorama scene made from another image or with other settings; "
                             "choose another folder or delete it")
        return data if data.get("complete") else None
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir())):
        raise InputError(f"{folder} exists and is not a panorama scene made here (no {PANORAMA_MANIFEST}); choose a "
                         "new or empty folder")
    return None


# --------------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------------

def make_panorama_scene(panorama: ImageLike, out_dir: str | os.PathLike, *, depth=None,
                        depth_fn: DepthFn | None = None, prompt: str = "",
                        options: PanoramaSceneOptions | None = None,
                        progress: ProgressFn | None = None) -> PanoramaScene:
    """Build the scene folder ``out_dir`` from one equirectangular image (see the module docstring).

    ``panorama``: a path, PIL image, uint8/float array or ComfyUI IMAGE tensor, 2:1. ``depth``: the
    user's equirectangular distance map (array/tensor or .npy/.npz/16-bit .png; 0/NaN/inf =
    unknown), else ``depth_fn`` (a :data:`geometry.depth.DepthFn`, e.g.
    :func:`geometry.panorama_depth.moge_view_depth_fn`) estimates it. ``prompt`` describes the
    scene; each trajectory's caption appends its motion. ``progress(done, total)`` ticks per depth
    view and per trajectory and may raise to interrupt; a rerun resumes. Raises RunFolderLocked
    while another build holds the folder.
    """
    opts = options or PanoramaSceneOptions()
    if depth is None and depth_fn is None:
        raise InputError("a panorama scene needs depth: give depth (an equirectangular distance map) or depth_fn (MoGe)")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    image = load_image(panorama, name=str(panorama) if isinstance(panorama, (str, os.PathLike)) else "panorama")
    check_panorama_size(*image.shape[:2])
    work = _area_resize(image, opts.max_width)
    small = _area_resize(work, opts.cloud_width)
    user_depth = None if depth is None else load_panorama_distance(depth, *small.shape[:2])

    folder = Path(out_dir)
    signature = {"version": MANIFEST_VERSION, "image": _digest(image),
                 "depth": None if user_depth is None else _digest(user_depth.numpy()),
                 "prompt": prompt, "options": json.loads(json.dumps(asdict(opts)))}
    done = _check_folder(folder, signature)  # before the lock: a foreign folder is left untouched
    if done is not None:
        return _finished(folder, done)
    with locked_run_folder(folder):
        done = _check_folder(folder, signature)  # another build may have finished meanwhile
        if done is not None:
            return _finished(folder, done)
        write_json_atomic(safe_join(folder, PANORAMA_MANIFEST), {"signature": signature, "complete": False})

        depth_steps = len(split_cameras()) + 1 if user_depth is None else 0  # depth: views, then the merge
        total = depth_steps + 1 + opts.wander.trajectory_count

        def tick(at: int):  # a sub-task's progress: the same tick again (so an interrupt is seen)
            return lambda _d, _n: report(progress, at, total)

        if user_depth is None:
            distance, mask = panorama_distance(small, depth_fn, view_size=opts.view_size,
                                               progress=lambda i, _n: report(progress, i, total))
        else:
            distance, mask = user_depth, user_depth > 0
        cloud = panorama_points(small, distance, mask, edge_threshold=opts.edge_threshold)
        plan = plan_wander(distance, mask, options=opts.wander, width=opts.bank_width, height=opts.bank_height)
        report(progress, depth_steps + 1, total)

        keys, bank, crops = panorama_bank_crops(work, opts.bank_width, opts.bank_height)
        for key, crop in zip(keys, crops):
            _write_png(safe_join(folder, PANO_BANK, IMAGES_DIR, bank_image(key)), crop)
        save_bank_cameras(keys, bank, safe_join(folder, PANO_BANK, CAMERAS_FILE))

        for i, planned in enumerate(plan.trajectories):
            traj_dir = safe_join(folder, planned.group, planned.traj)
            start = None
            if planned.start_from is None:
                start = _start_frame(work, planned)
                _write_png(safe_join(folder, planned.group, GROUP_START_IMAGE), start)
            write_json_atomic(traj_dir / TRAJ_CAPTION, {"prompt": _caption(prompt, planned)})
            if opts.renders:
                rgb, holes = _render(cloud, planned.trajectory, start, opts, tick(depth_steps + 1 + i))
                save_render_folder(traj_dir, rgb, holes, planned.trajectory)
            else:
                save_camera_json(planned.trajectory, traj_dir / CAMERA_FILE)
            report(progress, depth_steps + 2 + i, total)

        _write_png(safe_join(folder, PANORAMA_FILE), work)
        with atomic_path(safe_join(folder, DISTANCE_FILE)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, distance.numpy().astype(np.float32))
        write_ply(safe_join(folder, PANORAMA_CLOUD), cloud)
        summary = {"signature": signature, "complete": True, "panorama_size": list(image.shape[:2]),
                   "cloud_points": len(cloud), "plan": plan.summary()}
        write_json_atomic(safe_join(folder, PANORAMA_MANIFEST), summary)
        return PanoramaScene(folder, cloud, distance, summary, plan)


def _finished(folder: Path, manifest: dict) -> PanoramaScene:
    distance = torch.from_numpy(np.load(folder / DISTANCE_FILE))
    return PanoramaScene(folder, read_ply(folder / PANORAMA_CLOUD), distance, manifest)


# --------------------------------------------------------------------------------------------
# What the loop reads
# --------------------------------------------------------------------------------------------

def check_made_scene(folder: str | os.PathLike) -> dict | None:
    """The manifest of a scene folder made by :func:`make_panorama_scene`, None for another folder
    (a release scene); refuses one whose build has not finished or whose files are damaged."""
    folder = Path(folder)
    data = _read_manifest(folder)
    if data is None:
        return None
    if not data.get("complete"):
        raise InputError(f"{folder}: the panorama scene is not finished (its build was interrupted or is running); "
                         "make it again from the same image (make_panorama_scene / `panorama-scene`), which "
                         "finishes it")
    if not (folder / PANORAMA_CLOUD).is_file():
        raise InputError(f"{folder / PANORAMA_CLOUD} is missing; delete {folder} and make the scene again")
    return data


def planned_trajectories(folder: str | os.PathLike) -> list[tuple[str, CameraTrajectory]]:
    """Every trajectory of a scene folder as (``"<group>/<traj>"``, its cameras), in folder order."""
    paths = sorted(p for p in Path(folder).glob(f"*/*/{CAMERA_FILE}") if p.parent.parent.name != PANO_BANK)
    return [(f"{p.parent.parent.name}/{p.parent.name}", load_camera_json(p)) for p in paths]


def panorama_cache(folder: str | os.PathLike, *, mode: str = "global",
                   settings: CacheSettings | None = None) -> PointCache:
    """The initial 3D cache of a made scene: its 360-degree cloud; the scene scale is the median
    distance of the points from the panorama centre (the origin of the bank's world frame)."""
    cloud = read_ply(Path(folder) / PANORAMA_CLOUD)
    scale = float(cloud.xyz.double().norm(dim=1).median())
    return PointCache(cloud, scale, mode=mode, settings=settings)


def _render(cloud: PointCloud, trajectory: CameraTrajectory, start: np.ndarray | None,
            opts: PanoramaSceneOptions, progress: ProgressFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warps of the cloud along ``trajectory``; frame 0 is the start image when there is one (the
    iterative trajectories get theirs from a generated clip, so all their frames are renders)."""
    H, W = trajectory.height, trajectory.width
    kwargs = {"radius": opts.render_radius, "points_per_pixel": opts.points_per_pixel, "progress": progress}
    if start is None:
        return render_point_cloud(cloud.xyz, cloud.rgb_signed, trajectory.K, trajectory.w2c, H, W, **kwargs)
    return render_warps(cloud.xyz, cloud.rgb_signed, trajectory, to_tensor_m11(start), H, W, **kwargs)
