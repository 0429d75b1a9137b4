"""Declared library bounds: one set of numbers in code, requirements.txt, pyproject.toml and README,
and a too-old library stops the import with the version and the fix (not a missing symbol)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from worldstereo_core.dependencies import MIN_VERSIONS, DependencyError, check_versions, version_tuple


def _requirement_lines(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            out[name.lower().replace("_", "-")] = spec.replace(" ", "")
    return out


def test_requirements_pyproject_and_code_agree():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    requirements = _requirement_lines((REPO / "requirements.txt").read_text().splitlines())
    pyproject = _requirement_lines(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    assert requirements == pyproject
    for name, lowest in MIN_VERSIONS.items():
        assert requirements[name] == f">={lowest}", name


def test_ci_lowest_environment_pins_the_declared_bounds():
    lowest = _requirement_lines((REPO / ".ci" / "requirements-lowest.txt").read_text().splitlines())
    for name, version in MIN_VERSIONS.items():
        assert lowest[name] == f"=={version}", name


def test_readme_states_the_tested_range():
    readme = (REPO / "README.md").read_text()
    for name, lowest in MIN_VERSIONS.items():
        assert re.search(rf"{name} {re.escape(lowest)}\b", readme), f"README does not state {name} {lowest}"


def test_installed_versions_pass():
    check_versions()


def test_version_tuple():
    assert version_tuple("0.36.0") == (0, 36, 0)
    assert version_tuple("4.56.0.dev0") == (4, 56, 0)
    assert version_tuple("5.2.0+cu128") == (5, 2, 0)
    assert version_tuple("0.35.2") < version_tuple("0.36.0") < version_tuple("0.36.1") < version_tuple("1.0")


def test_too_old_or_missing_names_version_and_fix():
    def installed(name):
        if name == "transformers":
            raise __import__("importlib.metadata").metadata.PackageNotFoundError(name)
        return "0.35.2"

    with pytest.raises(DependencyError) as info:
        check_versions(installed)
    message = str(info.value)
    assert f"diffusers 0.35.2 is installed but {MIN_VERSIONS['diffusers']} or newer is needed" in message
    assert "transformers is not installed" in message
    assert "pip install -U" in message and f'"diffusers>={MIN_VERSIONS["diffusers"]}"' in message


def test_importing_the_package_with_an_old_diffusers_fails_clearly(tmp_path):
    """A real import with an older diffusers distribution first on sys.path."""
    old = "0.35.0"
    dist = tmp_path / f"diffusers-{old}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: diffusers\nVersion: {old}\n")
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]; import worldstereo_core"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"DependencyError: WorldStereo: diffusers {old} is installed but" in proc.stderr
    assert "pip install -U" in proc.stderr
