"""WorldStereo transformers on diffusers' Wan2.1 I2V backbone (the diffusers host).

* :class:`WorldStereoTransformer` (worldstereo-camera): ``WanTransformer3DModel`` + the GGM
  ControlNet, whose block-j residual is added after main block j.
* :class:`WorldStereoMemoryTransformer` (worldstereo-memory, -memory-dmd): the above with SSM
  blocks, width-stitched reference RoPE and the camera-pose MLP.

The forward itself is :func:`.host.run_worldstereo`; this module adapts diffusers' Wan modules to
its host interface (:class:`DiffusersWanHost`). Every block is called as a module, in execution
order, so module hooks (block swap, FSDP) and compiled blocks apply. The models know nothing
of sampling; inputs are checked here so a wrong tensor fails with its name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from ..errors import InputError
from .attention import BranchSelfAttention
from .config import ControlNetConfig, clean_transformer_config
from .host import branch_modules, run_worldstereo
from .inputs import BackboneSpec, MemoryInputs, VideoInputs, check_finite, check_memory_inputs, check_video_inputs
from .rope import apply_rotary, rope_cos_sin
from .sequence import WHOLE_SEQUENCE
from .ssm import ATTENTION_SCOPES, BlockParts, PairGroups, joint_block


class DiffusersAttention:
    """A branch attention kernel through diffusers' ``dispatch_attention_fn``.

    ``_attention_backend`` and ``_parallel_config`` are set as on a diffusers attention processor
    (by :mod:`..runtime.attention` and :mod:`..runtime.parallel`)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out.flatten(2)


class MemoryTransformerBlock(WanTransformerBlock):
    """A Wan block run as an SSM joint block over target and reference tokens (same keys as the Wan block)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn1.set_processor(DiffusersAttention())

    def parts(self, encoder_hidden_states: torch.Tensor, temb: torch.Tensor) -> BlockParts:
        attn1 = self.attn1

        def cross_attention(x):
            return self.attn2(self.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)

        return BlockParts(
            modulation=(self.scale_shift_table + temb.float()).chunk(6, dim=1),
            norm1=self.norm1, norm_ffn=self.norm3, q=attn1.to_q, k=attn1.to_k, v=attn1.to_v, out=attn1.to_out[0],
            norm_q=attn1.norm_q, norm_k=attn1.norm_k, heads=attn1.heads, cross_attention=cross_attention,
            ffn=self.ffn, apply_rotary=apply_rotary, attention=attn1.processor,
        )

    def forward(self, hidden_states: torch.Tensor, reference_states: torch.Tensor, encoder_hidden_states, temb,
                rotary_emb, pair_groups: PairGroups | None = None, update_reference: bool = True):
        """Returns (targets, references or None); see :func:`.ssm.joint_block`."""
        return joint_block(self.parts(encoder_hidden_states, temb), hidden_states, reference_states, rotary_emb,
                           pair_groups, update_reference)


@dataclass
class DiffusersConditioning:
    temb: torch.Tensor     # [B, D]
    tproj: torch.Tensor    # [B, 6, D], the blocks' modulation input
    context: torch.Tensor  # [B, image tokens + text tokens, D]


class DiffusersWanHost:
    """:class:`.host.WanHost` over a diffusers ``WanTransformer3DModel``."""

    branch_attention = None  # the ControlNet blocks carry DiffusersAttention processors

    def __init__(self, model: WanTransformer3DModel) -> None:
        self.model = model
        self.patch_size = tuple(model.config.patch_size)
        self.num_blocks = len(model.blocks)

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embedding(latent).flatten(2).transpose(1, 2).contiguous()

    def conditioning(self, timestep, text, image) -> DiffusersConditioning:
        temb, tproj, context, context_image = self.model.condition_embedder(timestep, text, image)
        if context_image is not None:
            context = torch.cat([context_image, context], dim=1)
        return DiffusersConditioning(temb, tproj.unflatten(1, (6, -1)), context)

    def rotary(self, positions: torch.Tensor):
        return rope_cos_sin(positions, self.model.config.attention_head_dim)

    def block(self, index, x, cond: DiffusersConditioning, rotary):
        return self.model.blocks[index](x, cond.context, cond.tproj, rotary)

    def memory_block(self, index, x, r, cond: DiffusersConditioning, rotary, pair_groups, update_reference):
        return self.model.blocks[index](x, r, cond.context, cond.tproj, rotary, pair_groups, update_reference)

    def head(self, x: torch.Tensor, cond: DiffusersConditioning) -> torch.Tensor:
        model = self.model
        table = model.scale_shift_table
        if table.device != cond.temb.device:  # a model spread over devices
            table = table.to(cond.temb.device)
        shift, scale = (table + cond.temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return model.proj_out(x)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        p_t, p_h, p_w = self.patch_size
        x = tokens.reshape(tokens.shape[0], *grid, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _no_attention_kwargs(attention_kwargs: dict[str, Any] | None) -> None:
    """Refuse ``attention_kwargs``: nothing reads them (diffusers uses them for LoRA scales; no LoRA
    loads into these models)."""
    if attention_kwargs:
        raise InputError(f"attention_kwargs are not supported by the WorldStereo transformers, got "
                         f"{sorted(attention_kwargs)}; pass None")


class WorldStereoTransformer(WanTransformer3DModel):
    """worldstereo-camera: Wan2.1 I2V + GGM ControlNet.

    Built from the diffusers transformer config fields plus ``controlnet_cfg``; the state dict uses
    the reference key names (Wan keys in diffusers naming + ``controlnet.*``)."""

    _no_split_modules = ["WanTransformerBlock", "MemoryTransformerBlock", "ControlNetBlock"]
    #: The blocks diffusers' ``compile_repeated_blocks`` compiles (:mod:`..runtime.compile`).
    _repeated_blocks = _no_split_modules
    #: Whether the model takes reference frames (the memory models).
    uses_references: ClassVar[bool] = False

    def __init__(self, controlnet_cfg: ControlNetConfig | dict, **transformer_config: Any) -> None:
        super().__init__(**clean_transformer_config(transformer_config))
        cfg = ControlNetConfig.from_dict(controlnet_cfg)
        config = self.config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        if cfg.time_embed_dim != inner_dim:
            raise InputError(
                f"controlnet_cfg.time_embed_dim ({cfg.time_embed_dim}) must equal the transformer width "
                f"{inner_dim}: the ControlNet is modulated by the main time embedding; wrong base model?"
            )
        self.controlnet_cfg = cfg
        self.camera_embedding = None
        for name, module in branch_modules(cfg, memory=self.uses_references, in_channels=config.in_channels,
                                           latent_channels=config.out_channels, inner_dim=inner_dim,
                                           patch_size=config.patch_size).items():
            setattr(self, name, module)
        for module in self.controlnet.modules():
            if isinstance(module, BranchSelfAttention):
                module.processor = DiffusersAttention()
        #: How the token sequence is split over processes (set by ``runtime.parallel.enable_sequence_parallel``).
        self.sequence_split = WHOLE_SEQUENCE
        self._clip_cache: dict | None = None

    def _branch_processors(self) -> Iterator[DiffusersAttention]:
        for module in self.controlnet.modules():
            if isinstance(module, BranchSelfAttention):
                yield module.processor

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' attention-backend switch, extended to the ControlNet's attention."""
        from diffusers.models.attention_dispatch import AttentionBackendName

        super().set_attention_backend(backend)
        for processor in self._branch_processors():
            processor._attention_backend = AttentionBackendName(backend.lower())

    def reset_attention_backend(self) -> None:
        super().reset_attention_backend()
        for processor in self._branch_processors():
            processor._attention_backend = None

    @property
    def backbone_spec(self) -> BackboneSpec:
        config = self.config
        return BackboneSpec(config.in_channels, config.out_channels, tuple(config.patch_size), config.text_dim,
                            config.image_dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @contextlib.contextmanager
    def reusing_condition(self) -> Iterator[None]:
        """Inside the block, calls with the same ``render_mask`` / ``camera_embedding`` (and
        ``ref_index``) tensor objects compute the ControlNet's condition embedding and the RoPE tables
        once (a sampling loop wraps one clip in it)."""
        self._clip_cache = {}
        try:
            yield
        finally:
            self._clip_cache = None

    def _controlnet_condition(self, render_mask: torch.Tensor, camera_embedding: torch.Tensor | None,
                              batch: int) -> torch.Tensor:
        """The condition tokens of the (checked) mask and rays, at their own batch when it is 1."""
        conditions = [render_mask, camera_embedding]
        if any(t is not None and t.shape[0] != 1 for t in conditions):
            conditions = [None if t is None else t.expand(batch, *t.shape[1:]) for t in conditions]
        return self.controlnet.embed_condition(*conditions, self.compute_dtype)

    def _video_inputs(self, inp: VideoInputs) -> VideoInputs:
        """``inp`` checked, with the ControlNet's condition tokens (kept for the clip when reused)."""
        cache, batch = self._clip_cache, inp.hidden_states.shape[0]
        key = ("condition", id(inp.render_mask), id(inp.camera_embedding), batch)
        tokens = cache[key][1] if cache is not None and key in cache else None
        checked = check_video_inputs(self.backbone_spec, self.controlnet_cfg, self.compute_dtype,
                                     replace(inp, controlnet_condition=tokens))
        if tokens is None:
            tokens = self._controlnet_condition(inp.render_mask, inp.camera_embedding, batch)
            if cache is not None:  # the inputs are kept so that their ids stay theirs
                cache[key] = ((inp.render_mask, inp.camera_embedding), tokens)
        return replace(checked, controlnet_condition=tokens)

    # ----- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        render_latent: torch.Tensor | None = None,
        render_mask: torch.Tensor | None = None,
        camera_embedding: torch.Tensor | None = None,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        reference_latent: torch.Tensor | None = None,
        ref_index: torch.Tensor | None = None,
        camera_qt: torch.Tensor | None = None,
        camera_qt_ref: torch.Tensor | None = None,
    ):
        """Predict the flow velocity [B, 16, F, h, w].

        The memory models take reference frames as spatial-stereo memory (``reference_latent``,
        ``ref_index`` as a CPU tensor: it sets token positions without waiting for the device,
        ``camera_qt``, ``camera_qt_ref``); the camera model refuses them.
        ``extrinsics``/``intrinsics`` are only checked for finite values; the reference ignores them.
        ``attention_kwargs`` exists for the reference's call signature and must be empty."""
        _no_attention_kwargs(attention_kwargs)
        check_finite(extrinsics=extrinsics, intrinsics=intrinsics)
        inp = self._video_inputs(VideoInputs(hidden_states, timestep, encoder_hidden_states,
                                             encoder_hidden_states_image, render_latent, render_mask, camera_embedding))
        host = DiffusersWanHost(self)
        if not self.uses_references:
            if any(t is not None for t in (reference_latent, ref_index, camera_qt, camera_qt_ref)):
                raise InputError("reference_latent, ref_index, camera_qt and camera_qt_ref are inputs of the memory "
                                 "models; the camera model takes no reference frames: leave them out")
            out = run_worldstereo(host, self.controlnet, inp, split=self.sequence_split, clip_cache=self._clip_cache)
        else:
            mem = check_memory_inputs(self.backbone_spec, self.controlnet_cfg, self.compute_dtype, inp.hidden_states,
                                      MemoryInputs(reference_latent, ref_index, camera_qt, camera_qt_ref))
            out = run_worldstereo(host, self.controlnet, inp, mem, camera_embedding=self.camera_embedding,
                                  update_ref=self.controlnet_cfg.update_ref, attention_scope=self.attention_scope,
                                  split=self.sequence_split, clip_cache=self._clip_cache)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class WorldStereoMemoryTransformer(WorldStereoTransformer):
    """worldstereo-memory / -memory-dmd: camera model + SSM reference attention and pose MLP."""

    uses_references = True

    def __init__(self, controlnet_cfg: ControlNetConfig | dict, *, attention_scope: str = "full",
                 **transformer_config: Any) -> None:
        super().__init__(controlnet_cfg, **transformer_config)
        cfg, cn = self.config, self.controlnet_cfg
        if cn.update_ref is None:
            raise InputError("controlnet_cfg.update_ref is required by the memory models")
        inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.blocks = nn.ModuleList(
            MemoryTransformerBlock(inner_dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.qk_norm,
                                   cfg.cross_attn_norm, cfg.eps, cfg.added_kv_proj_dim)
            for _ in range(cfg.num_layers)
        )
        self.set_attention_scope(attention_scope)

    def set_attention_scope(self, scope: str) -> None:
        """``"full"`` (released behaviour) or ``"pairs"`` (paper's restricted attention; see ssm.py)."""
        if scope not in ATTENTION_SCOPES:
            raise InputError(f"attention_scope must be one of {list(ATTENTION_SCOPES)}, got {scope!r}")
        self.attention_scope = scope


def _keep_in_fp32(name: str, model: nn.Module) -> bool:
    """Backbone parameters diffusers keeps in float32 when loading Wan in half precision."""
    if name.startswith("controlnet."):
        return False
    parts = name.split(".")
    return any(p in parts for p in model._keep_in_fp32_modules)


def param_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Storage dtype of every state-dict entry when the model runs in ``dtype``."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            out[name] = tensor.dtype
        elif dtype in (torch.float16, torch.bfloat16) and _keep_in_fp32(name, model):
            out[name] = torch.float32
        else:
            out[name] = dtype
    return out


def build_transformer(transformer_config: dict, controlnet_cfg: dict | ControlNetConfig, *, memory: bool,
                      device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
                      attention_scope: str = "full", attention_backend: str | None = None) -> WorldStereoTransformer:
    """Build a WorldStereo transformer.

    ``device="meta"``: parameters are placeholders (no memory) to be filled by
    :func:`..loading.strict.load_state_dict_strict` or the loader; buffers (RoPE tables) are real, on CPU.
    Otherwise the model is randomly initialised on ``device``. In half precision the backbone's
    time embedder, modulation tables and norms stay float32, as diffusers loads Wan.
    ``attention_backend``: a diffusers attention backend name (default: torch SDPA)."""
    kwargs = dict(clean_transformer_config(transformer_config))
    cls = WorldStereoMemoryTransformer if memory else WorldStereoTransformer
    if memory:
        kwargs["attention_scope"] = attention_scope
    elif attention_scope != "full":
        raise InputError("attention_scope applies to the memory models only")
    if str(device) == "meta":
        with init_empty_weights(include_buffers=False):
            model = cls(controlnet_cfg, **kwargs)
    else:
        model = cls(controlnet_cfg, **kwargs).to(device)
    dtypes = param_dtypes(model, dtype)
    for name, param in model.named_parameters():
        if param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])
    model.eval().requires_grad_(False)
    if attention_backend is not None:
        model.set_attention_backend(attention_backend)
    return model
