"""The web extension in the real frontend, via headless Chromium (browser_check.py).

Skipped unless COMFYUI_DIR is set and a Chromium executable is found (Debian: ``apt-get install
chromium``; or set CHROMIUM to its path); failed instead with WORLDSTEREO_REQUIRE_INTEGRATION=1.
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import chromium, comfyui_dir

pytestmark = pytest.mark.integration

COMFYUI_DIR = comfyui_dir()
CHROMIUM = chromium()

import browser_check  # noqa: E402


def test_extension_loads_and_previews(tmp_path):
    args = ["--comfyui-dir", COMFYUI_DIR, "--chromium", CHROMIUM, "--out", str(tmp_path)]
    if os.environ.get("COMFYUI_PYTHON"):
        args += ["--python", os.environ["COMFYUI_PYTHON"]]
    code = browser_check.main(args)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extension_registered"], report
    assert code == 0, json.dumps(report["errors"], indent=2)
    executed_only = set(report["executed_only_nodes_present"])
    assert executed_only, "the panorama scene node previews its planned trajectories after it ran"
    for node in report["nodes"]:  # trajectory nodes that exist get a live, updating preview
        if node["node_type"] in executed_only:
            assert node["executed"]["cams"] > 0 and node["executed"]["points"] > 0, node
        else:
            assert node["live"]["cams"] > 0 and node["after_change"]["cams"] > 0, node


def test_example_workflows_load_without_missing_nodes(tmp_path):
    """Each example workflow loads in the real frontend with every node type known, and the
    frontend still converts it into exactly the shipped API twin (export_workflows.py check mode)."""
    import export_workflows

    args = ["--comfyui-dir", COMFYUI_DIR, "--chromium", CHROMIUM, "--out", str(tmp_path)]
    if os.environ.get("COMFYUI_PYTHON"):
        args += ["--python", os.environ["COMFYUI_PYTHON"]]
    code = export_workflows.main(args)
    report = json.loads((tmp_path / "workflows.json").read_text())
    assert len(report["workflows"]) >= 4
    for entry in report["workflows"]:
        assert entry["missing_types"] == [] and entry["errors"] == [], entry
    assert code == 0, report["errors"]
