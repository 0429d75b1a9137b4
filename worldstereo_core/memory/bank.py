"""The 2D memory bank of the multi-trajectory loop (the reference's
``SimpleMemoryBank``).

Each entry is a frame (RGB uint8 H x W x 3), its camera (w2c 4x4, K 3x3 in pixels of the bank's
``width`` x ``height``, the original image size), a name ``<view>/<traj>/<frame:04d>`` and,
optionally, a depth map and a point array. After each trajectory :meth:`MemoryBank.update_memory`
keeps ``align_nframe`` frames chosen by :func:`sample_align_nframe`.

The bank caches the frustum boxes of its entries (:attr:`MemoryBank.frustums`) so retrieval
scores a whole trajectory against the whole bank in one tensor operation.

Persistence (:meth:`MemoryBank.save` / :meth:`MemoryBank.load`): ``<folder>/frames/*.png``
(content-addressed names), optional ``<folder>/extras/*.npy`` and the index
``<folder>/memory_bank.json``, written last and atomically, so an interrupted save leaves the
previous index, and every file it names, intact. A save deletes only files that a save of this
bank wrote: those the previous index names, and those listed in ``.memory_bank.pending.json``,
the journal a save writes before its data files (so files of an interrupted save are found too).
It never deletes through a symbolic link or outside ``folder``, and refuses a non-empty folder
that holds no bank.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..cameras import CameraTrajectory, as_tensor, scale_intrinsics
from ..constants import ALIGN_NFRAME, FRUSTUM_FAR, FRUSTUM_NEAR, MAX_REFERENCE, NFRAME
from ..errors import CheckpointError, InputError, WorldStereoError
from ..io.atomic import atomic_path, safe_join, write_json_atomic
from ..io.images import load_image
from ..io.scene_layout import CAMERAS_FILE, IMAGES_DIR, PANO_BANK, RECONSTRUCTION_INPUT_FNAME, bank_image
from ..progress import ProgressFn, report
from ..geometry.frustums import FrustumSet

INDEX_NAME = "memory_bank.json"
#: Files a save is about to write (removed when the save is complete).
JOURNAL_NAME = ".memory_bank.pending.json"
INDEX_VERSION = 1


def split_n_into_d_parts(n: int, d: int) -> list[int]:
    """``d`` integer parts summing to ``n``: (d - r) x q followed by r x (q + 1), q, r = divmod(n, d)."""
    if d <= 0 or n < 0:
        raise InputError(f"split_n_into_d_parts: need n >= 0 and d > 0, got n={n}, d={d}")
    q, r = divmod(n, d)
    return [q] * (d - r) + [q + 1] * r


def sample_align_nframe(n_frames: int, n_keep: int) -> list[int]:
    """Frames kept from an ``n_frames`` clip: never 0, always the last, larger gaps first.

    Cumulative sum of the reversed :func:`split_n_into_d_parts` (n_frames - 1, n_keep); e.g.
    (21, 8) -> 3, 6, 9, 12, 14, 16, 18, 20.
    """
    if n_keep < 1 or n_keep > n_frames - 1:
        raise InputError(f"align_nframe must be in 1..{n_frames - 1} for a {n_frames}-frame clip, got {n_keep}")
    return np.cumsum(split_n_into_d_parts(n_frames - 1, n_keep)[::-1]).tolist()


def _optional_array(x, what: str) -> np.ndarray | None:
    if x is None:
        return None
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype == object:
        raise InputError(f"{what}: expected a numeric array, got objects")
    return np.ascontiguousarray(arr)


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha1(str((arr.dtype.str, arr.shape)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


class MemoryBank:
    """Frames, cameras and names of everything generated so far (see the module docstring).

    ``frames``, ``fnames``, ``depths``, ``points``, ``w2c`` and ``K`` are for reading; entries
    are added only through :meth:`add` / :meth:`update_memory`, which keep the frustum cache in
    step. Names are unique.
    """

    def __init__(self, width: int, height: int, *, max_reference: int = MAX_REFERENCE,
                 align_nframe: int = ALIGN_NFRAME, nframe: int = NFRAME,
                 near: float = FRUSTUM_NEAR, far: float = FRUSTUM_FAR) -> None:
        if int(width) < 1 or int(height) < 1:
            raise InputError(f"memory bank image size must be positive, got {width}x{height}")
        if max_reference < 1 or align_nframe < 1 or nframe < 2:
            raise InputError("memory bank: max_reference and align_nframe must be >= 1 and nframe >= 2")
        if not 0 < near < far:
            raise InputError(f"memory bank: need 0 < near < far, got near={near}, far={far}")
        self.width, self.height = int(width), int(height)
        self.max_reference, self.align_nframe, self.nframe = int(max_reference), int(align_nframe), int(nframe)
        self.near, self.far = float(near), float(far)
        self.frames: list[np.ndarray] = []
        self.fnames: list[str] = []
        self.depths: list[np.ndarray | None] = []
        self.points: list[np.ndarray | None] = []
        self._w2c = torch.zeros(0, 4, 4, dtype=torch.float64)
        self._K = torch.zeros(0, 3, 3, dtype=torch.float64)
        self._frustums = FrustumSet.empty()

    # ---------------------------------------------------------------------------------- state
    def __len__(self) -> int:
        return len(self.fnames)

    @property
    def w2c(self) -> torch.Tensor:
        """World-to-camera matrices (N, 4, 4), float64."""
        return self._w2c

    @property
    def K(self) -> torch.Tensor:
        """Pixel intrinsics (N, 3, 3) for the bank's width x height, float64."""
        return self._K

    @property
    def frustums(self) -> FrustumSet:
        """Cached frustum boxes and viewing directions of every entry (float32)."""
        return self._frustums

    def config(self) -> dict:
        return {"width": self.width, "height": self.height, "max_reference": self.max_reference,
                "align_nframe": self.align_nframe, "nframe": self.nframe, "near": self.near, "far": self.far}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryBank):
            return NotImplemented

        def same(a, b) -> bool:
            return (a is None) == (b is None) and (a is None or (a.shape == b.shape and np.array_equal(a, b)))

        return (self.config() == other.config() and self.fnames == other.fnames
                and torch.equal(self._w2c, other._w2c) and torch.equal(self._K, other._K)
                and all(same(a, b) for a, b in zip(self.frames, other.frames))
                and all(same(a, b) for a, b in zip(self.depths, other.depths))
                and all(same(a, b) for a, b in zip(self.points, other.points)))

    __hash__ = None  # mutable

    # ---------------------------------------------------------------------------------- adding
    def add(self, frames: Sequence, w2c, K, fnames: Sequence[str], *,
            depths: Sequence | None = None, points: Sequence | None = None) -> None:
        """Append entries: frames (RGB images), w2c (n,4,4), K (n,3,3 or 3,3) at the bank size, names."""
        n = len(fnames)
        w2c_t = as_tensor(w2c, dtype=torch.float64).reshape(-1, 4, 4)
        K_t = as_tensor(K, dtype=torch.float64)
        K_t = K_t.expand(w2c_t.shape[0], 3, 3).clone() if K_t.dim() == 2 else K_t.reshape(-1, 3, 3)
        depths = [None] * n if depths is None else list(depths)
        points = [None] * n if points is None else list(points)
        counts = {"frames": len(frames), "w2c": w2c_t.shape[0], "K": K_t.shape[0],
                  "depths": len(depths), "points": len(points)}
        if any(c != n for c in counts.values()):
            raise InputError(f"memory bank add: {n} names but counts {counts}; give one of each per entry")
        if not (torch.isfinite(w2c_t).all() and torch.isfinite(K_t).all()):
            raise InputError("memory bank add: cameras contain NaN or infinite values")
        for f in fnames:
            if not isinstance(f, str) or not f:
                raise InputError(f"memory bank add: entry names must be non-empty strings, got {f!r}")
        taken, dup = set(self.fnames), []
        for f in fnames:
            if f in taken:
                dup.append(f)
            taken.add(f)
        if dup:
            raise InputError(f"memory bank add: entries {dup[:3]} already exist; each trajectory is "
                             "added once (check has_trajectory before updating a resumed bank)")
        new_frames = [load_image(fr, name=f"memory frame {name}") for fr, name in zip(frames, fnames)]
        new_depths = [_optional_array(x, f"depth of {name}") for x, name in zip(depths, fnames)]
        new_points = [_optional_array(x, f"points of {name}") for x, name in zip(points, fnames)]
        boxes = FrustumSet.from_cameras(w2c_t, K_t, self.width, self.height, self.near, self.far)
        self.frames += new_frames
        self.fnames += list(fnames)
        self.depths += new_depths
        self.points += new_points
        self._w2c = torch.cat([self._w2c, w2c_t])
        self._K = torch.cat([self._K, K_t])
        self._frustums = self._frustums.cat(boxes)

    def update_memory(self, frames: Sequence, w2c, K, view_id: str, traj_id: str, *,
                      k_size: tuple[int, int] | None = None, depths: Sequence | None = None,
                      points: Sequence | None = None) -> list[int]:
        """Keep ``align_nframe`` frames of a generated clip; returns the kept indices.

        ``frames`` is the clip as re-read from disk (N frames), ``w2c``/``K`` its N target cameras.
        ``k_size`` = (height, width) the K are expressed for, when not the bank size (they are
        then rescaled to it). Names are ``<view_id>/<traj_id>/<index:04d>``.
        """
        n = len(frames)
        w2c_t = as_tensor(w2c, dtype=torch.float64).reshape(-1, 4, 4)
        K_t = as_tensor(K, dtype=torch.float64)
        K_t = K_t.expand(w2c_t.shape[0], 3, 3) if K_t.dim() == 2 else K_t.reshape(-1, 3, 3)
        if w2c_t.shape[0] != n or K_t.shape[0] != n:
            raise InputError(
                f"update_memory {view_id}/{traj_id}: {n} frames but {w2c_t.shape[0]} w2c and "
                f"{K_t.shape[0]} K; pass the cameras of exactly the generated frames"
            )
        K_t = self.to_bank_intrinsics(K_t, k_size)
        keep = sample_align_nframe(n, self.align_nframe)
        pick = lambda seq: None if seq is None else [seq[i] for i in keep]  # noqa: E731
        self.add([frames[i] for i in keep], w2c_t[keep], K_t[keep],
                 [f"{view_id}/{traj_id}/{i:04d}" for i in keep], depths=pick(depths), points=pick(points))
        return keep

    def has_trajectory(self, view_id: str, traj_id: str) -> bool:
        """Whether frames of ``<view_id>/<traj_id>`` are already in the bank."""
        prefix = f"{view_id}/{traj_id}/"
        return any(f.startswith(prefix) for f in self.fnames)

    def next_traj_id(self, view_id: str) -> str:
        """The first ``traj<k>`` name not yet used under ``view_id``."""
        k = 0
        while self.has_trajectory(view_id, f"traj{k}"):
            k += 1
        return f"traj{k}"

    def summary(self) -> str:
        """One line: the number of entries and the frame size."""
        return f"{len(self)} entries, {self.width}x{self.height}"

    def to_bank_intrinsics(self, K: torch.Tensor, k_size: tuple[int, int] | None) -> torch.Tensor:
        """``K`` expressed for a (height, width) = ``k_size`` image, rescaled to the bank size."""
        if k_size is None:
            return K
        if len(k_size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in k_size):
            raise InputError(f"k_size must be (height, width) in pixels, got {k_size!r}")
        if tuple(k_size) == (self.height, self.width):
            return K
        return scale_intrinsics(K, tuple(int(v) for v in k_size), (self.height, self.width))

    # ---------------------------------------------------------------------------------- initial banks
    @classmethod
    def panorama(cls, scene: str, keys: Sequence[str], cameras: CameraTrajectory, frames: Sequence,
                 **kwargs) -> "MemoryBank":
        """The 27-view panorama bank: names ``<scene>/pano_bank/<key>``, size of the first frame."""
        if len(keys) != len(cameras) or len(frames) != len(keys):
            raise InputError(f"panorama bank: {len(keys)} keys, {len(cameras)} cameras, {len(frames)} "
                             "frames; give one camera and one image per key")
        first = load_image(frames[0], name=f"{PANO_BANK} image {keys[0]}") if len(frames) else None
        if first is None:
            raise InputError(f"panorama bank: no images; {PANO_BANK}/{IMAGES_DIR} must hold one image per camera")
        bank = cls(first.shape[1], first.shape[0], **kwargs)
        bank.add(frames, cameras.w2c, cameras.K, [f"{scene}/{PANO_BANK}/{k}" for k in keys])
        return bank

    @classmethod
    def reconstruction(cls, image, K, width: int, height: int, **kwargs) -> "MemoryBank":
        """The reconstruction bank: the (working-size) input image, w2c = I, ``K`` for width x height."""
        bank = cls(width, height, **kwargs)
        bank.add([image], torch.eye(4, dtype=torch.float64)[None], as_tensor(K).reshape(1, 3, 3),
                 [RECONSTRUCTION_INPUT_FNAME])
        return bank

    @classmethod
    def from_panorama_folder(cls, scene_dir: str | os.PathLike, **kwargs) -> "MemoryBank":
        """Bank of a panorama scene folder: ``pano_bank/cameras.json`` + ``pano_bank/images/<key>.png``."""
        from ..io.camera_json import bank_keys, load_bank_cameras

        scene_dir = Path(scene_dir)
        cameras_json = scene_dir / PANO_BANK / CAMERAS_FILE
        paths = [scene_dir / PANO_BANK / IMAGES_DIR / bank_image(k) for k in bank_keys(cameras_json)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{scene_dir / PANO_BANK / IMAGES_DIR}: missing {len(missing)} bank image(s) "
                             f"({', '.join(missing[:5])}...); every key of {CAMERAS_FILE} needs <key>.png")
        images = [load_image(p) for p in paths]
        height, width = images[0].shape[:2]  # the bank's K is in pixels of its images
        keys, cams = load_bank_cameras(cameras_json, width=width, height=height)
        return cls.panorama(scene_dir.name, keys, cams, images, **kwargs)

    # ---------------------------------------------------------------------------------- persistence
    def save(self, folder: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
        """Write the bank to ``folder`` (resumable; see the module docstring). Returns the index path."""
        folder = Path(folder)
        owned = self._owned_files(folder)
        entries = [{"fname": self.fnames[i], "w2c": self._w2c[i].tolist(), "K": self._K[i].tolist(),
                    "frame": self._png_name(i, self.frames[i]),
                    **{key: None if arr is None else self._npy_name(i, key, arr)
                       for key, arr in (("depth", self.depths[i]), ("points", self.points[i]))}}
                   for i in range(len(self))]
        wanted = {e[k] for e in entries for k in ("frame", "depth", "points") if e[k]}
        journal = safe_join(folder, JOURNAL_NAME)
        write_json_atomic(journal, sorted(owned | wanted))
        for i, entry in enumerate(entries):
            self._write_png(folder, entry["frame"], self.frames[i])
            for key, arr in (("depth", self.depths[i]), ("points", self.points[i])):
                if arr is not None:
                    self._write_npy(folder, entry[key], arr)
            report(progress, i + 1, len(entries))
        index = {"version": INDEX_VERSION, **self.config(), "entries": entries}
        path = write_json_atomic(safe_join(folder, INDEX_NAME), index, indent=None)
        self._remove_own(folder, owned - wanted)
        journal.unlink()
        return path

    @staticmethod
    def _owned_files(folder: Path) -> set[str]:
        """Data files earlier saves of a bank wrote into ``folder`` (named by its index or journal).

        Refuses a folder that holds other things and no bank, so a save never mixes with them."""
        index, journal = folder / INDEX_NAME, folder / JOURNAL_NAME
        if folder.is_dir() and not index.is_file() and not journal.is_file() and any(folder.iterdir()):
            raise InputError(f"{folder} is not empty and holds no memory bank ({INDEX_NAME} missing); save the bank "
                             "into a new or empty folder")
        owned: set[str] = set()
        try:
            if index.is_file():
                entries = json.loads(index.read_text(encoding="utf-8"))["entries"]
                owned |= {e[k] for e in entries for k in ("frame", "depth", "points") if e.get(k)}
            if journal.is_file():
                owned |= set(json.loads(journal.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder}: the saved memory bank's {index.name} or {journal.name} is damaged "
                                  f"({exc!r}); save into a new folder, or delete this one first") from exc
        return {name for name in owned if isinstance(name, str)}

    @staticmethod
    def _png_name(i: int, frame: np.ndarray) -> str:
        return f"frames/{i:06d}-{_digest(frame)}.png"

    @staticmethod
    def _npy_name(i: int, key: str, arr: np.ndarray) -> str:
        return f"extras/{i:06d}-{key}-{_digest(arr)}.npy"

    @staticmethod
    def _write_png(folder: Path, rel: str, frame: np.ndarray) -> None:
        path = safe_join(folder, rel)
        if not path.is_file():
            with atomic_path(path) as tmp:
                Image.fromarray(frame).save(tmp, format="PNG", compress_level=1)

    @staticmethod
    def _write_npy(folder: Path, rel: str, arr: np.ndarray) -> None:
        path = safe_join(folder, rel)
        if not path.is_file():
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)

    @staticmethod
    def _remove_own(folder: Path, names: set[str]) -> None:
        """Delete files a save of this bank wrote and the index no longer names: plain files only,
        never through a symbolic link, never outside ``folder``."""
        root = folder.resolve()
        for name in sorted(names):
            path = folder / name
            if path.is_symlink() or not path.is_file() or path.parent.resolve() != (root / name).parent:
                continue
            path.unlink()

    @classmethod
    def exists(cls, folder: str | os.PathLike) -> bool:
        """Whether ``folder`` holds a saved bank index."""
        return (Path(folder) / INDEX_NAME).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "MemoryBank":
        """Read a bank written by :meth:`save` (equal to the saved one)."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        if not path.is_file():
            raise InputError(f"{folder}: no memory bank here ({INDEX_NAME} missing); start a new run or "
                             "point to the folder a previous run saved")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if index.get("version") != INDEX_VERSION:
                raise CheckpointError(f"{path}: unsupported memory bank version {index.get('version')!r} "
                                      f"(this build reads {INDEX_VERSION}); start a new run")
            bank = cls(index["width"], index["height"], max_reference=index["max_reference"],
                       align_nframe=index["align_nframe"], nframe=index["nframe"],
                       near=index["near"], far=index["far"])
            entries = index["entries"]
            frames = [cls._read_png(folder, e["frame"]) for e in entries]
            bank.add(frames, [e["w2c"] for e in entries] or torch.zeros(0, 4, 4),
                     [e["K"] for e in entries] or torch.zeros(0, 3, 3), [e["fname"] for e in entries],
                     depths=[cls._read_npy(folder, e["depth"]) for e in entries],
                     points=[cls._read_npy(folder, e["points"]) for e in entries])
        except WorldStereoError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: memory bank index is damaged ({exc!r}); delete the folder "
                                  "to start over") from exc
        return bank

    @staticmethod
    def _read_png(folder: Path, rel: str) -> np.ndarray:
        path = safe_join(folder, rel)
        if not path.is_file():
            raise CheckpointError(f"{folder}: frame file {rel} named by {INDEX_NAME} is missing; the "
                                  "bank folder was modified, delete it to start over")
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB")).copy()
        except (OSError, ValueError, SyntaxError) as exc:
            raise CheckpointError(f"{folder}: frame file {rel} is not a readable PNG ({exc}); the bank folder is "
                                  "damaged, delete it to start over") from exc

    @staticmethod
    def _read_npy(folder: Path, rel: str | None) -> np.ndarray | None:
        if rel is None:
            return None
        path = safe_join(folder, rel)
        if not path.is_file():
            raise CheckpointError(f"{folder}: data file {rel} named by {INDEX_NAME} is missing; delete "
                                  "the folder to start over")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{folder}: data file {rel} is damaged ({exc}); delete the folder to "
                                  "start over") from exc
