"""Runtime options for running the WorldStereo transformers on small or many accelerators.

* :mod:`.block_swap`: only N transformer blocks resident on the accelerator, the rest streamed from
  page-locked CPU memory into reused device slots, the next block prefetched on a side CUDA stream.
* :mod:`.fp8`: float8 (e4m3) storage of the blocks' Linear layers, multiplied in fp8 where the GPU
  can (``torch._scaled_mm``), dequantised per call elsewhere.
* :mod:`.attention`: attention backend selection (torch SDPA, flash-attn, SageAttention).
* :mod:`.compile`: regional ``torch.compile`` of the repeated blocks.
* :mod:`.offload`: VAE tiling and offloading of the text/image encoders.
* :mod:`.flops`: the arithmetic cost of a transformer forward (the compute floor).
* :mod:`.options`: one :class:`~.options.RuntimeOptions` bundle, its CLI flags, and applying it.

Multi-process (torchrun) sequence parallelism lives in :mod:`worldstereo_core.distributed`.
This package imports nothing heavy at import time; the submodules are imported where used.
"""
