"""Atomic writes and safe output paths (worldstereo_core/io/atomic.py)."""
from __future__ import annotations

import os
import stat

import pytest

from worldstereo_core.errors import InputError
from worldstereo_core.io.atomic import atomic_path, safe_join, write_json_atomic


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "data.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "v": 1\n}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json"]


def test_written_file_gets_umask_mode_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "a.json", [1, 2])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("parts", [("..", "x.png"), ("/etc", "passwd"), ("a", "..", "..", "b")])
def test_safe_join_refuses_escapes(tmp_path, parts):
    with pytest.raises(InputError, match="escape"):
        safe_join(tmp_path, *parts)


def test_safe_join_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError):
        safe_join(root, "link", "file.txt")
    assert safe_join(root, "sub", "file.txt") == (root / "sub" / "file.txt").resolve()


_FILE_SIZE_LIMIT = """
import resource, sys
sys.path.insert(0, {repo!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # ulimit -f: writes past 20 kB fail (EFBIG)
from pathlib import Path
import numpy as np
from worldstereo_core.errors import OutputWriteError
from worldstereo_core.io.atomic import write_json_atomic
from worldstereo_core.io.video import write_video
out = Path({out!r})
frames = np.random.default_rng(0).integers(0, 255, (5, 64, 96, 3), dtype=np.uint8)
for name, write in (("video", lambda: write_video(out / "clip.mp4", frames)),
                    ("json", lambda: write_json_atomic(out / "big.json", list(range(10000))))):
    try:
        write()
        print(name, "written")
    except OutputWriteError as exc:
        print(name, "refused:", exc)
"""


def test_file_size_limit_is_a_named_error_and_leaves_nothing(tmp_path):
    """Issue 10 item 5: a full disk / `ulimit -f` gave a raw traceback (or a SIGXFSZ kill)."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT.format(repo=str(REPO), out=str(out))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["video", "json"]
    for line, name in zip(lines, ("clip.mp4", "big.json")):
        assert f"refused: cannot write {out / name}: " in line and "file-size limit" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no partial file, no temporary


def test_full_disk_is_a_named_error_and_keeps_the_previous_file(tmp_path):
    import errno

    from worldstereo_core.errors import OutputWriteError

    target = tmp_path / "state.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(OutputWriteError, match="the disk is full") as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert str(target) in str(err.value) and "choose another output folder" in str(err.value)
    assert target.read_text() == '{\n  "v": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(FileNotFoundError):  # other errors pass through unchanged
        with atomic_path(target):
            raise FileNotFoundError("not about writing")


def test_stale_temporaries_are_recognised_by_name(tmp_path):
    from worldstereo_core.io.atomic import is_temporary, remove_stale_temporaries

    made = []
    for name in ("clip.mp4", "state.json", "cache.npz", "noext"):
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "sub" / name) as tmp:
                made.append(tmp.name)
                raise RuntimeError
    assert all(is_temporary(n) for n in made)
    keep = [".hidden.tmp", "notes.tmp", ".clip.mp4", "clip.abcdefgh.mp4.tmp", ".x.abc.tmp"]
    assert not any(is_temporary(n) for n in keep)
    (tmp_path / "sub" / ".clip.abcd_123.mp4.tmp").write_text("left by a killed write")
    for name in keep:
        (tmp_path / name).write_text("a user's file")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".clip.abcd_123.mp4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(keep)
