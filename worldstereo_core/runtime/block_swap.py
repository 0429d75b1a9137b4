"""Block swap: at most N transformer blocks on the accelerator, the rest streamed from CPU memory.

The model's weights live in CPU memory (pinned when CUDA is available). Inside
``with swap(device):`` everything outside the blocks, plus the blocks chosen to stay resident,
is moved to ``device``; the other ("streamed") blocks are copied in just before they run and
dropped right after. While block i runs, the next streamed block is already being copied on a
side CUDA stream, so transfers overlap compute. Blocks are *groups*: for the WorldStereo models
group i is main block i plus, for i < L_c, ControlNet block i and its output projection (which
run right after it), so N counts main blocks.

Budget: with N < number of groups, ``N - (prefetch + 1)`` groups stay resident (spread evenly) and
``prefetch + 1`` slots stream the rest; at no time are more than N groups on the device. Weights
are never modified, so a block is dropped by pointing its parameters back at their CPU copies.

On a device without CUDA streams (CPU, tests) the copies are synchronous; the logic (which group
is where, in which order) is the same and :attr:`BlockSwap.trace` records it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import InputError

HOME = torch.device("cpu")


@dataclass
class _Slot:
    """One tensor of a group: where it sits in the module tree and its CPU copy."""

    owner: nn.Module
    name: str
    is_param: bool
    storage: torch.Tensor

    def point_to(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def _slots(group: Sequence[nn.Module], pin: bool) -> list[_Slot]:
    out = []
    for module in group:
        for owner in module.modules():
            for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    storage = tensor.detach().to(HOME)
                    if pin:
                        storage = storage.pin_memory()
                    slot = _Slot(owner, name, is_param, storage)
                    slot.point_to(storage)
                    out.append(slot)
    return out


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` indices out of ``range(total)``, spread evenly (first at 0)."""
    if count <= 0:
        return []
    return sorted({(i * total) // count for i in range(count)})


def worldstereo_swap_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Execution-ordered groups of a WorldStereo transformer: main block i, then (i < L_c) the
    ControlNet block i and its output projection, which the forward runs right after main block i."""
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


class BlockSwap:
    """Stream ``groups`` of ``model`` through an accelerator with at most ``resident`` on it at once.

    Use ``with swap(device): model(...)`` (or let a pipeline do it: :func:`enable_block_swap` sets
    ``model.placement``, which the pipelines use instead of ``model.to``). Outside the context the
    model is an ordinary CPU model. ``trace`` (a list) receives ``("load"|"run"|"release", i)``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Sequence[nn.Module]], *, resident: int,
                 prefetch: int = 1, pin_memory: bool | None = None, trace: list | None = None) -> None:
        if not isinstance(resident, int) or isinstance(resident, bool) or resident < 1:
            raise InputError(f"block swap: the number of resident blocks must be an integer >= 1, got {resident!r}")
        if prefetch < 0:
            raise InputError(f"block swap: prefetch must be >= 0, got {prefetch}")
        self.model, self.groups = model, [list(g) for g in groups]
        n = len(self.groups)
        self.resident = min(resident, n)
        self.prefetch = min(prefetch, max(self.resident - 1, 0))
        streaming = self.resident < n
        keep = self.resident - (self.prefetch + 1) if streaming else n
        self.permanent = set(evenly_spaced(keep, n)) if streaming else set(range(n))
        self.streamed = [i for i in range(n) if i not in self.permanent]
        self._streamed_set = set(self.streamed)
        self.slots_for_streaming = self.resident - len(self.permanent)
        self.trace = trace
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory

        in_groups = {id(m) for g in self.groups for top in g for m in top.modules()}
        self._rest = [m for m in model.modules() if id(m) not in in_groups]
        self._slots = [_slots(g, self.pin) for g in self.groups]
        self._rest_to(HOME)
        self._state = ["home"] * n           # home | loading | active
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._order: list[int] = []           # load order of non-home streamed groups (oldest first)
        self._device: torch.device | None = None
        self._stream = None
        self.loads = self.misses = self.max_resident = 0
        self._handles = []
        for i, group in enumerate(self.groups):
            for module in group:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(i)))
            self._handles.append(group[-1].register_forward_hook(self._make_post_hook(i)))

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
        device = self._device
        with torch.inference_mode(False):
            if device.type == "cuda":
                with torch.cuda.stream(self._stream):
                    tensors = [s.storage.to(device, non_blocking=True) for s in self._slots[i]]
                    event = torch.cuda.Event()
                    event.record(self._stream)
            else:
                tensors = [s.storage.to(device, copy=True) for s in self._slots[i]]
                event = None
        self._pending[i] = (tensors, event)
        self._state[i] = "loading"
        if i not in self.permanent:
            self._order.append(i)
        self.loads += 1
        self.max_resident = max(self.max_resident, self.resident_now())
        self._log("load", i)

    def _activate(self, i: int) -> None:
        tensors, event = self._pending.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # the allocator must not reuse them before this stream is done
        for slot, t in zip(self._slots[i], tensors):
            slot.point_to(t)
        self._state[i] = "active"

    def _release(self, i: int) -> None:
        if self._state[i] == "home":
            return
        self._pending.pop(i, None)
        for slot in self._slots[i]:
            slot.point_to(slot.storage)
        self._state[i] = "home"
        if i in self._order:
            self._order.remove(i)
        self._log("release", i)

    def _make_room(self, keep: set[int]) -> bool:
        """Free a streaming slot (dropping the oldest group not in ``keep``); False if none can go."""
        while sum(self._state[j] != "home" for j in self.streamed) >= self.slots_for_streaming:
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
            self._device = None
            self._stream = None

    def offload(self) -> None:
        """Everything back to CPU memory."""
        for i in range(len(self.groups)):
            self._release(i)
        self._rest_to(HOME)

    def detach(self) -> None:
        """Remove the hooks; the model stays an ordinary CPU model (weights in the CPU copies)."""
        if self._device is not None:
            raise RuntimeError("cannot detach block swap while it is placed on a device")
        self.offload()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stats(self) -> dict:
        return {"groups": len(self.groups), "resident": self.resident, "permanent": len(self.permanent),
                "streamed": len(self.streamed), "prefetch": self.prefetch, "loads": self.loads,
                "misses": self.misses, "max_resident": self.max_resident}


def enable_block_swap(model: nn.Module, resident: int, *, prefetch: int = 1, pin_memory: bool | None = None,
                      trace: list | None = None) -> BlockSwap:
    """Stream a WorldStereo transformer's blocks (:func:`worldstereo_swap_groups`) with at most
    ``resident`` on the accelerator. Sets ``model.placement`` (used by the pipelines) and returns
    the :class:`BlockSwap`; the model is moved to CPU memory."""
    if getattr(model, "placement", None) is not None:
        raise InputError("block swap is already enabled on this model; call disable_block_swap(model) first")
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
