"""Saving node results where ComfyUI expects them, and the ``ui`` entries that show them.

Previews go to ComfyUI's temp folder (wiped at start-up), kept results to the output folder.
File names follow ComfyUI's ``<prefix>_<counter:05>_.<ext>`` scheme via
``folder_paths.get_save_image_path``; every file is written atomically and never outside its
base folder: paths are checked on their resolved real paths (a sub-folder that links elsewhere
is refused) before anything is written. The returned entries ``{"filename", "subfolder", "type"}`` are what the frontend
fetches through ``GET /view``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from ..worldstereo_core.constants import FPS
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.atomic import safe_join
from .images import image_to_uint8

Kind = Literal["temp", "output"]


def base_dir(kind: Kind) -> Path:
    """ComfyUI's temp or output folder."""
    import folder_paths

    if kind == "temp":
        return Path(folder_paths.get_temp_directory())
    if kind == "output":
        return Path(folder_paths.get_output_directory())
    raise InputError(f"kind must be 'temp' or 'output', got {kind!r}")


def file_entry(path: str | Path, kind: Kind) -> dict:
    """The ``ui`` entry for a file inside the temp/output folder (``/view`` coordinates)."""
    root = base_dir(kind).resolve()
    path = Path(path).resolve()
    if root not in path.parents:
        raise InputError(f"{path} is not inside ComfyUI's {kind} folder {root}")
    subfolder = path.parent.relative_to(root).as_posix()
    return {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": kind}


def _save_location(filename_prefix: str, kind: Kind, width: int = 0, height: int = 0) -> tuple[str, str, str, int]:
    """(root, folder, name, counter) from ``folder_paths.get_save_image_path``, with the prefix's
    sub-folder checked against the root's real path first (ComfyUI creates a missing folder and
    its own check does not follow links)."""
    import folder_paths

    root = str(base_dir(kind))
    try:
        safe_join(root, os.path.dirname(os.path.normpath(filename_prefix)))
        folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(filename_prefix, root, width, height)
    except Exception as err:  # ComfyUI raises a bare Exception for prefixes escaping the folder
        raise InputError(f"filename_prefix {filename_prefix!r}: {err}") from err
    return root, folder, name, counter


def _inside(root: str, folder: str, name: str) -> Path:
    """``folder/name``, refused unless its real path is inside ``root``'s."""
    return safe_join(root, os.path.relpath(folder, root), name)


def next_paths(filename_prefix: str, kind: Kind, count: int, ext: str, width: int = 0, height: int = 0
               ) -> list[Path]:
    """``count`` fresh file paths ``<prefix>_<NNNNN>_.<ext>`` (sub-folders in the prefix allowed)."""
    root, folder, name, counter = _save_location(filename_prefix, kind, width, height)
    return [_inside(root, folder, f"{name}_{counter + i:05}_.{ext}") for i in range(count)]


def next_folder(filename_prefix: str, kind: Kind = "output") -> Path:
    """A fresh folder path ``<prefix>_<NNNNN>`` (not created); counts like image files do."""
    root, folder, name, counter = _save_location(filename_prefix, kind)
    while True:
        path = _inside(root, folder, f"{name}_{counter:05}")
        if not path.exists():
            return path
        counter += 1


def relative_to_base(path: str | Path, kind: Kind = "output") -> str:
    """``path`` relative to the temp/output folder with '/' separators (what Preview3D expects)."""
    entry = file_entry(path, kind)
    return f"{entry['subfolder']}/{entry['filename']}" if entry["subfolder"] else entry["filename"]


def save_video(image: torch.Tensor, filename_prefix: str = "WorldStereo", kind: Kind = "temp", fps: int = FPS
               ) -> dict:
    """Write an IMAGE batch as one H.264 MP4 (core video writer); return its ``ui`` entry."""
    from ..worldstereo_core.io.video import write_video

    frames = image_to_uint8(image).numpy()
    height, width = frames.shape[1:3]
    (path,) = next_paths(filename_prefix, kind, 1, "mp4", width, height)
    write_video(path, frames, fps=fps)
    return file_entry(path, kind)


def video_ui(image: torch.Tensor, filename_prefix: str = "WorldStereo", kind: Kind = "temp", fps: int = FPS
             ) -> dict:
    """``ui`` dict showing an IMAGE batch as a playing video under the node."""
    return {"images": [save_video(image, filename_prefix, kind, fps)], "animated": (True,)}

