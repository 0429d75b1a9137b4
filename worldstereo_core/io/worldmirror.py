"""WorldMirror (HY-World 2.0) input folder from a memory bank, and the optional reconstruction run.

Export layout (spec/geometry.md §9.1), in ``folder``:

* ``images/<camera_id>.png`` for every bank entry; ``camera_id`` is ``pano-<frame>`` for
  ``pano_bank`` entries and ``<view>-<traj>-<frame>`` otherwise;
* ``cameras.json`` = ``{"num_cameras", "extrinsics": [{"camera_id", "matrix": c2w}],
  "intrinsics": [{"camera_id", "matrix": K}]}`` in bank order;
* ``name_map.json`` = ``{"<view>/<traj>/<frame>" (bank views: "<scene>/pano_bank/<frame>"):
  "0000", ...}`` numbered in the sorted order of camera ids.

K is rescaled to each saved image's size, so K and image always agree (the reference writes the
bank K unchanged, which disagrees for frames saved at the working size; ``reference_compatible``
reproduces that). The export is skipped when ``cameras.json`` exists; it is written last.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from PIL import Image

from ..cameras import invert_rigid, scale_intrinsics
from ..errors import InputError
from ..progress import ProgressFn, report
from .atomic import atomic_path, safe_join, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..memory.bank import MemoryBank

log = logging.getLogger(__name__)

PANO_TRAJ = "pano_bank"
#: Flags of the HY-World 2.0 reconstruction command documented by WorldStereo (§9.2).
WORLDMIRROR_FLAGS = (
    "--use_fsdp", "--enable_bf16", "--no_save_normal", "--no_save_gs", "--no_sky_mask",
    "--apply_edge_mask", "--apply_confidence_mask", "--confidence_percentile", "15.0",
    "--compress_pts", "--no_interactive", "--disable_heads", "gs", "points",
)


def _split(fname: str) -> tuple[str, str, str]:
    parts = fname.rsplit("/", 2)
    if len(parts) != 3 or not all(parts):
        raise InputError(f"memory entry name {fname!r} is not of the form <view>/<traj>/<frame>")
    return parts[0], parts[1], parts[2]


def camera_id(fname: str) -> str:
    """WorldMirror camera id of a bank entry name (also the image file stem)."""
    view, traj, frame = _split(fname)
    cid = f"pano-{frame}" if traj == PANO_TRAJ else f"{view}-{traj}-{frame}"
    if "/" in cid or "\\" in cid or cid in (".", "..") or "\x00" in cid:
        raise InputError(f"memory entry {fname!r} gives camera id {cid!r}, which is not a plain file name; "
                         "view and traj names must not contain path separators")
    return cid


def name_map_key(fname: str, scene: str) -> str:
    """``name_map.json`` key: the entry name, with bank views renamed ``<scene>/pano_bank/<frame>``."""
    view, traj, frame = _split(fname)
    return f"{scene}/{PANO_TRAJ}/{frame}" if traj == PANO_TRAJ else fname


@dataclass
class WorldMirrorExport:
    """What :func:`export_worldmirror` did."""

    folder: Path
    camera_ids: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def images_dir(self) -> Path:
        return self.folder / "images"

    @property
    def cameras_path(self) -> Path:
        return self.folder / "cameras.json"


def export_worldmirror(bank: "MemoryBank", folder: str | os.PathLike, scene: str, *,
                       reference_compatible: bool = False, progress: ProgressFn | None = None) -> WorldMirrorExport:
    """Write the WorldMirror input folder for ``bank`` (see the module docstring)."""
    folder = Path(folder)
    if (folder / "cameras.json").is_file():
        log.info("WorldMirror export: %s already has cameras.json; skipping", folder)
        return WorldMirrorExport(folder, skipped=True)
    ids = [camera_id(f) for f in bank.fnames]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise InputError(f"WorldMirror export: duplicate camera ids {dup[:5]}; every memory entry needs a unique name")
    c2w = invert_rigid(bank.w2c)
    extrinsics, intrinsics = [], []
    for i, (cid, frame) in enumerate(zip(ids, bank.frames)):
        with atomic_path(safe_join(folder, "images", cid + ".png")) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        K = bank.K[i]
        if not reference_compatible:
            K = scale_intrinsics(K, (bank.height, bank.width), frame.shape[:2])
        extrinsics.append({"camera_id": cid, "matrix": c2w[i].tolist()})
        intrinsics.append({"camera_id": cid, "matrix": K.tolist()})
        report(progress, i + 1, len(ids))
    order = sorted(range(len(ids)), key=ids.__getitem__)
    name_map = {name_map_key(bank.fnames[i], scene): f"{rank:04d}" for rank, i in enumerate(order)}
    write_json_atomic(safe_join(folder, "name_map.json"), name_map)
    write_json_atomic(safe_join(folder, "cameras.json"),
                      {"num_cameras": len(ids), "extrinsics": extrinsics, "intrinsics": intrinsics})
    return WorldMirrorExport(folder, ids)


# --------------------------------------------------------------------------------------------
# Running HY-World 2.0 WorldMirror (optional)
# --------------------------------------------------------------------------------------------

@dataclass
class WorldMirrorRun:
    """Outcome of :func:`run_worldmirror`: ``ran`` is False when it was skipped (see ``message``)."""

    ran: bool
    message: str
    command: list[str] = field(default_factory=list)
    results_dir: Path | None = None
    returncode: int | None = None


def worldmirror_available() -> bool:
    """Whether the ``hyworld2`` package is importable."""
    return importlib.util.find_spec("hyworld2") is not None


def worldmirror_command(folder: str | os.PathLike, *, target_size: int = 832, nproc: int = 1,
                        python: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """The torchrun command reconstructing ``folder`` (an export) into ``folder/results`` (§9.2)."""
    folder = Path(folder)
    if nproc < 1 or target_size < 14:
        raise InputError(f"worldmirror: nproc must be >= 1 and target_size >= 14, got {nproc}, {target_size}")
    return [
        python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "-m", "hyworld2.worldrecon.pipeline",
        "--input_path", str(folder / "images"),
        "--prior_cam_path", str(folder / "cameras.json"),
        "--strict_output_path", str(folder / "results"),
        "--target_size", str(int(target_size)),
        *WORLDMIRROR_FLAGS, *extra_args,
    ]


def run_worldmirror(folder: str | os.PathLike, *, target_size: int = 832, nproc: int = 1,
                    extra_args: Sequence[str] = (),
                    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> WorldMirrorRun:
    """Run WorldMirror on an export when ``hyworld2`` is installed; skip with a message otherwise.

    Also skipped when ``results/points.ply`` already exists. Raises InputError when the export
    is incomplete and RuntimeError when the command fails (its output is in ``results/worldmirror.log``).
    """
    folder = Path(folder)
    results = folder / "results"
    if not worldmirror_available():
        msg = ("WorldMirror skipped: the hyworld2 package (HY-World 2.0) is not installed in this "
               "Python environment; install it to reconstruct the exported folder " + str(folder))
        log.info(msg)
        return WorldMirrorRun(False, msg)
    if not (folder / "cameras.json").is_file() or not (folder / "images").is_dir():
        raise InputError(f"WorldMirror: {folder} is not a complete export (images/ and cameras.json); "
                         "run export_worldmirror first")
    if (results / "points.ply").is_file():
        return WorldMirrorRun(False, f"WorldMirror skipped: {results / 'points.ply'} already exists", results_dir=results)
    cmd = worldmirror_command(folder, target_size=target_size, nproc=nproc, extra_args=extra_args)
    results.mkdir(parents=True, exist_ok=True)
    proc = runner(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    (results / "worldmirror.log").write_text(proc.stdout or "", encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"WorldMirror failed with exit code {proc.returncode}; see {results / 'worldmirror.log'}")
    return WorldMirrorRun(True, "WorldMirror finished", cmd, results, proc.returncode)
