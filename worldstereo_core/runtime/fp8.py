"""Float8 weights: Linear weights kept as ``torch.float8_e4m3fn`` plus a float32 scale.

Each converted layer stores ``q = round_e4m3(W / s)`` with ``s = amax / 448`` per output channel
(``"channel"``, default) or per tensor (``"tensor"``), so weights take one byte per element. Two
ways to multiply (:attr:`FP8Linear.matmul_path`, chosen per device by :func:`fp8_matmul_path` and
logged once per device and mode):

* ``"scaled_mm"``: fp8 x fp8 products on the tensor cores (``torch._scaled_mm``, CUDA compute
  capability 8.9+ for per-tensor scales, 9.0+ for per-channel ones, bf16 compute for per-channel).
  The activations are quantised to e4m3 too, with a dynamic scale per row (``"channel"``) or per
  tensor (``"tensor"``), and products accumulate in float32.
* ``"dequantize"``: everywhere else ``F.linear(x, (q * s).to(dtype), b)``: the weight is widened to
  the compute dtype and scaled in place (no float32 copy), identical to ``(q.float() * s).to(dtype)``.

Precision (e4m3: 3 mantissa bits, round to nearest): for ``|W / s|`` in the normal range
(>= 2^-6) the stored weight errs by at most ``2^-4 |W|``; below it (subnormals, spacing 2^-9) by at
most ``2^-10 s``. :func:`fp8_error_bound` gives that element-wise bound, from which a bound on a
layer's output follows: ``|y - y_fp8| <= (|W - Q(W)|) @ |x|`` (the dequantize path; the scaled path
adds the same relative error for the activations).

Loading: :func:`convert_linears` swaps ``nn.Linear`` for :class:`FP8Linear` (also on the meta
device) and :func:`quantize_stream` quantises checkpoint weights one tensor at a time as they are
read, so the full-precision model is never held in memory (see ``load_worldstereo_transformer(fp8=...)``).
An :class:`FP8Linear`'s ``state_dict()`` holds the float8 weight without its (non-persistent) scale;
keep the full-precision checkpoint as the source of truth.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
FP8_MODES = ("channel", "tensor")
#: Worst relative rounding error of a normal e4m3 number (half a unit in the last of 3 mantissa bits).
E4M3_RELATIVE_ERROR = 2.0 ** -4
#: Worst absolute rounding error of a subnormal e4m3 number, in units of the scale (half of 2^-9).
E4M3_SUBNORMAL_ERROR = 2.0 ** -10
#: Linear layers of the WorldStereo transformers stored in fp8: everything inside the repeated blocks
#: (backbone, SSM and ControlNet) and the ControlNet's per-block output projections; >98% of the weights.
WORLDSTEREO_FP8_PREFIXES = ("blocks.", "controlnet.controlnet_blocks.", "controlnet.proj_out.")
#: How an FP8Linear multiplies (see the module docstring); "auto" picks per device.
FP8_MATMUL_PATHS = ("scaled_mm", "dequantize")
#: Least CUDA compute capability with fp8 tensor-core products (torch._scaled_mm), per scale mode.
SCALED_MM_CAPABILITY = {"tensor": (8, 9), "channel": (9, 0)}


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
    """``q * scale`` in ``dtype``, each product formed in float32 and rounded once to ``dtype`` (as
    ``(q.float() * scale).to(dtype)``), without a float32 copy of the weight: every e4m3 value is
    exact in bf16/fp16, and the in-place product with a float32 scale computes in float32."""
    return q.to(dtype).mul_(scale)


def fp8_matmul_path(device: torch.device | str, mode: str, compute_dtype: torch.dtype,
                    capability: tuple[int, int] | None = None) -> str:
    """``"scaled_mm"`` where ``device`` multiplies fp8 on its tensor cores (CUDA, not ROCm, compute
    capability at least :data:`SCALED_MM_CAPABILITY` for ``mode``; per-channel scales need bf16
    compute), else ``"dequantize"``. ``capability`` overrides the device's (tests)."""
    _check_mode(mode)
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return "dequantize"
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < SCALED_MM_CAPABILITY[mode] or (mode == "channel" and compute_dtype != torch.bfloat16):
        return "dequantize"
    return "scaled_mm"


@functools.cache
def _resolved_path(device: torch.device, mode: str, compute_dtype: torch.dtype) -> str:
    path = fp8_matmul_path(device, mode, compute_dtype)
    log.info("fp8 (%s scales, %s compute) on %s: %s", mode, str(compute_dtype).replace("torch.", ""), device,
             "fp8 products with torch._scaled_mm" if path == "scaled_mm"
             else "weights dequantised per call (no fp8 products on this device)")
    return path


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
        #: "auto" (per device, :func:`fp8_matmul_path`) or a path of :data:`FP8_MATMUL_PATHS` to force.
        self.matmul = "auto"
        #: The path the last forward took (None before the first).
        self.matmul_path: str | None = None
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

    def _path(self, device: torch.device) -> str:
        if self.matmul == "dequantize" or self.in_features % 16 or self.out_features % 16:
            return "dequantize"  # torch._scaled_mm needs both dimensions divisible by 16
        return "scaled_mm" if self.matmul == "scaled_mm" else _resolved_path(device, self.mode, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.matmul_path = self._path(x.device)
        if self.matmul_path == "dequantize":
            return F.linear(x, self.dequantized_weight(), self.bias)
        return self._scaled_forward(x)

    def _scaled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 x fp8 product: activations quantised with a dynamic scale (per row for per-channel
        weights, per tensor otherwise), float32 accumulation, output and bias in the compute dtype."""
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        amax = torch.linalg.vector_norm(rows, float("inf"), dim=1 if self.mode == "channel" else None,
                                        keepdim=self.mode == "channel").float()
        scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
        # quotient in float32 (a 0-dim scale would not promote), rounded once to e4m3 on store
        q = torch.div(rows, scale.reshape(-1, 1), out=torch.empty(rows.shape, dtype=FP8_DTYPE, device=rows.device))
        w_scale = self.weight_scale.reshape(1, -1) if self.mode == "channel" else self.weight_scale
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=w_scale, bias=bias,
                               out_dtype=self.compute_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

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


def set_fp8_matmul(model: nn.Module, matmul: str) -> int:
    """Set how every :class:`FP8Linear` of ``model`` multiplies: ``"auto"`` or one of
    :data:`FP8_MATMUL_PATHS` (``"scaled_mm"`` also runs on the CPU, for comparisons). Returns the count."""
    if matmul != "auto" and matmul not in FP8_MATMUL_PATHS:
        raise InputError(f"fp8 matmul must be 'auto' or one of {FP8_MATMUL_PATHS}, got {matmul!r}")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.matmul = matmul
    return len(layers)


def fp8_matmul_paths(model: nn.Module) -> dict[str, int]:
    """How many :class:`FP8Linear` layers took each path in their last forward (None: not run yet)."""
    return dict(Counter(m.matmul_path for m in model.modules() if isinstance(m, FP8Linear)))


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
