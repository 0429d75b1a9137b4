"""The multi-trajectory loop (reconstruction / panorama) as one node over ``tasks.loop``, and the
node that makes a panorama scene from one 360-degree image for it.

The loop runs on the native MODEL (WorldStereo Apply Variant / Load Complete Variant) with the core
CLIP, VAE and CLIP vision, through :class:`.native.generator.NativeClipGenerator`; it samples as the
release does unless SIGMAS, a SAMPLER or a CFG are given (:func:`.native.sampling.release_sampling`).

The scene comes from a folder in ``input/`` (the release's layout: ``image.png`` + ``prompt.json``
with optional ``renders/traj_*``, or a panorama scene with ``pano_bank/``), from a connected
``panorama_scene`` (made by *Panorama Scene From Image* in ``output/<output_folder>/panorama_scenes/
<name>``: :func:`worldstereo_core.tasks.panorama_scene.make_panorama_scene`, as the CLI's
``multi-traj --task panorama <image>``) or, for a reconstruction, from the connected image and the
prompt widget. Results go to
``output/<output_folder>/<scene>/``; the run state is saved after every trajectory, so queueing the
same node again after a cancel (or a crash) resumes where it stopped instead of starting over.
A folder another run holds, or one whose run was made from other inputs or settings, is refused
with a message saying so (:mod:`worldstereo_core.tasks.loop`). The scene folder is checked when
the prompt is queued. Progress runs over the preparation, trajectories x denoising steps and the
exports; Cancel acts between any two units of work.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from comfy_api.latest import io
from PIL import Image

from ..worldstereo_core.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS, DEFAULT_SEED, DMD_STEPS, NFRAME
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.geometry.wander import WanderOptions
from ..worldstereo_core.io.atomic import plain_name, safe_join
from ..worldstereo_core.io.scene_layout import IMAGES_DIR, PANO_BANK, PANORAMA_SCENES, START_IMAGE
from ..worldstereo_core.io.video import read_video
from ..worldstereo_core.memory.cache import CACHE_MODES
from ..worldstereo_core.tasks.ordering import TASK_TYPES, scene_task
from ..worldstereo_core.tasks.panorama_scene import PanoramaSceneOptions
from . import files, types
from ._comfy import comfy_progress, node_errors, on_compute_device
from .geometry import first_image_uint8, uint8_to_image
from .saving import file_entry, relative_to_base
from .trajectory_preview import preview_ui, trajectory_entry

CATEGORY = "WorldStereo/loop"
FROM_IMAGE = "(the image input)"
TASKS = ("auto",) + TASK_TYPES
SCENE_MARKERS = (START_IMAGE, PANO_BANK)
MAX_SEED = 0xFFFFFFFFFFFFFFFF  #: the seed widget's bound (ComfyUI's own)


def scene_choices() -> list[str]:
    found = [f for f in files.input_folders(any_of=SCENE_MARKERS) if f != files.NONE]
    return [FROM_IMAGE] + found


def resolve_task(task: str, scene_dir) -> str:
    """The task for a scene folder (``None``: the image input, always a reconstruction)."""
    if task not in TASKS:
        raise InputError(f"task must be one of {list(TASKS)}, got {task!r}")
    if scene_dir is None and task == "panorama":
        raise InputError(f"a panorama needs a scene folder with {PANO_BANK}/ or a connected panorama_scene "
                         "(Panorama Scene From Image); the image input makes a reconstruction scene")
    if task != "auto":
        return task
    return "reconstruction" if scene_dir is None else scene_task(scene_dir)


class MultiTrajectoryLoop(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Multi-Trajectory Loop"

    @classmethod
    def define_schema(cls) -> io.Schema:
        S = types.Socket
        return io.Schema(
            node_id="WorldStereoMultiTrajectoryLoop",
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description=("Generate every trajectory of a scene in order, growing the memory bank (and, in 'global' "
                         "cache mode, the 3D point cache) after each one; exports the WorldMirror folder and the "
                         "cloud. Re-queue to resume an interrupted run."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip=
                               "A memory variant (worldstereo-memory or worldstereo-memory-dmd) on the core MODEL: "
                               "WorldStereo Apply Variant or Load Complete Variant (LoRAs after it)."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE from Load VAE."),
                io.Clip.Input("clip", tooltip="The UMT5 text encoder from Load CLIP (type wan): encodes the "
                                              "scene's prompts and the variant's negative prompt."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H from Load CLIP Vision."),
                io.Combo.Input("scene", options=scene_choices(), tooltip=
                               "A scene folder in input/, or the image input (not used when a panorama_scene is "
                               "connected)."),
                io.Combo.Input("task", options=list(TASKS), default="auto", tooltip=
                               f"auto: panorama when the folder has {PANO_BANK}/ or a panorama_scene is connected."),
                io.Combo.Input("cache_mode", options=list(CACHE_MODES), default=CACHE_MODES[0], tooltip=
                               "release: start-view cloud and the scene's pre-rendered warps (as released); "
                               "global: grow a 3D point cache from every clip (needs MoGe)."),
                io.String.Input("prompt", multiline=True, default="", tooltip=
                                "Scene description, for the image input (folders bring their own)."),
                io.Int.Input("steps", default=DEFAULT_NUM_STEPS, min=1, max=200, tooltip=
                             f"UniPC steps per trajectory (the DMD variant always takes its {DMD_STEPS}; not used when "
                             "sigmas is connected)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, tooltip=
                               f"Text guidance scale; 0 = the release's ({DEFAULT_GUIDANCE_SCALE}, or 1 for DMD, which "
                               "has no CFG)."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1, tooltip=
                               "Flow shift of the UniPC sigmas; 0 = the base's (3 for 480P, 5 for 720P). Not used "
                               "by DMD or when sigmas is connected."),
                io.Int.Input("seed", default=DEFAULT_SEED, min=0, max=MAX_SEED, control_after_generate=True, tooltip=
                             "Seeds one noise generator that every trajectory draws from in turn, as the release."),
                io.String.Input("output_folder", default="WorldStereo/loop", tooltip=
                                "Inside ComfyUI's output folder; the same folder resumes a run."),
                S.MOGE.Input("moge", optional=True, tooltip=
                             "Depth of the start view (scenes without renders) and of kept frames (global cache)."),
                S.DINOV2.Input("dinov2", optional=True, tooltip=
                               "Image features for choosing diverse memory references; without it, camera poses "
                               "alone choose them."),
                io.Image.Input("image", optional=True, tooltip="Start image when scene is '(the image input)'."),
                S.PANORAMA_SCENE.Input("panorama_scene", optional=True, tooltip=
                                       "A scene made by Panorama Scene From Image: runs the panorama task on it "
                                       "(the scene widget is then not used)."),
                io.Sigmas.Input("sigmas", optional=True, tooltip=
                                "Overrides the schedule (default: WorldStereo Release Sigmas from steps and shift, "
                                "or the DMD sigmas)."),
                io.Sampler.Input("sampler", optional=True, tooltip=
                                 "Overrides the sampler (default: WorldStereo Release UniPC Sampler, or core euler "
                                 "for DMD)."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Every generated clip, one after the other."),
                S.MEMORY_BANK.Output(display_name="memory_bank", tooltip="The final memory bank."),
                io.String.Output(display_name="output_folder", tooltip="Scene results, relative to the output folder."),
                io.String.Output(display_name="cloud_file", tooltip=
                                 "The cache point cloud (GLB) relative to the output folder, for Preview3D ('' if "
                                 "none)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scene, task, cache_mode, output_folder):
        """Checks the scene folder (cameras, prompts, renders, bank) at queue time, before any weights load."""
        from ..worldstereo_core.tasks.loop import LoopOptions, validate_scene

        def check():
            files.output_folder(output_folder, "output_folder")
            if scene == FROM_IMAGE:  # the task is checked at run time: a panorama_scene may be connected
                if task not in TASKS:
                    raise InputError(f"task must be one of {list(TASKS)}, got {task!r}")
                return
            folder = files.input_path(scene, "scene", folder=True)
            if not any((folder / m).exists() for m in SCENE_MARKERS):
                raise InputError(f"scene folder {scene!r} has neither {START_IMAGE} nor {PANO_BANK}/")
            validate_scene(folder, LoopOptions(task=resolve_task(task, folder), cache_mode=cache_mode))
        return files.validation_message(check)

    @classmethod
    def fingerprint_inputs(cls, scene, **_):
        if scene == FROM_IMAGE:
            return ""
        return files.fingerprint_of(files.input_path, scene, "scene", folder=True)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, vae, clip, clip_vision, scene, task, cache_mode, prompt, steps, cfg, shift, seed,
                output_folder, moge=None, dinov2=None, image=None, panorama_scene=None, sigmas=None,
                sampler=None) -> io.NodeOutput:
        from ..worldstereo_core.geometry.panorama_depth import moge_view_depth_fn
        from ..worldstereo_core.memory.cache import moge_depth_fn
        from ..worldstereo_core.memory.selector import CameraSelector
        from ..worldstereo_core.tasks.loop import LoopOptions, run_image_scene, run_multi_trajectory
        from .native.generator import NativeClipGenerator
        from .native.model import variant_config
        from .native.sampling import release_sampling

        out_root = files.output_folder(output_folder, "output_folder")
        if panorama_scene is not None:
            if task not in ("auto", "panorama"):
                raise InputError(f"a connected panorama_scene runs the panorama task; set task to auto or panorama, "
                                 f"not {task!r}")
            scene, scene_dir, task = str(panorama_scene.folder), Path(panorama_scene.folder), "panorama"
        elif scene == FROM_IMAGE:
            if image is None:
                raise InputError("scene is '(the image input)' but no image is connected")
            task = resolve_task(task, None)
        else:
            scene_dir = files.input_path(scene, "scene", folder=True)
            task = resolve_task(task, scene_dir)
        config = variant_config(model)
        if not config.is_memory:
            raise InputError("the multi-trajectory loop conditions on the memory bank; apply worldstereo-memory or "
                             "worldstereo-memory-dmd")
        release_sigmas, release_sampler, release_cfg = release_sampling(config, steps, shift)
        clip_generator = NativeClipGenerator(model, clip, vae, clip_vision,
                                    sigmas=release_sigmas if sigmas is None else sigmas,
                                    sampler=release_sampler if sampler is None else sampler,
                                    cfg=cfg if cfg > 0 else release_cfg)
        options = LoopOptions(task=task, model_name=config.model_type, cache_mode=cache_mode, seed=int(seed),
                              nframe=config.nframe, scale_map=config.scale_map)
        kwargs = dict(options=options, selector=CameraSelector(feature_fn=dinov2) if dinov2 is not None else None,
                      progress=comfy_progress(1))
        with on_compute_device(moge) if moge is not None else contextlib.nullcontext():
            if moge is not None:  # panorama views and frames: MoGe is told the field of view (as the CLI)
                kwargs["depth_fn"] = moge_view_depth_fn(moge) if task == "panorama" else moge_depth_fn(moge)
            if scene == FROM_IMAGE:
                result = run_image_scene(first_image_uint8(image, "image"), prompt, out_root, clip_generator, **kwargs)
            else:
                result = run_multi_trajectory(scene_dir, out_root, clip_generator, **kwargs)
        if not result.trajectories:
            raise InputError(f"scene {scene!r} has no trajectories to generate")
        frames = uint8_to_image(np.concatenate([read_video(o.result) for o in result.trajectories]))
        folder = relative_to_base(result.scene_out, "output")
        cloud = relative_to_base(result.cloud_glb, "output") if result.cloud_glb else ""
        summary = json.dumps({f"{o.view_id}/{o.traj_id}": o.status for o in result.trajectories})
        ui = {"text": [f"output/{folder}: {summary}"]}
        if cloud:
            ui["3d"] = [file_entry(result.cloud_glb, "output")]
        return io.NodeOutput(frames, result.bank, folder, cloud, ui=ui)


def wander_preview(folder: Path, cloud) -> dict:
    """The trajectory preview of a panorama scene: every planned trajectory (labelled ``group/traj``)
    over a sample of the 360-degree cloud."""
    from ..worldstereo_core.tasks.panorama_scene import planned_trajectories

    trajs = planned_trajectories(folder)
    cloud_once = [{"points": cloud.xyz, "colors": cloud.rgb}] + [{}] * max(0, len(trajs) - 1)
    return preview_ui(*(trajectory_entry(traj, label=label, **extra)
                        for (label, traj), extra in zip(trajs, cloud_once)))


class PanoramaSceneFromImage(io.ComfyNode):
    """One 360-degree image -> a panorama scene folder for the loop (the CLI's ``multi-traj --task
    panorama <image>`` first step): the 27 bank crops, the panorama's depth (yours, or MoGe's split /
    merge), its 360-degree cloud and planned wander trajectories with their warps. A finished folder
    made from the same image and settings is reused; Cancel acts between depth views and
    trajectories, and re-queueing finishes an interrupted build."""

    DISPLAY_NAME = "WorldStereo Panorama Scene From Image"

    @classmethod
    def define_schema(cls) -> io.Schema:
        wander = WanderOptions()
        size = PanoramaSceneOptions()
        return io.Schema(
            node_id="WorldStereoPanoramaSceneFromImage",
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description=("Make a panorama scene from one equirectangular (360-degree, 2:1) image: the 27 memory-bank "
                         "views, the panorama's depth and point cloud, and wander trajectories that move into open "
                         "space. Connect it to the Multi-Trajectory Loop's panorama_scene."),
            inputs=[
                io.Image.Input("image", tooltip="The 360-degree panorama: an equirectangular image, width = 2 x "
                                                 "height (the first image of a batch)."),
                io.String.Input("prompt", multiline=True, default="", tooltip=
                                "Scene description; each trajectory's caption adds its motion to it."),
                io.String.Input("name", default="panorama", tooltip=
                                f"Scene name: the scene goes to output/<output_folder>/{PANORAMA_SCENES}/<name>, the "
                                "loop's results to <name> in the loop's output folder."),
                io.String.Input("output_folder", default="WorldStereo/panorama", tooltip=
                                "Inside ComfyUI's output folder. A finished scene of the same image and settings "
                                "is reused; one made from something else is refused, not overwritten."),
                io.Int.Input("views", default=wander.views, min=0, max=64, tooltip=
                             "view* groups, spread round the horizon: three trajectories each from the panorama's "
                             "centre (orbit right, orbit left, rise and circle looking down)."),
                io.Int.Input("explorations", default=wander.explorations, min=0, max=64, tooltip=
                             "wonder_* groups: two trajectories each that walk into the most open directions and "
                             "turn (the second also rises and looks down)."),
                io.Int.Input("reconstructs", default=wander.reconstructs, min=0, max=64, tooltip=
                             "reconstruct_* groups: a shorter walk into the next open direction, then an ellipse "
                             "loop from where it ended."),
                io.Int.Input("frames", default=wander.nframe, min=2, max=1024, tooltip=
                             f"Cameras per trajectory: the loaded model's nframe ({NFRAME} for the released models)."),
                io.Int.Input("bank_width", default=size.bank_width, min=16, max=16384, step=2, tooltip=
                             f"Width of the bank views, start frames and warps (the release's {size.bank_width})."),
                io.Int.Input("bank_height", default=size.bank_height, min=16, max=16384, step=2, tooltip=
                             f"Height of the bank views, start frames and warps (the release's {size.bank_height})."),
                types.Socket.DEPTH.Input("depth", optional=True, tooltip=
                                "Your own equirectangular depth (e.g. Load Depth File): each pixel's distance from "
                                "the panorama centre, 0 = unknown. Used instead of MoGe."),
                types.Socket.MOGE.Input("moge", optional=True, tooltip=
                               "MoGe estimates the panorama's depth (split into views, merged) when no depth is "
                               "connected."),
            ],
            outputs=[
                types.Socket.PANORAMA_SCENE.Output(display_name="panorama_scene", tooltip=
                                         "The scene folder, for the Multi-Trajectory Loop's panorama_scene."),
                io.Image.Output(display_name="bank_views", tooltip="The 27 perspective views of the memory bank."),
            ],
        )

    @classmethod
    def scene_folder(cls, name: str, output_folder: str) -> Path:
        """``output/<output_folder>/panorama_scenes/<name>`` (contained in the output folder)."""
        return safe_join(files.output_folder(output_folder, "output_folder"), PANORAMA_SCENES,
                         plain_name(name.strip()))

    @classmethod
    def validate_inputs(cls, name, output_folder, bank_width, bank_height):
        def check():
            cls.scene_folder(name, output_folder)
            PanoramaSceneOptions(bank_width=bank_width, bank_height=bank_height)
        return files.validation_message(check)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, image, prompt, name, output_folder, views, explorations, reconstructs, frames, bank_width,
                bank_height, depth=None, moge=None) -> io.NodeOutput:
        from ..worldstereo_core.geometry.panorama_depth import moge_view_depth_fn
        from ..worldstereo_core.tasks.panorama_scene import make_panorama_scene

        if depth is None and moge is None:
            raise InputError("connect a depth map (depth) or a MoGe model (moge): the scene's cloud and trajectories "
                             "are read from the panorama's depth")
        folder = cls.scene_folder(name, output_folder)
        options = PanoramaSceneOptions(bank_width=bank_width, bank_height=bank_height, wander=WanderOptions(
            views=views, explorations=explorations, reconstructs=reconstructs, nframe=frames))
        panorama = first_image_uint8(image, "image")
        use_moge = depth is None
        with on_compute_device(moge) if use_moge else contextlib.nullcontext():
            scene = make_panorama_scene(panorama, folder, depth=None if use_moge else depth.depth,
                                        depth_fn=moge_view_depth_fn(moge) if use_moge else None, prompt=prompt,
                                        options=options, progress=comfy_progress(1))
        views_dir = scene.folder / PANO_BANK / IMAGES_DIR
        bank = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(views_dir.glob("*.png"))])
        plan = scene.summary.get("plan", {})
        text = f"output/{relative_to_base(scene.folder, 'output')}: " + json.dumps(
            {"reused": scene.reused, "cloud_points": scene.summary.get("cloud_points"),
             "trajectories": len(plan.get("trajectories", [])), "sphere_coverage": plan.get("coverage")})
        ui = {"text": [text], **wander_preview(scene.folder, scene.cloud)}
        return io.NodeOutput(scene, uint8_to_image(bank), ui=ui)


NODE_CLASS_MAPPINGS = {"WorldStereoMultiTrajectoryLoop": MultiTrajectoryLoop,
                       "WorldStereoPanoramaSceneFromImage": PanoramaSceneFromImage}
NODE_DISPLAY_NAME_MAPPINGS = {"WorldStereoMultiTrajectoryLoop": MultiTrajectoryLoop.DISPLAY_NAME,
                              "WorldStereoPanoramaSceneFromImage": PanoramaSceneFromImage.DISPLAY_NAME}
