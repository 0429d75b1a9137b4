"""Multi-trajectory generation: the release's ``run_multi_traj`` plus the paper's global 3D cache.

Task types (spec/geometry.md §7.2): ``reconstruction`` (one image: eloop -> up -> right -> left)
and ``panorama`` (the 27-view bank, then view*/target*/reconstruct*/wonder* trajectories, the
iterative ones starting from the last frame of another generated clip). Per trajectory, in order:

1. conditioning: the start image at the working size (``assign_scale``) and the warp render +
   hole mask, taken from the scene's pre-rendered ``render.mp4``/``render_mask.mp4`` (release
   mode, as the release does) or rendered from the point cache (the start-view cloud in release
   mode when a scene has no renders; the growing cache in ``global`` mode). Renders made here are
   written as a render folder next to the result and read back, as the reference does;
2. retrieval from the memory bank, saved as ``memory_inputs/{<model>.mp4, <model>_ref_index.json,
   <model>_ref_w2cs.json}``;
3. generation by the injected generator (:mod:`.generate`); noise as the release draws it: one
   generator seeded once with ``seed``, trajectory k taking its (k+1)-th draw (also on resume), or
   ``noise="per-trajectory"``: seed + k; ``<model>_result.mp4`` (16 fps) is written and read back;
4. memory update (``sample_align_nframe`` keep rule) and, in global mode, cache update with the
   same kept frames;
5. the run state (memory bank, cache, finished trajectories) is saved in ``<model>_state/``.

Outputs go to ``<out>/<scene>/<view>/<traj>/``; at the end the WorldMirror folder
(``world_mirror_data/<model>/``), the cache as ``<model>_cloud.ply`` / ``.glb`` and one MP4 per
trajectory. Resume: a rerun skips finished trajectories; a result without a saved state (an
interrupted save, or results of another run) is read back and folded into memory without
generating again, as the release does. Every write is atomic and the state is committed in one
atomic step after each trajectory, so a resumed run gives the same outputs as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cameras import (CameraTrajectory, as_tensor, intrinsics_from_fov, invert_rigid, scale_intrinsics,
                       subsample_indices)
from ..constants import ALIGN_NFRAME, DEFAULT_SCALE_MAP, DEFAULT_SEED, FPS, MAX_REFERENCE, NFRAME
from ..errors import InputError
from ..geometry.trajectories import median_depth, reconstruction_trajectories
from ..io.atomic import safe_join, write_json_atomic
from ..io.camera_json import load_camera_json
from ..io.images import load_image, resize_bicubic, to_tensor_m11
from ..io.pointcloud_files import camera_frustum_segments, write_glb, write_ply
from ..io.render_folder import MASK_VIDEO, RENDER_VIDEO, load_render_folder, save_render_folder
from ..io.video import read_video, read_video_frames, write_video
from ..io.worldmirror import export_worldmirror, run_worldmirror
from ..memory.bank import MemoryBank
from ..memory.cache import CACHE_MODES, CacheSettings, DepthFn, PointCache, depth_map
from ..memory.retrieval import RetrievalResult, retrieve
from ..progress import ProgressFn, report
from ..sizes import assign_scale, validate_scale_map
from .generate import GenerationRequest, Generator
from .ordering import (RECONSTRUCTION_ORDER, RECONSTRUCTION_VIEW, TASK_TYPES, read_prompt, recon_sort_trajs,
                       sort_trajs)

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"
WORLD_UP = {"reconstruction": "-y", "panorama": "+z"}
#: "release": one generator for the run, trajectory k draws after k others; "per-trajectory": seed + k.
NOISE_SCHEMES = ("release", "per-trajectory")


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
    fov_deg: float = 60.0
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
        """What a resumed run must share with the saved state."""
        sig = {"task": self.task, "model_name": self.model_name, "cache_mode": self.cache_mode,
               "align_nframe": self.align_nframe, "max_reference": self.max_reference, "nframe": self.nframe,
               "size": list(size), "seed": self.seed, "noise": self.noise, "scene_renders": self.scene_renders}
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


@dataclass
class _Scene:
    name: str
    task: str
    size: tuple[int, int]                   # working (H, W)
    jobs: list[_Job]
    bank_factory: Any                       # () -> MemoryBank
    cache_factory: Any = None               # () -> PointCache (start-view cloud), or None


def _trajectory(path: Path, nframe: int, size_hw: tuple[int, int]) -> CameraTrajectory:
    traj = load_camera_json(path)
    if traj.width is None or traj.height is None:
        traj.height, traj.width = size_hw
    return traj.subsample(nframe)


def _has_renders(folder: Path) -> bool:
    return (folder / RENDER_VIDEO).is_file() and (folder / MASK_VIDEO).is_file()


def _prepare_reconstruction(scene_dir: Path, opts: LoopOptions, depth_fn: DepthFn | None) -> _Scene:
    image = load_image(scene_dir / "image.png")
    h0, w0 = image.shape[:2]
    size = assign_scale(h0, w0, opts.scale_map)
    image_w = resize_bicubic(image, size)
    identity = torch.eye(4, dtype=torch.float64)
    start_depth: dict[str, torch.Tensor] = {}

    def depth_of_start(K_w: torch.Tensor, w2c: torch.Tensor):
        if "depth" not in start_depth:
            if depth_fn is None:
                raise InputError(f"{scene_dir}: this run needs the depth of image.png (no pre-rendered renders/ "
                                 "to use, or the global cache); give a depth model (MoGe) or depth function")
            out = depth_fn(image_w, K_w, w2c)
            start_depth["depth"] = depth_map(out)
            start_depth["raw"] = out
        return start_depth["depth"], start_depth["raw"]

    if any((scene_dir / RECONSTRUCTION_VIEW / t / "camera.json").is_file() for t in RECONSTRUCTION_ORDER):
        jobs = []
        for tj in recon_sort_trajs(scene_dir):
            jobs.append(_Job(tj.view_id, tj.traj_id, tj.prompt, _trajectory(tj.camera_path, opts.nframe, (h0, w0)),
                             start_image=tj.start_image,
                             render_dir=tj.traj_dir if opts.scene_renders and _has_renders(tj.traj_dir) else None))
        first = next((j for j in jobs if j.traj_id == "traj_eloop"), jobs[0]).trajectory
        K0 = scale_intrinsics(first.K[0], (first.height, first.width), (h0, w0))
        w2c0 = first.w2c[0]
    else:
        prompt = read_prompt(scene_dir / "prompt.json", "reconstruction scene")
        K_guess = intrinsics_from_fov(w0, h0, opts.fov_deg)
        depth, raw = depth_of_start(scale_intrinsics(K_guess, (h0, w0), size), identity)
        K0 = K_guess
        if isinstance(raw, dict) and raw.get("intrinsics_normalised") is not None:
            K0 = scale_intrinsics(as_tensor(raw["intrinsics_normalised"]), (1, 1), (h0, w0))
        trajs = reconstruction_trajectories(identity, K0, w0, h0, median_depth(depth), nframe=opts.nframe)
        jobs = [_Job(RECONSTRUCTION_VIEW, t, prompt, trajs[t], start_image=scene_dir / "image.png")
                for t in RECONSTRUCTION_ORDER]
        w2c0 = identity

    def bank() -> MemoryBank:
        return MemoryBank.reconstruction(image_w, K0, w0, h0, max_reference=opts.max_reference,
                                         align_nframe=opts.align_nframe, nframe=opts.nframe)

    def cache() -> PointCache:
        K_w = scale_intrinsics(K0, (h0, w0), size)
        depth, _ = depth_of_start(K_w, w2c0)
        return PointCache.from_depth(image_w, depth, K_w, w2c0, mode=opts.cache_mode, settings=opts.cache)

    return _Scene(scene_dir.name, "reconstruction", size, jobs, bank, cache)


def _prepare_panorama(scene_dir: Path, opts: LoopOptions) -> _Scene:
    if opts.cache_mode == "global":
        raise InputError("the global 3D cache needs one start view to lift; panorama scenes run in release "
                         "mode (cache_mode='release') with their pre-rendered warps")
    tjobs = sort_trajs(scene_dir)
    first = next(j.start_image for j in tjobs if j.start_image is not None)
    h0, w0 = load_image(first).shape[:2]
    size = assign_scale(h0, w0, opts.scale_map)
    jobs = []
    for tj in tjobs:
        if not (opts.scene_renders and _has_renders(tj.traj_dir)):
            raise InputError(f"{tj.traj_dir}: panorama trajectories need pre-rendered {RENDER_VIDEO} and "
                             f"{MASK_VIDEO} (the release's input layout)")
        jobs.append(_Job(tj.view_id, tj.traj_id, tj.prompt, _trajectory(tj.camera_path, opts.nframe, (h0, w0)),
                         start_image=tj.start_image, start_from=tj.start_from, render_dir=tj.traj_dir))

    def bank() -> MemoryBank:
        return MemoryBank.from_panorama_folder(scene_dir, max_reference=opts.max_reference,
                                               align_nframe=opts.align_nframe, nframe=opts.nframe)

    return _Scene(scene_dir.name, "panorama", size, jobs, bank, None)


# --------------------------------------------------------------------------------------------
# Run state (resume)
# --------------------------------------------------------------------------------------------

class _State:
    """``<model>_state/state.json`` naming the committed ``step-NNNN/`` folder (bank + cache)."""

    def __init__(self, folder: Path, signature: dict) -> None:
        self.folder, self.signature = folder, signature
        self.done: list[tuple[str, str]] = []

    def load(self) -> tuple[MemoryBank, PointCache | None] | None:
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is damaged ({exc}); delete {self.folder} to start the run over") from exc
        if data.get("version") != STATE_VERSION:
            raise InputError(f"{path}: state version {data.get('version')!r} is not {STATE_VERSION}; delete "
                             f"{self.folder} to start over")
        if data.get("signature") != self.signature:
            diff = sorted(k for k in set(data.get("signature", {})) | set(self.signature)
                          if data.get("signature", {}).get(k) != self.signature.get(k))
            raise InputError(f"{self.folder} belongs to a run with other settings ({', '.join(diff)}); use the same "
                             "settings to resume, another output folder, or delete the state folder to start over")
        step = safe_join(self.folder, data["folder"])
        self.done = [tuple(d) for d in data["done"]]
        bank = MemoryBank.load(step / "memory_bank")
        cache = PointCache.load(step / "cache.npz") if (step / "cache.npz").is_file() else None
        return bank, cache

    def commit(self, bank: MemoryBank, cache: PointCache | None) -> None:
        """Write bank + cache to a new step folder, then switch state.json to it (atomic), then prune."""
        name = f"step-{len(self.done):04d}"
        step = safe_join(self.folder, name)
        previous = sorted(p for p in self.folder.glob("step-*") if p.is_dir() and p.name != name)
        if step.exists():
            shutil.rmtree(step)
        if previous:  # hard links: unchanged bank frames are not written again
            shutil.copytree(previous[-1], step, copy_function=_link_or_copy)
        bank.save(step / "memory_bank")
        if cache is not None:
            cache.save(step / "cache.npz")
        elif (step / "cache.npz").exists():
            (step / "cache.npz").unlink()
        write_json_atomic(self.folder / STATE_FILE, {"version": STATE_VERSION, "signature": self.signature,
                                                     "folder": name, "done": [list(d) for d in self.done]})
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
    write_video(safe_join(folder, f"{model}.mp4"), frames, FPS)
    write_json_atomic(safe_join(folder, f"{model}_ref_index.json"), found.ref_index_json())
    write_json_atomic(safe_join(folder, f"{model}_ref_w2cs.json"), found.ref_w2cs.tolist())


def _scaled_progress(progress: ProgressFn | None, offset: int, steps: int, total: int) -> ProgressFn | None:
    if progress is None:
        return None

    def inner(done: int, sub_total: int) -> None:
        progress(offset + min(steps, done * steps // max(sub_total, 1)), total)

    return inner


def _deduplicated(progress: ProgressFn | None) -> ProgressFn | None:
    """``progress`` without repeated identical calls (a generator's last step and the loop's
    end-of-trajectory report coincide)."""
    if progress is None:
        return None
    last: list = [None]

    def inner(done: int, total: int) -> None:
        if last[0] != (done, total):
            last[0] = (done, total)
            progress(done, total)

    return inner


def run_multi_trajectory(scene_dir: str | os.PathLike, out_dir: str | os.PathLike, generator: Generator, *,
                         options: LoopOptions | None = None, depth_fn: DepthFn | None = None, selector=None,
                         progress: ProgressFn | None = None) -> LoopResult:
    """Generate every trajectory of a scene folder in order (see the module docstring).

    ``generator``: a :data:`.generate.Generator` (its ``steps`` attribute, if any, is the number of
    progress ticks per trajectory). ``depth_fn``: depth of the start image and, in global mode, of
    the kept frames (see :data:`memory.cache.DepthFn`). ``selector``: a CameraSelector for retrievals
    over more than ``max_reference`` entries (default: camera features only). ``progress(done,
    total)`` runs over trajectories x generator steps and may raise to interrupt; a rerun resumes.
    """
    opts = options or LoopOptions()
    opts.check()
    progress = _deduplicated(progress)
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise InputError(f"scene folder {scene_dir} not found; check the path")
    scene = (_prepare_reconstruction(scene_dir, opts, depth_fn) if opts.task == "reconstruction"
             else _prepare_panorama(scene_dir, opts))
    out_scene = safe_join(out_dir, scene.name)
    H, W = scene.size
    needs_cache = opts.cache_mode == "global" or any(j.render_dir is None for j in scene.jobs)
    if opts.cache_mode == "global" and depth_fn is None:
        raise InputError("the global cache lifts every kept frame with a depth model; give depth_fn (MoGe)")

    state = _State(safe_join(out_scene, f"{opts.model_name}_state"), opts.signature(scene.size))
    loaded = state.load()
    if loaded is not None:
        bank, cache = loaded
        log.info("resuming %s: %d trajectories already done", scene.name, len(state.done))
    else:
        bank = scene.bank_factory()
        cache = scene.cache_factory() if needs_cache and scene.cache_factory is not None else None
    if needs_cache and cache is None:
        raise InputError(f"{scene.name}: some trajectories have no pre-rendered warps and there is no start-view "
                         "cloud to render them from")

    steps = max(1, int(getattr(generator, "steps", 1) or 1))
    total = len(scene.jobs) * steps
    outcomes: list[TrajectoryOutcome] = []
    results: dict[tuple[str, str], Path] = {}
    for index, job in enumerate(scene.jobs):
        traj_out = safe_join(out_scene, job.view_id, job.traj_id)
        result = safe_join(traj_out, f"{opts.model_name}_result.mp4")
        results[(job.view_id, job.traj_id)] = result
        key = (job.view_id, job.traj_id)
        if key in state.done:
            if not result.is_file():
                raise InputError(f"{state.folder} lists {job.name} as done but {result} is missing; delete the "
                                 "state folder to rebuild the memory from the existing results")
            outcomes.append(TrajectoryOutcome(job.view_id, job.traj_id, result, "skipped"))
            report(progress, (index + 1) * steps, total)
            continue
        traj = job.trajectory
        traj_w = traj.resized(H, W)
        if result.is_file():
            status, source = "read back", ""
            log.info("%s: %s exists; reading it back into memory", job.name, result.name)
        else:
            status = "generated"
            source = _generate(job, index, traj_out, result, scene, opts, generator, bank, cache, results,
                               selector, _scaled_progress(progress, index * steps, steps, total))
        frames = read_video(result)
        if len(frames) != len(traj):
            raise InputError(f"{result} has {len(frames)} frames but {job.name} has {len(traj)} cameras; delete it "
                             "to generate it again")
        kept = bank.update_memory(list(frames), traj.w2c, traj.K, job.view_id, job.traj_id,
                                  k_size=(traj.height, traj.width))
        if cache is not None and opts.cache_mode == "global":
            record = cache.update([frames[k] for k in kept], traj_w.w2c[kept], traj_w.K[kept], depth_fn,
                                  label=job.name, names=[f"{job.name}/{k:04d}" for k in kept])
            log.info("%s: cache %d -> %d points (%d of %d frames aligned)", job.name, record.points_before,
                     record.points_after, sum(f.skipped is None for f in record.frames), len(record.frames))
        state.done.append(key)
        state.commit(bank, cache)
        outcomes.append(TrajectoryOutcome(job.view_id, job.traj_id, result, status, source, kept, len(bank),
                                          None if cache is None else len(cache)))
        report(progress, (index + 1) * steps, total)

    out = LoopResult(out_scene, outcomes, bank, cache)
    if opts.exports:
        _export(out, scene, opts)
    return out


def _generate(job: _Job, index: int, traj_out: Path, result: Path, scene: _Scene, opts: LoopOptions,
              generator: Generator, bank: MemoryBank, cache: PointCache | None,
              results: dict[tuple[str, str], Path], selector, progress: ProgressFn | None) -> str:
    """Prepare the conditioning of one trajectory, generate it and write ``result``; returns the render source."""
    H, W = scene.size
    traj, traj_w = job.trajectory, job.trajectory.resized(H, W)
    if job.start_from is not None:
        source_video = results.get(job.start_from)
        if source_video is None or not source_video.is_file():
            raise InputError(f"{job.name} starts from the last frame of {'/'.join(job.start_from)}, which has not "
                             "been generated")
        start = resize_bicubic(read_video_frames(source_video, [-1])[0], (H, W))
    else:
        start = resize_bicubic(load_image(job.start_image), (H, W))
    image_t = to_tensor_m11(start)

    if job.render_dir is not None and opts.cache_mode == "release":
        render, mask, _ = load_render_folder(job.render_dir, H, W, image_t, clear_first_mask=job.start_from is not None)
        if len(render) != len(traj):  # longer render videos are subsampled like the cameras
            keep = subsample_indices(len(render), len(traj))
            render, mask = render[keep], mask[keep]
        source = "scene renders"
    else:
        rgb, holes = cache.render(traj_w, image_t, H, W)
        save_render_folder(traj_out, rgb, holes, traj_w)
        render, mask, _ = load_render_folder(traj_out, H, W, image_t)
        source = "global cache" if opts.cache_mode == "global" else "start-view cloud"
    if len(render) != len(traj):
        raise InputError(f"{job.name}: {len(render)} render frames for {len(traj)} cameras")

    K_bank = scale_intrinsics(traj.K, (traj.height, traj.width), (bank.height, bank.width))
    found = retrieve(bank, traj.w2c, K_bank, job.view_id, job.traj_id, selector=selector)
    _save_memory_inputs(safe_join(traj_out, "memory_inputs"), opts.model_name, found, (H, W))
    refs = found.ref_index.tolist()
    request = GenerationRequest(
        image=start, prompt=job.prompt, render=render, render_mask=mask, trajectory=traj_w,
        **_noise(opts, index), references=np.stack([resize_bicubic(found.frames[k], (H, W)) for k in refs]),
        ref_index=found.ref_index, ref_w2cs=found.ref_w2cs, name=job.name)
    frames = _frames_array(generator(request, progress), len(traj), (H, W), job.name)
    write_video(result, frames, FPS)
    return source


def _noise(opts: LoopOptions, index: int) -> dict[str, int]:
    """Seed and earlier draws of trajectory ``index``'s noise (see :data:`NOISE_SCHEMES`)."""
    if opts.noise == "release":
        return {"seed": opts.seed, "noise_index": index}
    return {"seed": opts.seed + index, "noise_index": 0}


def _export(out: LoopResult, scene: _Scene, opts: LoopOptions) -> None:
    out.worldmirror = export_worldmirror(out.bank, safe_join(out.scene_out, "world_mirror_data", opts.model_name),
                                         scene.name).folder
    if opts.run_worldmirror:
        outcome = run_worldmirror(out.worldmirror)
        log.info(outcome.message)
    if out.cache is not None and len(out.cache):
        c2w = invert_rigid(out.bank.w2c)
        segments = camera_frustum_segments(c2w, out.bank.K, out.bank.width, out.bank.height, 0.05 * out.cache.scale)
        out.cloud_ply = write_ply(safe_join(out.scene_out, f"{opts.model_name}_cloud.ply"), out.cache.cloud)
        out.cloud_glb = write_glb(safe_join(out.scene_out, f"{opts.model_name}_cloud.glb"), out.cache.cloud,
                                  frustum_segments=segments, world_up=WORLD_UP[scene.task])
