"""The run-folder lock (worldstereo_core/io/run_lock.py): one run per folder, the holder named,
locks of dead processes recovered, released on errors, re-entrant within a thread only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from worldstereo_core.errors import RunFolderLocked
from worldstereo_core.io import run_lock
from worldstereo_core.io.run_lock import LOCK_NAME, acquire, locked_run_folder, release


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))


def test_lock_file_names_this_process_and_goes_away(tmp_path):
    with locked_run_folder(tmp_path / "run") as folder:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_released_on_errors_and_reentrant_in_one_thread(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with locked_run_folder(tmp_path):
            with locked_run_folder(tmp_path):  # the same thread may take it again
                assert (tmp_path / LOCK_NAME).exists()
            assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_thread_is_refused(tmp_path):
    seen = []
    with locked_run_folder(tmp_path):
        def other():
            try:
                acquire(tmp_path)
            except RunFolderLocked as exc:
                seen.append(str(exc))
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen and f"pid {os.getpid()}" in seen[0]


def test_live_holder_refused_dead_holder_recovered(tmp_path):
    _write_lock(tmp_path, pid=os.getppid(), command="python -m worldstereo_core multi-traj scene")
    with pytest.raises(RunFolderLocked) as err:
        acquire(tmp_path)
    message = str(err.value)
    assert f"pid {os.getppid()} on host {socket.gethostname()}, started earlier" in message
    assert "multi-traj scene" in message and str(tmp_path / LOCK_NAME) in message
    _write_lock(tmp_path, pid=_dead_pid())
    path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)


def test_reused_pid_and_other_hosts(tmp_path):
    # the recorded pid runs, but it is another process than the one that took the lock
    _write_lock(tmp_path, pid=os.getppid(), process_start=-1)
    if run_lock._process_start(os.getppid()) is None:
        pytest.skip("process start times are not readable here (/proc)")
    release(acquire(tmp_path))
    # a lock taken on another machine cannot be checked: refused
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunFolderLocked, match="host elsewhere"):
        acquire(tmp_path)


def test_unreadable_lock_is_waited_for_then_recovered(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a holder between creating and writing the file
    with pytest.raises(RunFolderLocked, match="still starting"):
        acquire(tmp_path)
    old = time.time() - 2 * run_lock.UNREADABLE_GRACE_S
    os.utime(tmp_path / LOCK_NAME, (old, old))
    release(acquire(tmp_path))


def test_run_folder_that_is_a_file_is_a_named_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(Exception, match="is a file, not a folder"):
        acquire(tmp_path / "out")


def test_processes_race_for_one_lock(tmp_path):
    """Several processes started together: exactly one holds the lock (until its stdin closes), the
    others are refused."""
    code = ("import sys; sys.path.insert(0, {repo!r}); from worldstereo_core.io.run_lock import acquire\n"
            "from worldstereo_core.errors import RunFolderLocked\n"
            "try:\n    acquire({folder!r}); print('held', flush=True); sys.stdin.read()\n"
            "except RunFolderLocked:\n    print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(repo=str(REPO), folder=str(tmp_path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)
    assert outcomes == ["held", "refused", "refused", "refused"]
