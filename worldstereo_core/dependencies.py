"""The lowest diffusers / transformers this package works with, checked when it is imported.

An older diffusers or transformers would otherwise fail deep inside, naming a missing symbol or a
keyword instead of the version and the fix. ``requirements.txt`` and ``pyproject.toml`` declare
the same bounds (tests/test_dependencies.py keeps them in step), and CI runs the model and
pipeline tests with exactly these versions.
"""
from __future__ import annotations

import re
from importlib import metadata

#: Lowest tested version of each library (diffusers 0.36.0 is the release's own pin).
MIN_VERSIONS: dict[str, str] = {"diffusers": "0.36.0", "transformers": "4.56.0"}


class DependencyError(ImportError):
    """A required library is missing or older than :data:`MIN_VERSIONS`; the message says how to fix it."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.36.0"`` / ``"4.56.0.dev0"`` / ``"5.2.0+local"`` -> (0, 36, 0) / (4, 56, 0) / (5, 2, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_versions(installed=metadata.version) -> None:
    """Raise :class:`DependencyError` naming every library that is missing or too old."""
    problems = []
    for name, lowest in MIN_VERSIONS.items():
        try:
            found = installed(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if version_tuple(found) < version_tuple(lowest):
            problems.append(f"{name} {found} is installed but {lowest} or newer is needed")
    if problems:
        wanted = " ".join(f'"{name}>={lowest}"' for name, lowest in MIN_VERSIONS.items())
        raise DependencyError(f"WorldStereo: {'; '.join(problems)}. Fix: run `python -m pip install -U {wanted}` "
                              "with the Python that runs ComfyUI (or run the pack's install.py)")
