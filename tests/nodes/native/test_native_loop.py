"""The Multi-Trajectory Loop node on the native MODEL, in-process in the real ComfyUI.

Models: the pipeline fixtures' tiny memory variant as a native MODEL (``comfy_native_env``; its
config given the tiny working sizes), the fixtures' VAE and CLIP vision as core objects, and a
stand-in for the core CLIP text encoder (a seeded embedding per prompt: the text path itself is
checked in ``test_native_nodes``).

* Every example scene (reconstruction and panorama, whatever ``$WORLDSTEREO_EXAMPLES`` holds) runs
  through the node with the release's sampling chosen from the variant (UniPC sigmas of the given
  steps + the release UniPC sampler at CFG 5; the DMD sigmas + euler at CFG 1), read back from the
  run's saved key; SIGMAS / SAMPLER / cfg inputs override it.
* Resume: a run interrupted after its first trajectory resumes with the same models; another LoRA
  strength, a changed variant file or another base weight are refused by name; a held run folder
  is refused before any work.
* :func:`patcher_identity` stays the same while ComfyUI loads and patches the weights.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import example_dirs, examples_root, import_test_module
from test_native_nodes import _common, _pipeline_cases, _variant, core_vae, fixture_clip_vision
from comfy_native_env import real_comfy
from tiny_models import TINY_SCALE_MAP

ComfyHost = import_test_module("models/test_hosts").ComfyHost
SCENES = example_dirs("reconstruction") + example_dirs("panorama")
STATE = "state.json"


class SeededText:
    """Stand-in for the core CLIP (type wan): a fixed random embedding per prompt, with a patcher
    (whose identity joins the resume key) as the core CLIP has."""

    def __init__(self, env, width: int, tokens: int = 16) -> None:
        self.width, self.tokens = width, tokens
        self.patcher = env.comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), "cpu", "cpu")

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, text: str) -> list:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return [[torch.randn(1, self.tokens, self.width, generator=torch.Generator().manual_seed(seed)), {}]]


def _case(dmd: bool) -> Path:
    """A pipeline fixture of a memory variant (UniPC or DMD schedule)."""
    for case in _pipeline_cases():
        fixture = json.loads((case / "config.json").read_text())
        if (fixture["scheduler"]["class"] == "FlowGeneratorScheduler") == dmd and \
                fixture["fixture_kind"] != "pipeline_camera":
            return case
    pytest.skip(f"no pipeline fixture of a {'DMD' if dmd else 'UniPC'} memory variant")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with real_comfy() as comfy_env:
        import folder_paths

        base = tmp_path_factory.mktemp("comfy_loop")
        folder_paths.set_input_directory(str(base / "input"))
        folder_paths.set_output_directory(str(base / "output"))
        os.makedirs(base / "input")
        comfy_env.loop = importlib.import_module(f"{comfy_env.package}.nodes.loop")
        comfy_env.identity = importlib.import_module(f"{comfy_env.package}.nodes.native.identity")
        comfy_env.native_nodes = importlib.import_module(f"{comfy_env.package}.nodes.native.nodes")
        comfy_env.errors = importlib.import_module("worldstereo_core.errors")
        comfy_env.input_dir, comfy_env.output_dir = base / "input", base / "output"
        yield comfy_env
        comfy_env.comfy.model_management.unload_all_models()


def _tiny_variant(case: Path, scratch: Path) -> Path:
    """The fixture's variant with the tiny working sizes in its config (the loop's scale_map)."""
    source = _variant(case, scratch)
    folder = scratch / "tiny" / source.name
    folder.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config["scale_map"] = TINY_SCALE_MAP
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to((source / "model.safetensors").resolve())
    return folder


@pytest.fixture(scope="module")
def parts(env, tmp_path_factory):
    """Native memory and DMD MODELs, core VAE and CLIP vision, the text stand-in."""
    scratch = tmp_path_factory.mktemp("native_loop_models")
    common = _common()
    host = ComfyHost(env, scratch)
    memory = host.load(_tiny_variant(_case(False), scratch / "memory"))
    dmd = host.load(_tiny_variant(_case(True), scratch / "dmd"))
    text_dim = memory.get_model_object("diffusion_model").text_dim
    return dict(memory=memory, dmd=dmd, vae=core_vae(env, common),
                clip_vision=fixture_clip_vision(env, common, scratch), clip=SeededText(env, text_dim),
)


def _run(env, parts, model: str = "memory", **inputs):
    node = env.loop.MultiTrajectoryLoop
    args = dict(model=parts[model], vae=parts["vae"], clip=parts["clip"], clip_vision=parts["clip_vision"],
                task="auto", cache_mode="release", prompt="", steps=1, cfg=0.0, shift=0.0, seed=3)
    args.update(inputs)
    result = node.execute(**args)
    statuses = json.loads(result.ui["text"][0].split(": ", 1)[1])
    return result.args, statuses


def _saved_key(env, folder: str) -> dict:
    (path,) = (env.output_dir / folder).glob(f"*_state/{STATE}")
    return json.loads(path.read_text())["key"]["models"]["generator"]


def _scene_input(env, scene: Path, name: str | None = None, trajectories: int | None = None) -> str:
    """``scene`` copied into input/ (as ``name``), its panorama bank completed with copies of the
    bank images present (the examples ship 3 of 27), optionally with only its first trajectories."""
    target = env.input_dir / (name or scene.name)
    if target.exists():
        return target.name
    shutil.copytree(scene, target)
    images = target / "pano_bank" / "images"
    if images.is_dir():
        present = sorted(images.glob("*.png"))
        for i, key in enumerate(sorted(json.loads((target / "pano_bank" / "cameras.json").read_text()))):
            if not (images / f"{key}.png").exists():
                shutil.copy(present[i % len(present)], images / f"{key}.png")
    if trajectories is not None:
        for extra in sorted((target / "renders").glob("traj_*"))[trajectories:]:
            shutil.rmtree(extra)
    return target.name


@pytest.mark.parametrize("scene", SCENES or [None], ids=lambda p: p.name if p else "absent")
def test_loop_runs_every_example_scene_on_the_native_model(env, parts, scene):
    if scene is None:
        pytest.skip(f"no reconstruction or panorama scenes under {examples_root()}")
    name = _scene_input(env, scene)
    assert env.loop.MultiTrajectoryLoop.validate_inputs(scene=name, task="auto", cache_mode="release",
                                                        output_folder="native") is True
    with torch.inference_mode():
        (frames, bank, folder, cloud), statuses = _run(env, parts, scene=name, output_folder="native/release")
    nframe = env.native.model.variant_config(parts["memory"]).nframe
    assert statuses and set(statuses.values()) == {"generated"}
    assert frames.shape == (len(statuses) * nframe, *TINY_SCALE_MAP[0], 3) and len(bank) > 0
    assert (env.output_dir / folder / "world_mirror_data").is_dir() and cloud == ""
    key = _saved_key(env, folder)
    config = env.native.model.variant_config(parts["memory"])
    release = env.native.sampling.release_unipc_sigmas(1, env.native.sampling.release_shift(config))
    assert key["sigmas"] == [round(float(s), 6) for s in release]
    assert (key["sampler"], key["cfg"], key["variant"]) == ("sample_release_unipc", 5.0, "worldstereo-memory")


def _small_scene(env, trajectories: int) -> str:
    """The first reconstruction example with its first ``trajectories`` trajectories."""
    scenes = example_dirs("reconstruction")
    if not scenes:
        pytest.skip(f"no reconstruction scenes under {examples_root()}")
    return _scene_input(env, scenes[0], f"small_scene_{trajectories}", trajectories=trajectories)


def test_dmd_and_overrides_choose_the_sampling(env, parts):
    scene = _small_scene(env, 1)
    with torch.inference_mode():
        (_, _, folder, _), statuses = _run(env, parts, "dmd", scene=scene, steps=40, output_folder="native/dmd")
    key = _saved_key(env, folder)
    sigmas = env.native.sampling.dmd_sigmas(env.native.model.variant_config(parts["dmd"]))
    assert key["sigmas"] == [round(float(s), 6) for s in sigmas] and len(sigmas) - 1 < 40
    assert (key["sampler"], key["cfg"], key["variant"]) == ("sample_euler", 1.0, "worldstereo-memory-dmd")

    custom = torch.tensor([1.0, 0.4, 0.0])
    euler = env.comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        (_, _, folder, _), _ = _run(env, parts, scene=scene, cfg=2.5, sigmas=custom, sampler=euler,
                                    output_folder="native/custom")
    key = _saved_key(env, folder)
    assert (key["sigmas"], key["sampler"], key["cfg"]) == ([1.0, 0.4, 0.0], "sample_euler", 2.5)


def _with_lora(env, model, strength: float):
    """A clone with a rank-1 LoRA on one weight, as the core LoRA loaders add it."""
    from comfy.weight_adapter.lora import LoRAAdapter

    patched = model.clone()
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    weight = patched.model_state_dict()[key]
    up, down = torch.ones(weight.shape[0], 1), torch.ones(1, weight.shape[1])
    patched.add_patches({key: LoRAAdapter(set(), (up, down, None, None, None, None))}, strength)
    return patched


def _with_changed_base(model):
    """A clone whose base weights differ in one tensor (another file)."""
    other = model.clone()
    other.model = copy.deepcopy(model.model)
    with torch.no_grad():
        other.model.diffusion_model.head.head.weight.add_(0.01)
    return other


def _loop_args(parts, model, scene: str, out: str) -> dict:
    return dict(model=model, vae=parts["vae"], clip=parts["clip"], clip_vision=parts["clip_vision"], scene=scene,
                task="auto", cache_mode="release", prompt="", steps=1, cfg=0.0, shift=0.0, seed=3,
                output_folder=out)


def test_resume_needs_the_same_models(env, parts):
    """Interrupted after the first trajectory, the run resumes with the same models only: another
    LoRA strength, another base weight or a changed variant file are refused, naming the models."""
    scene = _small_scene(env, 2)
    out = "native/resume"
    node = env.loop.MultiTrajectoryLoop
    mm, utils = env.comfy.model_management, env.comfy.utils
    loop_module = importlib.import_module("worldstereo_core.tasks.loop")
    first_done = loop_module.PREPARE_TICKS + 1 + loop_module.TRAJECTORY_TICKS  # steps=1

    def interrupt_after_first(value, total, preview, prompt_id=None, node_id=None):
        if value == first_done:
            mm.interrupt_current_processing(True)

    model = _with_lora(env, parts["memory"], 0.5)
    run_folder = env.output_dir / out / scene  # held by another (live) process: refused before any work
    run_folder.mkdir(parents=True)
    lock = run_folder / ".worldstereo.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with pytest.raises(env.errors.RunFolderLocked, match=f"Loop: .* in use by another run: pid {os.getppid()} "):
        node.execute(**_loop_args(parts, model, scene, out))
    assert os.listdir(run_folder) == [lock.name]
    lock.unlink()

    utils.set_progress_bar_global_hook(interrupt_after_first)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            node.execute(**_loop_args(parts, model, scene, out))
    finally:
        utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)

    for other in (_with_lora(env, parts["memory"], 0.25), _with_changed_base(model)):
        with torch.inference_mode(), pytest.raises(env.errors.InputError, match="models"):
            node.execute(**_loop_args(parts, other, scene, out))
    config = Path(env.native.model.worldstereo_forward(model).source).parent / "config.json"
    original, stat = config.read_text(), config.stat()
    config.write_text(original + "\n")
    try:
        with torch.inference_mode(), pytest.raises(env.errors.InputError, match="models"):
            node.execute(**_loop_args(parts, model, scene, out))
    finally:
        config.write_text(original)
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    with torch.inference_mode():
        result = node.execute(**_loop_args(parts, model, scene, out))
    statuses = list(json.loads(result.ui["text"][0].split(": ", 1)[1]).values())
    assert statuses.count("skipped") == 1 and statuses.count("generated") == len(statuses) - 1


def test_patcher_identity_is_stable_under_loading_and_sees_patches(env, parts):
    identity = env.identity.patcher_identity
    model = _with_lora(env, parts["memory"], 0.5)
    before = identity(model)
    env.comfy.model_management.load_models_gpu([model])  # applies the patches to the weights in place
    assert identity(model) == before
    env.comfy.model_management.unload_all_models()
    assert identity(model) == before
    assert identity(_with_lora(env, parts["memory"], 0.25)) != before
    assert identity(parts["memory"]) != before
    assert identity(_with_changed_base(parts["memory"])) != identity(parts["memory"])


def test_resize_to_bucket_uses_the_variant_scale_map(env, parts):
    geometry = importlib.import_module(f"{env.package}.nodes.geometry")
    image = torch.rand(1, 90, 150, 3, generator=torch.Generator().manual_seed(1))
    out, width, height = geometry.ResizeToBucket.execute(image, parts["memory"]).args
    expected = min(TINY_SCALE_MAP, key=lambda b: abs(b[0] / b[1] - 90 / 150))
    assert (height, width) == tuple(expected) and out.shape == (1, height, width, 3)
