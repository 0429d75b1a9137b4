"""Weight-only float8 storage: Linear weights kept as ``torch.float8_e4m3fn`` plus a float32 scale.

Each converted layer stores ``q = round_e4m3(W / s)`` with ``s = amax / 448`` per output channel
(``"channel"``, default) or per tensor (``"tensor"``), and computes ``F.linear(x, (q * s).to(dtype), b)``
in the layer's compute dtype, so weights take one byte per element and the arithmetic is unchanged.

Precision (e4m3: 3 mantissa bits, round to nearest): for ``|W / s|`` in the normal range
(>= 2^-6) the stored weight errs by at most ``2^-4 |W|``; below it (subnormals, spacing 2^-9) by at
most ``2^-10 s``. :func:`fp8_error_bound` gives that element-wise bound, from which a bound on a
layer's output follows: ``|y - y_fp8| <= (|W - Q(W)|) @ |x|``.

Loading: :func:`convert_linears` swaps ``nn.Linear`` for :class:`FP8Linear` (also on the meta
device) and :func:`quantize_stream` quantises checkpoint weights one tensor at a time as they are
read, so the full-precision model is never held in memory (see ``load_worldstereo_transformer(fp8=...)``).
An :class:`FP8Linear`'s ``state_dict()`` holds the float8 weight without its (non-persistent) scale;
keep the full-precision checkpoint as the source of truth.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
FP8_MODES = ("channel", "tensor")
#: Worst relative rounding error of a normal e4m3 number (half a unit in the last of 3 mantissa bits).
E4M3_RELATIVE_ERROR = 2.0 ** -4
#: Worst absolute rounding error of a subnormal e4m3 number, in units of the scale (half of 2^-9).
E4M3_SUBNORMAL_ERROR = 2.0 ** -10
#: Smallest normal e4m3 magnitude.
E4M3_MIN_NORMAL = 2.0 ** -6
#: Linear layers of the WorldStereo transformers stored in fp8: everything inside the repeated blocks
#: (backbone, SSM and ControlNet) and the ControlNet's per-block output projections; >98% of the weights.
WORLDSTEREO_FP8_PREFIXES = ("blocks.", "controlnet.controlnet_blocks.", "controlnet.proj_out.")


def _check_mode(mode: str) -> None:
    if mode not in FP8_MODES:
        raise InputError(f"fp8 mode must be one of {FP8_MODES} (per output channel or per tensor scale), got {mode!r}")


def fp8_scale(weight: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """float32 scale ``amax / 448``: shape [out, 1] for ``"channel"``, [] for ``"tensor"`` (1 where amax is 0)."""
    _check_mode(mode)
    w = weight.detach().abs().float()
    amax = w.amax(dim=1, keepdim=True) if mode == "channel" else w.amax()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_weight(weight: torch.Tensor, mode: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale) of a 2-D weight."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise InputError(f"fp8 quantisation takes a 2-D floating weight, got {weight.dtype} {list(weight.shape)}")
    scale = fp8_scale(weight, mode)
    q = (weight.detach().float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` computed in float32, returned in ``dtype``."""
    return (q.float() * scale).to(dtype)


def fp8_roundtrip(weight: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """The weight an :class:`FP8Linear` computes with, in the weight's own dtype."""
    return dequantize_weight(*quantize_weight(weight, mode), weight.dtype)


def fp8_error_bound(weight: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """Element-wise bound on ``|W - fp8_roundtrip(W)|`` (float32): ``max(2^-4 |W|, 2^-10 s)``.

    Excludes the final cast of ``q * s`` to a half-precision compute dtype (not needed in float32)."""
    scale = fp8_scale(weight, mode)
    return torch.maximum(weight.detach().abs().float() * E4M3_RELATIVE_ERROR, scale * E4M3_SUBNORMAL_ERROR)


class FP8Linear(nn.Module):
    """``nn.Linear`` with a float8 weight and float32 scale, computing in ``compute_dtype``.

    ``.to(dtype)`` / ``.half()`` change the compute dtype (and the bias), never the fp8 storage;
    ``.to(device)`` moves everything. Loading a full-precision ``weight`` through
    ``load_state_dict`` quantises it; a float8 ``weight`` is taken as already quantised with the
    current scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "channel",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        _check_mode(mode)
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        scale_shape = (out_features, 1) if mode == "channel" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device),
                             persistent=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "channel") -> "FP8Linear":
        """Quantise an existing layer (a meta layer gives a meta FP8Linear to be loaded later)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode,
                    compute_dtype=linear.weight.dtype, device=linear.weight.device)
        if not linear.weight.is_meta:
            q, scale = quantize_weight(linear.weight, mode)
            layer.weight.data = q
            layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.data
        return layer

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` into this layer (kept on its device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InputError(f"weight of shape {list(weight.shape)} does not fit FP8Linear "
                             f"[{self.out_features}, {self.in_features}]")
        q, scale = quantize_weight(weight, self.mode)
        device = q.device if self.weight.is_meta else self.weight.device
        self.weight = nn.Parameter(q.to(device), requires_grad=False)
        self.weight_scale = scale.to(device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def _apply(self, fn, recurse: bool = True):
        # Two probes tell whether ``fn`` casts (both come out in one dtype, the new compute dtype)
        # and where it moves tensors; the fp8 weight and float32 scale only follow the device.
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.weight.device))
        if fn(torch.empty(0, dtype=torch.float64, device=self.weight.device)).dtype == probe.dtype:
            self.compute_dtype = probe.dtype
        self.weight.data = self.weight.data.to(probe.device)
        self.weight_scale = self.weight_scale.to(probe.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if isinstance(incoming, torch.Tensor) and incoming.dtype != FP8_DTYPE:
            q, scale = quantize_weight(incoming, self.mode)
            self.weight_scale = scale.to(self.weight_scale.device if not self.weight_scale.is_meta else q.device)
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict[key] = q.to(incoming.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, compute_dtype={self.compute_dtype}")


def worldstereo_fp8_filter(name: str, module: nn.Linear) -> bool:
    """The layers :data:`WORLDSTEREO_FP8_PREFIXES` selects."""
    return name.startswith(WORLDSTEREO_FP8_PREFIXES)


LinearFilter = Callable[[str, nn.Linear], bool]


def convert_linears(model: nn.Module, *, mode: str = "channel", include: LinearFilter | None = None) -> int:
    """Replace the ``nn.Linear`` layers ``include(name, layer)`` selects (default: all) by
    :class:`FP8Linear`, in place, one layer at a time. Returns how many were converted."""
    _check_mode(mode)
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and (include is None or include(name, module))]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(module, mode))
    return len(chosen)


def convert_worldstereo_fp8(model: nn.Module, mode: str = "channel") -> int:
    """:func:`convert_linears` over the WorldStereo block layers (:data:`WORLDSTEREO_FP8_PREFIXES`)."""
    count = convert_linears(model, mode=mode, include=worldstereo_fp8_filter)
    if count == 0:
        raise InputError("no Linear layer under blocks./controlnet. to store in fp8: is this a WorldStereo transformer "
                         "(and not already converted)?")
    return count


def quantize_stream(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``(state-dict name, tensor)`` pairs through, quantising the weights of the model's
    :class:`FP8Linear` layers on arrival (their scales are set on the layers, on the tensor's device)."""
    targets = {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, FP8Linear)}
    for name, tensor in items:
        layer = targets.get(name)
        if layer is not None and tensor.dtype != FP8_DTYPE:
            tensor, layer.weight_scale = quantize_weight(tensor, layer.mode)
        yield name, tensor


def fp8_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held in fp8 weights, bytes of all other parameters and buffers)."""
    fp8 = other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = t.numel() * t.element_size()
        if t.dtype == FP8_DTYPE:
            fp8 += size
        else:
            other += size
    return fp8, other
