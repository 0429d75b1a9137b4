"""Multi-trajectory generation: the release's ``run_multi_traj`` plus the paper's global 3D cache.

Task types (the reference's ``run_multi_traj``): ``reconstruction`` (one image: eloop -> up -> right -> left)
and ``panorama`` (the 27-view bank, then view*/target*/reconstruct*/wonder* trajectories, the
iterative ones starting from the last frame of another generated clip; a scene made from one
panorama image by :mod:`.panorama_scene` also has the panorama's 360-degree cloud, the initial 3D
cache; :func:`run_panorama_image` goes from the image to the results). Per trajectory, in order:

1. conditioning: the start image at the working size (``assign_scale``) and the warp render +
   hole mask, taken from the scene's pre-rendered ``render.mp4``/``render_mask.mp4`` (release
   mode, as the release does) or rendered from the point cache (in release mode, where a scene
   has no renders: the start-view cloud, or a made panorama scene's 360-degree cloud; in
   ``global`` mode the growing cache, which starts from that cloud). Renders made here are
   written as a render folder next to the result and read back, as the reference does;
2. retrieval from the memory bank (the start image or the 27 bank views, and the kept frames of
   every generated trajectory), saved as ``memory_inputs/{<model>.mp4, <model>_ref_index.json,
   <model>_ref_w2cs.json}``;
3. generation by the injected clip generator (:mod:`.generate`); noise as the release draws it: one
   generator seeded once with ``seed``, trajectory k taking its (k+1)-th draw (also on resume), or
   ``noise="per-trajectory"``: seed + k; ``<model>_result.mp4`` (16 fps) is written and read back;
4. memory update (``sample_align_nframe`` keep rule) and, in global mode, cache update with the
   same kept frames;
5. the run state (memory bank, cache, finished trajectories) is saved in ``<model>_state/``.

Outputs go to ``<out>/<scene>/<view>/<traj>/``; at the end the WorldMirror folder
(``world_mirror_data/<model>/``, every image at the working size, the start image at the scene's
frame-0 pose), the cache as ``<model>_cloud.ply`` / ``.glb`` and one MP4 per trajectory.

The run folder ``<out>/<scene>/`` is held by one run at a time (:mod:`..io.run_lock`; a second run
is refused at once, naming the holder) and temporaries of killed writes are removed when it is
opened. Resume: the state, saved when the run starts and after every trajectory, records the
run's key: every setting, a digest of every input file and prompt (a made panorama scene's
manifest, which identifies the image, depth and settings it was made from, and its cloud among
them, so a scene rebuilt from something else is not resumed), and what identifies the models
(:meth:`.generate.PipelineClipGenerator.resume_key`: weights by name, size and mtime, scheduler
settings). A rerun with the same key skips finished trajectories, after checking that each
result file is still the one saved; a rerun with another key is refused with the changed items
named (the folder's results belong to the old inputs). A result without a saved state (results
of the release, or a state folder deleted by hand) is read back and folded into memory without
generating again, as the release does. Every write is atomic and the state is committed in one
atomic step, so a resumed run gives the same outputs as an uninterrupted one.

:func:`validate_scene` checks a scene folder without loading any model (the CLI checks every scene
before loading weights). Progress runs over :func:`progress_total` ticks: one for preparing the
scene, per trajectory one each for conditioning, retrieval and the memory update besides the
clip generator's steps, and one for the exports; between ticks, sub-steps (render chunks, cache
frames, bank files, export images) re-report the count, so an interrupting callback acts within
one unit of work.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..cameras import WORLD_UP, CameraTrajectory, intrinsics_from_fov, invert_rigid, scale_intrinsics
from ..constants import ALIGN_NFRAME, DEFAULT_SCALE_MAP, DEFAULT_SEED, FALLBACK_FOV_DEG, FPS, MAX_REFERENCE, NFRAME
from ..errors import CheckpointError, InputError, WorldStereoError
from ..geometry.depth import DepthFn
from ..geometry.start_view import ViewDepth, start_intrinsics
from ..geometry.trajectories import reconstruction_trajectories
from ..io.atomic import atomic_path, plain_name, safe_join, write_json_atomic
from ..io.camera_json import bank_keys, load_camera_json
from ..io.fingerprint import file_digest, text_digest
from ..io.images import load_image, resize_bicubic, to_tensor_m11
from ..io.pointcloud_files import camera_frustum_segments, write_glb, write_ply
from ..io.render_folder import load_render_folder, save_render_folder
from ..io.run_lock import locked_run_folder
from ..io.scene_layout import (CAMERA_FILE, CAMERAS_FILE, ELOOP_TRAJ, IMAGES_DIR, MASK_VIDEO, PANO_BANK,
                               PANORAMA_CLOUD, PANORAMA_MANIFEST, PANORAMA_SCENES, PROMPT_FILE,
                               RECONSTRUCTION_INPUT_FNAME, RECONSTRUCTION_ORDER, RECONSTRUCTION_VIEW, RENDER_VIDEO,
                               START_IMAGE, bank_image, memory_inputs, result_video, scene_cloud)
from ..io.video import read_video, read_video_frames, write_video
from ..io.worldmirror import export_worldmirror, run_worldmirror
from ..memory.bank import MemoryBank
from ..memory.cache import CACHE_MODES, CacheSettings, PointCache
from ..memory.retrieval import RetrievalResult, retrieve
from ..progress import ProgressFn, report
from ..sizes import assign_scale, validate_scale_map
from .generate import ClipGenerator, GenerationRequest
from .ordering import TASK_TYPES, read_prompt, recon_sort_trajs, sort_trajs
from .panorama_scene import PanoramaSceneOptions, check_made_scene, make_panorama_scene, panorama_cache

log = logging.getLogger(__name__)

STATE_VERSION = 2
STATE_FILE = "state.json"
#: "release": one generator for the run, trajectory k draws after k others; "per-trajectory": seed + k.
NOISE_SCHEMES = ("release", "per-trajectory")
#: Progress ticks besides the clip generator's steps: preparing the scene; per trajectory conditioning,
#: retrieval and memory update + saved state; the exports.
PREPARE_TICKS, TRAJECTORY_TICKS, EXPORT_TICKS = 1, 3, 1
#: Folder and scene name of a reconstruction made from an image given directly (:func:`run_image_scene`).
IMAGE_SCENE_INPUTS, IMAGE_SCENE = "inputs", "scene"


@dataclass(frozen=True)
class LoopOptions:
    """Settings of a multi-trajectory run (those in :meth:`signature` must not change on resume)."""

    task: str = "reconstruction"
    #: Output file prefix (``<model>_result.mp4``): the model type, as in the release.
    model_name: str = "worldstereo-memory"
    #: ``"release"`` (start-view cloud, pre-rendered warps) or ``"global"`` (growing 3D cache).
    cache_mode: str = "release"
    align_nframe: int = ALIGN_NFRAME
    max_reference: int = MAX_REFERENCE
    nframe: int = NFRAME
    scale_map: tuple[tuple[int, int], ...] = DEFAULT_SCALE_MAP
    seed: int = DEFAULT_SEED
    #: How trajectories draw their initial noise (:data:`NOISE_SCHEMES`).
    noise: str = "release"
    #: Use a scene's pre-rendered render.mp4 / render_mask.mp4 when present (release mode).
    scene_renders: bool = True
    #: Horizontal field of view assumed for an image-only reconstruction scene whose depth function
    #: does not estimate intrinsics (MoGe does).
    fov_deg: float = FALLBACK_FOV_DEG
    cache: CacheSettings = field(default_factory=CacheSettings)
    #: WorldMirror folder, cloud PLY/GLB at the end; ``run_worldmirror`` also runs HY-World 2.0 if installed.
    exports: bool = True
    run_worldmirror: bool = False

    def check(self) -> None:
        if self.task not in TASK_TYPES:
            raise InputError(f"task must be one of {TASK_TYPES}, got {self.task!r}")
        if self.noise not in NOISE_SCHEMES:
            raise InputError(f"noise must be one of {NOISE_SCHEMES}, got {self.noise!r}")
        if self.cache_mode not in CACHE_MODES:
            raise InputError(f"cache mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")
        if not isinstance(self.model_name, str) or not self.model_name or any(c in self.model_name for c in "/\\"):
            raise InputError(f"model_name must be a plain file-name prefix, got {self.model_name!r}")
        if not 1 <= self.align_nframe < self.nframe:
            raise InputError(f"align_nframe must be in 1..{self.nframe - 1}, got {self.align_nframe}")
        if self.max_reference < 1 or self.nframe < 2:
            raise InputError("max_reference must be >= 1 and nframe >= 2")
        validate_scale_map(self.scale_map)
        if not 1.0 < self.fov_deg < 179.0:
            raise InputError(f"fov_deg must be in (1, 179) degrees, got {self.fov_deg}")

    def signature(self, size: tuple[int, int]) -> dict:
        """The settings part of a run's resume key (every setting that shapes the outputs)."""
        sig = {"task": self.task, "model_name": self.model_name, "cache_mode": self.cache_mode,
               "align_nframe": self.align_nframe, "max_reference": self.max_reference, "nframe": self.nframe,
               "size": list(size), "seed": self.seed, "noise": self.noise, "scene_renders": self.scene_renders,
               "fov_deg": self.fov_deg}
        if self.cache_mode == "global":
            sig["cache"] = asdict(self.cache)
        return sig


@dataclass
class TrajectoryOutcome:
    """What happened to one trajectory of a run."""

    view_id: str
    traj_id: str
    result: Path
    #: "generated", "read back" (result existed, memory updated from it) or "skipped" (already in the state).
    status: str
    render_source: str = ""
    kept: list[int] = field(default_factory=list)
    #: Memory bank entries and cache points after this trajectory (None when skipped).
    bank_size: int | None = None
    cache_points: int | None = None


@dataclass
class LoopResult:
    """Outputs of :func:`run_multi_trajectory`."""

    scene_out: Path
    trajectories: list[TrajectoryOutcome]
    bank: MemoryBank
    cache: PointCache | None
    worldmirror: Path | None = None
    cloud_ply: Path | None = None
    cloud_glb: Path | None = None


# --------------------------------------------------------------------------------------------
# Scene preparation
# --------------------------------------------------------------------------------------------

@dataclass
class _Job:
    view_id: str
    traj_id: str
    prompt: str
    trajectory: CameraTrajectory           # original size, nframe cameras
    start_image: Path | None = None
    start_from: tuple[str, str] | None = None
    render_dir: Path | None = None          # scene folder with pre-rendered warps

    @property
    def name(self) -> str:
        return f"{self.view_id}/{self.traj_id}"

    @property
    def key(self) -> tuple[str, str]:
        return self.view_id, self.traj_id


@dataclass
class _Scene:
    name: str
    task: str
    size: tuple[int, int]                   # working (H, W)
    jobs: list[_Job]
    bank_factory: Any                       # () -> MemoryBank
    cache_factory: Any = None               # () -> PointCache (start-view cloud), or None
    #: What the outputs are made from: input files (relative name -> path) and prompts (name -> text).
    files: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    #: Whether the depth function shapes the outputs (start depth or global cache).
    uses_depth: bool = False
    #: w2c exported instead of the bank's, by entry name (the reconstruction start image's true pose).
    export_poses: dict[str, torch.Tensor] = field(default_factory=dict)
    #: What the cache factory's cloud is (named as the render source in release mode).
    cloud_name: str = "start-view cloud"

    def inputs_key(self) -> dict[str, str]:
        """Digest of every input file and prompt (part of the run's resume key)."""
        key = {name: file_digest(path) for name, path in self.files.items()}
        key.update({name: text_digest(text) for name, text in self.texts.items()})
        return key


def _trajectory(path: Path, nframe: int, size_hw: tuple[int, int]) -> CameraTrajectory:
    return load_camera_json(path, default_size=size_hw).subsample(nframe)


def _has_renders(folder: Path) -> bool:
    return (folder / RENDER_VIDEO).is_file() and (folder / MASK_VIDEO).is_file()


def _relative(scene_dir: Path, path: Path) -> str:
    return path.relative_to(scene_dir).as_posix()


def _prepare_reconstruction(scene_dir: Path, opts: LoopOptions, depth_fn: DepthFn | None) -> _Scene:
    image = load_image(scene_dir / START_IMAGE)
    h0, w0 = image.shape[:2]
    size = assign_scale(h0, w0, opts.scale_map)
    image_sized = resize_bicubic(image, size)
    identity = torch.eye(4, dtype=torch.float64)
    start_depth: dict[str, ViewDepth] = {}
    files, texts = {START_IMAGE: scene_dir / START_IMAGE}, {}

    def depth_of_start(K_sized: torch.Tensor, w2c: torch.Tensor) -> ViewDepth:
        if "depth" not in start_depth:
            if depth_fn is None:
                raise InputError(f"{scene_dir}: this run needs the depth of {START_IMAGE} (no pre-rendered "
                                 f"{RECONSTRUCTION_VIEW}/ to use, or the global cache); give a depth model (MoGe) "
                                 "or depth function")
            start_depth["depth"] = ViewDepth.of(depth_fn(image_sized, K_sized, w2c))
        return start_depth["depth"]

    if any((scene_dir / RECONSTRUCTION_VIEW / t / CAMERA_FILE).is_file() for t in RECONSTRUCTION_ORDER):
        jobs = []
        for tj in recon_sort_trajs(scene_dir):
            render_dir = tj.traj_dir if opts.scene_renders and _has_renders(tj.traj_dir) else None
            jobs.append(_Job(tj.view_id, tj.traj_id, tj.prompt, _trajectory(tj.camera_path, opts.nframe, (h0, w0)),
                             start_image=tj.start_image, render_dir=render_dir))
            files[_relative(scene_dir, tj.camera_path)] = tj.camera_path
            if render_dir is not None:
                for name in (RENDER_VIDEO, MASK_VIDEO):
                    files[_relative(scene_dir, render_dir / name)] = render_dir / name
            texts["prompt"] = tj.prompt
        first = next((j for j in jobs if j.traj_id == ELOOP_TRAJ), jobs[0]).trajectory
        K0 = scale_intrinsics(first.K[0], (first.height, first.width), (h0, w0))
        w2c0 = first.w2c[0]
        uses_depth = opts.cache_mode == "global" or any(j.render_dir is None for j in jobs)
    else:
        prompt = read_prompt(scene_dir / PROMPT_FILE, "reconstruction scene")
        texts["prompt"] = prompt
        K_guess = intrinsics_from_fov(w0, h0, opts.fov_deg)
        depth = depth_of_start(scale_intrinsics(K_guess, (h0, w0), size), identity)
        K0 = start_intrinsics(depth, w0, h0, opts.fov_deg)
        trajs = reconstruction_trajectories(identity, K0, w0, h0, depth.median_depth, nframe=opts.nframe)
        jobs = [_Job(RECONSTRUCTION_VIEW, t, prompt, trajs[t], start_image=scene_dir / START_IMAGE)
                for t in RECONSTRUCTION_ORDER]
        w2c0 = identity
        uses_depth = True

    def bank() -> MemoryBank:
        return MemoryBank.reconstruction(image_sized, K0, w0, h0, max_reference=opts.max_reference,
                                         align_nframe=opts.align_nframe, nframe=opts.nframe)

    def cache() -> PointCache:
        K_sized = scale_intrinsics(K0, (h0, w0), size)
        return PointCache.from_depth(image_sized, depth_of_start(K_sized, w2c0), K_sized, w2c0, mode=opts.cache_mode,
                                     settings=opts.cache)

    return _Scene(scene_dir.name, "reconstruction", size, jobs, bank, cache, files, texts, uses_depth,
                  {RECONSTRUCTION_INPUT_FNAME: w2c0})


def _prepare_panorama(scene_dir: Path, opts: LoopOptions) -> _Scene:
    made = check_made_scene(scene_dir) is not None  # made from a panorama image: it has a 360-degree cloud
    if opts.cache_mode == "global" and not made:
        raise InputError(f"{scene_dir}: the global 3D cache of a panorama scene starts from the panorama's 360-degree "
                         f"cloud ({PANORAMA_CLOUD}), which release scene folders do not have; make the scene from the "
                         "panorama image (make_panorama_scene, `panorama-scene`, or give multi-traj the image), or "
                         "run this folder with cache_mode='release'")
    tjobs = sort_trajs(scene_dir)
    first = next(j.start_image for j in tjobs if j.start_image is not None)
    h0, w0 = load_image(first).shape[:2]
    size = assign_scale(h0, w0, opts.scale_map)
    jobs, texts = [], {}
    bank_dir = scene_dir / PANO_BANK
    keys = bank_keys(bank_dir / CAMERAS_FILE)
    files = {_relative(scene_dir, p): p for p in [bank_dir / CAMERAS_FILE, *(bank_dir / IMAGES_DIR / bank_image(k)
                                                                            for k in keys)] if p.is_file()}
    for tj in tjobs:
        render_dir = tj.traj_dir if opts.scene_renders and _has_renders(tj.traj_dir) else None
        if render_dir is None and not made:
            raise InputError(f"{tj.traj_dir}: panorama trajectories need pre-rendered {RENDER_VIDEO} and "
                             f"{MASK_VIDEO} (the release's input layout), or a scene made from a panorama image, "
                             "whose 360-degree cloud they are rendered from")
        jobs.append(_Job(tj.view_id, tj.traj_id, tj.prompt, _trajectory(tj.camera_path, opts.nframe, (h0, w0)),
                         start_image=tj.start_image, start_from=tj.start_from, render_dir=render_dir))
        renders = () if render_dir is None else (render_dir / RENDER_VIDEO, render_dir / MASK_VIDEO)
        for path in (tj.camera_path, *renders, tj.start_image):
            if path is not None:
                files[_relative(scene_dir, path)] = path
        texts[f"prompt of {tj.view_id}/{tj.traj_id}"] = tj.prompt
    if made:  # what the scene was made from (image, depth, options) and the cloud
        files.update({name: scene_dir / name for name in (PANORAMA_MANIFEST, PANORAMA_CLOUD)})

    def bank() -> MemoryBank:
        return MemoryBank.from_panorama_folder(scene_dir, max_reference=opts.max_reference,
                                               align_nframe=opts.align_nframe, nframe=opts.nframe)

    def cache() -> PointCache:
        return panorama_cache(scene_dir, mode=opts.cache_mode, settings=opts.cache)

    return _Scene(scene_dir.name, "panorama", size, jobs, bank, cache if made else None, files, texts,
                  uses_depth=opts.cache_mode == "global", cloud_name="360-degree cloud")


def _prepare(scene_dir: Path, opts: LoopOptions, depth_fn: DepthFn | None) -> _Scene:
    return (_prepare_reconstruction(scene_dir, opts, depth_fn) if opts.task == "reconstruction"
            else _prepare_panorama(scene_dir, opts))


class _DepthDeferred(Exception):
    """Raised by :func:`validate_scene`'s stand-in depth function: what remains needs a depth model."""


def _deferred_depth(image, K, w2c):
    raise _DepthDeferred


def validate_scene(scene_dir: str | os.PathLike, options: LoopOptions | None = None) -> int:
    """Check a scene folder without any model: settings, image, prompts, camera files, pre-rendered
    warps present, panorama bank complete. Returns the number of trajectories; raises InputError
    naming the problem and the fix.

    (An image-only reconstruction scene's trajectories come from the depth of its image; for it
    the image and prompt are checked.)"""
    opts = options or LoopOptions()
    opts.check()
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise InputError(f"scene folder {scene_dir} not found; check the path")
    try:
        scene = _prepare(scene_dir, opts, _deferred_depth)
    except _DepthDeferred:
        return len(RECONSTRUCTION_ORDER)
    scene.bank_factory()
    return len(scene.jobs)


# --------------------------------------------------------------------------------------------
# Run state (resume)
# --------------------------------------------------------------------------------------------

def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class _State:
    """``<model>_state/state.json``: the run's key, the finished trajectories with the digest of
    each result, and the committed ``step-NNNN/`` folder (bank + cache)."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder, self.key = folder, key
        self.done: list[tuple[str, str]] = []
        self.results: dict[str, str] = {}

    def load(self) -> tuple[MemoryBank, PointCache | None] | None:
        """The saved bank and cache, or None when there is no state; refuses another run's state."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        run = self.folder.parent
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is damaged ({exc}); delete {self.folder} to rebuild the memory from the "
                             "finished results (they are read back, not generated again)") from exc
        if data.get("version") != STATE_VERSION:
            raise InputError(f"{path}: state version {data.get('version')!r} is not {STATE_VERSION}; delete "
                             f"{self.folder} to rebuild the memory from the finished results (they are read back, "
                             "not generated again)")
        saved = data.get("key", {})
        changes = [f"{part} ({', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''})"
                   for part in ("settings", "inputs", "models")
                   if (diff := _changed(saved.get(part, {}), self.key.get(part, {})))]
        if changes:
            raise InputError(f"{run} holds a run made with other {'; '.join(changes)}. Its results belong to "
                             "those and are kept as they are: to resume it, run it as before; to run the changed "
                             f"one, choose another output folder, or delete {run} to start over")
        self.done = [tuple(d) for d in data["done"]]
        self.results = dict(data.get("results", {}))
        step = safe_join(self.folder, data["folder"])
        try:
            bank = MemoryBank.load(step / "memory_bank")
            cache = PointCache.load(step / "cache.npz") if (step / "cache.npz").is_file() else None
        except WorldStereoError as exc:
            raise CheckpointError(f"the saved run state in {self.folder} is damaged ({exc}); delete {self.folder} "
                                  "to rebuild the memory from the finished results (they are read back, not "
                                  "generated again)") from exc
        return bank, cache

    def check_result(self, name: str, result: Path) -> None:
        """Refuse a finished result that is missing or not the file this run saved (truncated, replaced)."""
        fix = (f"delete it (if present) and {self.folder} to generate it again from the other results, or delete "
               f"{self.folder.parent} to start over")
        if not result.is_file():
            raise InputError(f"{self.folder} lists {name} as done but {result} is missing; {fix}")
        if file_digest(result) != self.results.get(name):
            raise InputError(f"{result} is not the result this run saved for {name} (it was changed, truncated or "
                             f"damaged since); {fix}")

    def commit(self, bank: MemoryBank, cache: PointCache | None, progress: ProgressFn | None = None) -> None:
        """Write bank + cache to a new step folder, then switch state.json to it (atomic), then prune."""
        name = f"step-{len(self.done):04d}"
        step = safe_join(self.folder, name)
        previous = sorted(p for p in self.folder.glob("step-*") if p.is_dir() and p.name != name)
        if step.exists():
            shutil.rmtree(step)
        if previous:  # hard links: unchanged bank frames are not written again
            shutil.copytree(previous[-1], step, copy_function=_link_or_copy)
        bank.save(step / "memory_bank", progress=progress)
        if cache is not None:
            cache.save(step / "cache.npz")
        elif (step / "cache.npz").exists():
            (step / "cache.npz").unlink()
        write_json_atomic(self.folder / STATE_FILE, {"version": STATE_VERSION, "key": self.key, "folder": name,
                                                     "done": [list(d) for d in self.done], "results": self.results})
        for old in previous:
            shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def _frames_array(frames: Any, n: int, size: tuple[int, int], name: str) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.shape != (n, size[0], size[1], 3):
        raise InputError(f"generator returned frames of shape {arr.shape} for {name}; expected "
                         f"({n}, {size[0]}, {size[1]}, 3) (one frame per camera, at the working size)")
    return arr


def _save_memory_inputs(folder: Path, model: str, found: RetrievalResult, size: tuple[int, int]) -> None:
    frames = np.stack([resize_bicubic(f, size) for f in found.frames])
    video, ref_index, ref_w2cs = memory_inputs(model)
    write_video(safe_join(folder, video), frames, FPS)
    write_json_atomic(safe_join(folder, ref_index), found.ref_index_json())
    write_json_atomic(safe_join(folder, ref_w2cs), found.ref_w2cs.tolist())


class _Ticks:
    """The run's progress over :func:`progress_total` ticks (see the module docstring)."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int = 1) -> None:
        self.done += n
        report(self.progress, self.done, self.total)

    def beat(self, *_: int) -> None:
        """Re-report the current count (a :data:`ProgressFn` for sub-steps: the callback may interrupt)."""
        report(self.progress, self.done, self.total)

    def steps(self, steps: int) -> ProgressFn | None:
        """The clip generator's ``(step, steps)`` mapped onto the next ``steps`` ticks."""
        if self.progress is None:
            return None
        offset = self.done

        def inner(done: int, sub_total: int) -> None:
            report(self.progress, offset + min(steps, done * steps // max(sub_total, 1)), self.total)

        return inner


def progress_total(trajectories: int, steps: int, exports: bool = True) -> int:
    """Progress ticks of a run of ``trajectories`` trajectories with a ``steps``-tick clip generator."""
    return PREPARE_TICKS + trajectories * (steps + TRAJECTORY_TICKS) + (EXPORT_TICKS if exports else 0)


def _resume_key(source: Any) -> Any:
    """``source.resume_key()`` when it has one (a PipelineClipGenerator, the CLI's MoGe ...), else None."""
    key = getattr(source, "resume_key", None)
    return key() if callable(key) else None


def run_multi_trajectory(scene_dir: str | os.PathLike, out_dir: str | os.PathLike, clip_generator: ClipGenerator, *,
                         options: LoopOptions | None = None, depth_fn: DepthFn | None = None, selector=None,
                         progress: ProgressFn | None = None) -> LoopResult:
    """Generate every trajectory of a scene folder in order (see the module docstring).

    ``clip_generator``: a :data:`.generate.ClipGenerator` (its ``steps`` attribute, if any, is the number of
    progress ticks per trajectory; its ``resume_key()``, if any, joins the run's key). ``depth_fn``:
    depth of the start image and, in global mode, of the kept frames (see
    :data:`geometry.depth.DepthFn`). ``selector``: a CameraSelector for retrievals over more than
    ``max_reference`` entries (default: camera features only). ``progress(done, total)`` may raise
    to interrupt; a rerun resumes. Raises RunFolderLocked when another run holds the run folder.
    """
    opts = options or LoopOptions()
    count = validate_scene(scene_dir, opts)
    scene_dir = Path(scene_dir)
    if opts.cache_mode == "global" and depth_fn is None:
        raise InputError("the global cache lifts every kept frame with a depth model; give depth_fn (MoGe)")
    steps = max(1, int(getattr(clip_generator, "steps", 1) or 1))
    with locked_run_folder(safe_join(out_dir, scene_dir.name)) as out_scene:
        ticks = _Ticks(progress, progress_total(count, steps, opts.exports))
        ticks.beat()
        scene = _prepare(scene_dir, opts, depth_fn)
        models = {name: key for name, key in (("generator", _resume_key(clip_generator)),  # the key's name persists
                                              ("selector", _resume_key(selector)),
                                              ("depth", _resume_key(depth_fn) if scene.uses_depth else None))
                  if key is not None}
        key = {"settings": opts.signature(scene.size), "inputs": scene.inputs_key(), "models": models}
        state = _State(safe_join(out_scene, f"{opts.model_name}_state"), key)
        loaded = state.load()
        needs_cache = opts.cache_mode == "global" or any(j.render_dir is None for j in scene.jobs)
        if loaded is not None:
            bank, cache = loaded
            log.info("resuming %s: %d trajectories already done", scene.name, len(state.done))
        else:
            bank = scene.bank_factory()
            cache = scene.cache_factory() if needs_cache and scene.cache_factory is not None else None
            state.commit(bank, cache, ticks.beat)  # the run's key is on disk before any result
        if needs_cache and cache is None:
            raise InputError(f"{scene.name}: some trajectories have no pre-rendered warps and there is no start-view "
                             "cloud to render them from")
        ticks.add(PREPARE_TICKS)
        outcomes = [_run_trajectory(index, job, scene, out_scene, opts, clip_generator, state, bank, cache, depth_fn,
                                    selector, ticks, steps)
                    for index, job in enumerate(scene.jobs)]
        out = LoopResult(out_scene, outcomes, bank, cache)
        if opts.exports:
            _export(out, scene, opts, ticks)
            ticks.add(EXPORT_TICKS)
    return out


def run_image_scene(image, prompt: str, out_dir: str | os.PathLike, clip_generator: ClipGenerator,
                    **kwargs) -> LoopResult:
    """:func:`run_multi_trajectory` of a reconstruction from an image and a prompt given directly
    (RGB uint8 (H, W, 3) or anything :func:`io.images.load_image` takes), stored as the scene
    ``<out_dir>/inputs/scene/`` (image.png + prompt.json) with results in ``<out_dir>/scene/``.

    The inputs of an existing run are never replaced: other ones are refused, naming what changed
    (the run folder's lock is held from the check to the end of the run)."""
    if not prompt.strip():
        raise InputError("prompt is empty; a reconstruction from an image needs a prompt describing the scene")
    rgb = load_image(image, name="image")
    with locked_run_folder(safe_join(out_dir, IMAGE_SCENE)) as run:
        folder = safe_join(out_dir, IMAGE_SCENE_INPUTS, IMAGE_SCENE)
        image_path, prompt_path = folder / START_IMAGE, folder / PROMPT_FILE
        changed = []
        if image_path.is_file() and not np.array_equal(load_image(image_path), rgb):
            changed.append("image")
        if prompt_path.is_file() and read_prompt(prompt_path, "image scene") != prompt:
            changed.append("prompt")
        if changed and any(run.glob(f"*_state/{STATE_FILE}")):
            raise InputError(f"{run} holds a run made from another {' and '.join(changed)} ({folder}); its "
                             "results belong to those inputs and are kept: to run the new ones, choose another "
                             f"output folder, or delete {run} to start over")
        if changed or not image_path.is_file() or not prompt_path.is_file():
            with atomic_path(image_path) as tmp:
                Image.fromarray(rgb).save(tmp, format="PNG")
            write_json_atomic(prompt_path, {"prompt": prompt})
        return run_multi_trajectory(folder, out_dir, clip_generator, **kwargs)


def run_panorama_image(panorama, out_dir: str | os.PathLike, clip_generator: ClipGenerator, *, name: str | None = None,
                       prompt: str = "", depth=None, depth_fn: DepthFn | None = None,
                       scene_options: PanoramaSceneOptions | None = None, options: LoopOptions | None = None,
                       selector=None, progress: ProgressFn | None = None) -> LoopResult:
    """:func:`run_multi_trajectory` of a panorama from one equirectangular image: its scene folder
    is made first (:func:`.panorama_scene.make_panorama_scene` in ``<out_dir>/panorama_scenes/<name>``;
    a finished one is reused), then generated with results in ``<out_dir>/<name>``.

    ``panorama``: a path, PIL image, array or ComfyUI IMAGE tensor (2:1); ``name``: default the
    file's stem, else "panorama". ``depth``: the user's equirectangular distance map, else
    ``depth_fn`` estimates it (MoGe told each view's field of view:
    :func:`geometry.panorama_depth.moge_view_depth_fn`); ``depth_fn`` also lifts the kept frames
    into the cache when ``options.cache_mode`` is "global". ``options.task`` is always "panorama".
    ``progress`` follows the scene's build, then the run. The run folder's lock is held from the
    scene to the end of the run; a scene folder made from another image, depth, prompt or settings
    is refused (the run's results belong to it)."""
    opts = replace(options or LoopOptions(), task="panorama")
    opts.check()
    if name is None:
        name = Path(panorama).stem if isinstance(panorama, (str, os.PathLike)) else "panorama"
    plain_name(name)
    with locked_run_folder(safe_join(out_dir, name)):
        scene = make_panorama_scene(panorama, safe_join(out_dir, PANORAMA_SCENES, name), depth=depth,
                                    depth_fn=depth_fn, prompt=prompt, options=scene_options, progress=progress)
        return run_multi_trajectory(scene.folder, out_dir, clip_generator, options=opts, depth_fn=depth_fn,
                                    selector=selector, progress=progress)


def _run_trajectory(index: int, job: _Job, scene: _Scene, out_scene: Path, opts: LoopOptions,
                    clip_generator: ClipGenerator, state: _State, bank: MemoryBank, cache: PointCache | None,
                    depth_fn: DepthFn | None, selector, ticks: _Ticks, steps: int) -> TrajectoryOutcome:
    """Generate (or skip, or read back) one trajectory and fold it into memory; commits the state."""
    traj_out = safe_join(out_scene, job.view_id, job.traj_id)
    result = safe_join(traj_out, result_video(opts.model_name))
    if job.key in state.done:
        state.check_result(job.name, result)
        ticks.add(steps + TRAJECTORY_TICKS)
        return TrajectoryOutcome(job.view_id, job.traj_id, result, "skipped")
    traj = job.trajectory
    traj_sized = traj.resized(*scene.size)
    if result.is_file():
        status, source = "read back", ""
        log.info("%s: %s exists; reading it back into memory", job.name, result.name)
        ticks.add(steps + TRAJECTORY_TICKS - 1)
    else:
        status = "generated"
        source = _generate(job, index, traj_out, result, scene, out_scene, opts, clip_generator, bank, cache, selector,
                           ticks, steps)
    try:
        frames = read_video(result)
    except InputError as exc:
        raise InputError(f"{exc}; delete {result} to generate it again") from exc
    if len(frames) != len(traj):
        raise InputError(f"{result} has {len(frames)} frames but {job.name} has {len(traj)} cameras; delete it "
                         "to generate it again")
    kept = bank.update_memory(list(frames), traj.w2c, traj.K, job.view_id, job.traj_id,
                              k_size=(traj.height, traj.width))
    if cache is not None and opts.cache_mode == "global":
        record = cache.update([frames[k] for k in kept], traj_sized.w2c[kept], traj_sized.K[kept], depth_fn,
                              label=job.name, names=[f"{job.name}/{k:04d}" for k in kept], progress=ticks.beat)
        log.info("%s: cache %d -> %d points (%d of %d frames aligned)", job.name, record.points_before,
                 record.points_after, sum(f.skipped is None for f in record.frames), len(record.frames))
    state.done.append(job.key)
    state.results[job.name] = file_digest(result)
    state.commit(bank, cache, ticks.beat)
    ticks.add()
    return TrajectoryOutcome(job.view_id, job.traj_id, result, status, source, kept, len(bank),
                             None if cache is None else len(cache))


def _conditioning(job: _Job, traj_out: Path, scene: _Scene, out_scene: Path, opts: LoopOptions,
                  cache: PointCache | None, ticks: _Ticks) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, str]:
    """Start image, warp render, hole mask (working size) and where the render came from."""
    H, W = scene.size
    traj, traj_sized = job.trajectory, job.trajectory.resized(H, W)
    if job.start_from is not None:
        source_video = safe_join(out_scene, *job.start_from, result_video(opts.model_name))
        if not source_video.is_file():
            raise InputError(f"{job.name} starts from the last frame of {'/'.join(job.start_from)}, which has not "
                             "been generated")
        start = resize_bicubic(read_video_frames(source_video, [-1])[0], (H, W))
    else:
        start = resize_bicubic(load_image(job.start_image), (H, W))
    image_t = to_tensor_m11(start)

    if job.render_dir is not None and opts.cache_mode == "release":
        render, mask, _ = load_render_folder(job.render_dir, H, W, image_t, clear_first_mask=job.start_from is not None,
                                             nframe=len(traj))  # longer render videos: subsampled like the cameras
        source = "scene renders"
    else:
        rgb, holes = cache.render(traj_sized, image_t, H, W, progress=ticks.beat)
        save_render_folder(traj_out, rgb, holes, traj_sized)
        render, mask, _ = load_render_folder(traj_out, H, W, image_t)
        source = "global cache" if opts.cache_mode == "global" else scene.cloud_name
    if len(render) != len(traj):
        raise InputError(f"{job.name}: {len(render)} render frames for {len(traj)} cameras")
    return start, render, mask, source


def _generate(job: _Job, index: int, traj_out: Path, result: Path, scene: _Scene, out_scene: Path,
              opts: LoopOptions, clip_generator: ClipGenerator, bank: MemoryBank, cache: PointCache | None, selector,
              ticks: _Ticks, steps: int) -> str:
    """Prepare the conditioning of one trajectory, generate it and write ``result``; returns the render source."""
    H, W = scene.size
    traj, traj_sized = job.trajectory, job.trajectory.resized(H, W)
    start, render, mask, source = _conditioning(job, traj_out, scene, out_scene, opts, cache, ticks)
    ticks.add()

    K_bank = scale_intrinsics(traj.K, (traj.height, traj.width), (bank.height, bank.width))
    found = retrieve(bank, traj.w2c, K_bank, job.view_id, job.traj_id, selector=selector, progress=ticks.beat)
    _save_memory_inputs(safe_join(traj_out, "memory_inputs"), opts.model_name, found, (H, W))
    ticks.add()
    request = GenerationRequest(
        image=start, prompt=job.prompt, render=render, render_mask=mask, trajectory=traj_sized,
        **_noise(opts, index), references=found.reference_frames(H, W),
        ref_index=found.ref_index, ref_w2cs=found.ref_w2cs, name=job.name)
    frames = _frames_array(clip_generator(request, ticks.steps(steps)), len(traj), (H, W), job.name)
    ticks.done += steps
    write_video(result, frames, FPS)
    ticks.beat()
    return source


def _noise(opts: LoopOptions, index: int) -> dict[str, int]:
    """Seed and earlier draws of trajectory ``index``'s noise (see :data:`NOISE_SCHEMES`)."""
    if opts.noise == "release":
        return {"seed": opts.seed, "noise_index": index}
    return {"seed": opts.seed + index, "noise_index": 0}


def _export(out: LoopResult, scene: _Scene, opts: LoopOptions, ticks: _Ticks) -> None:
    out.worldmirror = export_worldmirror(out.bank, safe_join(out.scene_out, "world_mirror_data", opts.model_name),
                                         scene.name, size=scene.size, poses=scene.export_poses,
                                         progress=ticks.beat).folder
    if opts.run_worldmirror:
        ticks.beat()
        outcome = run_worldmirror(out.worldmirror)
        log.info(outcome.message)
    if out.cache is not None and len(out.cache):
        ticks.beat()
        c2w = invert_rigid(out.bank.w2c)
        segments = camera_frustum_segments(c2w, out.bank.K, out.bank.width, out.bank.height, 0.05 * out.cache.scale)
        out.cloud_ply = write_ply(safe_join(out.scene_out, scene_cloud(opts.model_name)), out.cache.cloud)
        out.cloud_glb = write_glb(safe_join(out.scene_out, scene_cloud(opts.model_name, ".glb")), out.cache.cloud,
                                  frustum_segments=segments, world_up=WORLD_UP[scene.task])
