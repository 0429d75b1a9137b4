"""One clip's prepared conditioning, and the clip generator that turns it into frames.

The task loops never call a pipeline directly: they build a :class:`GenerationRequest` and hand it
to a :data:`ClipGenerator` (any callable), which keeps them testable with a stand-in generator.
:class:`PipelineClipGenerator` wraps a WorldStereo pipeline (camera, memory or DMD) and derives the
model's camera inputs from the request: the Plücker ray map of the target cameras
(:func:`cameras.plucker_embedding`), and for memory models the pose tokens of targets and
references normalised together (:func:`cameras.unified_camera_normalization` + :func:`cameras.camera_qt`).
:func:`load_pipeline_clip_generator` builds one from a ComfyUI-style models folder (see :mod:`..hub`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..cameras import CameraTrajectory, camera_qt, plucker_embedding, unified_camera_normalization
from ..errors import InputError
from ..io.fingerprint import file_stamps
from ..io.images import resize_bicubic, to_tensor_m11
from ..progress import ProgressFn
from ..runtime.options import RuntimeOptions, apply_runtime, load_device, load_kwargs

if TYPE_CHECKING:
    from ..pipelines.base import ClipInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one clip is generated from (all at the working size H x W).

    ``render``/``render_mask``: (F,3,H,W) in [-1,1] / (F,1,H,W) in {0,1} (1 = hole), frame 0 the
    start image. ``trajectory``: the F target cameras, K in pixels of (H, W). ``seed`` seeds the
    noise generator and ``noise_index`` says how many earlier clips drew from it (the release draws
    every trajectory's noise from one generator). ``references``
    (R,H,W,3) uint8, ``ref_index`` (R,) (reference r belongs to target frame ``ref_index[r] + 1``)
    and ``ref_w2cs`` (R,4,4): the retrieved memory (memory models only; None for the camera model).
    """

    image: np.ndarray
    prompt: str
    render: torch.Tensor
    render_mask: torch.Tensor
    trajectory: CameraTrajectory
    seed: int
    noise_index: int = 0
    references: np.ndarray | None = None
    ref_index: torch.Tensor | None = None
    ref_w2cs: torch.Tensor | None = None
    name: str = "clip"

    @property
    def height(self) -> int:
        return int(self.render.shape[-2])

    @property
    def width(self) -> int:
        return int(self.render.shape[-1])

    @property
    def num_frames(self) -> int:
        return int(self.render.shape[0])

    def check(self) -> None:
        """Raise InputError when the parts do not fit together."""
        F, H, W = self.num_frames, self.height, self.width
        if self.render.shape != (F, 3, H, W) or self.render_mask.shape != (F, 1, H, W):
            raise InputError(f"{self.name}: render {tuple(self.render.shape)} and mask {tuple(self.render_mask.shape)} "
                             "must be (F,3,H,W) and (F,1,H,W)")
        if tuple(np.asarray(self.image).shape) != (H, W, 3):
            raise InputError(f"{self.name}: start image {np.asarray(self.image).shape} is not ({H}, {W}, 3)")
        if len(self.trajectory) != F or (self.trajectory.height, self.trajectory.width) != (H, W):
            raise InputError(f"{self.name}: trajectory has {len(self.trajectory)} cameras for "
                             f"{self.trajectory.height}x{self.trajectory.width}; need {F} for {H}x{W}")
        refs = (self.references, self.ref_index, self.ref_w2cs)
        if any(r is not None for r in refs):
            if any(r is None for r in refs):
                raise InputError(f"{self.name}: give references, ref_index and ref_w2cs together")
            R = len(self.ref_index)
            if np.asarray(self.references).shape != (R, H, W, 3) or tuple(self.ref_w2cs.shape) != (R, 4, 4):
                raise InputError(f"{self.name}: {R} reference indices but references "
                                 f"{np.asarray(self.references).shape} and ref_w2cs {tuple(self.ref_w2cs.shape)}")


    def with_start_reference(self) -> GenerationRequest:
        """This request with the start image as its one reference, attached to target frame 1
        (``ref_index`` 0) with the first camera's pose: a memory model's clip without retrieved memory."""
        return replace(self, references=np.asarray(self.image)[None], ref_index=torch.zeros(1, dtype=torch.long),
                       ref_w2cs=self.trajectory.w2c[:1].clone())


def clip_request(image: np.ndarray, render: torch.Tensor, render_mask: torch.Tensor, trajectory: CameraTrajectory,
                 *, prompt: str = "", seed: int = 0, references: np.ndarray | None = None,
                 ref_index: torch.Tensor | None = None, ref_w2cs: torch.Tensor | None = None,
                 name: str = "clip") -> GenerationRequest:
    """A request at the render's size: ``render`` (F,3,H,W) in [-1,1] and its hole mask (F,1,H,W)
    in {0,1}; the start ``image`` (uint8 HxWx3, any size) and the F-camera ``trajectory`` are resized
    to H x W. Raises InputError when the mask or the trajectory is not the render's."""
    n, _, height, width = render.shape
    if tuple(render_mask.shape) != (n, 1, height, width):
        raise InputError(f"{name}: the hole mask has shape {[render_mask.shape[0], *render_mask.shape[2:]]} but the "
                         f"render is {n} frames of {height}x{width}; connect the mask of the same render")
    if len(trajectory) != n:
        raise InputError(f"{name}: the trajectory has {len(trajectory)} cameras but the render {n} frames; render "
                         "the same trajectory")
    start = np.asarray(image)
    if start.shape[:2] != (height, width):
        start = resize_bicubic(start, (height, width))
    return GenerationRequest(image=start, prompt=prompt, render=render, render_mask=render_mask,
                             trajectory=trajectory.resized(height, width), seed=int(seed), references=references,
                             ref_index=ref_index, ref_w2cs=ref_w2cs, name=name)


#: ``generator(request, progress) -> frames`` (F, H, W, 3), uint8 or float in [0, 1].
ClipGenerator = Callable[[GenerationRequest, ProgressFn | None], Any]


def model_inputs(request: GenerationRequest, *, memory: bool) -> ClipInputs:
    """The pipeline inputs of a request (batch 1, float32): render, mask and rays and, for memory
    models, the references with their ``ref_index`` and the pose tokens of targets and references."""
    from ..pipelines.base import ClipInputs

    request.check()
    traj = request.trajectory
    render = dict(render_video=request.render.permute(1, 0, 2, 3)[None].float(),
                  render_mask=request.render_mask.permute(1, 0, 2, 3)[None].float(),
                  camera_embedding=plucker_embedding(traj.K, traj.w2c, request.height, request.width,
                                                     name=f"{request.name} trajectory").float())
    if not memory:
        return ClipInputs(**render)
    if request.references is None:
        raise InputError(f"{request.name}: a memory model needs reference frames (retrieved from the memory bank, "
                         "or the start image with ref_index [0] for a single clip)")
    targets, refs = unified_camera_normalization(traj.w2c, request.ref_w2cs)
    return ClipInputs(**render,
                      reference_video=torch.stack([to_tensor_m11(f) for f in request.references], dim=1)[None],
                      ref_index=torch.as_tensor(request.ref_index, dtype=torch.long),
                      camera_qt=camera_qt(targets)[None].float(),
                      camera_qt_ref=camera_qt(refs)[None].float())


class PipelineClipGenerator:
    """A :data:`ClipGenerator` over a WorldStereo pipeline (:mod:`worldstereo_core.pipelines`).

    ``num_inference_steps`` / ``guidance_scale`` default to the pipeline's own defaults (40 UniPC
    steps and CFG 5.0, or the DMD schedule without CFG). :attr:`steps` is the number of progress
    ticks one clip makes. ``weights``: the files and folders the models were loaded from (for
    :meth:`resume_key`).
    """

    def __init__(self, pipeline, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 weights: Sequence[str | os.PathLike] = (), **call_kwargs: Any) -> None:
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.weights = [Path(w) for w in weights if w]
        self.call_kwargs = call_kwargs

    def resume_key(self) -> dict:
        """What about this generator shapes its clips (a multi-trajectory run's key records it): the
        weight files by name, size and mtime, the transformer's dtypes, the scheduler's timesteps
        (steps and shift), the guidance scale, the negative prompt and the other call options."""
        scheduler = self.pipeline.make_scheduler(self.num_inference_steps)
        guidance = self.guidance_scale
        return {
            "pipeline": type(self.pipeline).__name__,
            "weights": {w.name: file_stamps(w) for w in self.weights},  # by name: the models folder may move
            "dtypes": sorted({str(p.dtype) for p in self.pipeline.transformer.parameters()}),
            "timesteps": [round(float(t), 6) for t in scheduler.timesteps],
            "guidance_scale": self.pipeline.default_guidance_scale() if guidance is None else float(guidance),
            "negative_prompt": self.pipeline.negative_prompt,
            "options": {k: repr(v) for k, v in sorted(self.call_kwargs.items())},
        }

    @property
    def memory(self) -> bool:
        return bool(getattr(self.pipeline, "uses_references", False))

    @property
    def steps(self) -> int:
        return len(self.pipeline.make_scheduler(self.num_inference_steps).timesteps)

    def __call__(self, request: GenerationRequest, progress: ProgressFn | None = None) -> np.ndarray:
        out = self.pipeline.generate(request.image, model_inputs(request, memory=self.memory), prompt=request.prompt,
                                     seed=request.seed, noise_index=request.noise_index,
                                     num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                     output_type="np", progress=progress, **self.call_kwargs)
        return np.asarray(out.frames[0])


def load_pipeline_clip_generator(models_root: str | os.PathLike, model_type: str, *, base: str | None = None,
                            device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                            download: bool = False, num_inference_steps: int | None = None,
                            guidance_scale: float | None = None, runtime: RuntimeOptions | None = None,
                            progress: ProgressFn | None = None) -> tuple[PipelineClipGenerator, Any]:
    """(generator, WorldStereoConfig) for a variant in a models folder (downloaded on first use
    with ``download``). ``base``: a Wan2.1-I2V diffusers folder, repo id or folder name under
    ``<models>/diffusers`` (default: the variant config's ``base_model``).

    ``runtime`` (default: the plain model) is applied in the order of :mod:`..runtime.options`:
    the transformer loads with :func:`~..runtime.options.load_kwargs` (fp8 while reading, on the
    CPU when its blocks are streamed or sharded), the base components on
    :func:`~..runtime.options.load_device`, then :func:`~..runtime.options.apply_runtime` (sequence
    parallel under torchrun, attention, compile, sharding, block swap, VAE tiling, offload) gives
    the pipeline's keyword arguments."""
    from .. import hub
    from ..loading import default_dtype, load_base_components, load_worldstereo_transformer
    from ..models import load_worldstereo_config
    from ..pipelines import build_pipeline

    runtime = runtime or RuntimeOptions()
    variant = hub.ensure_worldstereo(models_root, model_type, download=download)
    config = load_worldstereo_config(variant)
    base_name = base or config.base_model or hub.WAN_BASE_REPO
    parts = [p for p in hub.WAN_BASE_PARTS if not (config.is_dmd and p == "scheduler")]
    base_folder = hub.ensure_wan_base(models_root, base_name, parts=parts, download=download)
    dtype = dtype or default_dtype(device)
    log.info("loading %s from %s on the Wan base %s (%s, %s, %s)", model_type, variant, base_folder, device, dtype,
             runtime)
    transformer = load_worldstereo_transformer(variant, base=base_folder, dtype=dtype, progress=progress,
                                               **load_kwargs(runtime, device))
    components = load_base_components(base_folder, device=load_device(runtime, device), vae_dtype=dtype,
                                      scheduler=not config.is_dmd)
    pipeline_kwargs = apply_runtime(transformer, runtime, device, components=components)
    pipeline = build_pipeline(config, transformer, components, **pipeline_kwargs)
    return PipelineClipGenerator(pipeline, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             weights=[variant, base_folder]), config
