"""The WorldStereo forward, written once over a small interface to a Wan2.1 backbone (the host).

A host exposes its backbone (diffusers' ``WanTransformer3DModel`` in :mod:`.transformer`, ComfyUI's
``WanModel`` in the node pack) through :class:`WanHost`; the branches (:class:`WorldStereoBranches`:
the GGM ControlNet, the pose MLP) and the SSM step (:mod:`.ssm`) are shared. :func:`run_worldstereo`
is the whole forward: patch-embed, per-block ControlNet residuals, the SSM joint blocks with
width-stitched reference RoPE, and the head.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..constants import NFRAME
from .attention import AttentionFn
from .config import ControlNetConfig
from .controlnet import GGMControlNet, zero_init
from .inputs import MemoryInputs, VideoInputs
from .ops import TORCH_OPS
from .rope import grid_positions
from .sequence import WHOLE_SEQUENCE, SequenceSplit
from .ssm import PairGroups, add_pose, camera_pose_mlp, joint_positions
from .transfer import host_to_device


class HostConditioning(Protocol):
    """What a host's :meth:`WanHost.conditioning` returns; only ``temb`` is read by the branches."""

    temb: torch.Tensor  # [B, D], the time embedding before the blocks' 6-way projection


class WanHost(Protocol):
    """A Wan2.1 I2V backbone as the WorldStereo forward uses it."""

    patch_size: tuple[int, int, int]
    num_blocks: int
    #: Kernel for the ControlNet's attention (None: each ControlNet block's own processor).
    branch_attention: AttentionFn | None

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        """The patch embedding: [B, C_in, F, h, w] -> tokens [B, N, D]."""

    def conditioning(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
                     ) -> HostConditioning:
        """Time embedding (+ the blocks' modulation) and the cross-attention context."""

    def rotary(self, positions: torch.Tensor) -> Any:
        """The host's RoPE table for token positions [N, 3] (frame, y, x)."""

    def block(self, index: int, x: torch.Tensor, cond: HostConditioning, rotary: Any) -> torch.Tensor:
        """Backbone block ``index`` as the host runs it."""

    def memory_block(self, index: int, x: torch.Tensor, r: torch.Tensor, cond: HostConditioning, rotary: Any,
                     pair_groups: PairGroups | None, update_reference: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone block ``index`` as an SSM joint block (:func:`.ssm.joint_block` over its parts)."""

    def head(self, x: torch.Tensor, cond: HostConditioning) -> torch.Tensor:
        """Output norm + modulation + projection: [B, N, D] -> [B, N, C_out * prod(patch)]."""

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, C_out * prod(patch)] -> [B, C_out, F, h, w]."""


def branch_modules(cfg: ControlNetConfig, *, memory: bool, in_channels: int, latent_channels: int,
                   inner_dim: int, patch_size: Sequence[int], ops=TORCH_OPS) -> dict[str, nn.Module]:
    """The modules WorldStereo adds to a Wan backbone, by checkpoint prefix: ``controlnet``, and for
    the memory models ``camera_embedding`` and ``ref_index_embedding`` when configured (the latter
    is in the checkpoints but unused by the forward, as in the reference)."""
    modules: dict[str, nn.Module] = {
        "controlnet": GGMControlNet(cfg, in_channels=in_channels, latent_channels=latent_channels,
                                    inner_dim=inner_dim, patch_size=patch_size, ops=ops),
    }
    if memory and cfg.ref_embedding:
        modules["ref_index_embedding"] = zero_init(ops.Embedding(NFRAME, inner_dim))
    if memory and cfg.main_camera_embedding:
        modules["camera_embedding"] = camera_pose_mlp(cfg.camera_embedding_dim, inner_dim, ops=ops)
    return modules


class WorldStereoBranches(nn.Module):
    """The WorldStereo modules of one variant as a module of their own (state-dict keys as in the
    checkpoints: ``controlnet.*``, ``camera_embedding.*``, ``ref_index_embedding.*``)."""

    def __init__(self, cfg: ControlNetConfig, *, memory: bool, in_channels: int, latent_channels: int,
                 inner_dim: int, patch_size: Sequence[int], ops=TORCH_OPS) -> None:
        super().__init__()
        self.camera_embedding = None
        for name, module in branch_modules(cfg, memory=memory, in_channels=in_channels,
                                           latent_channels=latent_channels, inner_dim=inner_dim,
                                           patch_size=patch_size, ops=ops).items():
            setattr(self, name, module)


def _kept(cache: dict | None, key: tuple, make: Callable[[], Any], owner: Any = None) -> Any:
    """``make()``, remembered in ``cache`` under ``key`` (None: not remembered). ``owner``: the
    object whose ``id`` the key holds, kept alive with the entry so that the id stays its own."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = (owner, make())
    return cache[key][1]


def run_worldstereo(host: WanHost, controlnet: GGMControlNet, inp: VideoInputs, mem: MemoryInputs | None = None, *,
                    camera_embedding: nn.Module | None = None, update_ref: bool = True,
                    attention_scope: str = "full", split: SequenceSplit = WHOLE_SEQUENCE,
                    clip_cache: dict | None = None) -> torch.Tensor:
    """The WorldStereo forward on ``host``: the flow velocity [B, C_out, F, h, w].

    ``mem`` (memory models): reference latents, ``ref_index`` (on the CPU) and poses, with
    ``camera_embedding`` the pose MLP (None if the variant has none) and ``update_ref`` whether
    reference tokens are carried from block to block. ``inp.controlnet_condition`` must hold the
    clip's ControlNet condition tokens (:meth:`GGMControlNet.embed_condition`). ``clip_cache``: a
    dict living as long as one clip, where the RoPE tables (and ``pairs`` groups) are kept between
    its steps; positions reach the device without a host sync either way."""
    hidden = inp.hidden_states
    p_t, p_h, p_w = host.patch_size
    grid = (hidden.shape[2] // p_t, hidden.shape[3] // p_h, hidden.shape[4] // p_w)
    device = hidden.device
    cond = host.conditioning(inp.timestep, inp.encoder_hidden_states, inp.encoder_hidden_states_image)
    cn_rotary = _kept(clip_cache, ("controlnet rotary", grid, device, id(split)),
                      lambda: controlnet.rotary(grid, device, split))
    residuals = controlnet.residuals(hidden, inp.render_latent, inp.controlnet_condition, cond.temb,
                                     attention=host.branch_attention, split=split, rotary=cn_rotary)
    x = host.embed(hidden)
    n_residuals = controlnet.num_layers
    if mem is None:
        x = split.local(x, "video")
        rotary = _kept(clip_cache, ("rotary", grid, device, id(split)), lambda: host.rotary(
            host_to_device(split.local(grid_positions(*grid), "video", dim=0), device)))
        for i in range(host.num_blocks):
            x = host.block(i, x, cond, rotary)
            if i < n_residuals:
                x = x + next(residuals)
    else:
        r = host.embed(mem.reference_latent)
        if camera_embedding is not None:  # one pose token per frame, added to all its tokens
            x = add_pose(x, camera_embedding(mem.camera_qt))
            r = add_pose(r, camera_embedding(mem.camera_qt_ref))
        x, r = split.local(x, "video"), split.local(r, "reference")

        def joint_rotary():
            positions = joint_positions(mem.ref_index, *grid)
            n_ref = mem.ref_index.numel() * grid[1] * grid[2]
            positions = torch.cat([split.local(positions[:n_ref], "reference", dim=0),
                                   split.local(positions[n_ref:], "video", dim=0)])
            return host.rotary(host_to_device(positions, device))

        ref_key = id(mem.ref_index)
        rotary = _kept(clip_cache, ("joint rotary", grid, device, id(split), ref_key), joint_rotary, mem.ref_index)
        groups = None
        if attention_scope == "pairs":
            groups = _kept(clip_cache, ("pairs", grid, device, ref_key),
                           lambda: PairGroups.build(mem.ref_index, grid[0], grid[1] * grid[2], device), mem.ref_index)
        last = host.num_blocks - 1
        for i in range(host.num_blocks):
            # Reference outputs are only computed when the next block consumes them.
            x, r_out = host.memory_block(i, x, r, cond, rotary, groups, update_ref and i < last)
            if r_out is not None:
                r = r_out
            if i < n_residuals:
                x = x + next(residuals)
    tokens = split.gather(host.head(x, cond))
    return host.unpatchify(tokens, grid)
