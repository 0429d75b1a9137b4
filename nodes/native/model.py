"""The native WorldStereo MODEL: WorldStereo on a core ComfyUI Wan2.1-I2V ``MODEL``.

:func:`apply_variant` takes the ModelPatcher from Load Diffusion Model (any weight dtype ComfyUI
loads) and a variant folder (``config.json`` + ``model.safetensors``) and returns a clone that
runs WorldStereo:

* the variant's backbone tensors become ``"set"`` weight patches, so ComfyUI applies them when it
  loads the model (whole or partially, in the model's own dtype) and LoRAs added afterwards stack
  on top; the few parameters ComfyUI never weight-patches (the blocks' and head's ``modulation``)
  become object patches instead;
* the branches (GGM ControlNet, pose MLP; built with ``comfy.ops``) form an additional model of
  the clone, loaded, partially loaded and offloaded by ComfyUI's model management with it;
* the forward runs as a ``DIFFUSION_MODEL`` wrapper over the native blocks
  (``worldstereo_core.models.host.run_worldstereo`` on :class:`.host.ComfyWanHost`), reading the
  per-clip inputs from the conditioning (:mod:`.conds`).

:func:`load_complete_variant` loads a variant whose file holds the whole backbone (the DMD release)
through ComfyUI's own loader, with no base.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import comfy.ldm.wan.model
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
from comfy.patcher_extension import WrappersMP

from ...worldstereo_core.errors import CheckpointError, InputError, MissingWeightsError
from ...worldstereo_core.loading.safetensors_files import listing
from ...worldstereo_core.loading.strict import check_keys
from ...worldstereo_core.loading.transformer import (IGNORED_MODULES, UNUSED_BY_FORWARD, VARIANT_WEIGHTS,
                                                     WORLDSTEREO_PREFIXES)
from ...worldstereo_core.loading.wan_keys import diffusers_to_original, is_original_wan_layout, strip_prefix
from ...worldstereo_core.models.config import WorldStereoConfig, load_worldstereo_config
from ...worldstereo_core.models.host import WorldStereoBranches, run_worldstereo
from ...worldstereo_core.models.inputs import (BackboneSpec, MemoryInputs, VideoInputs, check_condition,
                                               check_memory_inputs, check_video_inputs)

from .conds import CAMERA_QT, CAMERA_QT_REF, CONDITION, REF_INDEX, REFERENCE_LATENT, RENDER_LATENT, ClipCondition
from .host import ComfyWanHost

#: Key of the wrappers and of the additional model on the native MODEL.
WORLDSTEREO_KEY = "worldstereo"
#: transformer_options entry holding the per-run cache of ControlNet condition tokens.
CONDITION_CACHE = "worldstereo_condition_cache"
DIFFUSION_MODEL_PREFIX = "diffusion_model."


@dataclass
class Variant:
    """A WorldStereo variant folder's config and tensors, split into backbone and branches."""

    config: WorldStereoConfig
    backbone: dict[str, torch.Tensor]   # ComfyUI Wan names (``blocks.0.self_attn.q.weight``)
    branches: dict[str, torch.Tensor]   # checkpoint names (``controlnet.*``, ``camera_embedding.*``, ...)
    source: str


def read_variant(folder: str | Path) -> Variant:
    """Read ``<folder>/config.json`` and ``<folder>/model.safetensors`` (diffusers or Wan key names)."""
    folder = Path(folder)
    config = load_worldstereo_config(folder)
    path = folder / VARIANT_WEIGHTS
    if not path.is_file():
        raise MissingWeightsError(f"{path} not found; download the variant's {VARIANT_WEIGHTS} into {folder}")
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    branches = {k: v for k, v in tensors.items() if k.startswith(WORLDSTEREO_PREFIXES)}
    rest = [k for k in tensors if k not in branches and IGNORED_MODULES.isdisjoint(k.split("."))]
    if is_original_wan_layout(rest):
        backbone = {strip_prefix(k): tensors[k] for k in rest}
    else:
        backbone = {diffusers_to_original(k, source=str(path)): tensors[k] for k in rest}
    return Variant(config, backbone, branches, str(path))


def wan_model(model) -> comfy.ldm.wan.model.WanModel:
    """The ``WanModel`` of a MODEL, or an InputError saying what the MODEL is instead."""
    wan = model.get_model_object("diffusion_model")
    if not isinstance(wan, comfy.ldm.wan.model.WanModel):
        raise InputError(f"the MODEL is a {type(wan).__name__}, not a Wan2.1 model; load Wan2.1-I2V-14B "
                         "(480P or 720P) with Load Diffusion Model")
    if wan.img_emb is None:
        raise InputError("the MODEL is a Wan text-to-video model; WorldStereo is trained on Wan2.1 image-to-video: "
                         "load Wan2.1-I2V-14B (480P or 720P) with Load Diffusion Model")
    return wan


def worldstereo_forward(model) -> "WorldStereoForward":
    """The WorldStereo forward of a native MODEL, or an InputError for any other MODEL."""
    forward = model.get_wrappers(WrappersMP.DIFFUSION_MODEL, WORLDSTEREO_KEY)
    if not forward:
        raise InputError("the MODEL does not run WorldStereo; connect the MODEL of WorldStereo Apply Variant (or "
                         "WorldStereo Load Complete Variant)")
    return forward[0]


def variant_config(model) -> WorldStereoConfig:
    """The WorldStereo variant config of a native MODEL, or an InputError for any other MODEL."""
    return worldstereo_forward(model).config


def backbone_spec(wan) -> BackboneSpec:
    image_dim = wan.img_emb.proj[0].normalized_shape[0] if wan.img_emb is not None else None
    return BackboneSpec(wan.in_dim, wan.out_dim, tuple(wan.patch_size), wan.text_dim, image_dim, text_tokens=None)


def _check_fits(wan, variant: Variant) -> None:
    """Named errors when the variant was not made for this backbone (width, I2V layout, tensor shapes)."""
    cn = variant.config.controlnet_cfg
    if cn.time_embed_dim != wan.dim:
        raise CheckpointError(f"{variant.source} is a WorldStereo variant for a {cn.time_embed_dim}-wide Wan model, "
                              f"but the MODEL is {wan.dim} wide; load the Wan2.1-I2V-14B base it was trained on")
    expected = {k: tuple(v.shape) for k, v in wan.state_dict().items()}
    unknown = [k for k in variant.backbone if k not in expected]
    wrong = [f"{k} {list(t.shape)} (model expects {list(expected[k])})" for k, t in variant.backbone.items()
             if k in expected and tuple(t.shape) != expected[k]]
    problems = ([f"tensors the MODEL does not have: {listing(unknown)}"] if unknown else []) + \
        ([f"wrongly shaped tensors: {listing(wrong)}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{variant.source} does not fit the MODEL: " + "; ".join(problems) + ". Load the "
                              f"Wan2.1-I2V-14B base the variant names ({variant.config.base_model!r}) with Load "
                              "Diffusion Model")


def apply_variant(model, folder: str | Path, *, attention_scope: str = "full"):
    """A clone of ``model`` (a core Wan2.1-I2V MODEL) that runs the WorldStereo variant in ``folder``."""
    variant = read_variant(folder)
    wan = wan_model(model)
    _check_fits(wan, variant)
    keys = {DIFFUSION_MODEL_PREFIX + k: t for k, t in variant.backbone.items()}
    patched = sorted(k for k in keys if k in model.patches)
    if patched:
        raise InputError(f"the MODEL already carries weight patches (a LoRA?) on {len(patched)} tensors the variant "
                         f"replaces, e.g. {patched[0]}; apply LoRAs after the WorldStereo model node, not before")
    native = model.clone()
    weights = {k: t for k, t in keys.items() if _patched_on_load(native.model, k)}
    native.add_patches({k: ("set", (t,)) for k, t in weights.items()}, 1.0)
    for key in keys.keys() - weights.keys():
        current = comfy.utils.get_attr(native.model, key)
        native.add_object_patch(key, torch.nn.Parameter(keys[key].to(current.dtype), requires_grad=False))
    return attach_branches(native, variant, attention_scope=attention_scope)


def _patched_on_load(model: torch.nn.Module, key: str) -> bool:
    """Whether ComfyUI applies weight patches to parameter ``key``: it patches the parameters of
    modules without parameterised children only (so not a Wan block's or head's ``modulation``)."""
    owner = model.get_submodule(key.rpartition(".")[0])
    return len(list(owner.parameters(recurse=False))) == len(list(owner.parameters()))


def load_complete_variant(folder: str | Path, model_options: dict | None = None, *, attention_scope: str = "full"):
    """A native MODEL from a variant file that holds the whole backbone, loaded by ComfyUI's own
    loader (``model_options`` as Load Diffusion Model's: ``dtype``, ``fp8_optimizations``, ...)."""
    variant = read_variant(folder)
    model = comfy.sd.load_diffusion_model_state_dict(dict(variant.backbone), model_options=dict(model_options or {}))
    if model is None:
        raise CheckpointError(f"ComfyUI cannot tell which model {variant.source} holds: it is not a complete Wan2.1 "
                              "backbone; load the base with Load Diffusion Model and apply the variant to it")
    wan = wan_model(model)
    missing = sorted(k for k in wan.state_dict() if k not in variant.backbone and not k.endswith("scale_weight"))
    if missing:
        raise CheckpointError(f"{variant.source} lacks {len(missing)} backbone tensors (e.g. {missing[0]}), so it "
                              "needs a base: load Wan2.1-I2V-14B with Load Diffusion Model and apply the variant")
    _check_fits(wan, variant)
    return attach_branches(model, variant, attention_scope=attention_scope)


def attach_branches(model, variant: Variant, *, attention_scope: str = "full"):
    """Give ``model`` (modified in place and returned) the variant's branches and the WorldStereo forward."""
    wan = wan_model(model)
    cfg = variant.config
    dtype = model.get_model_object("manual_cast_dtype") or model.model_dtype()
    build = partial(WorldStereoBranches, cfg.controlnet_cfg, memory=cfg.is_memory, in_channels=wan.in_dim,
                    latent_channels=wan.out_dim, inner_dim=wan.dim, patch_size=wan.patch_size)
    with torch.device("meta"):  # the tensor shapes, from plain torch layers
        expected = {k: tuple(t.shape) for k, t in build().state_dict().items()}
    state = dict(variant.branches)
    for key, initial in UNUSED_BY_FORWARD.items():  # never read by the forward; the reference's value
        if key in expected and key not in state:
            state[key] = initial(expected[key])
    check_keys(expected, {k: tuple(t.shape) for k, t in state.items()}, source=variant.source,
               hint=f"the {cfg.model_type} file lacks or misnames WorldStereo tensors; re-download it")
    branches = build(ops=comfy.ops.disable_weight_init)
    # Through load_state_dict, as ComfyUI loads its own models: with dynamic VRAM (newer ComfyUI)
    # comfy.ops layers only get their weights there.
    branches.load_state_dict(state)
    branches.to(dtype=dtype).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(branches, load_device=model.load_device,
                                               offload_device=model.offload_device)
    model.set_additional_models(WORLDSTEREO_KEY, [patcher])
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WORLDSTEREO_KEY,
                               WorldStereoForward(branches, cfg, attention_scope, variant.source))
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WORLDSTEREO_KEY, condition_cache_per_run)
    return model


class ConditionCache:
    """ControlNet condition tokens of the clips of one sampling run (a plain object, so that
    ComfyUI's per-call copies of ``transformer_options`` share it)."""

    def __init__(self) -> None:
        self.tokens: dict = {}

    def __deepcopy__(self, memo):
        return self


def condition_cache_per_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one :class:`ConditionCache` for the duration of a sampling run."""
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    options[CONDITION_CACHE] = ConditionCache()
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(CONDITION_CACHE, None)


class WorldStereoForward:
    """The ``DIFFUSION_MODEL`` wrapper: the WorldStereo forward on the native Wan blocks
    (``source``: the variant file the branches were read from)."""

    def __init__(self, branches: WorldStereoBranches, config: WorldStereoConfig, attention_scope: str,
                 source: str) -> None:
        self.branches, self.config, self.attention_scope, self.source = branches, config, attention_scope, source

    def __deepcopy__(self, memo):  # model options are deep-copied; the branches are shared, never copied
        return self

    def condition_tokens(self, clip: ClipCondition, spec: BackboneSpec, x: torch.Tensor, options: dict
                         ) -> torch.Tensor:
        """The ControlNet's embedding of ``clip``, computed once per sampling run."""
        cache = options.get(CONDITION_CACHE)
        key = (id(clip), x.device, x.dtype)
        if cache is not None and key in cache.tokens:
            return cache.tokens[key][1]
        check_condition(spec, self.config.controlnet_cfg, *x.shape[2:], clip.render_mask, clip.camera_embedding)
        camera = None if clip.camera_embedding is None else clip.camera_embedding.to(x.device)
        tokens = self.branches.controlnet.embed_condition(clip.render_mask.to(x.device), camera, x.dtype)
        if cache is not None:  # the clip is kept so that its id stays its own
            cache.tokens[key] = (clip, tokens)
        return tokens

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},
                 **kwargs):
        wan = executor.class_obj
        if not isinstance(kwargs.get(CONDITION), ClipCondition):
            raise InputError("this MODEL runs WorldStereo and needs the conditioning of the WorldStereo conditioning "
                             "node (render latent, mask and rays); plain Wan conditioning lacks them")
        if time_dim_concat is not None:
            raise InputError("WorldStereo does not take time_dim_concat conditioning")
        cn = self.config.controlnet_cfg
        spec = backbone_spec(wan)
        tokens = self.condition_tokens(kwargs[CONDITION], spec, x, transformer_options)
        inp = check_video_inputs(spec, cn, x.dtype, VideoInputs(x, timestep, context, clip_fea, kwargs.get(RENDER_LATENT),
                                                                controlnet_condition=tokens))
        mem = None
        if self.config.is_memory:
            ref_index = kwargs.get(REF_INDEX)
            mem = check_memory_inputs(spec, cn, x.dtype, inp.hidden_states, MemoryInputs(
                kwargs.get(REFERENCE_LATENT), None if ref_index is None else torch.tensor(ref_index),
                kwargs.get(CAMERA_QT), kwargs.get(CAMERA_QT_REF)))
        return run_worldstereo(ComfyWanHost(wan, transformer_options), self.branches.controlnet, inp, mem,
                               camera_embedding=self.branches.camera_embedding, update_ref=bool(cn.update_ref),
                               attention_scope=self.attention_scope)
