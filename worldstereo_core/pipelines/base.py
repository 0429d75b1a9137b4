"""The sampling core shared by the camera, memory and DMD pipelines.

One run: validate inputs -> conditioning (text, CLIP, I2V condition, render/reference keyframe
latents) -> denoising loop (optionally with classifier-free guidance on the text only) ->
keyframe decode. Subclasses choose the schedule, whether CFG applies and which extra inputs the
transformer takes; the loop itself lives only here.

Components stay where the caller put them ("home"); each is moved to the execution device while
it is used and moved home afterwards, unless ``keep_on_device=True``. Results come back on the
CPU. A progress callback may raise to interrupt; the run then stops after the current step (or
conditioning stage: the callback is also called with 0 steps done between the text, CLIP and VAE
encodings), components go home and the CUDA cache is emptied.

Work is not repeated: text embeddings are kept for the next runs with the same prompt and
encoder (:class:`.conditioning.PromptCache`, shared by the pipelines), the ControlNet's condition
embedding and the RoPE tables are computed once per clip, and the step loop makes no host sync
(timesteps go to the device before it, the schedules step with host scalars). The CUDA cache is
emptied after a run only when memory was handed back (components moved home, streamed blocks) or
the run failed.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from ..constants import DEFAULT_SEED, TEXT_SEQ_LEN
from ..errors import InputError, MissingWeightsError
from ..models.inputs import MemoryInputs, batched, check_ref_index, describe
from ..progress import ProgressFn, report
from ..sizes import SIZE_MULTIPLE
from .conditioning import PROMPT_CACHE, encode_image, encode_prompt, preprocess_image
from .schedulers import Scheduler, initial_noise, make_generator
from .vae import (LATENT_COND_MODES, SPATIAL_FACTOR, TEMPORAL_FACTOR, decode_keyframes, encode_keyframes,
                  encode_video, frames_from_video, i2v_mask, image_condition_latent, latent_frames,
                  reference_latent_layout)

logger = logging.getLogger(__name__)

OUTPUT_TYPES: tuple[str, ...] = ("latent", "pt", "np")


@dataclass(frozen=True)
class ModelCall:
    """One logical transformer call, given to a ``model_call_hook`` (debugging, tests)."""

    step: int
    branch: str                      # "cond" or "uncond"
    timestep: torch.Tensor           # [B] as passed to the model
    latent_model_input: torch.Tensor  # [B,36,F,h,w]
    noise_pred: torch.Tensor         # [B,16,F,h,w] float32


ModelCallHook = Callable[[ModelCall], None]


@dataclass
class GenerationOutput:
    """Result of a pipeline run (all tensors on the CPU)."""

    latents: torch.Tensor            # normalised keyframe latents [B,16,F,h,w] float32
    frames: Any = None               # "pt": [B,F,3,H,W] in [0,1]; "np": float32 [B,F,H,W,3]; None for "latent"
    timesteps: list[float] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClipInputs:
    """The pixel-space tensors one clip is generated from (batch B; F keyframes of H x W).

    ``render_video`` [B,3,F,H,W] in [-1,1] (the camera and DMD pipelines also take num_frames
    frames, encoded as one causal video), ``render_mask`` [B|1,1,F,H,W] in {0,1},
    ``camera_embedding`` [B|1,6,F,H,W] Plücker rays. Memory pipelines only: ``reference_video``
    [B,3,F_ref,H,W], ``ref_index`` [F_ref] (value k attaches a reference to target frame k+1),
    ``camera_qt`` [B|1,F,7] and ``camera_qt_ref`` [B|1,F_ref,7] pose tokens. Checked by the pipeline."""

    render_video: torch.Tensor
    render_mask: torch.Tensor
    camera_embedding: torch.Tensor | None = None
    reference_video: torch.Tensor | None = None
    ref_index: torch.Tensor | None = None
    camera_qt: torch.Tensor | None = None
    camera_qt_ref: torch.Tensor | None = None


@dataclass(frozen=True)
class LatentGrid:
    """The sizes of one run: batch, latent frames, nominal frames, pixel and latent height/width."""

    batch: int
    frames: int
    num_frames: int
    height: int
    width: int
    h: int
    w: int


@dataclass(frozen=True)
class Conditions:
    """Everything the loop feeds the transformer besides the noisy latents (on the device, batched)."""

    condition: torch.Tensor          # [B,20,F,h,w]: I2V mask (4) + image-condition latent (16)
    prompt_embeds: torch.Tensor      # [B,512,text_dim]
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor       # [B,tokens,image_dim]
    render_latent: torch.Tensor      # [B,16,F,h,w]
    render_mask: torch.Tensor        # [B,1,F,H,W]
    camera_embedding: torch.Tensor | None  # [B,6,F,H,W]
    memory: MemoryInputs | None      # memory pipelines: reference latents, ref_index (CPU), pose tokens

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The transformer's keyword arguments besides the latents, timestep and text."""
        kwargs = {"render_latent": self.render_latent, "render_mask": self.render_mask,
                  "camera_embedding": self.camera_embedding}
        if self.memory is not None:
            kwargs.update(vars(self.memory))
        kwargs["encoder_hidden_states_image"] = self.image_embeds
        return {k: v for k, v in kwargs.items() if v is not None}


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    """Compute dtype of a model (its patch embedding's for Wan transformers, whose norms may stay fp32)."""
    patch = getattr(module, "patch_embedding", None)
    if isinstance(patch, torch.nn.Module):
        return patch.weight.dtype
    return next(module.parameters()).dtype


def _exact_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so device comparisons with parameters' devices hold."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _batched(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """:func:`~..models.inputs.batched` against a pipeline run's batch (render_video's)."""
    return batched(x, batch, name, of="render_video")


def _reusing_condition(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The model's per-clip reuse of its ControlNet condition embedding, where it has one."""
    reuse = getattr(model, "reusing_condition", None)
    return reuse() if reuse is not None else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mark(device: torch.device):
    """A point in time on ``device``'s stream: a recorded CUDA event (no host sync) or perf_counter."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _intervals(marks: list) -> list[float]:
    """Seconds between consecutive marks (waits once for the last CUDA event)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


class KeyframePipeline(abc.ABC):
    """Shared core of the WorldStereo samplers (see camera/memory/dmd for the concrete ones).

    Constructor: the transformer and Wan VAE; optional UMT5 ``text_encoder`` + ``tokenizer`` (else
    pass prompt embeddings) and CLIP ``image_encoder`` + ``image_processor`` (else pass
    ``image_embeds``); ``negative_prompt`` and ``latent_cond_mode`` from the variant config;
    ``clip_no_rescale`` (default True = the reference's CLIP ``do_rescale=False`` quirk, see
    :func:`.conditioning.clip_pixel_values`); ``device`` (execution device, default: the
    transformer's); ``keep_on_device`` (leave components on the execution device after a run).
    """

    #: Whether the transformer takes reference_latent / ref_index / camera_qt / camera_qt_ref.
    uses_references: ClassVar[bool] = False
    #: Whether a render_video of num_frames frames may be encoded as one causal video.
    allows_causal_render: ClassVar[bool] = True
    #: Whether classifier-free guidance is available.
    supports_cfg: ClassVar[bool] = True

    def __init__(self, transformer: torch.nn.Module, vae, *, text_encoder=None, tokenizer=None,
                 image_encoder=None, image_processor=None, negative_prompt: str | None = "",
                 latent_cond_mode: str = "full_vae", clip_no_rescale: bool = True,
                 device: torch.device | str | None = None, keep_on_device: bool = False) -> None:
        if latent_cond_mode not in LATENT_COND_MODES:
            raise InputError(f"latent_cond_mode must be one of {LATENT_COND_MODES}, got {latent_cond_mode!r}")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.negative_prompt = negative_prompt or ""
        self.latent_cond_mode = latent_cond_mode
        self.clip_no_rescale = clip_no_rescale
        self.device = _exact_device(torch.device(device) if device is not None else _device_of(transformer))
        self.keep_on_device = keep_on_device
        self.prompt_cache = PROMPT_CACHE
        self._released = False  # whether this run handed device memory back (see __call__)

    # ----------------------------------------------------------------------------------------
    # Subclass hooks
    # ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_scheduler(self, num_inference_steps: int | None) -> Scheduler:
        """A fresh schedule for one run (``None``: the variant's default length)."""

    def default_guidance_scale(self) -> float:
        return 1.0

    # ----------------------------------------------------------------------------------------
    # Placement
    # ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _placed(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``module`` on the execution device for the block; moved home after unless kept.

        A module with a ``placement`` (e.g. ``runtime.block_swap.BlockSwap``) places itself."""
        placement = getattr(module, "placement", None)
        if placement is not None:
            self._released |= not self.keep_on_device
            with placement(self.device, keep=self.keep_on_device):
                yield module
            return
        home = _device_of(module)
        module.to(self.device)
        try:
            yield module
        finally:
            if not self.keep_on_device and home != self.device:
                module.to(home)
                self._released = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Half-precision runs go under autocast, as the reference's run scripts do; fp32 runs do not."""
        dtype = _dtype_of(self.transformer)
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------
    # Public entry point
    # ----------------------------------------------------------------------------------------
    def __call__(self, image: Any, render_video: torch.Tensor, render_mask: torch.Tensor,
                 camera_embedding: torch.Tensor | None = None, *, reference_video: torch.Tensor | None = None,
                 ref_index: torch.Tensor | None = None, camera_qt: torch.Tensor | None = None,
                 camera_qt_ref: torch.Tensor | None = None, **options: Any) -> GenerationOutput:
        """Generate keyframes (the diffusers-style entry point): the clip's tensors as
        :class:`ClipInputs` describes them, every other keyword as :meth:`generate` takes it."""
        clip = ClipInputs(render_video, render_mask, camera_embedding, reference_video, ref_index, camera_qt,
                          camera_qt_ref)
        return self.generate(image, clip, **options)

    def generate(self, image: Any, clip: ClipInputs, *, prompt: str | list[str] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt: str | list[str] | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, noise_index: int = 0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, latent_cond_mode: str | None = None,
                 output_type: str = "np", batch_cfg: bool = True, progress: ProgressFn | None = None,
                 model_call_hook: ModelCallHook | None = None) -> GenerationOutput:
        """Generate the keyframes of one clip.

        Args (tensors may live on any device):
            image: the conditioning image (PIL, uint8 [H,W,3], or float [0,1] [H,W,3]/[3,H,W]/[1,H,W,3]).
            clip: the render, its mask and rays, and for memory pipelines the references (:class:`ClipInputs`).
            prompt / prompt_embeds: text or precomputed UMT5 embeddings [B|1,512,text_dim].
            negative_prompt / negative_prompt_embeds: used only when CFG is on (default: the
                pipeline's negative prompt).
            image_embeds: precomputed CLIP penultimate states [B|1,tokens,dim] (else computed).
            height, width: pixel size (default: render_video's). num_frames: nominal frame count
                (4k+1; default 4(F-1)+1).
            latents: initial noise [B,16,F,h,w]; else drawn with ``generator`` or ``seed``
                (default 1024) by a generator on the execution device, after ``noise_index``
                draws of the same shape (clip k of a run that shares one generator, as the release).
            num_inference_steps, guidance_scale: schedule length and text CFG scale.
            latent_cond_mode: "full_vae" or "first_frame_only" (default: the pipeline's).
            output_type: "latent" (no decode), "pt" or "np".
            batch_cfg: run the cond and uncond passes as one batch-2 forward.
            progress: ``callback(step, total)`` after each step; may raise to interrupt.
            model_call_hook: receives a :class:`ModelCall` for every logical transformer call.
        """
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        mode = latent_cond_mode or self.latent_cond_mode
        if mode not in LATENT_COND_MODES:
            raise InputError(f"latent_cond_mode must be one of {LATENT_COND_MODES}, got {mode!r}")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale()
        if not self.supports_cfg and guidance_scale > 1:
            raise InputError(f"{type(self).__name__} samples without classifier-free guidance; "
                             f"guidance_scale must be 1.0 (got {guidance_scale})")
        do_cfg = guidance_scale > 1

        t_start = time.perf_counter()
        timings: dict[str, Any] = {}
        self._released, failed = False, True
        try:
            with torch.inference_mode(), self._autocast():
                grid = self._check_inputs(clip, height, width, num_frames, latents)
                scheduler = self.make_scheduler(num_inference_steps)

                def beat() -> None:  # a chance to interrupt while preparing (0 steps done)
                    report(progress, 0, len(scheduler.timesteps))

                beat()
                pos = self._text(prompt, prompt_embeds, "prompt", grid.batch)
                neg = None
                if do_cfg:
                    if negative_prompt is None and negative_prompt_embeds is None:
                        negative_prompt = self.negative_prompt
                    neg = self._text(negative_prompt, negative_prompt_embeds, "negative_prompt", grid.batch)
                beat()
                cond = self._prepare(image, clip, grid, pos, neg, image_embeds, mode, beat)
                x = self._initial_latents(latents, generator, seed, noise_index, grid)
                _sync(self.device)
                timings["prepare_s"] = time.perf_counter() - t_start
                x = self._denoise(scheduler, x, cond, guidance_scale, do_cfg, batch_cfg, progress,
                                  model_call_hook, timings)
                del cond
                frames = None
                if output_type != "latent":
                    t0 = time.perf_counter()
                    with self._placed(self.vae):
                        frames = frames_from_video(decode_keyframes(self.vae, x).cpu(), output_type)
                    _sync(self.device)
                    timings["decode_s"] = time.perf_counter() - t0
                latents_out = x.float().cpu()
                del x
            failed = False
        finally:
            if self.device.type == "cuda" and (failed or self._released):
                torch.cuda.empty_cache()
        timings["total_s"] = time.perf_counter() - t_start
        return GenerationOutput(latents=latents_out, frames=frames,
                                timesteps=[float(t) for t in scheduler.timesteps], timings=timings)

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------
    def _check_inputs(self, clip: ClipInputs, height: int | None, width: int | None, num_frames: int | None,
                      latents: torch.Tensor | None) -> LatentGrid:
        render_video = clip.render_video
        if not isinstance(render_video, torch.Tensor) or render_video.dim() != 5 or render_video.shape[1] != 3:
            raise InputError(f"render_video must be a tensor [B,3,frames,H,W] in [-1,1]; got {describe(render_video)}")
        batch, _, render_frames, rh, rw = render_video.shape
        height, width = height or rh, width or rw
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise InputError(f"height and width must be multiples of {SIZE_MULTIPLE}; got {height}x{width}. "
                             "Resize the inputs to a bucket of the model's scale_map.")
        if (rh, rw) != (height, width):
            raise InputError(f"render_video is {rh}x{rw} but height x width is {height}x{width}; render at the "
                             "generation size")
        if num_frames is None:
            num_frames = TEMPORAL_FACTOR * (render_frames - 1) + 1
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames % TEMPORAL_FACTOR != 1:
            rounded = num_frames // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
            logger.warning("num_frames=%d is not of the form 4k+1; using %d", num_frames, rounded)
            num_frames = rounded
        frames = latent_frames(num_frames)
        allowed = {frames} | ({num_frames} if self.allows_causal_render else set())
        if render_frames not in allowed:
            raise InputError(f"render_video has {render_frames} frames; expected {frames} keyframes"
                             + (f" or {num_frames} frames" if self.allows_causal_render else "")
                             + f" for num_frames={num_frames}")
        expect = {"render_mask": (1, clip.render_mask), "camera_embedding": (6, clip.camera_embedding)}
        for name, (channels, value) in expect.items():
            if value is None and name == "camera_embedding":
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape[1:]) != (channels, frames, height, width) \
                    or value.shape[0] not in (1, batch):
                raise InputError(f"{name} must be [B,{channels},{frames},{height},{width}] (B = {batch} or 1); "
                                 f"got {describe(value)}")
        h, w = height // SPATIAL_FACTOR, width // SPATIAL_FACTOR
        if latents is not None and (not isinstance(latents, torch.Tensor)
                                    or tuple(latents.shape) != (batch, 16, frames, h, w)):
            raise InputError(f"latents must be [{batch},16,{frames},{h},{w}]; got {describe(latents)}")
        grid = LatentGrid(batch=batch, frames=frames, num_frames=num_frames, height=height, width=width, h=h, w=w)
        refs = dict(reference_video=clip.reference_video, ref_index=clip.ref_index, camera_qt=clip.camera_qt,
                    camera_qt_ref=clip.camera_qt_ref)
        if not self.uses_references:
            if any(r is not None for r in refs.values()):
                raise InputError(f"{type(self).__name__} takes no reference_video/ref_index/camera_qt/camera_qt_ref; "
                                 "use a memory model for reference-conditioned generation")
            return grid
        for name, value in refs.items():
            if not isinstance(value, torch.Tensor):
                raise InputError(f"{type(self).__name__} needs {name} (a tensor); got {describe(value)}")
        reference_video = clip.reference_video
        if reference_video.dim() != 5 or tuple(reference_video.shape[1:2] + reference_video.shape[3:]) != (3, height, width):
            raise InputError(f"reference_video must be [B,3,F_ref,{height},{width}] in [-1,1]; got {describe(reference_video)}")
        n_ref = reference_video.shape[2]
        check_ref_index(clip.ref_index, n_ref, frames)
        for name, value, count in (("camera_qt", clip.camera_qt, frames), ("camera_qt_ref", clip.camera_qt_ref, n_ref)):
            if value.dim() != 3 or tuple(value.shape[1:]) != (count, 7) or value.shape[0] not in (1, batch):
                raise InputError(f"{name} must be [B,{count},7] (quaternion wxyz + translation); got {describe(value)}")
        for name, value in refs.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise InputError(f"{name} contains NaN or infinite values")
        return grid

    # ----------------------------------------------------------------------------------------
    # Conditioning
    # ----------------------------------------------------------------------------------------
    def _text(self, prompt, embeds, name: str, batch: int) -> torch.Tensor:
        if embeds is None:
            if prompt is None:
                raise InputError(f"give {name} (text) or {name}_embeds (a tensor)")
            if self.text_encoder is None or self.tokenizer is None:
                raise MissingWeightsError(f"{name} given as text but the pipeline has no UMT5 text encoder/tokenizer; "
                                          "load the base model's text_encoder/ and tokenizer/ or pass "
                                          f"{name}_embeds")
            def encode() -> torch.Tensor:  # kept on the CPU: a run leaves nothing on the device
                with self._placed(self.text_encoder) as encoder:
                    return encode_prompt(self.tokenizer, encoder, prompt, max_length=TEXT_SEQ_LEN,
                                         device=self.device).cpu()

            embeds = self.prompt_cache.get(prompt, self.tokenizer, self.text_encoder, self.device, TEXT_SEQ_LEN, encode)
        if embeds.dim() != 3 or embeds.shape[1] != TEXT_SEQ_LEN:
            raise InputError(f"{name}_embeds must be [B,{TEXT_SEQ_LEN},text_dim]; got {describe(embeds)}")
        return _batched(embeds, batch, f"{name}_embeds").to(self.device, _dtype_of(self.transformer))

    def _prepare(self, image, clip: ClipInputs, grid: LatentGrid, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor | None, image_embeds: torch.Tensor | None, mode: str,
                 beat: Callable[[], None]) -> Conditions:
        batch, tdtype = grid.batch, _dtype_of(self.transformer)
        if image_embeds is None:
            if self.image_encoder is None or self.image_processor is None:
                raise MissingWeightsError("the pipeline has no CLIP image encoder/processor; load the base model's "
                                          "image_encoder/ and image_processor/ or pass image_embeds")
            with self._placed(self.image_encoder) as encoder:
                image_embeds = encode_image(encoder, self.image_processor, image,
                                            clip_no_rescale=self.clip_no_rescale, device=self.device)
        if image_embeds.dim() != 3:
            raise InputError(f"image_embeds must be [B,tokens,dim]; got {describe(image_embeds)}")
        image_embeds = _batched(image_embeds, batch, "image_embeds").to(self.device, tdtype)
        beat()

        with self._placed(self.vae):
            pixels = preprocess_image(image, grid.height, grid.width).to(self.device)
            cond_latent = image_condition_latent(self.vae, pixels, grid.num_frames, mode)
            beat()
            if clip.render_video.shape[2] == grid.frames:
                render_latent = encode_keyframes(self.vae, clip.render_video, name="render_video")
            else:
                render_latent = encode_video(self.vae, clip.render_video, name="render_video")
            reference_latent = None
            if self.uses_references:
                beat()
                reference_latent = reference_latent_layout(
                    encode_keyframes(self.vae, clip.reference_video, name="reference_video"))
        mask = i2v_mask(1, grid.frames, grid.h, grid.w, device=self.device)
        condition = _batched(torch.cat([mask, cond_latent], dim=1), batch, "image")
        memory = None
        if self.uses_references:
            memory = MemoryInputs(
                reference_latent=_batched(reference_latent, batch, "reference_video").to(tdtype),
                ref_index=clip.ref_index.to("cpu", torch.long),  # validated on the host at every call: no GPU sync
                camera_qt=_batched(clip.camera_qt, batch, "camera_qt").to(self.device, torch.float32),
                camera_qt_ref=_batched(clip.camera_qt_ref, batch, "camera_qt_ref").to(self.device, torch.float32))
        camera_embedding = clip.camera_embedding
        return Conditions(
            condition=condition, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            image_embeds=image_embeds, render_latent=render_latent.to(tdtype),
            render_mask=_batched(clip.render_mask, batch, "render_mask").to(self.device, torch.float32),
            camera_embedding=None if camera_embedding is None else
            _batched(camera_embedding, batch, "camera_embedding").to(self.device, torch.float32),
            memory=memory)

    def _initial_latents(self, latents, generator, seed, noise_index, grid: LatentGrid) -> torch.Tensor:
        if latents is not None:
            return latents.to(self.device, torch.float32)
        if generator is None:
            generator = make_generator(DEFAULT_SEED if seed is None else seed, self.device)
        shape = (grid.batch, 16, grid.frames, grid.h, grid.w)
        return initial_noise(shape, generator, self.device, skip=noise_index)

    # ----------------------------------------------------------------------------------------
    # Denoising loop
    # ----------------------------------------------------------------------------------------
    def _denoise(self, scheduler: Scheduler, x: torch.Tensor, cond: Conditions, guidance_scale: float, do_cfg: bool,
                 batch_cfg: bool, progress: ProgressFn | None, hook: ModelCallHook | None,
                 timings: dict[str, Any]) -> torch.Tensor:
        t_loop = time.perf_counter()
        timesteps = scheduler.timesteps.to(self.device)  # once, before the loop
        with self._placed(self.transformer) as model, _reusing_condition(model):
            x, marks = self._step_loop(model, scheduler, timesteps, x, cond, guidance_scale, do_cfg, batch_cfg,
                                       progress, hook)
        timings["step_s"] = _intervals(marks)  # read after the loop: no host sync per step
        timings["denoise_s"] = time.perf_counter() - t_loop
        return x

    def _step_loop(self, model: torch.nn.Module, scheduler: Scheduler, timesteps: torch.Tensor, x: torch.Tensor,
                   cond: Conditions, guidance_scale: float, do_cfg: bool, batch_cfg: bool,
                   progress: ProgressFn | None, hook: ModelCallHook | None) -> tuple[torch.Tensor, list]:
        """The denoising steps (``timesteps`` on the device): (final latents, a time mark per step
        boundary). No host sync: nothing here waits for the device."""
        batch, tdtype = x.shape[0], _dtype_of(self.transformer)
        static = cond.model_kwargs()
        doubled = None
        if do_cfg and batch_cfg:  # the CFG halves differ in the text only (concatenated once per clip)
            doubled = {k: v if k == "ref_index" else torch.cat([v, v]) for k, v in static.items()}
            doubled["encoder_hidden_states"] = torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds])
        total = len(timesteps)
        marks = [_mark(self.device)]
        for i in range(total):
            model_in = torch.cat([x, cond.condition], dim=1).to(tdtype)
            timestep = timesteps[i].expand(batch)
            if doubled is not None:
                out = model(hidden_states=torch.cat([model_in, model_in]), timestep=timestep.repeat(2),
                            **doubled, return_dict=False)[0].float()
                v_cond, v_uncond = out.chunk(2)
            else:
                v_cond = model(hidden_states=model_in, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                               **static, return_dict=False)[0].float()
                v_uncond = None
                if do_cfg:
                    v_uncond = model(hidden_states=model_in, timestep=timestep,
                                     encoder_hidden_states=cond.negative_prompt_embeds, **static,
                                     return_dict=False)[0].float()
            if hook is not None:
                hook(ModelCall(i, "cond", timestep, model_in, v_cond))
                if v_uncond is not None:
                    hook(ModelCall(i, "uncond", timestep, model_in, v_uncond))
            noise_pred = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
            x = scheduler.advance(noise_pred, i, x)
            del model_in, noise_pred, v_cond, v_uncond
            marks.append(_mark(self.device))
            report(progress, i + 1, total)
        return x, marks
