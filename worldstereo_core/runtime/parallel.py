"""Multi-process runs (torchrun): sequence parallelism, sharded weights, scenes spread over ranks.

Launch any CLI command under torchrun through :mod:`worldstereo_core.distributed`::

    torchrun --nproc-per-node 8 -m worldstereo_core.distributed --sp 8 multi-traj <scene> --task reconstruction ...

``--sp S`` groups the ranks into sequence-parallel groups of S processes (default: all of them):
the S ranks of a group generate the same clip together, each holding 1/S of the token sequence
of the main transformer and of the ControlNet (and of the memory references); ranks of different
groups take different scenes (:func:`split_work`). On CUDA the backend is NCCL with one GPU per
local rank, on CPU gloo.

How the sequence is split (no communication layer of our own; torch.distributed and diffusers):

* the forward cuts its token tensors into S contiguous chunks at its seams (video and reference
  tokens before the first block and their RoPE positions, the ControlNet's projected tokens) and
  gathers the output projection with ``all_gather_single``: the model's ``sequence_split`` is a
  :class:`SequenceSharding`;
* every self-attention (Wan blocks, SSM joint attention, ControlNet) runs diffusers' Ulysses
  context parallelism: its processors get a diffusers ``ParallelConfig`` and
  ``dispatch_attention_fn`` exchanges heads for tokens with ``all_to_all`` and back. The SSM
  attention is over [references; targets] without a mask, which is order-free, so the local
  [ref chunk; target chunk] layout needs no reordering. Cross-attention to text/image stays local.
* :func:`shard_weights` applies FSDP2 ``fully_shard`` per block over the group, so each rank
  holds 1/S of the weights and gathers one block at a time.

Outputs: only the first rank of each group writes to the output folder; the others run the same
task into a scratch folder (:func:`rank_output_dir`). Weights are not downloaded under torchrun
(run ``python -m worldstereo_core download ...`` first).

Requirements: S divides the token count (latent frames x h/2 x w/2), the reference token count,
and the head counts of the main model and the ControlNet; the attention scope is ``full``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InputError

log = logging.getLogger(__name__)

#: Device-mesh dimension names: data-parallel groups x diffusers' (ring, ulysses) context parallelism.
MESH_DIMS = ("dp", "ring", "ulysses")


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    sp_size: int = 1
    mesh: Any = None                 # torch DeviceMesh over MESH_DIMS (None when single-process)
    parallel_config: Any = None      # diffusers ParallelConfig (None without sequence parallelism)

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes its group's outputs (the first rank of each group)."""
        return self.sp_rank == 0

    @property
    def sp_group(self):
        return None if self.mesh is None else self.mesh["ulysses"].get_group()


_CURRENT: DistContext | None = None


def current() -> DistContext | None:
    """The context :func:`init_distributed` set up in this process, or None."""
    return _CURRENT


def init_distributed(sp_size: int | None = None, *, backend: str | None = None,
                     device_type: str | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (or with WORLD_SIZE 1) this is a single-process context. ``sp_size``:
    ranks per sequence-parallel group (default: all); it must divide the world size."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise InputError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at "
                             "most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    sp = world if sp_size is None else sp_size
    if sp < 1 or world % sp:
        raise InputError(f"--sp {sp} must divide the number of processes ({world})")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, sp_size=sp)
    if world > 1:
        ctx.backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(ctx.backend, rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        ctx.mesh = init_device_mesh(device.type, (world // sp, 1, sp), mesh_dim_names=MESH_DIMS)
        if sp > 1:
            from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

            # Set up by hand: diffusers' enable_parallelism would also install its Wan split plan,
            # which does not fit the WorldStereo forward (ControlNet residuals, reference tokens).
            # The group's own (ring, ulysses) mesh: diffusers 0.36 flattens the whole mesh it gets.
            config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=sp))
            config.setup(rank, world, device, mesh=ctx.mesh["ring", "ulysses"])
            ctx.parallel_config = config
    _CURRENT = ctx
    return ctx


def shutdown() -> None:
    """Leave the process group (if any) and forget the context."""
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def split_work(items: Sequence[Any], ctx: DistContext | None = None) -> list[Any]:
    """The items (e.g. scenes) this rank's group handles: every ``dp_size``-th, from ``dp_rank``."""
    ctx = ctx or current() or DistContext()
    return list(items)[ctx.dp_rank::ctx.dp_size]


# ------------------------------------------------------------------------------------------------
# Outputs of a sequence-parallel group
# ------------------------------------------------------------------------------------------------

def _manifest(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` ({} when it does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _mirror_writer_folder(src: Path, dst: Path | None, ctx: DistContext) -> None:
    """Give every rank of the group a copy of the writer's ``src`` at ``dst`` (non-writers) and
    make sure all of them got it: the writer broadcasts its file list, the others copy and compare,
    and one all-reduce tells every rank whether any copy failed (so all raise, or none does). The
    all-reduce is also the barrier that keeps the writer from writing before the copies are made."""
    listing = [_manifest(src) if ctx.is_writer else None]
    dist.broadcast_object_list(listing, group=ctx.sp_group, group_src=0, device=ctx.device)
    failed = 0
    if not ctx.is_writer and listing[0]:
        try:
            shutil.copytree(src, dst)
            failed = int(_manifest(dst) != listing[0])
        except OSError as exc:
            log.warning("rank %d cannot copy %s: %s", ctx.rank, src, exc)
            failed = 1
    flag = torch.tensor([failed], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.sp_group)
    if flag.item():
        raise InputError(f"the processes of a sequence-parallel group could not all read {src} (the writer's "
                         "outputs, needed to resume in step); put --out on a filesystem every process sees")


@contextlib.contextmanager
def rank_output_dir(out_dir: str | os.PathLike, scene: str, ctx: DistContext | None = None, *,
                    mirror: bool = False) -> Iterator[Path]:
    """The output folder this rank hands to a task for scene ``scene`` (written to ``<folder>/<scene>``).

    The ranks of a sequence-parallel group compute the same clip together, so every rank must run
    the whole task (each forward needs all of them), but only the group's writer
    (:attr:`DistContext.is_writer`) may write to ``out_dir``. The writer gets ``out_dir`` itself;
    the other ranks get a private scratch folder under the system temp dir, deleted afterwards, so
    their identical outputs never touch the real one. The tasks stay unaware of ranks.

    ``mirror``: the task reads what is already in ``<out_dir>/<scene>`` (a multi-trajectory run
    resumes from it), and all ranks must take the same skip/resume decisions or one would wait
    forever in a collective. Before the task, the writer's scene folder is copied into each
    scratch folder and checked (:func:`_mirror_writer_folder`): every rank then starts from the
    same files, and runs that start alike stay alike (the generated frames are the same on every
    rank of a group). A failure of any rank mid-run ends that process, and torchrun then stops
    the others.
    """
    ctx = ctx or current() or DistContext()
    out_dir = Path(out_dir)
    if ctx.sp_size == 1:
        yield out_dir
        return
    scratch = None if ctx.is_writer else Path(tempfile.mkdtemp(prefix=f"worldstereo-rank{ctx.rank}-"))
    try:
        if mirror:
            _mirror_writer_folder(out_dir / scene, None if scratch is None else scratch / scene, ctx)
        yield out_dir if scratch is None else scratch
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Sequence parallelism
# ------------------------------------------------------------------------------------------------

class SequenceSharding:
    """This process's part of the token sequence in a sequence-parallel group: the model's
    ``sequence_split`` (:class:`.models.sequence.SequenceSplit`), which the forward asks at its seams."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.size, self.index = ctx.sp_size, ctx.sp_rank

    def local(self, t: torch.Tensor, what: str, dim: int = 1) -> torch.Tensor:
        n = t.shape[dim]
        if n % self.size:
            raise InputError(f"sequence parallel over {self.size} processes needs the {what} token count ({n}) to "
                             f"be divisible by {self.size}; change the resolution/number of references or --sp")
        step = n // self.size
        return t.narrow(dim, self.index * step, step)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, C] chunks of all ranks -> [B, size*n, C] (rank order)."""
        t = t.contiguous()
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        dist.all_gather_single(out, t, group=self.ctx.sp_group)
        out = out.unflatten(0, (self.size, t.shape[0]))
        return out.transpose(0, 1).flatten(1, 2)


def _attention_processors(model: nn.Module):
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            yield processor


def enable_sequence_parallel(model: nn.Module, ctx: DistContext | None = None) -> SequenceSharding:
    """Split a WorldStereo transformer's token sequence over ``ctx``'s sequence-parallel group."""
    ctx = ctx or current()
    if ctx is None or ctx.parallel_config is None:
        raise InputError("sequence parallelism needs init_distributed() with more than one process per group "
                         "(run under torchrun with --sp > 1)")
    if getattr(model, "_sequence_sharding", None) is not None:
        raise InputError("sequence parallelism is already enabled on this model")
    heads = {"main": model.config.num_attention_heads, "ControlNet": model.controlnet_cfg.num_heads}
    for what, count in heads.items():
        if count % ctx.sp_size:
            raise InputError(f"--sp {ctx.sp_size} must divide the {what} attention heads ({count})")
    if getattr(model, "attention_scope", "full") != "full":
        raise InputError("sequence parallelism supports the released 'full' attention scope only, not 'pairs'")
    from .attention import attention_backend_of, check_backend

    check_backend(attention_backend_of(model) or "sdpa", ctx.device, context_parallel=True)
    for processor in _attention_processors(model):
        processor._parallel_config = ctx.parallel_config
    sharding = SequenceSharding(ctx)
    model.sequence_split = model._sequence_sharding = sharding
    return sharding


class ShardedPlacement:
    """The pipelines' ``placement`` hook of a sharded model: FSDP2 already keeps the shards on the
    group's device and gathers each block itself, so the model is never moved as a whole (a
    ``.to()`` of sharded parameters fails under inference mode)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextlib.contextmanager
    def __call__(self, device: torch.device | str, keep: bool = False) -> Iterator[None]:
        if torch.device(device).type != self.device.type:
            raise InputError(f"the transformer is sharded over {self.device.type} devices; run the pipeline on "
                             f"{self.device}, not {device}")
        yield


def shard_weights(model: nn.Module, ctx: DistContext | None = None) -> int:
    """FSDP2 ``fully_shard`` every block (main, ControlNet) and then the whole model over the
    sequence-parallel group: each rank keeps 1/S of the weights, on its device (load the model on
    the CPU first: only one block is whole on the device at a time). Sets ``model.placement`` to a
    :class:`ShardedPlacement`. Returns the number of units."""
    ctx = ctx or current()
    if ctx is None or ctx.mesh is None or ctx.sp_size == 1:
        raise InputError("sharded weights need init_distributed() with more than one process per group")
    if getattr(model, "placement", None) is not None:
        raise InputError("sharded weights and block swap do not combine; use one of them")
    from .fp8 import FP8Linear

    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise InputError("sharded weights and fp8 storage do not combine; drop --fp8 or --shard-weights")
    from torch.distributed.fsdp import fully_shard

    mesh = ctx.mesh["ulysses"]
    units = list(model.blocks) + list(model.controlnet.controlnet_blocks)
    for unit in units:  # each moves its block to the device, keeps its shard and frees the rest
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.placement = ShardedPlacement(ctx.device)
    return len(units) + 1


# ------------------------------------------------------------------------------------------------
# torchrun entry point
# ------------------------------------------------------------------------------------------------
