"""Frustum-overlap retrieval of reference frames from the memory bank (the reference's retrieval in
``SimpleMemoryBank``).

Every camera is summarised by the axis-aligned box around its frustum corners (the four image
corners at ray length ``near`` and ``far``) and by its viewing direction (the c2w z axis). The
score of a bank entry for a target camera is the box IoU times the angle factor
``clip(exp(5 (90 - angle) / 180), 0, 1)``, plus 1.0 when a shortcut forces that entry.

All scores are computed in float32, like the reference: exact ties then resolve the same way
(``argmax`` takes the first index; :func:`find_closest_cameras` with ``k > 1`` orders ties as
``torch.topk`` on CPU does). Targets x bank entries are scored in one broadcasted operation;
the bank caches its own boxes (see :class:`~worldstereo_core.memory.bank.MemoryBank`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..cameras import as_tensor
from ..errors import InputError
from ..geometry.frustums import SCORE_DTYPE, FrustumSet
from ..io.images import resize_bicubic
from ..progress import ProgressFn, report

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .bank import MemoryBank
    from .selector import CameraSelector, Selection

#: Score added to an entry forced by a shortcut.
SHORTCUT_BONUS = 1.0
#: Target positions at which ``view*`` traj0/traj1 use their traj2 shortcut.
VIEW_SHORTCUT_POSITIONS = frozenset({1, 2, 3, 5, 7, 9, 13, 17})
#: Target positions at which ``wonder*``/``target*`` traj>0 do NOT use their traj0 shortcut.
GROUP_SHORTCUT_SKIP = frozenset({4, 8, 12, 16})


# --------------------------------------------------------------------------------------------
# Pairwise scores (broadcast: a (T,) x b (N,) -> (T, N))
# --------------------------------------------------------------------------------------------

def box_iou(a: FrustumSet, b: FrustumSet) -> torch.Tensor:
    """IoU of every box of ``a`` with every box of ``b``: inter / (va + vb - inter + 1e-8), (Ta, Nb)."""
    lo = torch.maximum(a.mins[:, None], b.mins[None])
    hi = torch.minimum(a.maxs[:, None], b.maxs[None])
    ext = (hi - lo).clamp_min(0)
    inter = ext[..., 0] * ext[..., 1] * ext[..., 2]
    va = (a.maxs - a.mins).prod(dim=-1)
    vb = (b.maxs - b.mins).prod(dim=-1)
    return inter / (va[:, None] + vb[None] - inter + 1e-8)


def angle_between(a: FrustumSet, b: FrustumSet) -> torch.Tensor:
    """Angle in degrees between the viewing directions of ``a`` and ``b``, (Ta, Nb)."""
    cos = (a.dirs[:, None] * b.dirs[None]).sum(dim=-1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def angle_factor(angle_deg: torch.Tensor) -> torch.Tensor:
    """``clip(exp(5 (90 - angle) / 180), 0, 1)``: 1 below 90 degrees, decaying beyond."""
    return torch.clamp(torch.exp(5 * (90 - angle_deg) / 180), 0, 1)


def overlap_scores(a: FrustumSet, b: FrustumSet, penalty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, angle) of every pair: IoU (times the angle factor when ``penalty``), (Ta, Nb) each."""
    iou = box_iou(a, b)
    angle = angle_between(a, b)
    return (iou * angle_factor(angle) if penalty else iou), angle


def camera_distance(w2c_a, w2c_b) -> torch.Tensor:
    """``|t_a - t_b| + 0.1 |R_a - R_b|_F`` on w2c matrices, broadcast (Ta, Nb), float32."""
    a = as_tensor(w2c_a, dtype=SCORE_DTYPE).reshape(-1, 4, 4)
    b = as_tensor(w2c_b, dtype=SCORE_DTYPE).reshape(-1, 4, 4)
    dt = (a[:, None, :3, 3] - b[None, :, :3, 3]).norm(dim=-1)
    dR = (a[:, None, :3, :3] - b[None, :, :3, :3]).flatten(-2).norm(dim=-1)
    return dt + 0.1 * dR


@dataclass
class Match:
    """Best candidate(s) for one target: positions within the candidate list, scores, angles."""

    index: list[int]
    score: list[float]
    angle: list[float]


def find_closest_cameras(target: FrustumSet, candidates: FrustumSet, *, k: int = 1,
                         penalty: bool = True, shortcut: int | None = None) -> list[Match]:
    """Best ``k`` candidates for every target (one :class:`Match` per target).

    ``shortcut`` is a candidate position that gets +1.0 for every target. k = 1 picks the first
    maximum on ties; k > 1 orders as ``torch.topk`` on CPU (the reference's choice).
    """
    if len(candidates) == 0:
        raise InputError("retrieval: the candidate list is empty; add at least one memory entry first")
    score, angle = overlap_scores(target, candidates, penalty)
    if shortcut is not None:
        score[:, shortcut] += SHORTCUT_BONUS
    if k == 1:
        idx = torch.argmax(score, dim=1, keepdim=True)
    else:
        idx = torch.stack([torch.topk(row, min(k, row.numel())).indices for row in score])
    s, a = torch.gather(score, 1, idx), torch.gather(angle, 1, idx)
    return [Match(i.tolist(), si.tolist(), ai.tolist()) for i, si, ai in zip(idx, s, a)]


def closest_by_distance(w2c_target, w2c_candidates) -> tuple[list[int], list[float]]:
    """The "distance" method: argmin of :func:`camera_distance` per target (index, distance)."""
    d = camera_distance(w2c_target, w2c_candidates)
    idx = torch.argmin(d, dim=1)
    return idx.tolist(), d.gather(1, idx[:, None])[:, 0].tolist()


# --------------------------------------------------------------------------------------------
# Shortcuts and the per-trajectory retrieval
# --------------------------------------------------------------------------------------------

def _traj_number(traj_id: str) -> int | None:
    digits = traj_id[4:] if traj_id.startswith("traj") else ""
    return int(digits) if digits.isdigit() else None


def shortcut_plan(fnames: Sequence[str], view_id: str, traj_id: str, n_targets: int) -> dict[int, int]:
    """Forced bank entries ``{target position i: global bank index}`` for one trajectory.

    * ``wonder*`` / ``target*`` with traj > 0: entries of ``<view>/traj0``, ``[3::2]``, at every
      i except 4, 8, 12, 16;
    * ``view*`` traj0: entries of ``<view>/traj2``, ``[3::2]``; traj1: the first half of them,
      then ``[3::2]``; at i in {1, 2, 3, 5, 7, 9, 13, 17}.

    The entry forced at i is ``cand[floor(i / F * len(cand))]`` with F = ``n_targets``.
    """
    def entries(traj: str) -> list[int]:
        prefix = f"{view_id}/{traj}/"
        return [g for g, f in enumerate(fnames) if f.startswith(prefix)]

    number = _traj_number(traj_id)
    positions = range(1, n_targets)
    if view_id.startswith(("wonder", "target")) and number is not None and number > 0:
        cand = entries("traj0")[3::2]
        positions = [i for i in positions if i not in GROUP_SHORTCUT_SKIP]
    elif view_id.startswith("view") and traj_id in ("traj0", "traj1"):
        src = entries("traj2")
        cand = (src if traj_id == "traj0" else src[: len(src) // 2])[3::2]
        positions = [i for i in positions if i in VIEW_SHORTCUT_POSITIONS]
    else:
        return {}
    if not cand:
        return {}
    return {i: cand[math.floor(i / n_targets * len(cand))] for i in positions}


def retrieval_targets(n_frames: int, nframe: int) -> list[int]:
    """Frames of a trajectory used as retrieval targets: all, or ``[0::4]`` when > ``nframe``."""
    return list(range(0, n_frames, 4)) if n_frames > nframe else list(range(n_frames))


@dataclass
class RetrievalResult:
    """What :func:`retrieve` found for one trajectory.

    ``ref_index`` holds the target positions (0..F-2, i.e. target i - 1) at which each reference
    was first chosen, in order; ``ref_index_dict[k][i] = {"score", "angle_diff"}`` for every
    target i that chose the entry first chosen at k. ``retrieved`` has one global bank index per
    target i = 1..F-1 and ``frames`` the matching bank frames.
    """

    ref_index: torch.Tensor
    ref_w2cs: torch.Tensor
    retrieved: list[int]
    ref_index_dict: dict[int, dict[int, dict[str, float]]]
    frames: list[np.ndarray]
    target_frames: list[int]
    selection: "Selection | None" = field(default=None)

    def ref_index_json(self) -> dict[str, dict[str, dict[str, float]]]:
        """``ref_index_dict`` as the release writes it to ``memory_inputs/<model>_ref_index.json``:
        ``{"<k>": {"<i>": {"score": s, "angle_diff": a}}}``, k in first-choice order, i ascending."""
        return {str(k): {str(i): dict(v) for i, v in d.items()} for k, d in self.ref_index_dict.items()}

    def reference_frames(self, height: int, width: int) -> np.ndarray:
        """The references' frames (R, height, width, 3) uint8, bicubic-resized, in ``ref_index`` order."""
        return np.stack([resize_bicubic(self.frames[k], (height, width)) for k in self.ref_index.tolist()])

    @property
    def ref_global_indices(self) -> list[int]:
        """Global bank index of each reference, aligned with ``ref_index``."""
        return [self.retrieved[k] for k in self.ref_index.tolist()]


def assign_references(score: torch.Tensor, angle: torch.Tensor, candidates: Sequence[int],
                      forced: dict[int, int]) -> tuple[list[int], list[float], list[float]]:
    """Best candidate per target: (global indices, scores, angles), row r being target i = r + 1.

    ``score``/``angle`` (F-1, C) belong to the columns ``candidates`` (global bank indices);
    ``forced`` ({i: global index}, see :func:`shortcut_plan`) adds the shortcut bonus first.
    Ties go to the first column.
    """
    if forced:
        score = score.clone()
        column = {g: c for c, g in reversed(list(enumerate(candidates)))}  # first column of each entry
        for i, g in forced.items():
            score[i - 1, column[g]] += SHORTCUT_BONUS
    best = torch.argmax(score, dim=1)
    picked = [candidates[c] for c in best.tolist()]
    rows = torch.arange(score.shape[0])
    return picked, score[rows, best].tolist(), angle[rows, best].tolist()


def retrieve(bank: "MemoryBank", target_w2c, target_K, view_id: str, traj_id: str, *,
             k_size: tuple[int, int] | None = None, selector: "CameraSelector | None" = None,
             progress: ProgressFn | None = None) -> RetrievalResult:
    """Reference frames of ``bank`` for one target trajectory.

    ``target_w2c`` (N,4,4) / ``target_K`` (N,3,3 or 3,3) are the trajectory's cameras; ``k_size``
    = (height, width) the K are expressed for when not the bank's image size. When more than
    ``bank.max_reference`` distinct entries are chosen, ``selector`` (a
    :class:`~worldstereo_core.memory.selector.CameraSelector`; a camera-only one if None) keeps
    ``max_reference`` of the retrieved pairs and retrieval is redone on those without shortcuts.
    ``progress(done, 3)`` is called after scoring, selection and filing.
    """
    if len(bank) == 0:
        raise InputError("memory bank is empty; initialise it (panorama or reconstruction) before retrieval")
    w2c = as_tensor(target_w2c, dtype=torch.float64).reshape(-1, 4, 4)
    K = as_tensor(target_K, dtype=torch.float64)
    K = K.expand(w2c.shape[0], 3, 3) if K.dim() == 2 else K.reshape(-1, 3, 3)
    if K.shape[0] != w2c.shape[0]:
        raise InputError(f"target cameras: {w2c.shape[0]} w2c but {K.shape[0]} intrinsics; pass one K per frame")
    K = bank.to_bank_intrinsics(K, k_size)
    targets = retrieval_targets(w2c.shape[0], bank.nframe)
    n = len(targets)
    if n < 2:
        raise InputError(f"target trajectory {view_id}/{traj_id} has {w2c.shape[0]} frame(s); need at least 2")

    tf = FrustumSet.from_cameras(w2c[targets][1:], K[targets][1:], bank.width, bank.height, bank.near, bank.far)
    everything = list(range(len(bank)))
    score, angle = overlap_scores(tf, bank.frustums)
    forced = shortcut_plan(bank.fnames, view_id, traj_id, n)
    picked, best, best_angle = assign_references(score, angle, everything, forced)
    report(progress, 1, 3)

    selection = None
    if len(set(picked)) > bank.max_reference:
        if selector is None:
            from .selector import CameraSelector

            selector = CameraSelector()
        selection = selector.select(bank.w2c[picked], [bank.frames[g] for g in picked], bank.max_reference)
        restricted = [picked[j] for j in selection.indices]
        cols = torch.as_tensor(restricted, dtype=torch.long)
        picked, best, best_angle = assign_references(score[:, cols], angle[:, cols], restricted, {})
    report(progress, 2, 3)

    ref_index_dict: dict[int, dict[int, dict[str, float]]] = {}
    first_pos: dict[int, int] = {}
    for pos, g in enumerate(picked):
        k = first_pos.setdefault(g, pos)
        ref_index_dict.setdefault(k, {})[pos + 1] = {"score": best[pos], "angle_diff": best_angle[pos]}
    ref_index = torch.tensor(list(ref_index_dict), dtype=torch.long)
    ref_w2cs = bank.w2c[[picked[k] for k in ref_index.tolist()]]
    report(progress, 3, 3)
    return RetrievalResult(
        ref_index=ref_index,
        ref_w2cs=ref_w2cs,
        retrieved=picked,
        ref_index_dict=ref_index_dict,
        frames=[bank.frames[g] for g in picked],
        target_frames=targets,
        selection=selection,
    )
