"""What identifies files: their content (:func:`file_digest`) or, for large weights, name, size and
modification time (:func:`file_stamps`). Run folders keep these to tell a resumable run from one
whose inputs changed (:mod:`worldstereo_core.tasks.loop`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def text_digest(text: str) -> str:
    """SHA-256 of a string's UTF-8 bytes (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_stamps(path: str | os.PathLike) -> list[list]:
    """``[name, size, mtime_ns]`` of a file, or of every file under a folder (relative names, sorted;
    hidden files and folders, such as download caches, left out); ``[]`` when absent."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if not path.is_dir():
        return []
    out = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        st = f.stat()
        out.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return out
