"""The native nodes (ComfyUI V3 schema): WorldStereo on the core Wan2.1-I2V ``MODEL``, sampled by
the core samplers.

Core wiring: Load Diffusion Model (Wan2.1-I2V-14B) -> WorldStereo Apply Variant (-> core LoRA
loaders) -> KSampler / SamplerCustomAdvanced; Load CLIP (type wan) -> CLIP Text Encode -> WorldStereo
Conditioning (with Load VAE, Load CLIP Vision and our render / memory nodes) -> the sampler's
positive, negative and latent; the sampled LATENT -> WorldStereo VAE Decode Keyframes -> IMAGE and
VIDEO (-> core Save Video). WorldStereo Release Sigmas / DMD Sigmas and the Release UniPC Sampler
make SamplerCustomAdvanced sample as the release does.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from comfy_api.latest import InputImpl, Types, io

from ...worldstereo_core.constants import DEFAULT_NUM_STEPS, FPS
from ...worldstereo_core.errors import InputError
from ...worldstereo_core.pipelines.vae import decode_keyframes, normalize_latents
from ...worldstereo_core.tasks.generate import clip_request, model_inputs
from .. import types
from .._comfy import comfy_progress, node_errors
from ..geometry import first_image_uint8
from ..images import frames_to_image, image_to_frames, mask_from_comfy
from ..loaders import MODEL_TYPES, resolve_worldstereo_variant
from .conditioning import conditioning_steps, worldstereo_conditioning
from .model import apply_variant, load_complete_variant, variant_config
from .sampling import dmd_sigmas, release_shift, release_unipc_sampler, release_unipc_sigmas
from .vae import KeyframeVae

CATEGORY = "WorldStereo/native"
ATTENTION_SCOPES = ("full", "pairs")
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
COMPLETE_VARIANT = "worldstereo-memory-dmd"

_VARIANT_TOOLTIP = "WorldStereo variant folder in models/worldstereo (config.json + model.safetensors)."
_SCOPE_TOOLTIP = ("Memory variants: full = every target token attends every reference (the release); pairs = a "
                  "reference reaches only the target frame it belongs to.")


def _variant_input(default: str = MODEL_TYPES[0]):
    return io.Combo.Input("variant", options=list(MODEL_TYPES), default=default, tooltip=_VARIANT_TOOLTIP)


class ApplyVariant(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Apply Variant"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoApplyVariant", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="Turn the core Wan2.1-I2V-14B MODEL into WorldStereo: the variant's backbone as weight "
                        "patches (apply LoRAs after this node), its ControlNet and pose branches managed with the "
                        "model. Sample with the conditioning of WorldStereo Conditioning.",
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1-I2V-14B (480P or 720P) from Load Diffusion Model, any "
                                                "weight dtype."),
                _variant_input(),
                io.Combo.Input("attention_scope", options=list(ATTENTION_SCOPES), default="full",
                               tooltip=_SCOPE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the MODEL that runs WorldStereo.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, variant, attention_scope) -> io.NodeOutput:
        return io.NodeOutput(apply_variant(model, resolve_worldstereo_variant(variant),
                                           attention_scope=attention_scope))


class LoadCompleteVariant(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Load Complete Variant"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoLoadCompleteVariant", display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="Load a variant whose file holds the whole backbone (the DMD release) with ComfyUI's "
                        "own loader, without a Wan base.",
            inputs=[
                _variant_input(COMPLETE_VARIANT),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="As Load Diffusion Model's: store the weights in fp8 to halve their memory."),
                io.Combo.Input("attention_scope", options=list(ATTENTION_SCOPES), default="full",
                               tooltip=_SCOPE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="A MODEL that runs WorldStereo.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, variant, weight_dtype, attention_scope) -> io.NodeOutput:
        options = {}
        if weight_dtype.startswith("fp8_e4m3fn"):
            options["dtype"] = torch.float8_e4m3fn
            options["fp8_optimizations"] = weight_dtype.endswith("_fast")
        elif weight_dtype == "fp8_e5m2":
            options["dtype"] = torch.float8_e5m2
        return io.NodeOutput(load_complete_variant(resolve_worldstereo_variant(variant), options,
                                                   attention_scope=attention_scope))


class Conditioning(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Conditioning"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoConditioning", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="Condition the core samplers on one clip as the release does: the start image (CLIP on "
                        "the release's unrescaled pixels, VAE image condition), the warp render and hole mask "
                        "encoded keyframe by keyframe, the trajectory's Plücker rays and, for memory variants, "
                        "the retrieved references (else the start image). The latent has one frame per render "
                        "frame.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of WorldStereo Apply Variant (its variant decides "
                                                "whether memory is used)."),
                io.Conditioning.Input("positive", tooltip="CLIP Text Encode of the prompt with the Wan UMT5 "
                                                          "(Load CLIP, type wan)."),
                io.Conditioning.Input("negative", tooltip="CLIP Text Encode of the negative prompt (unused by "
                                                          "the DMD variant: sample it with CFG 1)."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE from Load VAE."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H from Load CLIP Vision."),
                io.Image.Input("start_image", tooltip="The start image (frame 0 of the clip)."),
                io.Image.Input("render", tooltip="Warp render along the trajectory (one frame per camera), "
                                                 "e.g. from WorldStereo Render Warps."),
                io.Mask.Input("hole_mask", tooltip="1 where the render has no point (same render)."),
                io.Custom(types.TRAJECTORY).Input("trajectory", tooltip="The cameras the render was made for."),
                io.Custom(types.MEMORY).Input("memory", optional=True, tooltip=(
                    "Retrieved references (WorldStereo Memory Retrieve), memory variants only; unconnected: the "
                    "start image as the one reference.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent", tooltip="Empty keyframe latent of the clip's size."),
            ],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, positive, negative, vae, clip_vision, start_image, render, hole_mask, trajectory,
                memory=None) -> io.NodeOutput:
        config = variant_config(model)
        if memory is not None and not config.is_memory:
            raise InputError(f"{config.model_type} takes no memory; apply worldstereo-memory(-dmd) or disconnect "
                             "the memory input")
        refs = {} if memory is None else dict(references=memory.frames, ref_index=memory.ref_index,
                                               ref_w2cs=memory.w2c)
        request = clip_request(first_image_uint8(start_image, "start_image"), image_to_frames(render, "render"),
                               (mask_from_comfy(hole_mask, "hole_mask") > 0.5).float(), trajectory, **refs)
        if config.is_memory and memory is None:
            request = request.with_start_reference()
        inputs = model_inputs(request, memory=config.is_memory)
        return io.NodeOutput(*worldstereo_conditioning(positive, negative, vae, clip_vision, request.image, inputs,
                                                       latent_cond_mode=config.latent_cond_mode,
                                                       progress=comfy_progress(conditioning_steps(inputs))))


class ReleaseSigmas(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Release Sigmas"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoReleaseSigmas", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="The sigmas the release samples worldstereo-camera / -memory with: the diffusers-0.36 "
                        "UniPC flow grid (use with WorldStereo Release UniPC Sampler and CFG 5).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of WorldStereo Apply Variant (its base decides the "
                                                "default shift)."),
                io.Int.Input("steps", default=DEFAULT_NUM_STEPS, min=1, max=200,
                             tooltip=f"Sampling steps ({DEFAULT_NUM_STEPS} in the release)."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Flow shift; 0 = the base's (3 for 480P, 5 for 720P)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, steps, shift) -> io.NodeOutput:
        return io.NodeOutput(release_unipc_sigmas(steps, release_shift(variant_config(model), shift)))


class DMDSigmas(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo DMD Sigmas"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoDMDSigmas", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="The 4-step schedule of worldstereo-memory-dmd from its config; sample it with the core "
                        "euler sampler and CFG 1 (exactly the release's DMD steps).",
            inputs=[io.Model.Input("model", tooltip="The MODEL of a worldstereo-memory-dmd variant.")],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model) -> io.NodeOutput:
        config = variant_config(model)
        if not config.is_dmd:
            raise InputError(f"{config.model_type} is not a DMD variant; use {ReleaseSigmas.DISPLAY_NAME}")
        return io.NodeOutput(dmd_sigmas(config))


class ReleaseUniPCSampler(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Release UniPC Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoReleaseUniPCSampler", display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="UniPC as the release runs it (bh2, x0 prediction, the model called at integer "
                        "timesteps), for SamplerCustomAdvanced with WorldStereo Release Sigmas.",
            inputs=[io.Int.Input("solver_order", default=2, min=1, max=3, tooltip="UniPC order (2 in the release).")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, solver_order) -> io.NodeOutput:
        return io.NodeOutput(release_unipc_sampler(solver_order))


class DecodeKeyframes(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo VAE Decode Keyframes"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WorldStereoVAEDecodeKeyframes", display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="Decode WorldStereo keyframe latents frame by frame with the core VAE. Core VAE Decode "
                        "would treat them as a temporally compressed video (4 frames per latent frame): wrong "
                        "here.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE from Load VAE."),
                io.Latent.Input("samples", tooltip="Keyframe latents from the sampler (one latent frame per "
                                                   "keyframe; not for core VAE Decode)."),
                io.Float.Input("fps", default=float(FPS), min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the VIDEO output."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="One image per keyframe."),
                     io.Video.Output(display_name="video", tooltip="The keyframes as a video (core Save Video).")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, vae, samples, fps) -> io.NodeOutput:
        latents = samples["samples"]
        if latents.dim() != 5:
            raise InputError(f"samples must be video latents [B, 16, F, h, w], got {list(latents.shape)}")
        keyframes = KeyframeVae(vae)
        normalised = normalize_latents(latents, keyframes)
        count = latents.shape[2]
        progress = comfy_progress(count)
        frames = []
        for i in range(count):
            frames.append(decode_keyframes(keyframes, normalised[:, :, i:i + 1]).cpu())
            progress(i + 1, count)
        images = frames_to_image(torch.cat(frames, dim=2).permute(0, 2, 1, 3, 4).flatten(0, 1))
        video = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=Fraction(fps)))
        return io.NodeOutput(images, video)


NODES = (ApplyVariant, LoadCompleteVariant, Conditioning, ReleaseSigmas, DMDSigmas, ReleaseUniPCSampler,
         DecodeKeyframes)
NODE_CLASS_MAPPINGS = {node.GET_SCHEMA().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES}
