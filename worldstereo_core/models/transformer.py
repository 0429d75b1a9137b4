"""WorldStereo transformers on diffusers' Wan2.1 I2V backbone.

* :class:`WorldStereoTransformer` (worldstereo-camera): ``WanTransformer3DModel`` + the GGM
  ControlNet, whose block-j residual is added after main block j (spec §3).
* :class:`WorldStereoMemoryTransformer` (worldstereo-memory, -memory-dmd): the above with SSM
  blocks, width-stitched reference RoPE and the camera-pose MLP (spec §4).

The models know nothing of sampling; inputs are checked here so a wrong tensor fails with its name.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.utils import apply_lora_scale

from ..constants import NFRAME
from ..errors import InputError
from .config import ControlNetConfig, clean_transformer_config
from .controlnet import GGMControlNet, zero_init
from .inputs import VideoInputs, check_memory_inputs, check_video_inputs
from .ssm import ATTENTION_SCOPES, MemoryTransformerBlock, PairGroups, stitched_rotary


class WorldStereoTransformer(WanTransformer3DModel):
    """worldstereo-camera: Wan2.1 I2V + GGM ControlNet.

    Built from the diffusers transformer config fields plus ``controlnet_cfg``; the state dict uses
    the reference key names (Wan keys in diffusers naming + ``controlnet.*``)."""

    _no_split_modules = ["WanTransformerBlock", "MemoryTransformerBlock", "ControlNetBlock"]

    def __init__(self, controlnet_cfg: ControlNetConfig | dict, **transformer_config: Any) -> None:
        super().__init__(**clean_transformer_config(transformer_config))
        cfg = ControlNetConfig.from_dict(controlnet_cfg)
        inner_dim = self.config.num_attention_heads * self.config.attention_head_dim
        if cfg.time_embed_dim != inner_dim:
            raise InputError(
                f"controlnet_cfg.time_embed_dim ({cfg.time_embed_dim}) must equal the transformer width "
                f"{inner_dim}: the ControlNet is modulated by the main time embedding; wrong base model?"
            )
        self.controlnet_cfg = cfg
        self.controlnet = GGMControlNet(
            cfg, in_channels=self.config.in_channels, latent_channels=self.config.out_channels,
            inner_dim=inner_dim, patch_size=self.config.patch_size, rope_max_seq_len=self.config.rope_max_seq_len,
        )

    # ----- shared pieces -------------------------------------------------------------------------
    def _conditioning(self, inp: VideoInputs):
        """Time/text/image embeddings and the (lazy) ControlNet residuals."""
        temb, tproj, ctx, ctx_img = self.condition_embedder(inp.timestep, inp.encoder_hidden_states,
                                                            inp.encoder_hidden_states_image)
        tproj = tproj.unflatten(1, (6, -1))
        if ctx_img is not None:
            ctx = torch.cat([ctx_img, ctx], dim=1)
        residuals = self.controlnet.residuals(inp.hidden_states, inp.render_latent, inp.render_mask,
                                              inp.camera_embedding, temb)
        return temb, tproj, ctx, residuals

    def _embed(self, hidden_states):
        return self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

    def _output(self, x, temb, shape, return_dict: bool):
        batch, _, frames, height, width = shape
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    # ----- forward -------------------------------------------------------------------------------
    @apply_lora_scale("attention_kwargs")
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
    ):
        """Predict the flow velocity [B, 16, F, h, w].

        ``extrinsics``/``intrinsics`` are only checked for finite values; the reference ignores them."""
        inp = check_video_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                 render_latent, render_mask, camera_embedding, extrinsics, intrinsics)
        hidden_states = inp.hidden_states
        temb, tproj, ctx, residuals = self._conditioning(inp)
        rotary_emb = self.rope(hidden_states)
        x = self._embed(hidden_states)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, tproj, rotary_emb)
            if i < self.controlnet.num_layers:
                x = x + next(residuals)
        return self._output(x, temb, hidden_states.shape, return_dict)


class WorldStereoMemoryTransformer(WorldStereoTransformer):
    """worldstereo-memory / -memory-dmd: camera model + SSM reference attention and pose MLP."""

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
        if cn.ref_embedding:  # present in the checkpoints, unused by the forward (as in the reference)
            self.ref_index_embedding = zero_init(nn.Embedding(NFRAME, inner_dim))
        self.camera_embedding = None
        if cn.main_camera_embedding:
            self.camera_embedding = nn.Sequential(
                nn.Linear(cn.camera_embedding_dim, inner_dim // 2), nn.SiLU(),
                nn.Linear(inner_dim // 2, inner_dim), nn.SiLU(),
                zero_init(nn.Linear(inner_dim, inner_dim)),
            )
        self.set_attention_scope(attention_scope)

    def set_attention_scope(self, scope: str) -> None:
        """``"full"`` (released behaviour) or ``"pairs"`` (paper's restricted attention; see ssm.py)."""
        if scope not in ATTENTION_SCOPES:
            raise InputError(f"attention_scope must be one of {list(ATTENTION_SCOPES)}, got {scope!r}")
        self.attention_scope = scope

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        render_latent: torch.Tensor | None = None,
        render_mask: torch.Tensor | None = None,
        camera_embedding: torch.Tensor | None = None,
        reference_latent: torch.Tensor | None = None,
        ref_index: torch.Tensor | None = None,
        camera_qt: torch.Tensor | None = None,
        camera_qt_ref: torch.Tensor | None = None,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ):
        """Predict the flow velocity [B, 16, F, h, w] with reference frames as spatial-stereo memory."""
        inp = check_video_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                 render_latent, render_mask, camera_embedding, extrinsics, intrinsics)
        hidden_states = inp.hidden_states
        mem = check_memory_inputs(self, hidden_states, reference_latent, ref_index, camera_qt, camera_qt_ref)
        _, _, frames, height, width = hidden_states.shape
        temb, tproj, ctx, residuals = self._conditioning(inp)
        rotary_joint = stitched_rotary(self.rope, frames, height, width, mem.ref_index)
        x, r = self._embed(hidden_states), self._embed(mem.reference_latent)
        p_t, p_h, p_w = self.config.patch_size
        tokens_per_frame = (height // p_h) * (width // p_w)
        if self.camera_embedding is not None:  # one pose token per frame, added to all its tokens
            x = (x.unflatten(1, (-1, tokens_per_frame)) + self.camera_embedding(mem.camera_qt)[:, :, None]
                 ).flatten(1, 2)
            r = (r.unflatten(1, (-1, tokens_per_frame)) + self.camera_embedding(mem.camera_qt_ref)[:, :, None]
                 ).flatten(1, 2)
        groups = None
        if self.attention_scope == "pairs":
            groups = PairGroups.build(mem.ref_index, frames // p_t, tokens_per_frame, x.device)

        carry = self.controlnet_cfg.update_ref
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # Reference outputs are only computed when the next block consumes them.
            x, r_out = block(x, r, ctx, tproj, rotary_joint, groups, update_reference=carry and i < last)
            if r_out is not None:
                r = r_out
            if i < self.controlnet.num_layers:
                x = x + next(residuals)
        return self._output(x, temb, hidden_states.shape, return_dict)


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
    :func:`load_state_dict_strict` or the loader; buffers (RoPE tables) are real, on CPU.
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
