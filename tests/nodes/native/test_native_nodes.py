"""The native nodes (``nodes/native/nodes.py``, V3 schema) in the real ComfyUI, in-process.

* Contract: every node converts to a valid V1 definition (the checks of ``test_node_contract``),
  has a tooltip on every input, a description, and uses core socket types or the pack's own.
* Every pipeline fixture (pipeline_camera / _memory / _dmd, and any other ``pipeline_*`` case)
  reproduced with ComfyUI's core objects: the native MODEL, a core VAE and CLIP vision built from
  the fixtures' tiny ones (``comfy_native_env``), the conditioning of
  :func:`worldstereo_conditioning` (the conditioning node's computation) checked at each stage
  (CLIP embedding, I2V condition, render and reference latents), sampled by the core
  SamplerCustomAdvanced node with the CFGGuider node and our sigmas / sampler nodes, and decoded by
  our decode node. Tolerances as ``test_hosts`` (the fixture README's: 1e-4 for the condition
  latents, 1e-3 for final latents and decoded frames).
* The conditioning node itself on a rendered scene: the memory fallback (the start image as the
  one reference) and its errors.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comfy_native_env import core_clip_vision, real_comfy, tiny_vae, wan_vae_to_original
from conftest import fixtures_root, import_test_module
from worldstereo_core.cameras import CameraTrajectory
from worldstereo_core.errors import InputError

_hosts = import_test_module("models/test_hosts")
_contract = import_test_module("nodes/test_node_contract")
ComfyHost, _fixture = _hosts.ComfyHost, _hosts._fixture
_error_prefix, contract_errors = _contract._error_prefix, _contract.contract_errors

CONDITION_ATOL = 1e-4
FINAL_ATOL = 1e-3
#: Socket types of ComfyUI's core the native nodes may use.
CORE_TYPES = {"MODEL", "CONDITIONING", "LATENT", "VAE", "CLIP_VISION", "IMAGE", "MASK", "SIGMAS", "SAMPLER", "VIDEO",
              "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def env():
    with real_comfy() as comfy_env:
        comfy_env.nodes = importlib.import_module(f"{comfy_env.package}.nodes.native.nodes")
        comfy_env.conditioning = importlib.import_module(f"{comfy_env.package}.nodes.native.conditioning")
        comfy_env.types = importlib.import_module(f"{comfy_env.package}.nodes.types")
        yield comfy_env
        comfy_env.comfy.model_management.unload_all_models()


# ----- contract ---------------------------------------------------------------------------------

def v1_view(cls) -> type:
    """The V1 definition ComfyUI reads from a V3 node, with its output lists as tuples (V3 emits
    lists, which ComfyUI accepts; the V1 checker asks for tuples)."""
    attrs = {name: tuple(value) if isinstance(value, list) else value
             for name in ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST", "CATEGORY",
                          "DESCRIPTION", "OUTPUT_NODE", "FUNCTION") if (value := getattr(cls, name, None)) is not None}
    attrs["INPUT_TYPES"] = classmethod(lambda _: cls.INPUT_TYPES())
    attrs[cls.FUNCTION] = getattr(cls, cls.FUNCTION)
    return type(cls.__name__, (), attrs)


def test_native_nodes_contract(env):
    mappings, names = env.nodes.NODE_CLASS_MAPPINGS, env.nodes.NODE_DISPLAY_NAME_MAPPINGS
    own = {v for k, v in vars(env.types).items() if k.isupper() and isinstance(v, str)}
    assert len(mappings) == 7 and set(names) == set(mappings)
    for node_id, cls in mappings.items():
        errors = contract_errors(node_id, v1_view(cls), names)
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.display_name == names[node_id]
        if not schema.description:
            errors.append("no description")
        for item in schema.inputs:
            if not item.tooltip:
                errors.append(f"input {item.id} has no tooltip")
            kind = item.get_io_type()
            if kind not in CORE_TYPES and kind not in own:
                errors.append(f"input {item.id}: {kind} is neither a core type nor one of the pack's")
        for item in schema.outputs:
            if item.get_io_type() not in CORE_TYPES | own:
                errors.append(f"output {item.display_name}: unknown type {item.get_io_type()}")
        assert errors == [], f"{node_id}: " + "; ".join(errors)
    new_own = {kind for cls in mappings.values() for kind in cls.RETURN_TYPES} - CORE_TYPES
    assert all(kind.startswith("WORLDSTEREO_") for kind in new_own)


# ----- the pipeline fixtures through the nodes and the core sampler --------------------------------

def test_native_error_prefixes_are_the_display_names(env):
    names = env.nodes.NODE_DISPLAY_NAME_MAPPINGS
    for node_id, cls in env.nodes.NODE_CLASS_MAPPINGS.items():
        assert _error_prefix(cls) in (None, names[node_id]), node_id


def _pipeline_cases() -> list[Path]:
    root = fixtures_root() / "reference_tiny"
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if (p / "config.json").is_file()
            and json.loads((p / "config.json").read_text()).get("fixture_kind", "").startswith("pipeline")]


def _common() -> Path:
    common = fixtures_root() / "reference_tiny" / "common"
    for name in ("vae.safetensors", "vae_config.json", "clip_vision.safetensors", "clip_vision_config.json"):
        if not (common / name).is_file():
            pytest.skip(f"{common / name} missing (the pipeline fixtures' tiny VAE and CLIP)")
    return common


def core_vae(env, common: Path):
    """A core VAE (as Load VAE gives it) of the fixtures' tiny diffusers VAE."""
    config = json.loads((common / "vae_config.json").read_text())
    state = wan_vae_to_original(load_file(str(common / "vae.safetensors")), config["num_res_blocks"])
    with tiny_vae(env.comfy, config):
        return env.comfy.sd.VAE(sd=state)


def fixture_clip_vision(env, common: Path, folder: Path):
    config = json.loads((common / "clip_vision_config.json").read_text())
    state = load_file(str(common / "clip_vision.safetensors"))
    if not any(k.startswith("vision_model.") for k in state):  # newer transformers drop the prefix
        state = {"vision_model." + k: v for k, v in state.items()}
    return core_clip_vision(env.comfy, config, state, folder)


def _variant(case: Path, scratch: Path) -> Path:
    """The fixture's variant folder; for a DMD schedule, the same weights as a worldstereo-memory-dmd
    variant whose config holds the fixture's schedule (the released DMD variant's case)."""
    fixture = json.loads((case / "config.json").read_text())
    folder = (case / fixture["transformer_fixture"].split()[0]).resolve()
    scheduler = fixture["scheduler"]
    if scheduler["class"] != "FlowGeneratorScheduler":
        return folder
    kw = scheduler["kwargs"]
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="worldstereo-memory-dmd", dmd_start_steps=kw["start_timesteps"],
                  dmd_end_steps=kw["num_train_timesteps"], gen_shift=kw["shift"], dmd_steps=kw["dmd_steps"])
    dmd = scratch / "dmd" / "worldstereo-memory-dmd"
    dmd.mkdir(parents=True)
    (dmd / "config.json").write_text(json.dumps(config))
    (dmd / "model.safetensors").symlink_to(folder / "model.safetensors")
    return dmd


class FixedNoise:
    """A NOISE (as the core noise nodes give it) that is the fixture's initial noise."""

    seed = 0

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise = noise

    def generate_noise(self, latent: dict) -> torch.Tensor:
        assert latent["samples"].shape == self.noise.shape
        return self.noise.clone()


def _sigmas_and_sampler(env, case: Path, native):
    """(SIGMAS, SAMPLER, CFG) from our nodes (and core euler for DMD) for the fixture's schedule."""
    fixture = json.loads((case / "config.json").read_text())
    scheduler = fixture["scheduler"]
    nodes = env.nodes
    if scheduler["class"] == "FlowGeneratorScheduler":
        sigmas = nodes.DMDSigmas.execute(native).args[0]
        return sigmas, env.comfy.samplers.sampler_object("euler"), 1.0
    sigmas = nodes.ReleaseSigmas.execute(native, scheduler["num_inference_steps"],
                                         scheduler["config"]["flow_shift"]).args[0]
    sampler = nodes.ReleaseUniPCSampler.execute(scheduler["config"]["solver_order"]).args[0]
    return sigmas, sampler, float(fixture["call_kwargs"]["guidance_scale"])


def _close(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    err = (got - expected).abs().max().item()
    print(f"{name}: max |diff| {err:.3g}")
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=atol), f"{name}: max |diff| {err:.3g}"


@pytest.mark.parametrize("case", _pipeline_cases() or [None], ids=lambda p: p.name if p else "absent")
def test_pipeline_fixture_through_native_nodes(env, case, tmp_path):
    if case is None:
        pytest.skip(f"no pipeline fixtures under {fixtures_root() / 'reference_tiny'}")
    import comfy_extras.nodes_custom_sampler as custom

    common = _common()
    fixture = json.loads((case / "config.json").read_text())
    host = ComfyHost(env, tmp_path)
    native = host.load(_variant(case, tmp_path))
    config = env.native.model.variant_config(native)
    vae, clip_vision = core_vae(env, common), fixture_clip_vision(env, common, tmp_path)
    inputs, outputs = load_file(str(case / "inputs.safetensors")), load_file(str(case / "outputs.safetensors"))
    latent_format = native.model.latent_format

    names = ("render_video", "render_mask", "camera_embedding") + (
        ("reference_video", "ref_index", "camera_qt", "camera_qt_ref") if config.is_memory else ())
    seen = []
    with torch.inference_mode():
        positive, negative, latent = env.conditioning.worldstereo_conditioning(
            [[inputs["prompt_embeds"], {}]], [[inputs["negative_prompt_embeds"], {}]], vae, clip_vision,
            inputs["image_uint8_hwc"].numpy(), env.conditioning.ClipInputs(**{k: inputs[k] for k in names}),
            latent_cond_mode=fixture["call_kwargs"]["latent_cond_mode"],
            progress=lambda done, total: seen.append((done, total)))
    keyframes = inputs["render_video"].shape[2] + (inputs["reference_video"].shape[2] if config.is_memory else 0)
    assert seen == [(i + 1, 2 + keyframes) for i in range(2 + keyframes)]  # CLIP, image condition, each keyframe

    options = positive[0][1]
    assert negative[0][1]["model_conds"] == options["model_conds"]  # one condition for both CFG halves
    embeds = options["clip_vision_output"].penultimate_hidden_states
    _close("image_embeds", embeds[..., :outputs["image_embeds"].shape[-1]], outputs["image_embeds"], CONDITION_ATOL)
    step0 = outputs["step0_latent_model_input"]
    _close("I2V condition", latent_format.process_in(options["concat_latent_image"]), step0[:, 20:], CONDITION_ATOL)
    assert torch.equal(1.0 - options["concat_mask"], step0[:, 16:20])
    conds = options["model_conds"]
    _close("render_latent", conds["worldstereo_render_latent"].cond, outputs["render_latent"], CONDITION_ATOL)
    if config.is_memory:
        _close("reference_latent", conds["worldstereo_reference_latent"].cond, outputs["reference_latent"],
               CONDITION_ATOL)
    noise = step0[:, :16]
    assert latent["samples"].shape == noise.shape and not latent["samples"].any()

    sigmas, sampler, cfg = _sigmas_and_sampler(env, case, native)
    (guider,) = custom.CFGGuider().get_guider(native, positive, negative, cfg)
    with torch.inference_mode():
        out, _ = custom.SamplerCustomAdvanced().sample(FixedNoise(noise), guider, sampler, sigmas, latent)
    _close("final_latents", latent_format.process_in(out["samples"]), outputs["final_latents"], FINAL_ATOL)

    final = {"samples": latent_format.process_out(outputs["final_latents"])}
    with torch.inference_mode():
        result = env.nodes.DecodeKeyframes.execute(vae, final, 16.0)
    images, video = result.args
    expected = ((outputs["decoded_video"][0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)  # [F, H, W, 3]
    _close("decoded keyframes", images, expected, FINAL_ATOL)
    components = video.get_components()
    assert torch.equal(components.images, images) and components.frame_rate == 16


# ----- the conditioning node on a scene ------------------------------------------------------------

def test_conditioning_node_memory_fallback_and_errors(env, tmp_path):
    """A memory variant without connected memory is conditioned on the start image as its one
    reference (ref_index [0], the first camera's pose); a camera variant refuses a memory and has no
    memory inputs; the latent has one frame per render frame."""
    common = _common()
    host = ComfyHost(env, tmp_path)
    memory_model, camera_model = host.load(_fixture("memory")), host.load(_fixture("camera"))
    vae, clip_vision = core_vae(env, common), fixture_clip_vision(env, common, tmp_path)
    frames, height, width = 3, 32, 48
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (1, height, width, 3), generator=g) / 255.0  # exact in uint8, as references are
    render = torch.rand(frames, height, width, 3, generator=g)
    render[0] = start[0]
    holes = (torch.rand(frames, height, width, generator=g) > 0.7).float()
    w2c = torch.eye(4).repeat(frames, 1, 1)
    w2c[:, 0, 3] = torch.arange(frames) * 0.1
    K = torch.tensor([[40.0, 0, width / 2], [0, 40.0, height / 2], [0, 0, 1]]).repeat(frames, 1, 1)
    trajectory = CameraTrajectory(w2c=w2c, K=K, width=width, height=height)
    text = [[torch.randn(1, 512, 32, generator=g), {}]]
    node = env.nodes.Conditioning
    with torch.inference_mode():
        positive, negative, latent = node.execute(memory_model, text, text, vae, clip_vision, start, render, holes,
                                                  trajectory).args
        conds = positive[0][1]["model_conds"]
        assert conds["worldstereo_ref_index"].cond == (0,)
        reference = conds["worldstereo_reference_latent"].cond
        assert reference.shape == (1, 36, 1, height // 8, width // 8)
        start_latent = conds["worldstereo_render_latent"].cond[:, :, :1]  # frame 0 of the render is the start
        assert torch.allclose(reference[:, :16], start_latent, atol=1e-5)
        assert latent["samples"].shape == (1, 16, frames, height // 8, width // 8)

        positive, _, _ = node.execute(camera_model, text, text, vae, clip_vision, start, render, holes,
                                      trajectory).args
        assert "worldstereo_reference_latent" not in positive[0][1]["model_conds"]
        memory = env.types.Memory(frames=np.zeros((1, height, width, 3), np.uint8),
                                  ref_index=torch.zeros(1, dtype=torch.long), w2c=w2c[:1])
        with pytest.raises(InputError, match="takes no memory"):
            node.execute(camera_model, text, text, vae, clip_vision, start, render, holes, trajectory, memory)
        with pytest.raises(InputError, match="not run WorldStereo"):
            env.nodes.ReleaseSigmas.execute(env.comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu"),
                                            40, 0.0)
        with pytest.raises(InputError, match="not a DMD variant"):
            env.nodes.DMDSigmas.execute(memory_model)


# ----- the loop's generator on the native MODEL ----------------------------------------------------

class FixedText:
    """A stand-in for the core CLIP text encoder: the fixture's embeddings for its two prompts (and a
    patcher, whose identity joins the generator's resume key, as the core CLIP has)."""

    def __init__(self, env, embeddings: dict[str, torch.Tensor]) -> None:
        self.embeddings = embeddings
        self.patcher = env.comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu")

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        return [[self.embeddings[tokens], {}]]


def _request(memory: bool, seed: int = 5, noise_index: int = 1):
    """A small synthetic clip request (3 keyframes of 32x48; two references for memory models)."""
    from worldstereo_core.tasks.generate import GenerationRequest

    frames, height, width = 3, 32, 48
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    render = torch.rand(frames, 3, height, width, generator=g) * 2 - 1
    render[0] = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    w2c = torch.eye(4).repeat(frames, 1, 1)
    w2c[:, 0, 3] = torch.arange(frames) * 0.1
    K = torch.tensor([[40.0, 0, width / 2], [0, 40.0, height / 2], [0, 0, 1]]).repeat(frames, 1, 1)
    extra = {}
    if memory:
        extra = dict(references=torch.randint(0, 256, (2, height, width, 3), generator=g, dtype=torch.uint8).numpy(),
                     ref_index=torch.tensor([1, 0]), ref_w2cs=w2c[[2, 0]].clone())
    return GenerationRequest(image=image, prompt="prompt", render=render,
                             render_mask=(torch.rand(frames, 1, height, width, generator=g) > 0.7).float(),
                             trajectory=CameraTrajectory(w2c=w2c, K=K, width=width, height=height), seed=seed,
                             noise_index=noise_index, **extra)


@pytest.mark.parametrize("case", _pipeline_cases() or [None], ids=lambda p: p.name if p else "absent")
def test_native_generator_matches_the_pipeline_generator(env, case, tmp_path):
    """The loop's generator interface on the native MODEL (core VAE, CLIP vision and sampler) gives
    the clip the diffusers PipelineClipGenerator gives for the same request (same weights, schedule,
    seed and noise index): frames within 1e-3, progress once per step."""
    if case is None:
        pytest.skip(f"no pipeline fixtures under {fixtures_root() / 'reference_tiny'}")
    _pipeline = import_test_module("pipelines/test_pipelines")._pipeline
    from tiny_components import load_fixture_common
    from worldstereo_core.tasks.generate import PipelineClipGenerator

    common = _common()
    fixture = json.loads((case / "config.json").read_text())
    inputs = load_file(str(case / "inputs.safetensors"))
    texts = {"prompt": inputs["prompt_embeds"], "negative": inputs["negative_prompt_embeds"]}
    pipeline, _ = _pipeline(case, load_fixture_common(common))
    dmd = fixture["scheduler"]["class"] == "FlowGeneratorScheduler"
    steps = None if dmd else fixture["scheduler"]["num_inference_steps"]
    reference = PipelineClipGenerator(pipeline, num_inference_steps=steps, guidance_scale=None if dmd else
                                  float(fixture["call_kwargs"]["guidance_scale"]), prompt_embeds=texts["prompt"],
                                  negative_prompt_embeds=texts["negative"])

    native = ComfyHost(env, tmp_path).load(_variant(case, tmp_path))
    sigmas, sampler, cfg = _sigmas_and_sampler(env, case, native)
    generator_module = importlib.import_module(f"{env.package}.nodes.native.generator")
    generator = generator_module.NativeClipGenerator(native, FixedText(env, texts), core_vae(env, common),
                                                 fixture_clip_vision(env, common, tmp_path), sigmas=sigmas,
                                                 sampler=sampler, cfg=cfg, negative_prompt="negative")
    assert generator.memory == reference.memory and generator.steps == reference.steps
    request = _request(generator.memory)
    seen = []
    with torch.inference_mode():
        frames = generator(request, progress=lambda done, total: seen.append((done, total)))
        expected = reference(request)
    _close("generated frames", torch.from_numpy(frames), torch.from_numpy(expected), FINAL_ATOL)
    assert seen == [(i + 1, generator.steps) for i in range(generator.steps)]
    key = generator.resume_key()
    assert key["variant"] == env.native.model.variant_config(native).model_type and len(key["sigmas"]) == len(sigmas)
