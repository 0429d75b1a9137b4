"""GGM ControlNet branch: point-cloud render + mask/Plücker condition -> per-block residuals.

Key names follow the reference checkpoints (prefix ``controlnet.``). The branch sees
``concat(hidden_states[:, :20], render_latent)`` (noisy latent, I2V mask, render latent), adds the
mask/camera embedding in ``conv_out_dim`` space, projects to ``dim`` and runs time-modulated
self-attention blocks; block j's output, projected to the main width D, is added to the main
stream after main block j.

The mask/camera embedding depends only on the clip's conditions: compute it once per clip with
:meth:`GGMControlNet.embed_condition` and pass it to every step (both CFG halves share it).
Layers come from an ops namespace (:mod:`.ops`), so a host can supply its own layer classes.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionFn, BranchSelfAttention
from .config import ControlNetConfig
from .ops import TORCH_OPS, check_ops
from .rope import grid_positions, rope_cos_sin
from .sequence import WHOLE_SEQUENCE, SequenceSplit
from .transfer import host_to_device

#: Pixel-to-token stride of the mask encoder: VAE factor 8, then the (1, 2, 2) patch.
MASK_PIXEL_STRIDE = 8
#: Zero frames padded in front (and behind with ``interp``) when the mask is temporally strided.
MASK_TEMPORAL_PAD = 3


def zero_init(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so a freshly built branch adds nothing (weights are loaded anyway)."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class MaskCamEmbed(nn.Module):
    """Visibility mask (+ Plücker rays) at pixel resolution -> [B, conv_out_dim, F, h', w']."""

    def __init__(self, add_channels: int, mid_channels: int, out_channels: int, patch_size, mask_downsample: int,
                 interp: bool, ops=TORCH_OPS) -> None:
        super().__init__()
        self.mask_downsample = mask_downsample
        self.interp = interp
        stride = (mask_downsample, MASK_PIXEL_STRIDE, MASK_PIXEL_STRIDE)
        self.mask_proj = nn.Sequential(
            ops.Conv3d(add_channels, mid_channels, kernel_size=stride, stride=stride),
            ops.GroupNorm(mid_channels // 8, mid_channels, eps=1e-5),
            nn.SiLU(),
        )
        patch = (1, patch_size[1], patch_size[2])
        self.mask_zero_proj = zero_init(ops.Conv3d(mid_channels, out_channels, kernel_size=patch, stride=patch))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        if self.mask_downsample > 1:
            pad_back = MASK_TEMPORAL_PAD if self.interp else 0
            condition = F.pad(condition, (0, 0, 0, 0, MASK_TEMPORAL_PAD, pad_back))
        return self.mask_zero_proj(self.mask_proj(condition))


class TimeModulatedNorm(nn.Module):
    """LayerNorm modulated by ``temb`` (LayerNormZero): returns ``(norm(x)*(1+scale)+shift, gate)``."""

    def __init__(self, conditioning_dim: int, dim: int, eps: float = 1e-5, ops=TORCH_OPS) -> None:
        super().__init__()
        self.linear = ops.Linear(conditioning_dim, 3 * dim)
        self.norm = ops.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.linear(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        return self.norm(x) * (1 + scale) + shift, gate


class ControlNetBlock(nn.Module):
    """Self-attention (RMS-normed q/k, RoPE) + GELU-tanh FFN, both gated by ``temb``; no cross-attention."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, time_embed_dim: int, eps: float = 1e-6,
                 ops=TORCH_OPS) -> None:
        super().__init__()
        self.norm1 = TimeModulatedNorm(time_embed_dim, dim, ops=ops)
        self.self_attn = BranchSelfAttention(dim, num_heads, eps, ops=ops)
        self.norm2 = TimeModulatedNorm(time_embed_dim, dim, ops=ops)
        self.ffn = nn.Sequential(ops.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), ops.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rotary, attention: AttentionFn | None = None
                ) -> torch.Tensor:
        n, gate = self.norm1(x, temb)
        x = x + gate * self.self_attn(n, rotary, attention)
        n, gate = self.norm2(x, temb)
        return x + gate * self.ffn(n)


def _add_batched(x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``x + extra`` where ``extra``'s batch divides ``x``'s (CFG halves share one condition), no copies."""
    if extra.shape[0] in (1, x.shape[0]):
        return x + extra
    return (x.unflatten(0, (-1, extra.shape[0])) + extra).flatten(0, 1)


class GGMControlNet(nn.Module):
    """The global-geometric-memory ControlNet (module ``controlnet`` of the WorldStereo models)."""

    def __init__(self, cfg: ControlNetConfig, *, in_channels: int, latent_channels: int, inner_dim: int,
                 patch_size, ops=TORCH_OPS) -> None:
        super().__init__()
        ops = check_ops(ops)
        patch_size = tuple(patch_size)
        self.patch_size = patch_size
        self.cond_channels = in_channels - latent_channels  # noisy latent + I2V mask (the first 20 of 36)
        self.head_dim = cfg.dim // cfg.num_heads
        self.controlnet_patch_embedding = ops.Conv3d(
            self.cond_channels + latent_channels, cfg.conv_out_dim, kernel_size=patch_size, stride=patch_size
        )
        self.controlnet_mask_embedding = MaskCamEmbed(
            cfg.add_channels, cfg.mid_channels, cfg.conv_out_dim, patch_size, cfg.mask_downsample, cfg.interp, ops=ops
        )
        self.proj_in = ops.Linear(cfg.conv_out_dim, cfg.dim) if cfg.conv_out_dim != cfg.dim else nn.Identity()
        self.controlnet_blocks = nn.ModuleList(
            ControlNetBlock(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.time_embed_dim, ops=ops)
            for _ in range(cfg.num_layers)
        )
        # The reference hardcodes 5120 (= D of Wan-14B); D in general.
        self.proj_out = nn.ModuleList(zero_init(ops.Linear(cfg.dim, inner_dim)) for _ in range(cfg.num_layers))

    @property
    def num_layers(self) -> int:
        return len(self.controlnet_blocks)

    def embed_condition(self, render_mask: torch.Tensor, camera_embedding: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
        """Mask (+ Plücker rays) at pixel resolution -> condition tokens [B, N, conv_out_dim] in ``dtype``.

        Depends on the clip only: compute once and pass to :meth:`residuals` at every step."""
        cond = render_mask if camera_embedding is None else torch.cat([render_mask, camera_embedding], dim=1)
        return self.controlnet_mask_embedding(cond.to(dtype)).flatten(2).transpose(1, 2)

    def rotary(self, grid: tuple[int, int, int], device: torch.device,
               split: SequenceSplit = WHOLE_SEQUENCE) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of a ``grid`` of tokens (this process's part), on ``device`` without a host sync."""
        return rope_cos_sin(host_to_device(split.local(grid_positions(*grid), "ControlNet", dim=0), device),
                            self.head_dim)

    def residuals(self, hidden_states: torch.Tensor, render_latent: torch.Tensor, condition: torch.Tensor,
                  temb: torch.Tensor, *, attention: AttentionFn | None = None,
                  split: SequenceSplit = WHOLE_SEQUENCE, rotary=None) -> Iterator[torch.Tensor]:
        """Yield residual j ([B, N, D], this process's part of the sequence) for j = 0..L_c-1,
        computing each block only when asked (one residual alive at a time).

        ``condition``: :meth:`embed_condition`'s tokens; its batch may divide the batch of
        ``hidden_states`` (e.g. 1 for both CFG halves). ``attention``: the kernel for every block
        (default: each block's own processor). ``rotary``: :meth:`rotary` of the token grid, when
        the caller keeps it (computed here otherwise)."""
        cn_in = torch.cat([hidden_states[:, : self.cond_channels], render_latent], dim=1)
        x = self.controlnet_patch_embedding(cn_in)
        grid = tuple(x.shape[2:])
        x = _add_batched(x.flatten(2).transpose(1, 2), condition.to(x.dtype))
        x = split.local(self.proj_in(x), "ControlNet")
        if rotary is None:
            rotary = self.rotary(grid, x.device, split)
        temb = temb.to(x.dtype)
        for block, proj in zip(self.controlnet_blocks, self.proj_out):
            x = block(x, temb, rotary, attention)
            yield proj(x)
