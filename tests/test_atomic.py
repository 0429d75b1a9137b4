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
