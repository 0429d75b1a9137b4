"""Without ComfyUI or Chromium the integration tests skip, except in CI
(WORLDSTEREO_REQUIRE_INTEGRATION=1), where that is a failure."""
from __future__ import annotations

import pytest

from conftest import chromium, comfyui_dir


@pytest.fixture
def nothing_available(monkeypatch, tmp_path):
    for name in ("COMFYUI_DIR", "CHROMIUM", "WORLDSTEREO_REQUIRE_INTEGRATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    return monkeypatch


@pytest.mark.parametrize("lookup", [comfyui_dir, chromium])
def test_missing_tool_skips_locally_and_fails_in_ci(nothing_available, lookup):
    with pytest.raises(pytest.skip.Exception):
        lookup()
    nothing_available.setenv("WORLDSTEREO_REQUIRE_INTEGRATION", "1")
    with pytest.raises(pytest.fail.Exception, match="WORLDSTEREO_REQUIRE_INTEGRATION=1"):
        lookup()


def test_a_folder_without_main_py_is_not_comfyui(nothing_available, tmp_path):
    nothing_available.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="no main.py"):
        comfyui_dir()
    (tmp_path / "main.py").write_text("")
    assert comfyui_dir() == str(tmp_path)
