"""One run at a time per run folder: a lock file ``<folder>/.worldstereo.lock``.

:func:`locked_run_folder` is how every task opens its run folder (the CLI, the loop node and so
the API queue all go through the tasks): it creates the lock file with ``O_CREAT | O_EXCL`` and
writes the holder into it (pid, host, start time, command), refuses at once with
:class:`~worldstereo_core.errors.RunFolderLocked` naming the holder when another run has it,
recovers a lock whose process is gone (same host, pid no longer running, or running but started
after the lock was taken), deletes the temporary files that killed writes left behind
(:func:`.atomic.remove_stale_temporaries`), and releases the lock on exit, also on errors and
interrupts. The lock is re-entrant within one thread, so a caller may hold it around a task that
takes it again; another thread of the same process is refused like another process.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import RunFolderLocked
from .atomic import output_folder, remove_stale_temporaries

LOCK_NAME = ".worldstereo.lock"
#: A lock file that cannot be read is taken as left by a crash once it is this old (seconds);
#: a live holder writes its record right after creating the file.
UNREADABLE_GRACE_S = 10.0

_held: dict[Path, list[int]] = {}  # lock files this process holds -> [holding thread, nesting depth]
_held_guard = threading.Lock()


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _is_stale(path: Path, holder: dict | None) -> bool:
    """Whether the lock at ``path`` (holding ``holder``) was left by a process that is gone."""
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot look at another machine's processes
    pid = holder["pid"]
    if pid == os.getpid():
        return path not in _held  # ours only while this process says so
    if not _pid_running(pid):
        return True
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and recorded != now  # the pid was reused


def _describe(holder: dict | None, path: Path) -> str:
    if holder is None:
        return f"a run that is still starting (its lock file {path} has no holder yet)"
    return (f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_holder_record(), fh)
    return True


def acquire(folder: str | os.PathLike) -> Path:
    """Take the lock of ``folder`` (created if missing); returns the lock file path."""
    folder = output_folder(folder, "run folder", create=True)
    path = (folder / LOCK_NAME).resolve()
    me = threading.get_ident()
    with _held_guard:
        if path in _held and _held[path][0] == me:
            _held[path][1] += 1
            return path
        for _ in range(3):
            if _try_create(path):
                _held[path] = [me, 1]
                return path
            holder = _read(path)
            if not _is_stale(path, holder):
                raise RunFolderLocked(
                    f"{folder} is in use by another run: {_describe(holder, path)}. Wait for it to finish, or "
                    f"use another output folder; if that process is gone for good, delete {path}")
            with contextlib.suppress(FileNotFoundError):
                if _read(path) == holder:  # still the stale record, not a fresh lock of another process
                    path.unlink()
        raise RunFolderLocked(f"{folder}: could not take the lock {path} (other runs keep taking it); try again")


def release(path: Path) -> None:
    """Give back a lock taken by :func:`acquire` (the file is removed when the outermost holder leaves)."""
    with _held_guard:
        if path in _held and _held[path][1] > 1:
            _held[path][1] -= 1
            return
        _held.pop(path, None)
        holder = _read(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_run_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, after deleting temporaries of killed writes; yields the folder."""
    path = acquire(folder)
    try:
        if _held[path][1] == 1:
            remove_stale_temporaries(path.parent)
        yield path.parent
    finally:
        release(path)
