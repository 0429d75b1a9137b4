"""The pack works whatever name it is imported or cloned under.

* ComfyUI imports the repository as a package named after its path (``load_custom_node``), never
  as top-level ``worldstereo_core``; anything that records a module name and imports it again
  (numba's on-disk cache did) breaks there once the CLI or the tests have used the same files.
* The suite runs in a clone named as the README clones it (``ComfyUI-WorldStereo``, not a Python
  identifier) and under any other name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_stub import comfyui_checkout
from conftest import REPO, fixtures_root, integration_unavailable
from worldstereo_core.geometry.renderer import numba_available

#: Renders a small cloud with every CPU backend; argv: mode ("top" | "comfyui"), pack folder, out.npz,
#: ComfyUI checkout (its ``comfy_api``, which the nodes import, is on the path inside ComfyUI).
RENDER_SCRIPT = r'''
import importlib, importlib.abc, importlib.util, os, sys
import numpy as np, torch
mode, folder, out, checkout = sys.argv[1:5]
if mode == "top":
    sys.path.insert(0, folder)
    renderer = importlib.import_module("worldstereo_core.geometry.renderer")
else:
    sys.path.append(checkout)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True  # as `main.py --cpu`: the pack's import reaches ComfyUI's server and model management
    class NoTopLevel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "worldstereo_core":
                raise ModuleNotFoundError(f"No module named {name!r} (ComfyUI never imports it top-level)")
    sys.meta_path.insert(0, NoTopLevel())
    name = folder.replace(".", "_x_")  # as ComfyUI's nodes.load_custom_node names a folder pack
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    assert pack.NODE_CLASS_MAPPINGS
    renderer = importlib.import_module(name + ".worldstereo_core.geometry.renderer")
torch.manual_seed(0)
points = torch.randn(400, 3, dtype=torch.float64) * 0.5 + torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
colors = torch.rand(400, 3, dtype=torch.float64)
K = torch.tensor([[[40.0, 0.0, 24.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
w2c = torch.eye(4, dtype=torch.float64)[None]
results = {}
for backend in ["torch", "auto"] + (["numba"] if renderer.numba_available() else []):
    rgb, mask = renderer.render_point_cloud(points, colors, K, w2c, 32, 48, backend=backend)
    results[backend + "_rgb"], results[backend + "_mask"] = rgb.numpy(), mask.numpy()
np.savez(out, **results)
'''


def _copy_repo(dest: Path) -> Path:
    """The repository's working files (no VCS data, venvs or caches) under ``dest``."""
    shutil.copytree(REPO, dest, ignore=lambda folder, names: [
        n for n in names if n.startswith(".") or n in ("__pycache__", "results")])
    return dest


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_pack_renders_when_imported_like_comfyui_after_top_level_use(tmp_path):
    """Top-level use first (the CLI, the tests), then ComfyUI's import of the same files: same images,
    and no module name from the first run is needed by the second (numba's cache did need one)."""
    checkout = comfyui_checkout()
    if not (checkout / "comfy_api").is_dir():
        integration_unavailable(f"no ComfyUI checkout at {checkout} (set COMFYUI_DIR)")
    pack = _copy_repo(tmp_path / "custom_nodes" / "ComfyUI-WorldStereo")
    script = tmp_path / "render.py"
    script.write_text(RENDER_SCRIPT)
    outputs = {}
    for mode in ("top", "comfyui", "top"):
        out = tmp_path / f"{mode}.npz"
        proc = _run([str(script), mode, str(pack), str(out), str(checkout)], cwd=tmp_path)
        assert proc.returncode == 0, f"{mode} import failed:\n{proc.stderr[-3000:]}"
        with np.load(out) as data:
            outputs.setdefault(mode, dict(data))
    assert outputs["top"].keys() == outputs["comfyui"].keys()
    assert ("numba_rgb" in outputs["top"]) == numba_available()
    for key, value in outputs["top"].items():
        np.testing.assert_array_equal(outputs["comfyui"][key], value, err_msg=key)
    assert outputs["top"]["torch_mask"].min() == 0  # the cloud is in view: the check compares real pixels


@pytest.mark.parametrize("folder", ["ComfyUI-WorldStereo", "worldstereo"])
def test_suite_runs_in_a_clone_of_any_folder_name(tmp_path, folder):
    clone = _copy_repo(tmp_path / folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COMFYUI_"))}
    env["WORLDSTEREO_FIXTURES"] = str(fixtures_root().resolve())
    proc = _run(["-m", "pytest", "-q", "tests/test_cameras.py"], cwd=clone, env=env)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"pytest in {folder}/ failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "error" not in summary, summary
