"""Shared test configuration: fixture/example roots, ComfyUI/Chromium lookup, the package import helper.

Fixture-driven tests read ``WORLDSTEREO_FIXTURES`` (default ``../shared/fixtures``) and
``WORLDSTEREO_EXAMPLES`` (default ``../shared/examples``) and skip, with the reason, when absent.
They iterate over whatever cases and scenes are there instead of naming particular ones.

Tests against a real ComfyUI (``COMFYUI_DIR``) or a browser (Chromium) get them from
:func:`comfyui_dir` / :func:`chromium` (or report a missing one with :func:`integration_unavailable`),
which skip when they are absent, except that with ``WORLDSTEREO_REQUIRE_INTEGRATION=1`` (set by
``.ci/run``) a missing one is a failure.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PACK_NAME = "comfyui_worldstereo"


class _RepoRootIsAFolder:
    """Collect the repository root as a plain folder, not as a Python package.

    Its ``__init__.py`` is ComfyUI's entry point (relative imports, loaded by ComfyUI under a
    path-derived name). pytest would import it as a package named after the clone's folder, which
    fails when that name is not an identifier (``ComfyUI-WorldStereo``, as the README clones it).
    Registered as a plugin, not a conftest hook, because the root is collected with the hooks of
    the folder above it."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent):
        if path == REPO:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config) -> None:
    config.pluginmanager.register(_RepoRootIsAFolder(), "worldstereo-repo-root")


def import_test_module(path: str):
    """The test module at ``path`` under tests/ (e.g. ``"models/test_hosts"``), for a test that reuses
    another folder's helpers: imported as pytest's prepend mode imports it (its folder on ``sys.path``,
    its basename as the module name, which is unique across tests/), so it is the same module object."""
    folder = (TESTS / path).parent
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(Path(path).name)


def fixtures_root() -> Path:
    return Path(os.environ.get("WORLDSTEREO_FIXTURES", REPO.parent / "shared" / "fixtures"))


def examples_root() -> Path:
    return Path(os.environ.get("WORLDSTEREO_EXAMPLES", REPO.parent / "shared" / "examples"))


def require_path(path: Path, what: str) -> Path:
    """Return ``path`` or skip the calling test with a clear reason."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set WORLDSTEREO_FIXTURES / WORLDSTEREO_EXAMPLES)")
    return path


def fixture_file(*parts: str) -> Path:
    return require_path(fixtures_root().joinpath(*parts), "fixture " + "/".join(parts))


def example_dirs(family: str) -> list[Path]:
    """Scene folders of one example family (``images``, ``reconstruction``, ``panorama``)."""
    root = examples_root() / family
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def integration_unavailable(reason: str):
    """Skip the caller for a missing ComfyUI / Chromium, or fail it under WORLDSTEREO_REQUIRE_INTEGRATION=1."""
    if os.environ.get("WORLDSTEREO_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{reason}; WORLDSTEREO_REQUIRE_INTEGRATION=1 requires the integration tests to run",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def comfyui_checkout() -> Path:
    """The ComfyUI checkout the tests import ``comfy`` / ``comfy_api`` from: ``$COMFYUI_DIR`` (a relative
    path is taken from the directory pytest started in and made absolute, so subprocesses started
    elsewhere find it too) or ``../shared/comfyui/ComfyUI``."""
    path = os.environ.get("COMFYUI_DIR")
    return Path(path).resolve() if path else (REPO.parent / "shared" / "comfyui" / "ComfyUI").resolve()


def comfyui_dir() -> str:
    """``COMFYUI_DIR`` (a ComfyUI checkout, absolute), or skip / fail the caller (see the module docstring)."""
    if not os.environ.get("COMFYUI_DIR"):
        integration_unavailable("COMFYUI_DIR is not set (path of a ComfyUI checkout); see tests/integration/README.md")
    path = comfyui_checkout()
    if not (path / "main.py").is_file():
        integration_unavailable(f"COMFYUI_DIR={path} is not a ComfyUI checkout (no main.py)")
    return str(path)


def chromium() -> str:
    """``CHROMIUM`` or the ``chromium`` on PATH, or skip / fail the caller (see the module docstring)."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        integration_unavailable("no Chromium executable (Debian: apt-get install chromium; or set CHROMIUM)")
    return path


def import_pack():
    """Import the repository root as the ComfyUI pack package (relative imports work)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


#: Cosine tolerance for comparing float32 viewing angles: a few float32 steps near 1 (one step of
#: the cosine at 1 is already 0.02 degrees, so near-identical directions are compared by cosine).
ANGLE_COS_ATOL = 5e-7


def angle_close(got_deg: float, expected_deg: float, atol_deg: float = 1e-3) -> bool:
    """Whether two angles agree within ``atol_deg`` degrees or their cosines within float32 rounding."""
    if abs(got_deg - expected_deg) <= atol_deg:
        return True
    return abs(math.cos(math.radians(got_deg)) - math.cos(math.radians(expected_deg))) <= ANGLE_COS_ATOL
