"""Command line: ``python -m worldstereo_core <command> ...`` over the functions the nodes call.

* ``camera-control <scene> [<scene> ...]``: the release's run_camera_control.py (image.png +
  prompt.json + camera.json -> ``<out>/<scene>/<model>_result.mp4`` and frames).
* ``multi-traj <scene> [<scene> ...] --task reconstruction|panorama``: the release's
  run_multi_traj.py, with ``--cache global`` for the paper's growing 3D cache; rerun the same
  command to resume. With ``--task panorama`` a scene may also be one equirectangular image: its
  scene folder is made first (:func:`worldstereo_core.tasks.panorama_scene.make_panorama_scene`,
  in ``<out>/panorama_scenes/<image name>``); MoGe is told each image's field of view there and
  in the panorama's global cache.
* ``panorama-scene <image> [<image> ...]``: only make those scene folders.
* ``download {worldstereo,wan-base,moge,dinov2,all}``: fetch weights into the models folder.

Models come from a ComfyUI-style models folder (``--models``, default ``$WORLDSTEREO_MODELS`` or
``./models``; layout in :mod:`worldstereo_core.hub`), downloaded on first use with ``--download``.
The memory/speed flags (``--block-swap``, ``--fp8``, ``--offload``, ...) are those of
:mod:`worldstereo_core.runtime.options`. Scenes are processed in turn; under torchrun
(:mod:`worldstereo_core.distributed`) they are spread over the data-parallel groups, the ranks of
a sequence-parallel group run each scene together and only the group's first rank writes.
Every scene is checked (and ``--out``) before any weights load; a bad scene is reported and the
others run, and the command then exits with code 2 and a summary. Ctrl-C stops cleanly (exit
code 130); finished trajectories are kept.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from . import hub
from .constants import (DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS, DEFAULT_SEED, MODEL_TYPES, NFRAME, PANO_BANK_SIZE,
                        RENDER_POINTS_PER_PIXEL, RENDER_RADIUS_NDC)
from .errors import InputError, WorldStereoError
from .geometry.moge import ensure_moge_checkpoint, load_moge
from .geometry.wander import WanderOptions
from .io.atomic import output_folder, safe_join
from .io.fingerprint import file_stamps
from .io.scene_layout import CAMERA_FILE, PANORAMA_SCENES, PROMPT_FILE, RENDER_VIDEO, START_IMAGE
from .progress import TqdmProgress
from .runtime import parallel
from .runtime.options import add_runtime_arguments, runtime_options_from_args
from .tasks.ordering import TASK_TYPES

log = logging.getLogger("worldstereo_core.cli")

MEMORY_TYPES = tuple(t for t in MODEL_TYPES if t != "worldstereo-camera")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


#: Seeds are unsigned 64-bit integers (torch.Generator's range; ComfyUI's seed widget).
MAX_SEED = 2**64 - 1


def _int_range(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi if hi is not None else 'inf'}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive finite number")
    return value


def parse_size_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"480x832,512x720"`` -> ((480, 832), (512, 720)) (height x width)."""
    out = []
    for item in text.split(","):
        try:
            h, w = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not HEIGHTxWIDTH (e.g. 480x832)") from None
        out.append((h, w))
    return tuple(out)


def _add_model_options(p: argparse.ArgumentParser, default_type: str, choices: Sequence[str]) -> None:
    p.add_argument("--models", type=Path, default=None,
                   help="models folder (default: $WORLDSTEREO_MODELS or ./models)")
    p.add_argument("--model-type", default=default_type, choices=choices, help="WorldStereo variant")
    p.add_argument("--base", default=None,
                   help="Wan2.1-I2V diffusers base: folder, repo id or folder name under <models>/diffusers "
                        "(default: the variant's base_model)")
    p.add_argument("--moge", default=hub.MOGE_REPO,
                   help="MoGe checkpoint: a model.pt path or a repo id under <models>/moge (default %(default)s)")
    p.add_argument("--download", action="store_true", help="download missing weights from Hugging Face")
    p.add_argument("--steps", type=_int_range(1, 1000), default=None,
                   help=f"sampling steps (default: {DEFAULT_NUM_STEPS}, or the DMD schedule)")
    p.add_argument("--guidance", type=_positive_float, default=None,
                   help=f"text CFG scale (default {DEFAULT_GUIDANCE_SCALE}; DMD: none)")
    p.add_argument("--seed", type=_int_range(0, MAX_SEED), default=DEFAULT_SEED,
                   help=f"random seed, a whole number in 0..2^64-1 (default {DEFAULT_SEED})")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="transformer/VAE dtype (auto: bf16 on recent CUDA, fp16 on older, fp32 on CPU)")
    p.add_argument("--scale-map", type=parse_size_list, default=None,
                   help="working-size buckets HxW[,HxW...] (default: the variant config's scale_map)")
    p.add_argument("--size", type=parse_size_list, default=None, help="one working size HxW (overrides --scale-map)")
    p.add_argument("--nframe", type=_int_range(2, 1000), default=None,
                   help=f"frames per clip (default: the config's, {NFRAME})")
    p.add_argument("--render-radius", type=_positive_float, default=RENDER_RADIUS_NDC,
                   help="point radius (NDC) of warp renders")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("-v", "--verbose", action="store_true")
    add_runtime_arguments(p)


def _add_panorama_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("panorama images (made into scene folders)")
    g.add_argument("--prompt", default="", help="scene description; each trajectory's caption adds its motion")
    g.add_argument("--pano-depth", type=Path, nargs="+", default=None,
                   help="equirectangular distance maps (.npy/.npz/16-bit .png), one per image, instead of MoGe")
    g.add_argument("--views", type=int, default=WanderOptions.views, help="view* groups (3 trajectories each)")
    g.add_argument("--explorations", type=int, default=WanderOptions.explorations,
                   help="wonder_* groups (2 trajectories each)")
    g.add_argument("--reconstructs", type=int, default=WanderOptions.reconstructs,
                   help="reconstruct_* groups (2 trajectories each)")
    g.add_argument("--bank-size", type=parse_size_list, default=None,
                   help="HxW of the bank crops, start frames and renders (default {}x{}, the release's)".format(
                       *PANO_BANK_SIZE))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worldstereo_core", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cc = sub.add_parser("camera-control", help=f"one camera-controlled clip from image + prompt + {CAMERA_FILE}")
    cc.add_argument("scene", type=Path, nargs="+", help=f"folder(s) with {START_IMAGE}, {PROMPT_FILE}, {CAMERA_FILE}")
    _add_model_options(cc, "worldstereo-camera", MODEL_TYPES)
    cc.add_argument("--depth", type=Path, nargs="+", default=None,
                    help=f"depth maps (.npy/.npz/16-bit .png) of the scenes' {START_IMAGE}, one per scene in the "
                         "same order, used instead of MoGe")

    mt = sub.add_parser("multi-traj", help="memory-consistent multi-trajectory generation")
    mt.add_argument("scene", type=Path, nargs="+",
                    help="reconstruction or panorama scene folder(s); with --task panorama also equirectangular "
                         f"(2:1) images, made into scene folders under <out>/{PANORAMA_SCENES}/")
    mt.add_argument("--task", required=True, choices=TASK_TYPES)
    _add_model_options(mt, "worldstereo-memory", MEMORY_TYPES)
    mt.add_argument("--align-nframe", type=_int_range(1), default=8, help="frames kept in memory per trajectory")
    mt.add_argument("--cache", default="release", choices=("release", "global"),
                    help="release: pre-rendered warps / start-view cloud; global: the paper's growing 3D cache "
                         "(panorama: scenes made from an image, which start it from their 360-degree cloud)")
    mt.add_argument("--dinov2", default=None,
                    help="DINOv2 folder for reference selection (default <models>/dinov2/dinov2-base if present)")
    mt.add_argument("--no-scene-renders", action="store_true",
                    help=f"render warps from the start-view cloud even where the scene has {RENDER_VIDEO}")
    mt.add_argument("--run-worldmirror", action="store_true", help="also run HY-World 2.0 WorldMirror if installed")
    mt.add_argument("--noise", default="release", choices=("release", "per-trajectory"),
                    help="release: one generator seeded once, drawn by each trajectory in turn; per-trajectory: "
                         "seed + trajectory index")
    _add_panorama_options(mt)

    ps = sub.add_parser("panorama-scene", help="make panorama scene folders from equirectangular images")
    ps.add_argument("image", type=Path, nargs="+", help="equirectangular (2:1) images")
    ps.add_argument("--out", type=Path, required=True,
                    help=f"output folder: scenes go to <out>/{PANORAMA_SCENES}/<image name> (where multi-traj looks)")
    ps.add_argument("--models", type=Path, default=None,
                    help="models folder (default: $WORLDSTEREO_MODELS or ./models)")
    ps.add_argument("--moge", default=hub.MOGE_REPO,
                    help="MoGe checkpoint: a model.pt path or a repo id under <models>/moge (default %(default)s)")
    ps.add_argument("--download", action="store_true", help="download MoGe from Hugging Face when missing")
    ps.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ps.add_argument("--nframe", type=int, default=None, help=f"frames per trajectory (default {NFRAME})")
    ps.add_argument("--render-radius", type=float, default=RENDER_RADIUS_NDC, help="point radius (NDC) of warp renders")
    ps.add_argument("-v", "--verbose", action="store_true")
    _add_panorama_options(ps)

    dl = sub.add_parser("download", help="download weights into the models folder")
    dl.add_argument("what", choices=("worldstereo", "wan-base", "moge", "dinov2", "all"))
    dl.add_argument("--models", type=Path, default=None)
    dl.add_argument("--model-type", default="worldstereo-memory", choices=MODEL_TYPES)
    dl.add_argument("--base", default=hub.WAN_BASE_REPO, help="Wan2.1-I2V diffusers repo id (default %(default)s)")
    dl.add_argument("--moge", default=hub.MOGE_REPO)
    dl.add_argument("-v", "--verbose", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------

def _context() -> parallel.DistContext:
    """This process's place in a torchrun run (a single-process context outside torchrun)."""
    return parallel.current() or parallel.DistContext()


def _device(name: str | None, ctx: parallel.DistContext) -> torch.device:
    if ctx.world_size > 1:  # under torchrun each process has its own device (its local GPU)
        if name and torch.device(name).type != ctx.device.type:
            raise InputError(f"--device {name}: under torchrun every process uses its own {ctx.device.type} "
                             f"device (this one {ctx.device}); drop --device")
        return ctx.device
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from .loading import default_dtype

    return default_dtype(device) if name == "auto" else DTYPES[name]


def _moge_path(models: Path, moge: str, download: bool) -> Path:
    """A MoGe checkpoint file given directly, or ``<models>/moge/<repo-name>/model.pt``."""
    if Path(moge).is_file():
        return Path(moge)
    return ensure_moge_checkpoint(safe_join(models, hub.MOGE_FOLDER), moge, download=download)


class LazyMoGeDepth:
    """A DepthFn that loads MoGe on its first call (runs that never need depth never load it).
    ``known_fov``: MoGe is given each image's field of view from K (panorama views)."""

    def __init__(self, models: Path, moge: str, download: bool, device: torch.device, *,
                 known_fov: bool = False) -> None:
        self.models, self.moge, self.download, self.device = models, moge, download, device
        self.known_fov = known_fov
        self._fn = None

    def resume_key(self) -> dict:
        """The checkpoint's name, size and mtime (as far as it is already on disk), and whether
        MoGe is given the field of view."""
        key = {"moge": self.moge, **({"known_fov": True} if self.known_fov else {})}
        try:
            path = _moge_path(self.models, self.moge, download=False)
        except WorldStereoError:
            return key
        return {**key, "file": file_stamps(path)}

    def __call__(self, image, K, w2c):
        if self._fn is None:
            from .geometry.panorama_depth import moge_view_depth_fn
            from .memory.cache import moge_depth_fn

            path = _moge_path(self.models, self.moge, self.download)
            log.info("loading MoGe from %s", path)
            model = load_moge(path, device=self.device)
            self._fn = moge_view_depth_fn(model) if self.known_fov else moge_depth_fn(model)
        return self._fn(image, K, w2c)


def _file_depth(path: Path):
    """A DepthFn returning a depth map file resized (nearest) to the image it is asked about."""
    from .geometry.depth import load_depth_map, resize_depth

    depth = load_depth_map(path)

    def fn(image, K, w2c):
        h, w = image.shape[:2]
        return depth if tuple(depth.shape) == (h, w) else resize_depth(depth, h, w)

    return fn


def _variant_settings(args, models: Path) -> tuple[tuple[tuple[int, int], ...], int]:
    """(scale_map, nframe) from the flags, else from the variant's config.json, read without any
    weights (with --download, only config.json is fetched here)."""
    from .models import load_worldstereo_config

    scale_map = args.size or args.scale_map
    if scale_map and args.nframe:
        return tuple(scale_map), args.nframe
    config = load_worldstereo_config(hub.ensure_worldstereo(models, args.model_type, download=args.download,
                                                            files=("config.json",)))
    return tuple(scale_map or config.scale_map), args.nframe or config.nframe


def _clip_generator(args, models: Path, device: torch.device, ctx: parallel.DistContext):
    from .tasks.generate import load_pipeline_clip_generator

    bar = TqdmProgress(desc="loading the transformer", unit="tensor") if ctx.is_writer else None
    try:
        clip_generator, _ = load_pipeline_clip_generator(
            models, args.model_type, base=args.base, device=device, dtype=_dtype(args.dtype, device),
            download=args.download, num_inference_steps=args.steps, guidance_scale=args.guidance,
            runtime=runtime_options_from_args(args), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return clip_generator


def _checked(work: list[tuple], check) -> tuple[list[tuple], list[str]]:
    """The work items whose scene passes ``check(item)``, and a line per failed one."""
    good, failed = [], []
    for item in work:
        try:
            check(*item)
        except WorldStereoError as exc:
            failed.append(f"{item[0]}: {exc}")
            print(f"error: scene {item[0]}: {exc}", file=sys.stderr)
        else:
            good.append(item)
    return good, failed


def _summary(total: int, failed: list[str]) -> int:
    """Print what failed (if anything); the exit code."""
    if not failed:
        return 0
    print(f"error: {len(failed)} of {total} scene(s) failed, the others ran:\n  " + "\n  ".join(failed),
          file=sys.stderr)
    return 2


def _run_scene(ctx: parallel.DistContext, scene: Path, run, failed: list[str], *, desc: str):
    """``run(bar)`` for one scene of a batch, with a progress bar ``<scene> <desc>`` on the writer rank
    (None elsewhere); a WorldStereoError is reported and the batch goes on (under torchrun it ends the
    process, as the ranks of a group must stay in step)."""
    bar = TqdmProgress(desc=f"{scene.name} {desc}") if ctx.is_writer else None
    try:
        return run(bar)
    except WorldStereoError as exc:
        if ctx.world_size > 1:
            raise
        failed.append(f"{scene}: {exc}")
        print(f"error: scene {scene}: {exc}", file=sys.stderr)
        return None
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _tag(ctx: parallel.DistContext) -> str:
    return f"[rank {ctx.rank}/{ctx.world_size}] " if ctx.world_size > 1 else ""


def _say_layout(ctx: parallel.DistContext, clip_generator) -> None:
    """Under torchrun, print on every rank how its model runs (read from the model itself)."""
    if ctx.world_size > 1:
        model = getattr(getattr(clip_generator, "pipeline", None), "transformer", None)
        split = getattr(model, "_sequence_sharding", None) is not None
        how = f"sequence parallel over {ctx.sp_size} processes" if split else "whole sequence"
        if isinstance(getattr(model, "placement", None), parallel.ShardedPlacement):
            how += ", weights sharded"
        print(f"{_tag(ctx)}{how} on {ctx.device}, {'writer' if ctx.is_writer else 'scratch outputs'}", flush=True)


def _my_scenes(args, ctx: parallel.DistContext, *per_scene: Sequence) -> list[tuple]:
    """(scene, *per-scene values) this process's group handles (all of them outside torchrun)."""
    names = [scene.name for scene in args.scene]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"several scenes are named {', '.join(twice)}; outputs go to <out>/<scene name>, so give "
                         "each scene folder a distinct name")
    if ctx.world_size > 1 and args.download:
        raise InputError("--download is not available under torchrun (every process would download the same "
                         "files); run `python -m worldstereo_core download ...` first")
    mine = parallel.split_work(list(zip(args.scene, *per_scene)), ctx)
    if ctx.world_size > 1 and ctx.is_writer:
        print(f"{_tag(ctx)}group {ctx.dp_rank + 1} of {ctx.dp_size}: "
              f"{', '.join(item[0].name for item in mine) or 'no scenes'}", flush=True)
    return mine


def cmd_camera_control(args) -> int:
    """Each scene in turn (see :func:`parallel.rank_output_dir` for which rank writes)."""
    from .tasks.camera_control import run_camera_control, validate_camera_scene

    ctx = _context()
    depths = args.depth or [None] * len(args.scene)
    if len(depths) != len(args.scene):
        raise InputError(f"--depth: give one depth file per scene ({len(args.scene)} scenes, {len(depths)} files)")
    work = _my_scenes(args, ctx, depths)
    if not work:
        return 0
    output_folder(args.out, "--out")
    models = hub.resolve_models_root(args.models)
    scale_map, nframe = _variant_settings(args, models)
    depth_fns: dict[Path, object] = {}

    def check(scene: Path, depth: Path | None) -> None:
        validate_camera_scene(scene, model_name=args.model_type, scale_map=scale_map, nframe=nframe)
        if depth is not None:
            depth_fns[scene] = _file_depth(depth)

    total = len(work)
    work, failed = _checked(work, check)
    if work:
        device = _device(args.device, ctx)
        clip_generator = _clip_generator(args, models, device, ctx)
        _say_layout(ctx, clip_generator)
        moge = LazyMoGeDepth(models, args.moge, args.download, device)
    for scene, _depth in work:
        def run(bar, scene=scene):
            with parallel.rank_output_dir(args.out, scene.name, ctx) as out_dir:
                return run_camera_control(scene, out_dir, clip_generator, depth_fns.get(scene, moge),
                                          model_name=args.model_type, scale_map=scale_map, nframe=nframe,
                                          seed=args.seed, render_radius=args.render_radius,
                                          points_per_pixel=RENDER_POINTS_PER_PIXEL, progress=bar)
        out = _run_scene(ctx, scene, run, failed, desc="sampling")
        if out is not None and ctx.is_writer:
            print(f"{_tag(ctx)}wrote {out.result} ({out.num_frames} frames, {out.size[0]}x{out.size[1]}) and "
                  f"{out.frames_dir}", flush=True)
    return _summary(total, failed)


def _panorama_depth(args, ctx: parallel.DistContext) -> LazyMoGeDepth:
    """MoGe told each image's field of view: panorama views and, in the global cache, generated frames."""
    return LazyMoGeDepth(hub.resolve_models_root(args.models), args.moge, args.download, _device(args.device, ctx),
                         known_fov=True)


def _panorama_scene_folders(args, scenes: Sequence[Path], ctx: parallel.DistContext,
                            moge: LazyMoGeDepth) -> list[Path]:
    """``scenes`` with every image replaced by its scene folder, made (or reused when finished)
    in ``<out>/panorama_scenes/<image name>``."""
    from .tasks.panorama_scene import PanoramaSceneOptions, make_panorama_scene

    images = [s for s in scenes if not s.is_dir()]
    if not images:
        return list(scenes)
    if ctx.world_size > 1:
        raise InputError("panorama images are made into scene folders by one process: run `python -m "
                         "worldstereo_core panorama-scene <image> --out <out>` first, then give torchrun the folders "
                         f"<out>/{PANORAMA_SCENES}/<image name>")
    stems = [s.stem for s in images]
    twice = sorted({n for n in stems if stems.count(n) > 1})
    if twice:
        raise InputError(f"several panorama images are named {', '.join(twice)}; their scenes would share a folder")
    depths = args.pano_depth or [None] * len(images)
    if len(depths) != len(images):
        raise InputError(f"--pano-depth: give one depth file per panorama image ({len(images)} images, "
                         f"{len(depths)} files)")
    if args.bank_size is not None and len(args.bank_size) != 1:
        raise InputError("--bank-size takes one HxW, e.g. {}x{}".format(*PANO_BANK_SIZE))
    bank_h, bank_w = (args.bank_size or [PANO_BANK_SIZE])[0]
    options = PanoramaSceneOptions(
        bank_width=bank_w, bank_height=bank_h, render_radius=args.render_radius,
        wander=WanderOptions(views=args.views, explorations=args.explorations, reconstructs=args.reconstructs,
                             nframe=args.nframe or NFRAME))
    made = dict(zip(images, depths))
    folders = []
    for scene in scenes:
        if scene in made:
            folder = safe_join(args.out, PANORAMA_SCENES, scene.stem)
            bar = TqdmProgress(desc=f"{scene.name} panorama scene")
            try:
                make_panorama_scene(scene, folder, depth=made[scene], depth_fn=moge, prompt=args.prompt,
                                    options=options, progress=bar)
            finally:
                bar.close()
            print(f"panorama scene: {folder}", flush=True)
            scene = folder
        folders.append(scene)
    return folders


def cmd_panorama_scene(args) -> int:
    ctx = _context()
    _panorama_scene_folders(args, args.image, ctx, _panorama_depth(args, ctx))
    return 0


def cmd_multi_traj(args) -> int:
    """Each scene in turn; ranks of a sequence-parallel group resume from the writer's folder
    (:func:`parallel.rank_output_dir` with ``mirror``)."""
    from .memory.cache import CacheSettings
    from .memory.selector import CameraSelector
    from .tasks.loop import LoopOptions, run_multi_trajectory, validate_scene

    ctx = _context()
    output_folder(args.out, "--out")
    panorama_depth = _panorama_depth(args, ctx) if args.task == "panorama" else None
    if panorama_depth is not None:
        args.scene = _panorama_scene_folders(args, args.scene, ctx, panorama_depth)
    work = _my_scenes(args, ctx)
    if not work:
        return 0
    models = hub.resolve_models_root(args.models)
    scale_map, nframe = _variant_settings(args, models)
    # exports (WorldMirror folder, cloud files) and the WorldMirror run only where they are kept
    options = LoopOptions(task=args.task, model_name=args.model_type, cache_mode=args.cache,
                          align_nframe=args.align_nframe, nframe=nframe, scale_map=scale_map, seed=args.seed,
                          noise=args.noise,
                          scene_renders=not args.no_scene_renders, exports=ctx.is_writer,
                          run_worldmirror=args.run_worldmirror and ctx.is_writer,
                          cache=CacheSettings(render_radius=args.render_radius))
    total = len(work)
    work, failed = _checked(work, lambda scene: validate_scene(scene, options))
    if work:
        device = _device(args.device, ctx)
        clip_generator = _clip_generator(args, models, device, ctx)
        _say_layout(ctx, clip_generator)
        dinov2 = Path(args.dinov2) if args.dinov2 else hub.dinov2_dir(models)
        if args.download and not args.dinov2:
            dinov2 = hub.ensure_dinov2(models, download=True)
        depth_fn = panorama_depth or LazyMoGeDepth(models, args.moge, args.download, device)
        selector = CameraSelector(dinov2_path=dinov2, device=device)
    tag = _tag(ctx)
    for (scene,) in work:
        def run(bar, scene=scene):
            with parallel.rank_output_dir(args.out, scene.name, ctx, mirror=True) as out_dir:
                return run_multi_trajectory(scene, out_dir, clip_generator, options=options, depth_fn=depth_fn,
                                            selector=selector, progress=bar)
        result = _run_scene(ctx, scene, run, failed, desc="trajectories x steps")
        if result is None or not ctx.is_writer:
            continue
        for t in result.trajectories:
            print(f"{tag}{t.view_id}/{t.traj_id}: {t.status}{' from ' + t.render_source if t.render_source else ''}"
                  f" -> {t.result}")
        if result.worldmirror:
            print(f"{tag}WorldMirror folder: {result.worldmirror}")
        if result.cloud_ply:
            print(f"{tag}point cloud: {result.cloud_ply}, {result.cloud_glb}")
        sys.stdout.flush()
    return _summary(total, failed)


def cmd_download(args) -> int:
    models = hub.resolve_models_root(args.models)
    todo = ("worldstereo", "wan-base", "moge", "dinov2") if args.what == "all" else (args.what,)
    bar = TqdmProgress(desc="files", unit="file")
    try:
        for what in todo:
            if what == "worldstereo":
                print(hub.ensure_worldstereo(models, args.model_type, download=True, progress=bar))
            elif what == "wan-base":
                print(hub.ensure_wan_base(models, args.base, download=True, progress=bar))
            elif what == "moge":
                print(_moge_path(models, args.moge, download=True))
            else:
                print(hub.ensure_dinov2(models, download=True, progress=bar))
    finally:
        bar.close()
    return 0


COMMANDS = {"camera-control": cmd_camera_control, "multi-traj": cmd_multi_traj, "panorama-scene": cmd_panorama_scene,
            "download": cmd_download}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "size", None) is not None and len(args.size) != 1:
        print("error: --size takes one HxW; use --scale-map for several", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted; finished trajectories are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except WorldStereoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
