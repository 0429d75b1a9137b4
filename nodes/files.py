"""Files and folders the nodes read from ComfyUI's ``input/`` folder (and write under ``output/``).

Combos list names relative to ``input/`` (``/`` separators); :func:`input_path` resolves a name
and refuses anything outside the folder; :func:`fingerprint` is what ``IS_CHANGED`` returns for a
file or folder (size and modification time of every file involved), so a node re-runs when the
data on disk changes. :func:`validation_message` turns a bad name into the text that
``VALIDATE_INPUTS`` returns.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from ..worldstereo_core.errors import InputError, WorldStereoError
from ..worldstereo_core.io.atomic import safe_join

#: Shown in a combo when nothing suitable is in input/ yet (keeps the widget valid).
NONE = "(none found in input/)"


def input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def _walk(root: Path):
    if not root.is_dir():
        return
    for dirpath, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        yield Path(dirpath), sorted(files)


def input_files(extensions: Iterable[str]) -> list[str]:
    """Files under input/ (any depth) whose name ends in one of ``extensions`` (case-insensitive)."""
    exts = tuple(e.lower() for e in extensions)
    root = input_dir()
    found = [(d / f).relative_to(root).as_posix() for d, files in _walk(root) for f in files
             if f.lower().endswith(exts) and not f.startswith(".")]
    return sorted(found) or [NONE]


def input_folders(*required: str, any_of: Iterable[str] = ()) -> list[str]:
    """Sub-folders of input/ holding every file/folder in ``required`` and at least one of ``any_of``."""
    alternatives = tuple(any_of)
    root = input_dir()
    found = []
    for d, _files in _walk(root):
        if d == root:
            continue
        if all((d / r).exists() for r in required) and (not alternatives or any((d / a).exists() for a in alternatives)):
            found.append(d.relative_to(root).as_posix())
    return sorted(found) or [NONE]


def input_path(name: str, what: str, *, folder: bool = False) -> Path:
    """Full path of ``name`` inside input/; InputError when empty, escaping or missing."""
    if not isinstance(name, str) or not name.strip() or name == NONE:
        raise InputError(f"{what}: no file chosen; put one into ComfyUI's input folder ({input_dir()}) "
                         "and refresh the node list (press R)")
    path = safe_join(input_dir(), name)
    if folder and not path.is_dir():
        raise InputError(f"{what}: folder {name!r} not found in {input_dir()}")
    if not folder and not path.is_file():
        raise InputError(f"{what}: file {name!r} not found in {input_dir()}")
    return path


def output_folder(name: str, what: str) -> Path:
    """A folder inside output/ named by the user (sub-folders allowed, no escape); not created."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{what}: give a folder name (it is created inside ComfyUI's output folder)")
    return safe_join(output_dir(), name.strip())


def fingerprint(path: Optional[Path]) -> str:
    """Size and mtime of a file, or of every file in a folder (recursively); '' when absent."""
    if path is None or not path.exists():
        return ""
    files = [path] if path.is_file() else [d / f for d, fs in _walk(path) for f in fs]
    parts = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        parts.append(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def fingerprint_of(fn, *args, **kwargs) -> str:
    """:func:`fingerprint` of the path ``fn(*args, **kwargs)`` names; '' when that raises InputError
    (what IS_CHANGED returns for an input that validation will reject)."""
    try:
        return fingerprint(fn(*args, **kwargs))
    except InputError:
        return ""


def validation_message(fn, *args, **kwargs):
    """``True`` when ``fn(*args, **kwargs)`` succeeds, else the error's text (what VALIDATE_INPUTS
    returns; ComfyUI shows it on the node and rejects the prompt)."""
    try:
        fn(*args, **kwargs)
    except WorldStereoError as err:
        return str(err)
    return True
