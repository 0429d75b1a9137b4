"""Real-server tests: a headless ComfyUI with this pack (skipped unless COMFYUI_DIR is set).

See tests/integration/README.md for setting up a ComfyUI checkout and its Python.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (path of a ComfyUI checkout); see tests/integration/README.md",
                allow_module_level=True)

import comfy_stub  # noqa: E402
from comfyui_harness import PACK_FOLDER, REPO, ComfyUIServer, PromptRun  # noqa: E402
from conftest import import_pack  # noqa: E402

API_PROMPTS = REPO / "tests" / "api_prompts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyUIServer(COMFYUI_DIR, tmp_path_factory.mktemp("comfyui"), python=os.environ.get("COMFYUI_PYTHON"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pack_node_ids() -> set[str]:
    comfy_stub.install()
    return set(import_pack().NODE_CLASS_MAPPINGS)


def test_server_is_up(server):
    status, stats = server.get("/system_stats")
    assert status == 200 and "comfyui_version" in stats["system"]
    assert stats["devices"] and stats["devices"][0]["type"] == "cpu"


def test_pack_imported_cleanly(server):
    log = server.log_text()
    assert f"custom_nodes/{PACK_FOLDER}" in log, "pack missing from the import-times block"
    assert server.import_failures() == [], "\n".join(server.import_failures())


def test_object_info_lists_every_node(server, pack_node_ids):
    info = server.object_info()
    ours = {name for name, d in info.items() if d.get("python_module") == f"custom_nodes.{PACK_FOLDER}"}
    assert ours == pack_node_ids
    for node_id in pack_node_ids:
        assert info[node_id]["category"].startswith("WorldStereo")


def test_model_folders_registered(server):
    status, folders = server.get("/models")
    assert status == 200 and {"worldstereo", "moge", "dinov2", "diffusion_models", "vae"} <= set(folders)
    variant = server.base_dir / "models" / "worldstereo" / "worldstereo-camera"
    variant.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (variant / name).write_bytes(b"{}")
    status, files = server.get("/models/worldstereo")
    assert status == 200 and {"worldstereo-camera/config.json", "worldstereo-camera/model.safetensors"} <= set(files)


def test_web_extension_served(server):
    status, extensions = server.get("/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK_FOLDER}/")]
    expected = {f"/extensions/{PACK_FOLDER}/{p.relative_to(REPO / 'web').as_posix()}" for p in (REPO / "web").rglob("*.js")}
    assert status == 200 and set(ours) == expected
    for url in ours:
        code, body, headers = server.request("GET", url)
        assert code == 200 and b"registerExtension" in body
        assert "javascript" in headers.get("Content-Type", "")


def test_trajectory_preview_route(server, pack_node_ids):
    for prefix in ("", "/api"):
        status, body = server.post(prefix + "/worldstereo/trajectory_preview", {"node_type": "NoSuchNode", "inputs": {}})
        assert status == 400 and "no trajectory preview" in body["error"]
    status, body = server.post("/worldstereo/trajectory_preview", {"inputs": {}})
    assert status == 400 and "node_type" in body["error"]


def _blur_chain(n_blurs: int, size: int = 512, batch: int = 2) -> dict:
    """Built-in nodes only: EmptyImage -> n x ImageBlur -> ImageInvert -> PreviewImage."""
    prompt = {"1": {"class_type": "EmptyImage",
                    "inputs": {"width": size, "height": size, "batch_size": batch, "color": 0x404040}}}
    last = "1"
    for i in range(n_blurs):
        node = str(10 + i)
        prompt[node] = {"class_type": "ImageBlur", "inputs": {"image": [last, 0], "blur_radius": 9, "sigma": 3.0}}
        last = node
    prompt["2"] = {"class_type": "ImageInvert", "inputs": {"image": [last, 0]}}
    prompt["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    return prompt


def test_harness_runs_a_prompt(server):
    """The helper itself: websocket sequence, /history outputs, /view of the preview."""
    run: PromptRun = server.run_prompt(_blur_chain(1, size=64, batch=1), timeout=120)
    assert run.status == "success", run.messages
    kinds = [m["type"] for m in run.messages]
    assert kinds.index("execution_start") < kinds.index("executed") < kinds.index("execution_success")
    assert {d["node"] for d in run.data("executing")} >= {"1", "10", "2", "3"}
    (image,) = run.outputs["3"]["images"]
    assert image["type"] == "temp" and run.history["status"]["status_str"] == "success"
    status, png, _ = server.request("GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type=temp")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    again = server.run_prompt(_blur_chain(1, size=64, batch=1), timeout=60)
    assert again.status == "success" and set(again.data("execution_cached")[0]["nodes"]) >= {"1", "10", "2", "3"}


def test_harness_interrupts_a_prompt(server):
    def interrupt_at_first_blur(message, srv, prompt_id):
        if message["type"] == "executing" and message["data"].get("node") == "10":
            assert srv.interrupt(prompt_id) == 200

    run = server.run_prompt(_blur_chain(8, size=768, batch=2), timeout=300, on_message=interrupt_at_first_blur)
    assert run.status == "interrupted", [m["type"] for m in run.messages]
    assert run.history["status"]["status_str"] == "error" and "3" not in run.outputs


def test_harness_reports_rejected_and_failed_prompts(server):
    status, body = server.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}}, "x")
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    bad = _blur_chain(0, size=64, batch=1)
    bad["1"]["inputs"]["width"] = 10 ** 7
    status, body = server.queue(bad, "x")
    assert status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"


def _api_prompts() -> list[Path]:
    return sorted(API_PROMPTS.glob("*.api.json")) if API_PROMPTS.is_dir() else []


@pytest.mark.parametrize("path", _api_prompts(), ids=lambda p: p.name)
def test_api_prompt_runs(server, path):
    """Every API-format twin of an example workflow completes (prompts added in phase 2)."""
    run = server.run_prompt(json.loads(path.read_text(encoding="utf-8")), timeout=600)
    assert run.status == "success", json.dumps(run.data("execution_error"))[:3000]
    assert run.outputs
