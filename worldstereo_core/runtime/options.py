"""One bundle of runtime options, its command-line flags, and applying it to a loaded model.

Order of use (what the CLI and the nodes do)::

    options = runtime_options_from_args(args)                  # or RuntimeOptions(...)
    transformer = load_worldstereo_transformer(variant, base=..., dtype=dtype,
                                               **load_kwargs(options, device))
    components = load_base_components(base, device=load_device(options, device), ...)
    pipeline_kwargs = apply_runtime(transformer, options, device, components=components)
    pipeline = build_pipeline(config, transformer, components, **pipeline_kwargs)

24 GB recipe (14B, 480p, 21 keyframes): ``--fp8 --block-swap 20 --offload --text-encoder-dtype bf16``
(add ``--vae-tiling`` for larger frames). Under torchrun (:mod:`worldstereo_core.distributed`)
sequence parallelism is applied automatically when the context has groups of more than one
process, with ``--shard-weights`` for FSDP2-sharded weights.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from .attention import BACKENDS
from .compile import COMPILE_MODES, CUDA_GRAPH_MODES, cuda_graph_conflict
from .fp8 import FP8_MODES

TEXT_ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run the transformer (all off by default: the plain model on one device).

    ``block_swap``: blocks kept on the accelerator at once (None: all; see :mod:`.block_swap`).
    ``fp8``: ``"channel"``/``"tensor"`` weight-only fp8 storage of the blocks (None: off).
    ``compile``: regional torch.compile (``compile_mode`` / ``compile_backend``).
    ``attention``: backend name (:data:`.attention.BACKENDS` or ``"auto"``).
    ``vae_tiling``: tiled VAE encode/decode. ``offload``: text encoder, CLIP and VAE live in CPU
    memory and visit the device only while used. ``text_encoder_dtype``: ``"bf16"`` halves UMT5.
    ``shard_weights``: FSDP2 across a sequence-parallel group (torchrun only).
    """

    block_swap: int | None = None
    prefetch: int = 1
    fp8: str | None = None
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    attention: str = "auto"
    vae_tiling: bool = False
    offload: bool = False
    text_encoder_dtype: str | None = None
    shard_weights: bool = False

    def __post_init__(self) -> None:
        if self.block_swap is not None and (not isinstance(self.block_swap, int) or self.block_swap < 1):
            raise InputError(f"block_swap must be a number of blocks >= 1, got {self.block_swap!r}")
        if self.fp8 is not None and self.fp8 not in FP8_MODES:
            raise InputError(f"fp8 must be one of {FP8_MODES} or None, got {self.fp8!r}")
        if self.attention != "auto" and self.attention not in BACKENDS:
            raise InputError(f"attention must be 'auto' or one of {list(BACKENDS)}, got {self.attention!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.text_encoder_dtype is not None and self.text_encoder_dtype not in TEXT_ENCODER_DTYPES:
            raise InputError(f"text_encoder_dtype must be one of {list(TEXT_ENCODER_DTYPES)}, "
                             f"got {self.text_encoder_dtype!r}")
        if self.block_swap is not None and self.shard_weights:
            raise InputError("block swap and sharded weights do not combine; use one of them")
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES:
            for on, what in ((self.block_swap is not None, "block swap"), (self.shard_weights, "sharded weights")):
                if on:
                    raise cuda_graph_conflict(self.compile_mode, what)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the runtime flags to a CLI (sub)parser."""
    g = parser.add_argument_group("memory and speed")
    g.add_argument("--block-swap", type=int, default=None, metavar="N",
                   help="keep at most N transformer blocks on the GPU, streaming the others from CPU memory "
                        "(e.g. 20 of 40 with --fp8 on a 24 GB card); default: all on the GPU")
    g.add_argument("--prefetch", type=int, default=1, help="blocks copied ahead with --block-swap (default 1)")
    g.add_argument("--fp8", nargs="?", const="channel", default=None, choices=FP8_MODES,
                   help="store the transformer blocks' weights in float8 (half of bf16), scaled per output "
                        "channel (default) or per tensor")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the transformer blocks (optional mode; first step is slow)")
    g.add_argument("--attention", default="auto", choices=("auto", *BACKENDS),
                   help="attention backend (default auto: flash-attn 3 on Hopper, else flash-attn 2 on compute "
                        "capability >= 8.0 when installed, else torch SDPA)")
    g.add_argument("--vae-tiling", action="store_true", help="tiled VAE encode/decode (less VAE memory)")
    g.add_argument("--offload", action="store_true",
                   help="keep text encoder, CLIP and VAE in CPU memory and move each to the GPU only while used")
    g.add_argument("--text-encoder-dtype", default=None, choices=tuple(TEXT_ENCODER_DTYPES),
                   help="UMT5 precision (bf16: 11 GB instead of 23 GB)")
    g.add_argument("--shard-weights", action="store_true",
                   help="under torchrun: shard the transformer weights over each sequence-parallel group (FSDP2)")


def runtime_options_from_args(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(block_swap=args.block_swap, prefetch=args.prefetch, fp8=args.fp8,
                          compile=args.compile is not None, compile_mode=args.compile or "default",
                          attention=args.attention, vae_tiling=args.vae_tiling, offload=args.offload,
                          text_encoder_dtype=args.text_encoder_dtype, shard_weights=args.shard_weights)


def load_device(options: RuntimeOptions, device: torch.device | str) -> torch.device:
    """Where to load the base components (text encoder, CLIP, VAE): the CPU when offloaded."""
    return torch.device("cpu") if options.offload else torch.device(device)


def load_kwargs(options: RuntimeOptions, device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments for ``load_worldstereo_transformer`` (streamed or sharded blocks load to the CPU)."""
    on_cpu = options.block_swap is not None or options.shard_weights
    return {"fp8": options.fp8, "device": torch.device("cpu") if on_cpu else torch.device(device)}


def apply_runtime(transformer: nn.Module, options: RuntimeOptions, device: torch.device | str, *,
                  components: Any = None) -> dict[str, Any]:
    """Apply ``options`` to a loaded transformer (and the base components); returns the keyword
    arguments the pipeline needs (``device``). Under an active :mod:`.parallel` context with
    sequence-parallel groups, the transformer is split over its group first."""
    from . import parallel as sequence_parallel
    from .attention import set_attention_backend
    from .block_swap import enable_block_swap
    from .compile import compile_blocks
    from .offload import enable_vae_tiling, offload_components

    device = torch.device(device)
    ctx = sequence_parallel.current()
    parallel = ctx is not None and ctx.sp_size > 1
    if options.shard_weights and not parallel:
        raise InputError("--shard-weights needs torchrun with sequence-parallel groups of more than one process")
    if options.fp8 is not None and not any(p.dtype == torch.float8_e4m3fn for p in transformer.parameters()):
        from .fp8 import convert_worldstereo_fp8

        convert_worldstereo_fp8(transformer, options.fp8)  # a model loaded without load_kwargs()
    if parallel:
        sequence_parallel.enable_sequence_parallel(transformer, ctx)
    set_attention_backend(transformer, options.attention, device)
    if options.compile:
        compile_blocks(transformer, mode=options.compile_mode, backend=options.compile_backend)
    if options.shard_weights:
        sequence_parallel.shard_weights(transformer, ctx)
    if options.block_swap is not None:
        enable_block_swap(transformer, options.block_swap, prefetch=options.prefetch)
    if components is not None:
        if options.vae_tiling and getattr(components, "vae", None) is not None:
            enable_vae_tiling(components.vae)
        if options.offload or options.text_encoder_dtype is not None:
            dtype = TEXT_ENCODER_DTYPES[options.text_encoder_dtype] if options.text_encoder_dtype else None
            if options.offload:
                offload_components(components, text_encoder_dtype=dtype)
            elif getattr(components, "text_encoder", None) is not None:
                components.text_encoder.to(dtype=dtype)
    return {"device": device}
