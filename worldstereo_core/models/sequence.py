"""How a forward sees its token sequence when it is split over processes (sequence parallelism).

A :class:`SequenceSplit` cuts full-length token tensors into this process's part (``local``) and
joins the parts of all processes back (``gather``). :data:`WHOLE_SEQUENCE` keeps everything (one
process); :mod:`worldstereo_core.distributed` supplies the real split.
"""
from __future__ import annotations

from typing import Protocol

import torch


class SequenceSplit(Protocol):
    def local(self, t: torch.Tensor, what: str, dim: int = 1) -> torch.Tensor:
        """This process's contiguous part of the full-length ``t`` along ``dim`` (``what`` names it in errors)."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, C] parts of all processes -> [B, N, C] in sequence order."""


class _WholeSequence:
    def local(self, t: torch.Tensor, what: str, dim: int = 1) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t


WHOLE_SEQUENCE: SequenceSplit = _WholeSequence()
