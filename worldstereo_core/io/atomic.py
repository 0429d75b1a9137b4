"""Atomic file writes and safe output paths.

Everything the pack writes goes through :func:`atomic_path` (write to a temporary sibling
``.<stem>.<8 random chars><suffix>.tmp``, then ``os.replace``), so an interrupted run never leaves
a half-written file that is later read back. A write that fails for want of space, a file-size
limit or permissions raises :class:`~worldstereo_core.errors.OutputWriteError` naming the file and
the fix, and its temporary file is removed. A process killed mid-write leaves its temporary
behind; :func:`remove_stale_temporaries` deletes those when the run folder is opened again.
:func:`safe_join` keeps output paths inside the chosen output folder, checked on the resolved
real paths before anything is written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import InputError, OutputWriteError

#: Names :func:`atomic_path` gives its temporary files (mkstemp's 8 random characters).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[^.]+)?\.tmp$")

_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than this system allows (a file-size limit such as `ulimit -f`)",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of its folder path is a file, not a folder",
    errno.EEXIST: "a part of its folder path is a file, not a folder",
}


def _default_file_mode() -> int:
    """The mode ``open(..., "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_error(path: Path, exc: OSError) -> OutputWriteError | None:
    """The named error for a failed write of ``path``, or None for errors that are not about writing."""
    reason = _WRITE_ERRORS.get(exc.errno)
    if reason is None:
        return None
    error = OutputWriteError(f"cannot write {path}: {reason} ({exc.strerror or exc}); free space, raise the limit "
                             "or choose another output folder and run again (nothing partial was left behind; "
                             "finished outputs are kept)")
    error.errno = exc.errno
    return error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    except OSError as exc:
        raise (_write_error(path, exc) or exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_file_mode())  # mkstemp makes 0600; give the usual umask mode
        os.replace(tmp_path, path)
    except OSError as exc:
        named = _write_error(path, exc)
        if named is None:
            raise
        raise named from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary names."""
    return bool(_TEMPORARY.match(name))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted writes under ``folder`` (links are not followed).

    Call it only while no other process writes there (under the run folder's lock)."""
    removed = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath, name)
            if is_temporary(name) and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse any result outside ``root`` (.., absolute, links).

    Both sides are resolved first (symbolic links followed), so a sub-folder that links elsewhere
    is refused before anything is written there."""
    root_path = Path(root).resolve()
    candidate = root_path.joinpath(*parts).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise InputError(
            f"output path {'/'.join(parts)!r} would escape the output folder {root_path} (through '..', an "
            "absolute path or a symbolic link); use a relative name inside it"
        )
    return candidate


def plain_name(name: str, what: str = "name") -> str:
    """``name`` when it is one plain folder or file name (no separator, not '.' or '..')."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise InputError(f"{what} must be a plain folder name, got {name!r}")
    return name


def output_folder(path: str | os.PathLike, what: str = "output folder", *, create: bool = False) -> Path:
    """``path`` as an output folder, created when ``create``; refused when it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder; give a folder path (it is created if missing)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (_write_error(path, exc) or exc) from exc
    return path
