"""The sampler (camera / memory / DMD, chosen by the loaded variant) and the keyframe decoder.

The sampler builds the pipeline of the variant (:func:`worldstereo_core.pipelines.build_pipeline`)
and one :class:`~worldstereo_core.tasks.generate.GenerationRequest` from the start image, the warp
render + hole mask, the target trajectory and (memory variants) the retrieved references; camera
inputs (Plücker rays, pose tokens) are derived by the core. It returns normalised keyframe latents;
:class:`DecodeKeyframes` turns them into an IMAGE batch with the Wan VAE, one keyframe at a time.
Both report progress per step / frame and stop when the user cancels.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from comfy_api.latest import io

from ..worldstereo_core.constants import DEFAULT_SEED
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.images import resize_bicubic
from . import types
from ._comfy import comfy_progress, free_memory, module_bytes, node_errors, on_compute_device, torch_device
from .geometry import first_image_uint8
from .images import frames_to_image, image_to_frames, mask_from_comfy

CATEGORY = "WorldStereo/sampling"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def build_sampler_pipeline(model: types.ModelBundle, vae: types.VaeModel, text_encoder: types.TextEncoder,
                           clip_vision: types.ClipVision, shift: float):
    """The variant's pipeline over the loaded parts, executing on ComfyUI's compute device.

    ``shift`` > 0 overrides the flow shift (UniPC) or the DMD generator shift; 0 keeps the base
    scheduler's (a single-file base: that of the repo the variant's base_model names) / the variant
    config's value.
    """
    from ..worldstereo_core.pipelines import BaseComponents, build_pipeline
    from ..worldstereo_core.pipelines.single_file import default_scheduler_config

    config = model.config
    options = {"device": torch_device()}
    if shift > 0:
        if config.is_dmd:
            config = dataclasses.replace(config, gen_shift=float(shift))
        else:
            options["flow_shift"] = float(shift)
    base = BaseComponents(vae=vae.vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer,
                          image_encoder=clip_vision.model, image_processor=clip_vision.processor,
                          scheduler_config=model.scheduler_config or default_scheduler_config(
                              base_model=config.base_model))
    return build_pipeline(config, model.transformer, base, **options)


def generation_request(image, render, hole_mask, trajectory, prompt: str, seed: int, memory=None):
    """A :class:`GenerationRequest` from ComfyUI inputs (all at the render's size)."""
    from ..worldstereo_core.tasks.generate import GenerationRequest

    frames = image_to_frames(render, "render")
    holes = (mask_from_comfy(hole_mask, "hole_mask") > 0.5).float()
    n, _, height, width = frames.shape
    if holes.shape != (n, 1, height, width):
        raise InputError(f"hole_mask has shape {list(holes.shape[:1]) + list(holes.shape[2:])} but the render is "
                         f"{n} frames of {height}x{width}; connect the mask of the same render")
    if len(trajectory) != n:
        raise InputError(f"the trajectory has {len(trajectory)} cameras but the render {n} frames; render the same "
                         "trajectory")
    if trajectory.width is None or trajectory.height is None:
        raise InputError("the trajectory states no image size; connect a scene (point_cloud) to the trajectory node")
    traj = trajectory if (trajectory.height, trajectory.width) == (height, width) else trajectory.resized(height, width)
    start = first_image_uint8(image, "image")
    if start.shape[:2] != (height, width):
        start = resize_bicubic(start, (height, width))
    extra = {}
    if memory is not None:
        extra = dict(references=memory.frames, ref_index=memory.ref_index, ref_w2cs=memory.w2c)
    return GenerationRequest(image=start, prompt=prompt, render=frames, render_mask=holes, trajectory=traj,
                             seed=int(seed), name="comfyui", **extra), traj


def single_view_memory(request) -> types.Memory:
    """For a memory variant without retrieved references: the start image as the one reference,
    attached to target frame 1 (ref_index 0) with the first camera's pose."""
    return types.Memory(frames=np.asarray(request.image)[None], ref_index=torch.zeros(1, dtype=torch.long),
                        w2c=request.trajectory.w2c[:1].clone())


class Sampler(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Sampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        S = types.Socket
        return io.Schema(
            node_id="WorldStereoSampler", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Generate keyframes along the trajectory. worldstereo-camera / -memory: UniPC with text CFG "
                         "(40 steps, CFG 5 in the release); worldstereo-memory-dmd: its 4-step distilled schedule, "
                         "steps and CFG are ignored. Memory variants use the connected memory (else the start "
                         "image)."),
            inputs=[
                S.MODEL.Input("model", tooltip="The loaded WorldStereo variant (camera, memory or memory-dmd)."),
                S.VAE.Input("vae", tooltip="The Wan2.1 VAE."),
                S.TEXT_ENCODER.Input("text_encoder", tooltip="The UMT5 text encoder."),
                S.CLIP_VISION.Input("clip_vision", tooltip="The CLIP vision encoder."),
                io.Image.Input("image", tooltip="Start image (frame 0 of the clip)."),
                io.Image.Input("render", tooltip="Warp render along the trajectory (one frame per camera)."),
                io.Mask.Input("hole_mask", tooltip="1 where the render has no point."),
                S.TRAJECTORY.Input("trajectory", tooltip="The target cameras (the ones the render was made for)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="Describe the scene."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip=
                                "Empty: the variant's own negative prompt."),
                io.Int.Input("steps", default=40, min=1, max=200, tooltip="UniPC steps (DMD: fixed)."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=30.0, step=0.1, tooltip=
                               "Text guidance scale; 1 = off (DMD: always off)."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1, tooltip=
                               "Flow shift; 0 = the base scheduler's (DMD: the variant's gen_shift)."),
                io.Int.Input("seed", default=DEFAULT_SEED, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                S.MEMORY.Input("memory", optional=True, tooltip="Retrieved references (memory variants)."),
            ],
            outputs=[S.LATENT.Output(display_name="keyframes", tooltip=
                                     "Keyframe latents; decode them with Decode Keyframes (not core VAE Decode).")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, vae, text_encoder, clip_vision, image, render, hole_mask, trajectory, prompt,
                negative_prompt, steps, cfg, shift, seed, memory=None) -> io.NodeOutput:
        from ..worldstereo_core.tasks.generate import model_inputs

        is_memory, is_dmd = model.config.is_memory, model.config.is_dmd
        if memory is not None and not is_memory:
            raise InputError(f"{model.config.model_type} takes no memory; load worldstereo-memory(-dmd) or "
                             "disconnect the memory input")
        request, traj = generation_request(image, render, hole_mask, trajectory, prompt, seed, memory)
        if is_memory and memory is None:
            ref = single_view_memory(request)
            request = dataclasses.replace(request, references=ref.frames, ref_index=ref.ref_index, ref_w2cs=ref.w2c)
        pipeline = build_sampler_pipeline(model, vae, text_encoder, clip_vision, shift)
        inputs = model_inputs(request, memory=is_memory)
        total = len(pipeline.make_sampler(None if is_dmd else steps).timesteps)
        device = torch_device()
        if device.type != "cpu":
            free_memory(module_bytes(model.transformer, vae.vae), device)
        call = {}
        if not is_dmd:
            call.update(num_inference_steps=steps, guidance_scale=cfg)
            if negative_prompt.strip():
                call["negative_prompt"] = negative_prompt
        out = pipeline(request.image, prompt=request.prompt, seed=request.seed, output_type="latent",
                       progress=comfy_progress(total), **inputs, **call)
        keyframes = types.Keyframes(out.latents, request.height, request.width, model.config.model_type, traj)
        return io.NodeOutput(keyframes)


class DecodeKeyframes(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Decode Keyframes"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoDecodeKeyframes", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Decode WorldStereo keyframe latents with the Wan VAE (each keyframe on its own) to an "
                         "IMAGE batch."),
            inputs=[types.Socket.VAE.Input("vae", tooltip="The Wan2.1 VAE."),
                    types.Socket.LATENT.Input("keyframes", tooltip="The Sampler's keyframes.")],
            outputs=[io.Image.Output(display_name="images", tooltip="One image per keyframe.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, vae, keyframes) -> io.NodeOutput:
        from ..worldstereo_core.pipelines.vae import decode_keyframes

        latents = keyframes.samples
        if latents.dim() != 5:
            raise InputError(f"keyframes must be [B,16,F,h,w] latents, got {list(latents.shape)}")
        n = latents.shape[2]
        progress = comfy_progress(n)
        frames = []
        with on_compute_device(vae.vae) as device, torch.inference_mode():
            for i in range(n):  # keyframes decode independently: one at a time, with progress
                frames.append(decode_keyframes(vae.vae, latents[:, :, i:i + 1].to(device)).cpu())
                progress(i + 1, n)
        video = torch.cat(frames, dim=2)  # [B,3,F,H,W]
        return io.NodeOutput(frames_to_image(video.permute(0, 2, 1, 3, 4).flatten(0, 1)))


NODE_CLASS_MAPPINGS = {
    "WorldStereoSampler": Sampler,
    "WorldStereoDecodeKeyframes": DecodeKeyframes,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
