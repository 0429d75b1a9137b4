"""WorldMirror (HY-World 2.0) input folder from a memory bank, and the optional reconstruction run.

Export layout (the reference's ``apply_worldmirror``), in ``folder``:

* ``images/<camera_id>.png`` for every bank entry, all of one size (HY-World refuses a folder
  whose images preprocess to different sizes); ``camera_id`` is ``pano-<frame>`` for
  ``pano_bank`` entries and ``<view>-<traj>-<frame>`` otherwise;
* ``cameras.json`` = ``{"num_cameras", "extrinsics": [{"camera_id", "matrix": c2w}],
  "intrinsics": [{"camera_id", "matrix": K}]}`` in bank order;
* ``name_map.json`` = ``{"<view>/<traj>/<frame>" (bank views: "<scene>/pano_bank/<frame>"):
  "0000", ...}`` numbered in the sorted order of camera ids.

Images are resized (bicubic) to one size, by default that of the bank's newest frame (in a loop
run: the working size of the generated clips), and each K is in pixels of its saved image. The
reference instead saves every frame at its own size with the bank K unchanged, which disagrees
for frames saved at the working size and mixes sizes in panorama exports;
``reference_compatible`` reproduces that. ``poses`` replaces the camera of named entries: a
reconstruction's start image is held in the bank at the identity (as in the reference, for
retrieval) but is exported at the scene's true frame-0 pose. The export is skipped when
``cameras.json`` exists; it is written last.

:func:`run_worldmirror` runs HY-World 2.0 on an export when it is installed and checks that it
made its outputs (``results/points.ply``, ``results/camera_params.json``), quoting its last
output lines when not.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from PIL import Image

from ..cameras import as_tensor, invert_rigid, scale_intrinsics
from ..errors import InputError, ToolError
from ..progress import ProgressFn, report
from ..sizes import check_image_size
from .atomic import atomic_path, safe_join, write_json_atomic, write_text_atomic
from .images import resize_bicubic
from .scene_layout import CAMERAS_FILE, IMAGES_DIR, NAME_MAP_FILE, PANO_BANK

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..memory.bank import MemoryBank

log = logging.getLogger(__name__)

#: Flags of the HY-World 2.0 reconstruction command documented by WorldStereo's README.
WORLDMIRROR_FLAGS = (
    "--use_fsdp", "--enable_bf16", "--no_save_normal", "--no_save_gs", "--no_sky_mask",
    "--apply_edge_mask", "--apply_confidence_mask", "--confidence_percentile", "15.0",
    "--compress_pts", "--no_interactive", "--disable_heads", "gs", "points",
)
#: What a successful reconstruction leaves in ``results/``.
WORLDMIRROR_OUTPUTS = ("points.ply", "camera_params.json")
#: The folder of an export the reconstruction writes into.
RESULTS_DIR = "results"
#: ``--target_size`` of the reconstruction (the release's command).
TARGET_SIZE = 832
#: Output lines quoted in the error when WorldMirror fails or makes nothing.
QUOTED_LINES = 15


def _split(fname: str) -> tuple[str, str, str]:
    parts = fname.rsplit("/", 2)
    if len(parts) != 3 or not all(parts):
        raise InputError(f"memory entry name {fname!r} is not of the form <view>/<traj>/<frame>")
    return parts[0], parts[1], parts[2]


def camera_id(fname: str) -> str:
    """WorldMirror camera id of a bank entry name (also the image file stem)."""
    view, traj, frame = _split(fname)
    cid = f"pano-{frame}" if traj == PANO_BANK else f"{view}-{traj}-{frame}"
    if "/" in cid or "\\" in cid or cid in (".", "..") or "\x00" in cid:
        raise InputError(f"memory entry {fname!r} gives camera id {cid!r}, which is not a plain file name; "
                         "view and traj names must not contain path separators")
    return cid


def name_map_key(fname: str, scene: str) -> str:
    """``name_map.json`` key: the entry name, with bank views renamed ``<scene>/pano_bank/<frame>``."""
    view, traj, frame = _split(fname)
    return f"{scene}/{PANO_BANK}/{frame}" if traj == PANO_BANK else fname


@dataclass
class WorldMirrorExport:
    """What :func:`export_worldmirror` did."""

    folder: Path
    camera_ids: list[str] = field(default_factory=list)
    skipped: bool = False


def export_worldmirror(bank: "MemoryBank", folder: str | os.PathLike, scene: str, *,
                       size: tuple[int, int] | None = None, poses: Mapping[str, torch.Tensor] | None = None,
                       reference_compatible: bool = False, progress: ProgressFn | None = None) -> WorldMirrorExport:
    """Write the WorldMirror input folder for ``bank`` (see the module docstring).

    ``size`` (height, width) of every saved image (default: the newest frame's); ``poses``: w2c
    to export instead of the bank's, by entry name."""
    folder = Path(folder)
    if (folder / CAMERAS_FILE).is_file():
        log.info("WorldMirror export: %s already has %s; skipping", folder, CAMERAS_FILE)
        return WorldMirrorExport(folder, skipped=True)
    if len(bank) == 0:
        raise InputError("WorldMirror export: the memory bank is empty; add generated clips first")
    ids = [camera_id(f) for f in bank.fnames]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise InputError(f"WorldMirror export: duplicate camera ids {dup[:5]}; every memory entry needs a unique name")
    unknown = sorted(set(poses or {}) - set(bank.fnames))
    if unknown:
        raise InputError(f"WorldMirror export: poses given for {unknown[:3]}, which are not in the memory bank")
    size = check_image_size(*(size or bank.frames[-1].shape[:2]), "WorldMirror image size")
    w2c = bank.w2c.clone()
    for name, pose in (poses or {}).items():
        w2c[bank.fnames.index(name)] = as_tensor(pose, dtype=torch.float64).reshape(4, 4)
    c2w = invert_rigid(w2c)
    extrinsics, intrinsics = [], []
    for i, (cid, frame) in enumerate(zip(ids, bank.frames)):
        K = bank.K[i]
        if not reference_compatible:
            frame = frame if frame.shape[:2] == size else resize_bicubic(frame, size)
            K = scale_intrinsics(K, (bank.height, bank.width), size)
        with atomic_path(safe_join(folder, IMAGES_DIR, cid + ".png")) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        extrinsics.append({"camera_id": cid, "matrix": c2w[i].tolist()})
        intrinsics.append({"camera_id": cid, "matrix": K.tolist()})
        report(progress, i + 1, len(ids))
    order = sorted(range(len(ids)), key=ids.__getitem__)
    name_map = {name_map_key(bank.fnames[i], scene): f"{rank:04d}" for rank, i in enumerate(order)}
    write_json_atomic(safe_join(folder, NAME_MAP_FILE), name_map)
    write_json_atomic(safe_join(folder, CAMERAS_FILE),
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


def worldmirror_command(folder: str | os.PathLike, *, target_size: int = TARGET_SIZE, nproc: int = 1,
                        python: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """The torchrun command reconstructing ``folder`` (an export) into ``folder/results``."""
    folder = Path(folder)
    if nproc < 1 or target_size < 14:
        raise InputError(f"worldmirror: nproc must be >= 1 and target_size >= 14, got {nproc}, {target_size}")
    return [
        python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "-m", "hyworld2.worldrecon.pipeline",
        "--input_path", str(folder / IMAGES_DIR),
        "--prior_cam_path", str(folder / CAMERAS_FILE),
        "--strict_output_path", str(folder / RESULTS_DIR),
        "--target_size", str(int(target_size)),
        *WORLDMIRROR_FLAGS, *extra_args,
    ]


def run_worldmirror(folder: str | os.PathLike, *, target_size: int = TARGET_SIZE, nproc: int = 1,
                    extra_args: Sequence[str] = (),
                    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> WorldMirrorRun:
    """Run WorldMirror on an export when ``hyworld2`` is installed; skip with a message otherwise.

    Also skipped when ``results/points.ply`` already exists. Raises InputError when the export is
    incomplete, and ToolError (a RuntimeError) quoting the tool's last output lines when it fails
    or exits without writing :data:`WORLDMIRROR_OUTPUTS` (its whole output is in
    ``results/worldmirror.log``).
    """
    folder = Path(folder)
    results = folder / RESULTS_DIR
    if not worldmirror_available():
        msg = ("WorldMirror skipped: the hyworld2 package (HY-World 2.0) is not installed in this "
               "Python environment; install it to reconstruct the exported folder " + str(folder))
        log.info(msg)
        return WorldMirrorRun(False, msg)
    if not (folder / CAMERAS_FILE).is_file() or not (folder / IMAGES_DIR).is_dir():
        raise InputError(f"WorldMirror: {folder} is not a complete export ({IMAGES_DIR}/ and {CAMERAS_FILE}); "
                         "run export_worldmirror first")
    if (results / "points.ply").is_file():
        return WorldMirrorRun(False, f"WorldMirror skipped: {results / 'points.ply'} already exists", results_dir=results)
    cmd = worldmirror_command(folder, target_size=target_size, nproc=nproc, extra_args=extra_args)
    results.mkdir(parents=True, exist_ok=True)
    proc = runner(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    log_path = write_text_atomic(results / "worldmirror.log", proc.stdout or "")
    missing = [name for name in WORLDMIRROR_OUTPUTS if not (results / name).is_file()]
    if proc.returncode != 0 or missing:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-QUOTED_LINES:]) or "(no output)"
        what = (f"failed with exit code {proc.returncode}" if proc.returncode != 0
                else f"exited without writing {', '.join(missing)}")
        raise ToolError(f"WorldMirror {what} for {folder}; its last lines:\n{tail}\n(full output in {log_path}; "
                        f"check the export's {IMAGES_DIR} and {CAMERAS_FILE}, or run the command by hand: "
                        f"{' '.join(cmd)})")
    return WorldMirrorRun(True, "WorldMirror finished", cmd, results, proc.returncode)
