"""Block swap: at most N transformer blocks on the accelerator, the rest streamed from CPU memory.

The model's weights live in CPU memory. Inside ``with swap(device):`` everything outside the
blocks, plus the blocks chosen to stay resident, is moved to ``device``; the other ("streamed")
blocks are copied in just before they run and dropped right after. Blocks are *groups*: for the
WorldStereo models group i is main block i plus, for i < L_c, ControlNet block i and its output
projection (which run right after it), so N counts main blocks.

Budget: with N < number of groups, ``N - (prefetch + 1)`` groups stay resident (spread evenly) and
``prefetch + 1`` slots stream the rest; at no time are more than N groups on the device.
:func:`plan_block_swap` states the memory: each streamed group's weights sit in one contiguous
CPU buffer (page-locked with ``cudaHostRegister`` when CUDA is available: exactly the streamed
bytes plus alignment, no power-of-two rounding; resident groups are not pinned), and each slot is
one device buffer the size of the largest streamed group, allocated once per placement. A group is
loaded into a free slot by one copy on a side CUDA stream, which first waits for the event recorded
when the slot's previous group finished on the compute stream; so transfers overlap compute, and
the weights on the device never exceed ``plan.device_bytes``. Weights are never modified, so a
group is dropped by pointing its parameters back at their CPU buffer.

On a device without CUDA streams (CPU, tests) the copies are synchronous; the logic (which group is
where, in which slot, in which order) is the same and :attr:`BlockSwap.trace` records it.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import InputError

log = logging.getLogger(__name__)

HOME = torch.device("cpu")
#: Byte alignment of each tensor inside a group buffer.
ALIGNMENT = 256


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# ------------------------------------------------------------------------------------------------
# Groups and their memory
# ------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    """One parameter or buffer of a group: where it sits in the module tree(s) and in the group buffer."""

    owners: list[tuple[nn.Module, str, bool]]  # (module, attribute, is a parameter)
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int

    def point_to(self, tensor: torch.Tensor) -> None:
        for owner, name, is_param in self.owners:
            if is_param:
                owner._parameters[name].data = tensor
            else:
                owner._buffers[name] = tensor

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def _layout(group: Sequence[nn.Module]) -> tuple[list[_Entry], int]:
    """The group's tensors (each once, even if shared) at aligned offsets, and the buffer size."""
    entries: dict[int, _Entry] = {}
    size = 0
    for module in group:
        for owner in module.modules():
            for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    key = id(tensor)
                    if key not in entries:
                        nbytes = tensor.numel() * tensor.element_size()
                        entries[key] = _Entry([], tensor.shape, tensor.dtype, size, nbytes)
                        size = _aligned(size + nbytes)
                    entries[key].owners.append((owner, name, is_param))
    return list(entries.values()), size


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` indices out of ``range(total)``, spread evenly (first at 0)."""
    if count <= 0:
        return []
    return sorted({(i * total) // count for i in range(count)})


def worldstereo_swap_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Execution-ordered groups of a WorldStereo transformer: main block i, then (i < L_c) the
    ControlNet block i and its output projection, which the forward runs right after main block i.

    Assumes ``model.blocks`` (an ``nn.ModuleList`` run in order, each called once per forward
    through its ``__call__``, so its hooks fire) and, optionally, ``model.controlnet`` with
    ``controlnet_blocks`` and ``proj_out`` ModuleLists whose i-th entries run right after main
    block i."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InputError("block swap needs a transformer with a `blocks` ModuleList (a WorldStereo / Wan model)")
    cn = getattr(model, "controlnet", None)
    cn_blocks = list(cn.controlnet_blocks) if cn is not None else []
    cn_proj = list(cn.proj_out) if cn is not None else []
    groups = []
    for i, block in enumerate(blocks):
        group = [block]
        if i < len(cn_blocks):
            group += [cn_blocks[i], cn_proj[i]]
        groups.append(group)
    return groups


@dataclass(frozen=True)
class SwapPlan:
    """Where the groups go and what memory that takes (bytes); computable on a meta model."""

    permanent: tuple[int, ...]  # groups resident on the device for the whole placement
    streamed: tuple[int, ...]  # groups copied in for each run
    slots: int  # device buffers for streamed groups
    prefetch: int
    group_bytes: tuple[int, ...]  # tensor bytes of each group (unpadded)
    buffer_bytes: tuple[int, ...]  # size of each group's buffer (aligned tensors)
    rest_bytes: int  # parameters and buffers outside the groups (always on the device)

    @property
    def streamed_bytes(self) -> int:
        return sum(self.group_bytes[i] for i in self.streamed)

    @property
    def pinned_bytes(self) -> int:
        """CPU memory page-locked (with CUDA): the streamed groups' buffers, nothing else."""
        return sum(self.buffer_bytes[i] for i in self.streamed)

    @property
    def slot_bytes(self) -> int:
        return max((self.buffer_bytes[i] for i in self.streamed), default=0)

    @property
    def device_bytes(self) -> int:
        """Most weight bytes on the device during a placement: everything outside the groups, the
        resident groups and the streaming slots."""
        return self.rest_bytes + sum(self.buffer_bytes[i] for i in self.permanent) + self.slots * self.slot_bytes


def plan_block_swap(model: nn.Module, resident: int, prefetch: int = 1,
                    groups: Sequence[Sequence[nn.Module]] | None = None) -> SwapPlan:
    """The :class:`SwapPlan` of streaming ``groups`` (default :func:`worldstereo_swap_groups`) of
    ``model`` with at most ``resident`` groups on the device (works on the meta device)."""
    if not isinstance(resident, int) or isinstance(resident, bool) or resident < 1:
        raise InputError(f"block swap: the number of resident blocks must be an integer >= 1, got {resident!r}")
    if prefetch < 0:
        raise InputError(f"block swap: prefetch must be >= 0, got {prefetch}")
    groups = worldstereo_swap_groups(model) if groups is None else groups
    n = len(groups)
    resident = min(resident, n)
    prefetch = min(prefetch, max(resident - 1, 0))
    streaming = resident < n
    permanent = evenly_spaced(resident - (prefetch + 1), n) if streaming else list(range(n))
    layouts = [_layout(g) for g in groups]
    in_groups = {id(t) for g in groups for top in g for t in [*top.parameters(), *top.buffers()]}
    rest = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in in_groups]
    return SwapPlan(permanent=tuple(permanent), streamed=tuple(i for i in range(n) if i not in permanent),
                    slots=resident - len(permanent), prefetch=prefetch,
                    group_bytes=tuple(sum(e.nbytes for e in entries) for entries, _ in layouts),
                    buffer_bytes=tuple(size for _, size in layouts),
                    rest_bytes=sum(t.numel() * t.element_size() for t in {id(t): t for t in rest}.values()))


def _page_lock(buffer: torch.Tensor) -> bool:
    """Page-lock a CPU buffer in place (``cudaHostRegister``: no copy, no rounding); unlocked when
    the buffer is freed. False (with a warning) when the driver refuses."""
    cudart = torch.cuda.cudart()
    ptr = buffer.data_ptr()
    code = int(cudart.cudaHostRegister(ptr, buffer.numel(), 0))
    if code != 0:
        log.warning("block swap: could not page-lock %.1f MiB of CPU memory (cudaError %d); copies of this "
                    "block will be synchronous", buffer.numel() / 2**20, code)
        return False
    weakref.finalize(buffer, cudart.cudaHostUnregister, ptr)
    return True


@dataclass
class _Slot:
    """A device buffer for one streamed group; ``free`` is recorded when its last group finished."""

    buffer: torch.Tensor
    group: int | None = None
    free: object = None  # torch.cuda.Event


# ------------------------------------------------------------------------------------------------
# The swap
# ------------------------------------------------------------------------------------------------

class BlockSwap:
    """Stream ``groups`` of ``model`` through an accelerator with at most ``resident`` on it at once.

    Use ``with swap(device): model(...)`` (or let a pipeline do it: :func:`enable_block_swap` sets
    ``model.placement``, which the pipelines use instead of ``model.to``). Outside the context the
    model is an ordinary CPU model. ``trace`` (a list) receives ``("load"|"run"|"release", i)``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Sequence[nn.Module]], *, resident: int,
                 prefetch: int = 1, pin_memory: bool | None = None, trace: list | None = None) -> None:
        self.model, self.groups = model, [list(g) for g in groups]
        self.plan = plan_block_swap(model, resident, prefetch, self.groups)
        n = len(self.groups)
        self.resident = min(resident, n)
        self.prefetch = self.plan.prefetch
        self.permanent = set(self.plan.permanent)
        self.streamed = list(self.plan.streamed)
        self._streamed_set = set(self.streamed)
        self.slots_for_streaming = self.plan.slots
        self.trace = trace
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory

        in_groups = {id(m) for g in self.groups for top in g for m in top.modules()}
        self._rest = [m for m in model.modules() if id(m) not in in_groups]
        self._rest_to(HOME)
        self._entries = [_layout(g)[0] for g in self.groups]
        # At home every tensor points into CPU memory: a streamed group into its one buffer (page-locked
        # with CUDA), a resident group at its own tensors (copied to the device once per placement).
        self._home: list[list[torch.Tensor]] = []
        self._buffers: dict[int, torch.Tensor] = {}
        self.pinned_bytes = 0
        for i, entries in enumerate(self._entries):
            if i in self._streamed_set:
                buffer = torch.empty(self.plan.buffer_bytes[i], dtype=torch.uint8)
                for e in entries:
                    e.view(buffer).copy_(_current(e))
                    e.point_to(e.view(buffer))  # the model's own copy is released here, group by group
                if pin and _page_lock(buffer):
                    self.pinned_bytes += buffer.numel()
                self._buffers[i] = buffer
                self._home.append([e.view(buffer) for e in entries])
            else:
                self._home.append([_current(e).to(HOME) for e in entries])
                for e, t in zip(entries, self._home[i]):
                    e.point_to(t)

        self._state = ["home"] * n           # home | loading | active
        self._pending: dict[int, object] = {}  # group -> copy-done event (CUDA) while loading
        self._placed: dict[int, torch.Tensor] = {}  # group -> its device buffer while not home
        self._order: list[int] = []           # load order of non-home streamed groups (oldest first)
        self._device: torch.device | None = None
        self._stream = None
        self._slots: list[_Slot] = []
        self.loads = self.misses = self.max_resident = 0
        self._handles = []
        for i, group in enumerate(self.groups):  # the hooks run eagerly, also around compiled blocks
            for module in group:
                self._handles.append(module.register_forward_pre_hook(torch.compiler.disable(self._make_pre_hook(i))))
            self._handles.append(group[-1].register_forward_hook(torch.compiler.disable(self._make_post_hook(i))))

    # ----- bookkeeping -----------------------------------------------------------------------------
    def _log(self, what: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((what, i))

    def resident_now(self) -> int:
        return sum(s != "home" for s in self._state)

    def _window(self, i: int) -> list[int]:
        """The next ``prefetch`` streamed groups after group i (cyclically; the next forward follows)."""
        if not self.streamed or self.prefetch == 0:
            return []
        n = len(self.groups)
        ahead = [j for j in ((i + d) % n for d in range(1, n + 1)) if j in self._streamed_set and j != i]
        return ahead[: self.prefetch]

    # ----- moving tensors ------------------------------------------------------------------------------
    def _rest_to(self, device: torch.device) -> None:
        for module in self._rest:
            for name, p in module._parameters.items():
                if p is not None and p.device != device:
                    p.data = p.data.to(device)
            for name, b in module._buffers.items():
                if b is not None and b.device != device:
                    module._buffers[name] = b.to(device)

    def _load(self, i: int) -> None:
        """Start copying group i to the device: a streamed group into a free slot, after the slot's
        previous group has finished (its event); a resident group into its own buffer."""
        cuda = self._device.type == "cuda"
        with torch.inference_mode(False):
            if i in self._streamed_set:
                slot = next(s for s in self._slots if s.group is None)
                slot.group = i
                target, source = slot.buffer[: self.plan.buffer_bytes[i]], [self._buffers[i]]
                wait = slot.free
            else:
                target = torch.empty(self.plan.buffer_bytes[i], dtype=torch.uint8, device=self._device)
                source, wait = self._home[i], None
                target_views = [e.view(target) for e in self._entries[i]]
            with torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
                if wait is not None:
                    self._stream.wait_event(wait)
                if i in self._streamed_set:
                    target.copy_(source[0], non_blocking=cuda)
                else:
                    for view, t in zip(target_views, source):
                        view.copy_(t, non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record(self._stream)
        self._placed[i] = target
        self._pending[i] = event
        self._state[i] = "loading"
        if i not in self.permanent:
            self._order.append(i)
        self.loads += 1
        self.max_resident = max(self.max_resident, self.resident_now())
        self._log("load", i)

    def _activate(self, i: int) -> None:
        event = self._pending.pop(i)
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)
        buffer = self._placed[i]
        with torch.inference_mode(False):
            for e in self._entries[i]:
                e.point_to(e.view(buffer))
        self._state[i] = "active"

    def _release(self, i: int) -> None:
        """Point group i back at its CPU memory; a slot is free for the next load once the work
        queued so far on the compute stream (the group's kernels) is done."""
        if self._state[i] == "home":
            return
        self._pending.pop(i, None)
        for e, t in zip(self._entries[i], self._home[i]):
            e.point_to(t)
        self._placed.pop(i)
        for slot in self._slots:
            if slot.group == i:
                slot.group = None
                if self._device.type == "cuda":
                    slot.free = torch.cuda.Event()
                    slot.free.record(torch.cuda.current_stream(self._device))
        self._state[i] = "home"
        if i in self._order:
            self._order.remove(i)
        self._log("release", i)

    def _make_room(self, keep: set[int]) -> bool:
        """Free a streaming slot (dropping the oldest group not in ``keep``); False if none can go."""
        while self._slots and all(s.group is not None for s in self._slots):
            victims = [j for j in self._order if j not in keep]
            if not victims:
                return False
            self._release(victims[0])
        return True

    # ----- hooks -------------------------------------------------------------------------------------
    def _make_pre_hook(self, i: int):
        def hook(module, args):
            if self._device is None:
                return None
            first = module is self.groups[i][0]
            if not first and self._state[i] == "active":  # a later member of a group already in place
                return None
            if first:
                self._log("run", i)
            if self._state[i] == "home":  # not prefetched: load now
                self.misses += 1
                self._make_room(keep={i})
                self._load(i)
            if self._state[i] == "loading":
                self._activate(i)
            window = self._window(i)
            for j in window:
                if self._state[j] == "home" and self._make_room(keep={i, *window}):
                    self._load(j)
            return None

        return hook

    def _make_post_hook(self, i: int):
        def hook(module, args, output):
            if self._device is not None and i not in self.permanent:
                self._release(i)
            return None

        return hook

    # ----- placement -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def __call__(self, device: torch.device | str, keep: bool = False) -> Iterator[nn.Module]:
        """The model ready to run on ``device`` for the block. ``keep``: leave the non-streamed
        parts on the device afterwards (the next entry then skips their transfer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._device is not None:
            raise RuntimeError("block swap placement is already active (nested use)")
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.inference_mode(False):
            self._slots = [_Slot(torch.empty(self.plan.slot_bytes, dtype=torch.uint8, device=device))
                           for _ in range(self.slots_for_streaming if self.streamed else 0)]
        try:
            self._rest_to(device)
            for i in sorted(self.permanent):
                if self._state[i] == "home":
                    self._load(i)
                if self._state[i] == "loading":
                    self._activate(i)
            for j in self.streamed[: self.prefetch]:  # the first streamed groups, before the forward asks
                if self._state[j] == "home":
                    self._load(j)
            yield self.model
        finally:
            for i in self.streamed:
                self._release(i)
            if not keep:
                self.offload()
            if self._stream is not None:  # no copy may still write into the slots when they are freed
                torch.cuda.current_stream(device).wait_stream(self._stream)
            self._slots = []
            self._device = None
            self._stream = None

    def offload(self) -> None:
        """Everything back to CPU memory."""
        for i in range(len(self.groups)):
            self._release(i)
        self._rest_to(HOME)

    def detach(self) -> None:
        """Remove the hooks; the model stays an ordinary CPU model (weights in the CPU buffers)."""
        if self._device is not None:
            raise RuntimeError("cannot detach block swap while it is placed on a device")
        self.offload()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stats(self) -> dict:
        return {"groups": len(self.groups), "resident": self.resident, "permanent": len(self.permanent),
                "streamed": len(self.streamed), "prefetch": self.prefetch, "loads": self.loads,
                "misses": self.misses, "max_resident": self.max_resident, "pinned_bytes": self.pinned_bytes,
                "streamed_bytes": self.plan.streamed_bytes, "device_weight_bytes": self.plan.device_bytes}


def _current(entry: _Entry) -> torch.Tensor:
    """The tensor an entry's first owner holds now."""
    owner, name, is_param = entry.owners[0]
    return owner._parameters[name].data if is_param else owner._buffers[name]


def enable_block_swap(model: nn.Module, resident: int, *, prefetch: int = 1, pin_memory: bool | None = None,
                      trace: list | None = None) -> BlockSwap:
    """Stream a WorldStereo transformer's blocks (:func:`worldstereo_swap_groups`) with at most
    ``resident`` on the accelerator. Sets ``model.placement`` (used by the pipelines) and returns
    the :class:`BlockSwap`; the model is moved to CPU memory. Refused for blocks compiled with CUDA
    graphs (streamed weights change address every forward)."""
    if getattr(model, "placement", None) is not None:
        raise InputError("block swap is already enabled on this model; call disable_block_swap(model) first")
    from .compile import check_no_cuda_graphs

    check_no_cuda_graphs(model, "block swap")
    swap = BlockSwap(model, worldstereo_swap_groups(model), resident=resident, prefetch=prefetch,
                     pin_memory=pin_memory, trace=trace)
    model.placement = swap
    return swap


def disable_block_swap(model: nn.Module) -> None:
    """Undo :func:`enable_block_swap` (the model stays on the CPU)."""
    swap = getattr(model, "placement", None)
    if isinstance(swap, BlockSwap):
        swap.detach()
        model.placement = None
