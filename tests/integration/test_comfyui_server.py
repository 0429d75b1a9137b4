"""Real-server tests: a headless ComfyUI with this pack (skipped unless COMFYUI_DIR is set; failed
instead with WORLDSTEREO_REQUIRE_INTEGRATION=1).

See tests/integration/README.md for setting up a ComfyUI checkout and its Python.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

from comfy_native_env import real_comfy
from conftest import comfyui_dir, import_pack

COMFYUI_DIR = comfyui_dir()

import comfy_stub  # noqa: E402
from comfyui_harness import PACK_FOLDER, REPO, PromptRun  # noqa: E402
from test_native_server import tiny_models_server  # noqa: E402

API_PROMPTS = REPO / "tests" / "api_prompts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A headless ComfyUI on the tiny checkpoints whose input/ holds what the example workflows load
    (example.png, a small panorama scene)."""
    from tiny_models import write_example_inputs

    with tiny_models_server(tmp_path_factory.mktemp("comfyui"), inputs=write_example_inputs) as srv:
        yield srv


@pytest.fixture(scope="module")
def pack_node_ids() -> set[str]:
    """The pack's node ids: those of the stub import plus the native ones (they need ComfyUI's own
    ``comfy_api``, so they are read with the real ComfyUI)."""
    comfy_stub.install()
    ids = set(import_pack().NODE_CLASS_MAPPINGS)
    with real_comfy() as env:
        ids |= set(importlib.import_module(f"{env.package}.nodes.native.nodes").NODE_CLASS_MAPPINGS)
    return ids


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
    status, files = server.get("/models/worldstereo")
    assert status == 200 and {"worldstereo-camera/config.json", "worldstereo-camera/model.safetensors"} <= set(files)
    status, files = server.get("/models/moge")
    assert status == 200 and "moge-2-vitl-normal/model.pt" in files
    info = server.object_info()
    kind, options = info["WorldStereoApplyVariant"]["input"]["required"]["variant"]
    assert kind == "COMBO" and "worldstereo-memory" in options["options"]  # a V3 combo


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


#: Sizes the tiny checkpoints run at, per node type: the panorama scene's bank views at the tiny
#: models' first working size (32 x 48) and one view group (3 trajectories) instead of the shipped 7.
TINY_SETTINGS = {"WorldStereoPanoramaSceneFromImage": {"bank_width": 48, "bank_height": 32, "views": 1,
                                                       "explorations": 0, "reconstructs": 0}}


def _load(path: Path) -> dict:
    """An API twin with :data:`TINY_SETTINGS` applied."""
    prompt = json.loads(path.read_text(encoding="utf-8"))
    for node in prompt.values():
        node["inputs"].update(TINY_SETTINGS.get(node["class_type"], {}))
    return prompt


def test_api_prompts_reference_known_nodes(server):
    info = server.object_info()
    assert _api_prompts(), "no API prompts in tests/api_prompts"
    for path in _api_prompts():
        unknown = {n["class_type"] for n in _load(path).values()} - set(info)
        assert not unknown, f"{path.name}: unknown node types {unknown}"


#: The nodes that sample (progress per step) and the core loaders every example loads its models with.
HEAVY_NODES = ("SamplerCustomAdvanced", "KSampler", "WorldStereoMultiTrajectoryLoop")
CORE_LOADERS = {"UNETLoader", "CLIPLoader", "VAELoader", "CLIPVisionLoader"}


def _progress_nodes(run: PromptRun) -> set[str]:
    return {d["node"] for d in run.data("progress")}


@pytest.mark.parametrize("path", _api_prompts(), ids=lambda p: p.name)
def test_api_prompt_runs(server, path):
    """Every API twin of an example workflow validates and runs to success on the tiny models, with
    progress over the websocket and its outputs (videos, folders) in /history and on disk."""
    prompt = _load(path)
    run = server.run_prompt(prompt, timeout=900)
    assert run.status == "success", json.dumps(run.data("execution_error"))[:3000]
    assert run.history["status"]["status_str"] == "success"
    heavy = {nid for nid, n in prompt.items() if n["class_type"] in HEAVY_NODES}
    assert heavy and heavy <= _progress_nodes(run), "sampler / loop sent no progress"
    videos = [(nid, o) for nid, o in run.outputs.items() if prompt[nid]["class_type"] == "SaveVideo"]
    assert videos, f"no video output in {sorted(run.outputs)}"
    for _nid, out in videos:
        (entry,) = out["images"]
        assert entry["type"] == "output" and entry["filename"].endswith(".mp4")
        file = server.output_dir / entry["subfolder"] / entry["filename"]
        assert file.is_file() and file.stat().st_size > 0
    loaders = {n["class_type"] for n in prompt.values()} & CORE_LOADERS
    assert loaders == CORE_LOADERS, f"{path.name} does not load the models with the core loaders"
    for nid, node in prompt.items():
        if node["class_type"] == "WorldStereoExportWorldMirror":
            (text,) = run.outputs[nid]["text"]
            folder = server.output_dir / text.split(":")[0].removeprefix("output/")
            assert (folder / "cameras.json").is_file() and any((folder / "images").iterdir())


def test_panorama_example_starts_from_one_image(server):
    """The panorama example runs from the 360-degree image in input/: its scene folder (27 bank views,
    one trajectory folder per planned trajectory) is made in the output folder, and the loop runs
    every planned trajectory of it."""
    prompt = _load(API_PROMPTS / "worldstereo_panorama.api.json")
    kinds = {n["class_type"]: nid for nid, n in prompt.items()}
    assert "WorldStereoMemoryBankCreate" not in kinds and "LoadImage" in kinds
    scene_id, loop_id = kinds["WorldStereoPanoramaSceneFromImage"], kinds["WorldStereoMultiTrajectoryLoop"]
    assert prompt[loop_id]["inputs"]["panorama_scene"] == [scene_id, 0]
    image = prompt[kinds["LoadImage"]]["inputs"]["image"]
    assert (REPO / "example_workflows" / "input" / image).is_file(), "the example image is not shipped"
    prompt[scene_id]["inputs"]["output_folder"] = prompt[loop_id]["inputs"]["output_folder"] = "WorldStereo/pano_one"
    run = server.run_prompt(prompt, timeout=900)
    assert run.status == "success", json.dumps(run.data("execution_error"))[:3000]
    assert {scene_id, loop_id} <= _progress_nodes(run)
    name = prompt[scene_id]["inputs"]["name"]
    folder = server.output_dir / "WorldStereo" / "pano_one" / "panorama_scenes" / name
    assert len(list((folder / "pano_bank" / "images").glob("*.png"))) == 27
    planned = sorted(p.parent.relative_to(folder).as_posix() for p in folder.glob("*/*/camera.json"))
    (summary,) = run.outputs[loop_id]["text"]
    assert sorted(json.loads(summary.split(": ", 1)[1])) == planned and len(planned) == 3


def test_rerun_is_cached(server):
    """Re-queueing an unchanged example executes nothing (loaders and samplers come from the cache)."""
    path = API_PROMPTS / "worldstereo_fast_dmd.api.json"
    first = server.run_prompt(_load(path), timeout=900)
    again = server.run_prompt(_load(path), timeout=300)
    assert first.status == again.status == "success"
    assert set(again.data("execution_cached")[0]["nodes"]) == set(_load(path))
    assert not again.data("progress")


def test_interrupted_loop_resumes(server):
    """Cancel the panorama loop during its second trajectory, then queue it again: it finishes and
    reports the trajectories completed before the cancel as skipped (resumed from the saved state)."""
    prompt = _load(API_PROMPTS / "worldstereo_panorama.api.json")
    loop_id = next(nid for nid, n in prompt.items() if n["class_type"] == "WorldStereoMultiTrajectoryLoop")
    prompt[loop_id]["inputs"]["output_folder"] = "WorldStereo/panorama_interrupted"
    prompt[loop_id]["inputs"]["steps"] = 3
    sent = []
    state = server.output_dir / "WorldStereo" / "panorama_interrupted"

    def done_trajectories() -> int:
        return sum(len(json.loads(p.read_text())["done"]) for p in state.rglob("state.json"))

    def interrupt_in_second_trajectory(message, srv, prompt_id):
        data = message.get("data") or {}
        if message["type"] == "progress" and data.get("node") == loop_id and not sent and done_trajectories():
            sent.append(srv.interrupt(prompt_id))

    run = server.run_prompt(prompt, timeout=900, on_message=interrupt_in_second_trajectory)
    assert sent == [200] and run.status == "interrupted", [m["type"] for m in run.messages]
    assert list(state.rglob("state.json")), "no run state saved before the interrupt"
    resumed = server.run_prompt(prompt, timeout=900)
    assert resumed.status == "success", json.dumps(resumed.data("execution_error"))[:3000]
    (summary,) = resumed.outputs[loop_id]["text"]
    statuses = json.loads(summary.split(": ", 1)[1])
    assert "skipped" in statuses.values() and "generated" in statuses.values(), statuses


def test_missing_model_is_a_readable_400(server):
    """Every output of the camera example needs the MoGe loader; a missing checkpoint there rejects the
    prompt at queue time with our message (folder and file named) instead of failing mid-run."""
    prompt = _load(API_PROMPTS / "worldstereo_single_image_camera_control.api.json")
    moge_id = next(nid for nid, n in prompt.items() if n["class_type"] == "WorldStereoMoGeLoader")
    prompt[moge_id]["inputs"]["checkpoint"] = "not_there/model.pt"
    status, body = server.queue(prompt, "x")
    assert status == 400, body
    errors = body["node_errors"][moge_id]["errors"]  # ComfyUI files the message under every validated input
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors)
    assert any("'moge' model folder" in e["details"] and "not_there/model.pt" in e["details"] for e in errors)


def test_runtime_error_is_reported_not_crashing(server):
    """A bad value found only at run time becomes an execution_error naming the node; the server
    keeps serving."""
    prompt = _load(API_PROMPTS / "worldstereo_fast_dmd.api.json")
    traj_id = next(nid for nid, n in prompt.items() if n["class_type"] == "WorldStereoTrajectoryFromJSON")
    prompt[traj_id]["inputs"]["json_text"] = '[{"type": "spiral"}]'
    run = server.run_prompt(prompt, timeout=600)
    assert run.status == "error"
    (error,) = run.data("execution_error")
    assert error["node_id"] == traj_id and "WorldStereo Trajectory From JSON" in error["exception_message"]
    assert server.get("/system_stats")[0] == 200
