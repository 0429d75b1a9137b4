"""The multi-trajectory loop (reconstruction / panorama) as one node over ``tasks.loop``.

The scene comes from a folder in ``input/`` (the release's layout: ``image.png`` + ``prompt.json``
with optional ``renders/traj_*``, or a panorama scene with ``pano_bank/``) or, for a
reconstruction, from the connected image and the prompt widget. Results go to
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

import numpy as np

from ..worldstereo_core.constants import DEFAULT_SEED
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.video import read_video
from ..worldstereo_core.memory.cache import CACHE_MODES
from ..worldstereo_core.tasks.ordering import TASK_TYPES
from . import files, types
from ._comfy import comfy_progress, node_errors, on_compute_device
from .geometry import first_image_uint8, uint8_to_image
from .saving import file_entry, relative_to_base
from .sampling import MAX_SEED, build_sampler_pipeline

CATEGORY = "WorldStereo/loop"
FROM_IMAGE = "(the image input)"
TASKS = ("auto",) + TASK_TYPES
SCENE_MARKERS = ("image.png", "pano_bank")


def scene_choices() -> list[str]:
    found = [f for f in files.input_folders(any_of=SCENE_MARKERS) if f != files.NONE]
    return [FROM_IMAGE] + found


def resolve_task(task: str, scene_dir) -> str:
    """The task for a scene folder (``None``: the image input, always a reconstruction)."""
    if task not in TASKS:
        raise InputError(f"task must be one of {list(TASKS)}, got {task!r}")
    if scene_dir is None and task == "panorama":
        raise InputError("a panorama needs a scene folder with pano_bank/; the image input makes a "
                         "reconstruction scene")
    if task != "auto":
        return task
    return "panorama" if scene_dir is not None and (scene_dir / "pano_bank").is_dir() else "reconstruction"


class MultiTrajectoryLoop:
    DESCRIPTION = ("Generate every trajectory of a scene in order, growing the memory bank (and, in 'global' "
                   "cache mode, the 3D point cache) after each one; exports the WorldMirror folder and the "
                   "cloud. Re-queue to resume an interrupted run.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", types.MEMORY_BANK, "STRING", "STRING")
    RETURN_NAMES = ("frames", "memory_bank", "output_folder", "cloud_file")
    OUTPUT_TOOLTIPS = ("Every generated clip, one after the other.", "The final memory bank.",
                       "Scene results, relative to the output folder.",
                       "The cache point cloud (GLB) relative to the output folder, for Preview3D ('' if none).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (types.MODEL,),
                "vae": (types.VAE,),
                "text_encoder": (types.TEXT_ENCODER,),
                "clip_vision": (types.CLIP_VISION,),
                "scene": (scene_choices(), {"tooltip": "A scene folder in input/, or the image input."}),
                "task": (list(TASKS), {"default": "auto", "tooltip": "auto: panorama when the folder has pano_bank/."}),
                "cache_mode": (list(CACHE_MODES), {"default": CACHE_MODES[0], "tooltip":
                               "release: start-view cloud and the scene's pre-rendered warps (as released); "
                               "global: grow a 3D point cache from every clip (needs MoGe)."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Scene description, for the image input (folders bring their own)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "seed": ("INT", {"default": DEFAULT_SEED, "min": 0, "max": MAX_SEED,
                                 "tooltip": "Seeds one noise generator that every trajectory draws from in "
                                            "turn, as the release."}),
                "output_folder": ("STRING", {"default": "WorldStereo/loop", "tooltip":
                                  "Inside ComfyUI's output folder; the same folder resumes a run."}),
            },
            "optional": {
                "moge": (types.MOGE, {"tooltip": "Depth of the start view (scenes without renders) and of kept frames "
                                                 "(global cache)."}),
                "dinov2": (types.DINOV2,),
                "image": ("IMAGE", {"tooltip": "Start image when scene is '(the image input)'."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, scene, task, cache_mode, output_folder):
        """Checks the scene folder (cameras, prompts, renders, bank) at queue time, before any weights load."""
        from ..worldstereo_core.tasks.loop import LoopOptions, validate_scene

        def check():
            files.output_folder(output_folder, "output_folder")
            if scene == FROM_IMAGE:
                resolve_task(task, None)
                return
            folder = files.input_path(scene, "scene", folder=True)
            if not any((folder / m).exists() for m in SCENE_MARKERS):
                raise InputError(f"scene folder {scene!r} has neither image.png nor pano_bank/")
            validate_scene(folder, LoopOptions(task=resolve_task(task, folder), cache_mode=cache_mode))
        return files.validation_message(check)

    @classmethod
    def IS_CHANGED(cls, scene, **_):
        if scene == FROM_IMAGE:
            return ""
        try:
            return files.fingerprint(files.input_path(scene, "scene", folder=True))
        except InputError:
            return ""

    @node_errors("WorldStereo Multi-Trajectory Loop")
    def run(self, model, vae, text_encoder, clip_vision, scene, task, cache_mode, prompt, steps, cfg, shift, seed,
            output_folder, moge=None, dinov2=None, image=None):
        from ..worldstereo_core.memory.cache import moge_depth_fn
        from ..worldstereo_core.memory.selector import CameraSelector
        from ..worldstereo_core.tasks.generate import PipelineGenerator
        from ..worldstereo_core.tasks.loop import LoopOptions, run_image_scene, run_multi_trajectory

        out_root = files.output_folder(output_folder, "output_folder")
        if scene == FROM_IMAGE:
            if image is None:
                raise InputError("scene is '(the image input)' but no image is connected")
            task = resolve_task(task, None)
        else:
            scene_dir = files.input_path(scene, "scene", folder=True)
            task = resolve_task(task, scene_dir)
        config = model.config
        if not config.is_memory:
            raise InputError("the multi-trajectory loop conditions on the memory bank; load worldstereo-memory or "
                             "worldstereo-memory-dmd")
        pipeline = build_sampler_pipeline(model, vae, text_encoder, clip_vision, shift)
        generator = PipelineGenerator(pipeline, num_inference_steps=None if config.is_dmd else steps,
                                      guidance_scale=None if config.is_dmd else cfg,
                                      weights=[model.variant_dir, model.base, vae.source, text_encoder.source,
                                               clip_vision.source])
        options = LoopOptions(task=task, model_name=config.model_type, cache_mode=cache_mode, seed=int(seed),
                              nframe=config.nframe, scale_map=config.scale_map)
        kwargs = dict(options=options, selector=CameraSelector(feature_fn=dinov2) if dinov2 is not None else None,
                      progress=comfy_progress(1))
        with on_compute_device(moge) if moge is not None else contextlib.nullcontext():
            if moge is not None:
                kwargs["depth_fn"] = moge_depth_fn(moge)
            if scene == FROM_IMAGE:
                result = run_image_scene(first_image_uint8(image, "image"), prompt, out_root, generator, **kwargs)
            else:
                result = run_multi_trajectory(scene_dir, out_root, generator, **kwargs)
        if not result.trajectories:
            raise InputError(f"scene {scene!r} has no trajectories to generate")
        frames = uint8_to_image(np.concatenate([read_video(o.result) for o in result.trajectories]))
        folder = relative_to_base(result.scene_out, "output")
        cloud = relative_to_base(result.cloud_glb, "output") if result.cloud_glb else ""
        summary = json.dumps({f"{o.view_id}/{o.traj_id}": o.status for o in result.trajectories})
        ui = {"text": [f"output/{folder}: {summary}"]}
        if cloud:
            ui["3d"] = [file_entry(result.cloud_glb, "output")]
        return {"ui": ui, "result": (frames, result.bank, folder, cloud)}


NODE_CLASS_MAPPINGS = {"WorldStereoMultiTrajectoryLoop": MultiTrajectoryLoop}
NODE_DISPLAY_NAME_MAPPINGS = {"WorldStereoMultiTrajectoryLoop": "WorldStereo Multi-Trajectory Loop"}
