"""Which trajectories a multi-trajectory run generates, in which order, from what (the
reference's ``run_multi_traj``).

* reconstruction: ``renders/traj_eloop``, ``traj_up``, ``traj_right``, ``traj_left``; start image
  ``image.png``; prompt ``prompt.json["prompt"]``.
* panorama: every ``view*`` group (skipping those whose ``valid_analysis.json`` says other than
  "yes") as traj2, traj0, traj1; then ``target*/traj*``; then ``reconstruct*/traj0``; then
  ``wonder*/traj*``; finally the iterative ``reconstruct*/traj1``, which starts from the last
  generated frame of its ``traj0``. Groups sort by name (hyphens read as underscores, which is how
  they are named in outputs and memory), trajectories by name. Start image
  ``<group>/start_frame.png``; prompt ``<group>/<traj>/traj_caption.json["prompt"]``.

Input folders are only read; the renamed group id is used for everything the run writes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.json_files import read_json_object
from ..io.scene_layout import (CAMERA_FILE, GROUP_START_IMAGE, MASK_VIDEO, PANO_BANK, PROMPT_FILE, RECONSTRUCTION_ORDER,
                               RECONSTRUCTION_VIEW, RENDER_VIDEO, START_IMAGE, TRAJ_CAPTION, VALID_ANALYSIS)

log = logging.getLogger(__name__)

VIEW_ORDER = ("traj2", "traj0", "traj1")
#: Groups whose ``traj1`` is iterative: it starts from the last generated frame of ``traj0``.
ITERATIVE_GROUP_PREFIX = "reconstruct_"
TASK_TYPES = ("reconstruction", "panorama")


@dataclass(frozen=True)
class TrajectoryJob:
    """One trajectory of a multi-trajectory run.

    ``view_id`` is the group name used in outputs and memory names (hyphens -> underscores);
    ``group_dir`` the input folder. Exactly one of ``start_image`` (a file) and ``start_from``
    (the (view_id, traj_id) whose last generated frame is the start image) is set.
    """

    view_id: str
    traj_id: str
    group_dir: Path
    camera_path: Path
    start_image: Path | None
    start_from: tuple[str, str] | None
    prompt: str
    is_iterative: bool = False

    @property
    def traj_dir(self) -> Path:
        return self.group_dir / self.traj_id

    @property
    def render_path(self) -> Path:
        return self.traj_dir / RENDER_VIDEO

    @property
    def mask_path(self) -> Path:
        return self.traj_dir / MASK_VIDEO

    @property
    def start_source(self) -> str:
        """Human-readable start image source."""
        if self.start_image is not None:
            return str(self.start_image)
        return f"last frame of {self.start_from[0]}/{self.start_from[1]}"


def group_id(name: str) -> str:
    """Group folder name as used on output: hyphens become underscores."""
    return name.replace("-", "_")


def is_iterative(view_id: str, traj_id: str) -> bool:
    """Whether a trajectory is one of the release's iterative ones (``reconstruct_*/traj1``: start
    image = last generated frame of ``traj0``, hole-mask frame 0 cleared). ``view_id`` as on output."""
    return view_id.startswith(ITERATIVE_GROUP_PREFIX) and traj_id == "traj1"


def read_prompt(path: str | os.PathLike, what: str, key: str = "prompt") -> str:
    """The string field ``key`` of a caption file (prompt.json, traj_caption.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found; every {what} needs it ({{\"{key}\": ...}})")
    value = read_json_object(path, what).get(key)
    if not isinstance(value, str):
        raise InputError(f"{path}: needs a string field {key!r}, got {type(value).__name__}")
    return value


def _check_scene(scene_dir: str | os.PathLike) -> Path:
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise InputError(f"scene folder {scene_dir} not found; check the path")
    return scene_dir


def recon_sort_trajs(scene_dir: str | os.PathLike) -> list[TrajectoryJob]:
    """The reconstruction trajectories present under ``renders/``, in eloop, up, right, left order."""
    scene_dir = _check_scene(scene_dir)
    image = scene_dir / START_IMAGE
    if not image.is_file():
        raise InputError(f"{image} not found; a reconstruction scene needs its input {START_IMAGE}")
    prompt = read_prompt(scene_dir / PROMPT_FILE, "reconstruction scene")
    group = scene_dir / RECONSTRUCTION_VIEW
    jobs = [TrajectoryJob(RECONSTRUCTION_VIEW, t, group, group / t / CAMERA_FILE, image, None, prompt)
            for t in RECONSTRUCTION_ORDER if (group / t / CAMERA_FILE).is_file()]
    if not jobs:
        raise InputError(f"{group}: no trajectories found; expected {', '.join(RECONSTRUCTION_ORDER)} "
                         f"folders with {CAMERA_FILE}")
    return jobs


def is_valid_view(group: Path) -> bool:
    """False only when ``valid_analysis.json`` exists and its "valid" is not "yes"."""
    path = group / VALID_ANALYSIS
    if not path.is_file():
        return True
    data = read_json_object(path, "view analysis")
    if "valid" not in data:
        raise InputError(f"{path}: missing field 'valid'")
    return data["valid"] == "yes"


def _trajs(group: Path) -> list[str]:
    return sorted(p.name for p in group.iterdir()
                  if p.is_dir() and p.name.startswith("traj") and (p / CAMERA_FILE).is_file())


def sort_trajs(scene_dir: str | os.PathLike) -> list[TrajectoryJob]:
    """The panorama trajectories of ``scene_dir`` in generation order (module docstring)."""
    scene_dir = _check_scene(scene_dir)
    groups: dict[str, Path] = {}
    for p in sorted(scene_dir.iterdir()):
        if not p.is_dir() or p.name == PANO_BANK:
            continue
        gid = group_id(p.name)
        if gid in groups:
            raise InputError(f"{scene_dir}: groups {groups[gid].name!r} and {p.name!r} both map to {gid!r}; rename one")
        groups[gid] = p

    def job(gid: str, traj: str, start_from: tuple[str, str] | None = None) -> TrajectoryJob:
        group = groups[gid]
        start = None if start_from else group / GROUP_START_IMAGE
        if start is not None and not start.is_file():
            raise InputError(f"{start} not found; every panorama group needs its start_frame.png")
        return TrajectoryJob(gid, traj, group, group / traj / CAMERA_FILE, start, start_from,
                             read_prompt(group / traj / TRAJ_CAPTION, "panorama trajectory"),
                             is_iterative=start_from is not None)

    def of(prefix: str) -> list[str]:
        return sorted(g for g in groups if g.startswith(prefix))

    jobs = []
    for gid in of("view"):
        if not is_valid_view(groups[gid]):
            log.info("panorama: skipping %s (valid_analysis.json is not 'yes')", gid)
            continue
        present = _trajs(groups[gid])
        jobs += [job(gid, t) for t in VIEW_ORDER if t in present]
    jobs += [job(gid, t) for gid in of("target") for t in _trajs(groups[gid])]
    recon = [(gid, _trajs(groups[gid])) for gid in of("reconstruct")]
    jobs += [job(gid, "traj0") for gid, present in recon if "traj0" in present]
    jobs += [job(gid, t) for gid in of("wonder") for t in _trajs(groups[gid])]
    for gid, present in recon:
        if "traj1" not in present:
            continue
        if not is_iterative(gid, "traj1"):
            jobs.append(job(gid, "traj1"))
            continue
        if "traj0" not in present:
            raise InputError(f"{groups[gid] / 'traj1'} starts from the last frame of traj0, but "
                             f"{groups[gid] / 'traj0' / CAMERA_FILE} is missing")
        jobs.append(job(gid, "traj1", start_from=(gid, "traj0")))
    known = ("view", "target", "reconstruct", "wonder")
    for gid in groups:
        if not gid.startswith(known):
            log.info("panorama: ignoring folder %s (not a view*/target*/reconstruct*/wonder* group)", gid)
    if not jobs:
        raise InputError(f"{scene_dir}: no panorama trajectories found (expected view*/target*/reconstruct*/"
                         f"wonder* groups with traj*/{CAMERA_FILE})")
    return jobs


def scene_task(scene_dir: str | os.PathLike) -> str:
    """The task of a scene folder: ``"panorama"`` when it has a ``pano_bank/``, else ``"reconstruction"``."""
    return "panorama" if (Path(scene_dir) / PANO_BANK).is_dir() else "reconstruction"
