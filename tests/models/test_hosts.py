"""One suite, two hosts: the WorldStereo forward on diffusers' Wan (``worldstereo_core.models``) and
on ComfyUI's own ``WanModel`` (``nodes/native``), from the same checkpoints and inputs.

The ComfyUI host runs in the real ComfyUI (``../shared/comfyui/ComfyUI`` or ``$COMFYUI_DIR``; its
tests skip when it is absent), CPU float32: its models come from ComfyUI's own loader (Load
Diffusion Model's ``comfy.sd.load_diffusion_model`` for a single-file base, with the variant as
weight patches, or ``load_diffusion_model_state_dict`` for a complete variant file), the inputs
reach its ``WanModel`` as the samplers pass them (conditioning ``model_conds``), and ComfyUI's
model management loads the patched weights. Checkpoints are the reference fixtures' weights,
converted (``comfy_native_env``). The ComfyUI-only tests at the end cover what only that host
has: weight patches over a core model, LoRA stacking, partial loading, fp8 weights, and the
errors for a base the variant does not fit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_native_env import real_comfy, tile_image_features, tiny_detection, widen_image_embedder
from conftest import fixtures_root
from tiny_checkpoints import (CAMERA, MEMORY, random_state_dict, split_backbone, tiny_controlnet_cfg, tiny_inputs,
                              tiny_transformer_config, write_single_file_base, write_variant)
from worldstereo_core.errors import CheckpointError, InputError
from worldstereo_core.loading import load_worldstereo_transformer
from worldstereo_core.loading.wan_keys import diffusers_to_original
from worldstereo_core.models import load_worldstereo_config

ATOL = RTOL = 1e-4
HOSTS = ("diffusers", "comfyui")


def _forward_fixtures() -> list[Path]:
    root = fixtures_root() / "reference_tiny"
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if (p / "config.json").is_file()
            and json.loads((p / "config.json").read_text()).get("fixture_kind") == "transformer_forward"]


FIXTURES = _forward_fixtures()


def _fixture_inputs(folder: Path) -> dict:
    return load_file(str(folder / "inputs.safetensors"))


# ----- the two hosts ---------------------------------------------------------------------------

class DiffusersHost:
    name = "diffusers"

    def load(self, variant_dir: Path, *, attention_scope: str = "full"):
        return load_worldstereo_transformer(variant_dir, dtype=torch.float32, device="cpu",
                                            attention_scope=attention_scope)

    def forward(self, model, inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]


class ComfyHost:
    """Variants are rewritten for ComfyUI's fixed CLIP width (exactly, see comfy_native_env) and
    loaded without a base, as a complete variant file (the DMD release's case)."""

    name = "comfyui"

    def __init__(self, env, scratch: Path) -> None:
        self.env, self.scratch = env, scratch

    def comfy_variant(self, variant_dir: Path, tensors: dict | None = None) -> Path:
        """``variant_dir`` (its config and ``tensors``, default its weights) widened for ComfyUI."""
        config = json.loads((variant_dir / "config.json").read_text())
        config["model_type"] = load_worldstereo_config(variant_dir).model_type
        folder = self.scratch / f"comfy{len(list(self.scratch.glob('comfy*')))}" / config["model_type"]
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        tensors = load_file(str(variant_dir / "model.safetensors")) if tensors is None else tensors
        save_file(widen_image_embedder(tensors), str(folder / "model.safetensors"))
        return folder

    def transformer_config(self, folder: Path) -> dict:
        return json.loads((folder / "config.json").read_text())["transformer"]

    def load(self, variant_dir: Path, *, attention_scope: str = "full"):
        folder = self.comfy_variant(variant_dir)
        with tiny_detection(self.env.comfy, self.transformer_config(folder)):
            return self.env.native.model.load_complete_variant(folder, {"dtype": torch.float32},
                                                               attention_scope=attention_scope)

    def forward(self, native, inputs: dict) -> torch.Tensor:
        return comfy_forward(self.env, native, inputs)


def _memory(env, inputs: dict):
    """The memory inputs of fixture-style ``inputs`` (None without references)."""
    if inputs.get("reference_latent") is None:
        return None
    return env.native.conds.MemoryInputs(inputs["reference_latent"], inputs.get("ref_index"), inputs.get("camera_qt"),
                                         inputs.get("camera_qt_ref"))


def comfy_forward(env, native, inputs: dict, *, load: bool = True) -> torch.Tensor:
    """``native``'s diffusion model on fixture-style inputs, called as ComfyUI's samplers call it:
    weights loaded (patched) by model management (unless ``load`` is False: the caller loaded
    them), WorldStereo inputs as processed model_conds."""
    conds = env.native.conds.worldstereo_model_conds(
        inputs["render_latent"], inputs["render_mask"], inputs.get("camera_embedding"), _memory(env, inputs))
    batch = inputs["hidden_states"].shape[0]
    kwargs = {name: cond.process_cond(batch_size=batch, area=None).cond for name, cond in conds.items()}
    wrappers = {kind: {key: list(fns) for key, fns in entries.items()} for kind, entries in native.wrappers.items()}
    options = {"wrappers": wrappers}  # what sampling puts in transformer_options
    timestep = inputs["timestep"].float().reshape(-1).expand(batch)
    with torch.inference_mode():  # as ComfyUI executes nodes
        if load:
            env.comfy.model_management.load_models_gpu([native, *native.get_nested_additional_models()])
        return native.model.diffusion_model(inputs["hidden_states"], timestep, inputs["encoder_hidden_states"],
                                            clip_fea=tile_image_features(inputs["encoder_hidden_states_image"]),
                                            transformer_options=options, **kwargs)


@pytest.fixture(scope="module")
def comfy_env():
    with real_comfy() as env:
        yield env
        env.comfy.model_management.unload_all_models()


@pytest.fixture(params=HOSTS)
def host(request, tmp_path):
    if request.param == "diffusers":
        return DiffusersHost()
    return ComfyHost(request.getfixturevalue("comfy_env"), tmp_path)


# ----- the shared suite ------------------------------------------------------------------------

@pytest.mark.parametrize("folder", FIXTURES or [None], ids=lambda p: p.name if p else "absent")
def test_reference_fixture_forward(host, folder):
    """Each transformer_forward fixture (camera, memory, memory_noupdate, ...) within 1e-4."""
    if folder is None:
        pytest.skip(f"no transformer_forward fixtures under {fixtures_root() / 'reference_tiny'}")
    out = host.forward(host.load(folder), _fixture_inputs(folder))
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    err = (out - ref).abs().max().item()
    print(f"{host.name} {folder.name}: max |diff| {err:.3g}")
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL), f"max |diff| {err:.3g}"


def _random_variant(root: Path, model_type: str, seed: int, **cn_overrides) -> tuple[Path, dict, dict]:
    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(model_type, tcfg, **cn_overrides)
    folder = write_variant(root / f"seed{seed}", model_type, random_state_dict(model_type, tcfg, ccfg, seed=seed),
                           controlnet_cfg=ccfg, transformer_config=tcfg)
    return folder, tcfg, ccfg


def test_batch_shares_conditions_exactly(host, tmp_path):
    """A batch of two (CFG-style: same conditions, other text) equals two separate calls."""
    folder, tcfg, ccfg = _random_variant(tmp_path, MEMORY, seed=1)
    model = host.load(folder)
    one = tiny_inputs(MEMORY, tcfg, ccfg, seed=2)
    other_text = torch.randn_like(one["encoder_hidden_states"])
    both = dict(one, encoder_hidden_states=torch.cat([one["encoder_hidden_states"], other_text]),
                **{k: torch.cat([v, v]) for k, v in one.items()
                   if k not in ("encoder_hidden_states", "ref_index")})
    out = host.forward(model, both)
    assert torch.allclose(out[0], host.forward(model, one), atol=1e-5)
    assert torch.allclose(out[1], host.forward(model, dict(one, encoder_hidden_states=other_text)), atol=1e-5)


def _frames_changed(a, b, tol=1e-6):
    return ((a - b).abs().amax(dim=(0, 1, 3, 4)) > tol).tolist()


@pytest.mark.parametrize("update_ref", [True, False])
def test_pairs_scope_reference_reaches_only_its_target_frame(host, tmp_path, update_ref):
    """Restricted attention: perturbing reference m changes output frame ref_index[m]+1 only, in
    every block; with the released full attention the same perturbation reaches every frame."""
    folder, tcfg, ccfg = _random_variant(tmp_path, MEMORY, seed=3, update_ref=update_ref)
    inputs = tiny_inputs(MEMORY, tcfg, ccfg, frames=4, ref_index=(2, 0, 2), seed=4)
    bumped = dict(inputs, reference_latent=inputs["reference_latent"].clone())
    bumped["reference_latent"][:, :, 1] += 1.0  # reference 1 -> target frame 1
    pairs = host.load(folder, attention_scope="pairs")
    assert _frames_changed(host.forward(pairs, inputs), host.forward(pairs, bumped)) == [False, True, False, False]
    full = host.load(folder)
    assert _frames_changed(host.forward(full, inputs), host.forward(full, bumped)) == [True] * 4


# ----- ComfyUI only: a native MODEL over a core model --------------------------------------------

def _fixture(kind: str = "memory") -> Path:
    """A forward fixture of ``kind`` (a memory one by default: it exercises every branch)."""
    for folder in FIXTURES:
        if (json.loads((folder / "config.json").read_text())["model_type"] != CAMERA) == (kind == "memory"):
            return folder
    pytest.skip(f"no {kind} transformer_forward fixture under {fixtures_root() / 'reference_tiny'}")


@pytest.fixture
def comfy_host(comfy_env, tmp_path):
    return ComfyHost(comfy_env, tmp_path)


def _core_model(comfy_host: ComfyHost, backbone: dict, transformer_config: dict, path: Path, **model_options):
    """A core MODEL as Load Diffusion Model gives it, from a ComfyUI single file of ``backbone``
    (diffusers names, widened for ComfyUI's CLIP width on the way)."""
    write_single_file_base(path, widen_image_embedder(backbone))
    with tiny_detection(comfy_host.env.comfy, transformer_config):
        return comfy_host.env.comfy.sd.load_diffusion_model(str(path), {"dtype": torch.float32, **model_options})


def _fixture_parts(folder: Path) -> tuple[dict, dict, dict]:
    """(backbone, branch tensors, transformer config) of a fixture."""
    backbone, branches = split_backbone(load_file(str(folder / "model.safetensors")))
    return backbone, branches, json.loads((folder / "config.json").read_text())["transformer"]


def _random_backbone(folder: Path, seed: int) -> dict:
    config = json.loads((folder / "config.json").read_text())
    state = random_state_dict(config["model_type"], config["transformer"], config["controlnet_cfg"], seed=seed)
    return split_backbone(state)[0]


def _assert_reproduces(out: torch.Tensor, folder: Path) -> None:
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL), f"max |diff| {(out - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("folder", FIXTURES or [None], ids=lambda p: p.name if p else "absent")
def test_variant_backbone_patches_a_core_model(comfy_host, folder, tmp_path):
    """A complete variant over an unrelated core model of the same shape: its backbone becomes weight
    patches that replace every base tensor (the result is the fixture's), the base stays untouched."""
    if folder is None:
        pytest.skip("no transformer_forward fixtures")
    backbone, _, tcfg = _fixture_parts(folder)
    base = _core_model(comfy_host, _random_backbone(folder, seed=11), tcfg, tmp_path / "base.safetensors")
    native = comfy_host.env.native.model.apply_variant(base, comfy_host.comfy_variant(folder))
    assert native.is_clone(base) and not base.patches and not base.object_patches
    assert len(native.patches) + len(native.object_patches) == len(backbone)
    assert all(k.endswith(".modulation") for k in native.object_patches)
    _assert_reproduces(comfy_forward(comfy_host.env, native, _fixture_inputs(folder)), folder)


def test_branches_are_an_additional_model_built_with_comfy_ops(comfy_host, tmp_path):
    """The branches travel with the MODEL (and its clones) as the additional model ComfyUI's
    sampling loads beside it, sized by their own tensors; every layer casts like a comfy.ops layer.
    A variant file without the unused ``ref_index_embedding`` gets the reference's zeros."""
    folder = _fixture()
    backbone, branches, tcfg = _fixture_parts(folder)
    base = _core_model(comfy_host, backbone, tcfg, tmp_path / "base.safetensors")
    stored = {k: v for k, v in branches.items() if not k.startswith("ref_index_embedding.")}
    native = comfy_host.env.native.model.apply_variant(base, comfy_host.comfy_variant(folder, stored))
    (extra,) = native.get_additional_models_with_key("worldstereo")
    module = extra.model
    assert set(module.state_dict()) == set(branches)
    assert not module.ref_index_embedding.weight.any()
    assert extra.model_size() == sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert extra in native.get_nested_additional_models() and not base.get_nested_additional_models()
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.LayerNorm,
                                                             torch.nn.GroupNorm, torch.nn.Embedding))]
    assert layers and all(hasattr(m, "comfy_cast_weights") for m in layers)
    assert native.clone().get_additional_models_with_key("worldstereo")[0].model is module
    _assert_reproduces(comfy_forward(comfy_host.env, native, _fixture_inputs(folder)), folder)


def test_partially_loaded_model_applies_patches_per_layer(comfy_host, tmp_path):
    """Loaded with (almost) no memory budget, every layer streams its weights and the variant's
    patches are applied on the fly: the output is unchanged."""
    folder = _fixture()
    _, _, tcfg = _fixture_parts(folder)
    base = _core_model(comfy_host, _random_backbone(folder, seed=12), tcfg, tmp_path / "base.safetensors")
    native = comfy_host.env.native.model.apply_variant(base, comfy_host.comfy_variant(folder))
    comfy_host.env.comfy.model_management.unload_all_models()
    cpu = torch.device("cpu")
    try:
        with torch.inference_mode():
            for patcher in (native, *native.get_nested_additional_models()):
                patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
        assert native.model.model_lowvram and native.lowvram_patch_counter() > 0
        _assert_reproduces(comfy_forward(comfy_host.env, native, _fixture_inputs(folder), load=False), folder)
    finally:
        for patcher in (native, *native.get_nested_additional_models()):
            patcher.unpatch_model(cpu)


#: Layers a tiny LoRA adapts (ComfyUI Wan names -> diffusers names).
LORA_TARGETS = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj",
                "blocks.2.cross_attn.k_img": "blocks.2.attn2.add_k_proj"}


def _tiny_lora(backbone: dict, rank: int = 4, alpha: float = 2.0, strength: float = 0.7
               ) -> tuple[dict, dict, float]:
    """(LoRA file tensors in ComfyUI's Wan key format, backbone with the LoRA merged, strength)."""
    g = torch.Generator().manual_seed(5)
    lora, merged = {}, dict(backbone)
    for comfy_name, name in LORA_TARGETS.items():
        weight = backbone[name + ".weight"]
        down = torch.randn(rank, weight.shape[1], generator=g) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=g) * 0.3
        prefix = f"diffusion_model.{comfy_name}"
        lora.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                     f"{prefix}.alpha": torch.tensor(alpha)})
        merged[name + ".weight"] = weight + (strength * alpha / rank) * (up @ down)
    return lora, merged, strength


def test_lora_stacks_on_the_variant_as_merging_it_would(comfy_host, tmp_path):
    """A core LoRA (ComfyUI's Wan key format, through comfy.sd.load_lora_for_models as
    LoraLoaderModelOnly calls it) applied to the native MODEL changes the output exactly as merging
    it into the variant's weights does; a LoRA applied before the WorldStereo node is refused."""
    env = comfy_host.env
    folder = _fixture()
    backbone, branches, tcfg = _fixture_parts(folder)
    lora, merged, strength = _tiny_lora(backbone)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    lora = env.comfy.utils.load_torch_file(str(tmp_path / "lora.safetensors"), safe_load=True)

    base = _core_model(comfy_host, _random_backbone(folder, seed=13), tcfg, tmp_path / "base.safetensors")
    native = env.native.model.apply_variant(base, comfy_host.comfy_variant(folder))
    with_lora, _ = env.comfy.sd.load_lora_for_models(native, None, lora, strength, 0)
    assert all(len(with_lora.patches[f"diffusion_model.{k}.weight"]) == 2 for k in LORA_TARGETS)  # set, then LoRA
    inputs = _fixture_inputs(folder)
    out = comfy_forward(env, with_lora, inputs)

    reference = comfy_host.load(comfy_host.comfy_variant(folder, {**merged, **branches}))
    expected = comfy_forward(env, reference, inputs)
    plain = load_file(str(folder / "outputs.safetensors"))["sample"]
    assert (out - plain).abs().max() > 1e-2                      # the LoRA matters
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), f"{(out - expected).abs().max().item():.3g}"

    lora_first, _ = env.comfy.sd.load_lora_for_models(base, None, lora, strength, 0)
    with pytest.raises(InputError, match="LoRA"):
        env.native.model.apply_variant(lora_first, comfy_host.comfy_variant(folder))


def _write_scaled_fp8(path: Path, backbone: dict) -> None:
    """A ComfyUI "scaled fp8" single file: block Linear weights as float8 e4m3 over a float32 scale."""
    out = {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for key, value in widen_image_embedder(backbone).items():
        name = diffusers_to_original(key)
        if name.startswith("blocks.") and name.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            out[name] = (value / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "scale_weight"] = scale.float()
        else:
            out[name] = value
    save_file(out, str(path))


@pytest.mark.parametrize("weights", ["fp8_e4m3fn", "scaled_fp8"])
def test_fp8_weights_run(comfy_host, tmp_path, weights):
    """A core model with fp8 block weights (loaded as fp8_e4m3fn, or a scaled-fp8 file): the
    variant's patches are stored in fp8 and the forward runs in the compute dtype, close to float32."""
    env = comfy_host.env
    folder = _fixture()
    _, _, tcfg = _fixture_parts(folder)
    backbone = _random_backbone(folder, seed=14)
    path = tmp_path / "base.safetensors"
    if weights == "fp8_e4m3fn":
        base = _core_model(comfy_host, backbone, tcfg, path, dtype=torch.float8_e4m3fn)
    else:
        _write_scaled_fp8(path, backbone)
        with tiny_detection(env.comfy, tcfg):
            base = env.comfy.sd.load_diffusion_model(str(path))
        assert base.model.model_config.scaled_fp8 == torch.float8_e4m3fn
    native = env.native.model.apply_variant(base, comfy_host.comfy_variant(folder))
    out = comfy_forward(env, native, _fixture_inputs(folder))
    assert native.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    error = (out - ref).abs().max().item()
    print(f"{weights} {folder.name}: max |diff| {error:.3g} (output max {ref.abs().max().item():.3g})")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 1e-4 < error < 0.1 * ref.abs().max()  # rounded weights, same model


def _variant_for_other_base(comfy_host, tmp_path, **transformer_overrides):
    """A core model with other sizes than the fixture's, and the fixture variant to apply to it."""
    folder = _fixture()
    config = json.loads((folder / "config.json").read_text())
    tcfg = {**config["transformer"], **transformer_overrides}
    state = random_state_dict(config["model_type"], tcfg, tiny_controlnet_cfg(config["model_type"], tcfg), seed=15)
    base = _core_model(comfy_host, split_backbone(state)[0], tcfg, tmp_path / "other.safetensors")
    return base, comfy_host.comfy_variant(folder)


def test_base_the_variant_does_not_fit_is_named(comfy_host, tmp_path):
    apply_variant = comfy_host.env.native.model.apply_variant
    base, variant = _variant_for_other_base(comfy_host, tmp_path / "wide", attention_head_dim=24,
                                            added_kv_proj_dim=48)
    with pytest.raises(CheckpointError, match="24-wide .* 48 wide"):
        apply_variant(base, variant)
    base, variant = _variant_for_other_base(comfy_host, tmp_path / "ffn", ffn_dim=56)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.weight \[40, 24\] \(model expects \[56, 24\]\)"):
        apply_variant(base, variant)

    folder = _fixture()
    backbone, _, tcfg = _fixture_parts(folder)
    t2v = {k: v for k, v in backbone.items() if not k.startswith("condition_embedder.image_embedder.")
           and ".attn2.add_" not in k and ".attn2.norm_added_k" not in k}
    write_single_file_base(tmp_path / "t2v.safetensors", t2v)
    with tiny_detection(comfy_host.env.comfy, tcfg):
        base = comfy_host.env.comfy.sd.load_diffusion_model(str(tmp_path / "t2v.safetensors"), {"dtype": torch.float32})
    with pytest.raises(InputError, match="text-to-video"):
        apply_variant(base, comfy_host.comfy_variant(folder))


# ----- ComfyUI only: sampling with the core samplers ---------------------------------------------

def _release_conditioning(env, case: Path, latent_format, text: torch.Tensor, model_conds: dict | None = None
                          ) -> tuple[list, torch.Tensor]:
    """Core CONDITIONING for ``text`` carrying a pipeline fixture's prepared inputs the way ComfyUI's
    Wan I2V nodes do (raw-space condition latent + concat mask, CLIP vision output) plus the
    WorldStereo model_conds (``model_conds``: share another conditioning's), and the initial noise."""
    inputs, outputs = load_file(str(case / "inputs.safetensors")), load_file(str(case / "outputs.safetensors"))
    step0 = outputs["step0_latent_model_input"]
    noise, i2v_mask, condition = step0[:, :16], step0[:, 16:20], step0[:, 20:]
    clip = env.comfy.clip_vision.Output()
    clip.penultimate_hidden_states = tile_image_features(outputs["image_embeds"])
    if model_conds is None:
        model_conds = env.native.conds.worldstereo_model_conds(
            outputs["render_latent"], inputs["render_mask"], inputs["camera_embedding"],
            _memory(env, {**inputs, "reference_latent": outputs.get("reference_latent")}))
    options = {"concat_latent_image": latent_format.process_out(condition), "concat_mask": 1.0 - i2v_mask,
               "clip_vision_output": clip}
    return env.native.conds.with_model_conds([[text, options]], model_conds), noise


def _pipeline_fixtures() -> list[Path]:
    root = fixtures_root() / "reference_tiny"
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if (p / "config.json").is_file()
            and json.loads((p / "config.json").read_text()).get("fixture_kind", "").startswith("pipeline")]


def _release_sampling(env, case: Path, config) -> tuple[torch.Tensor, object, float]:
    """(SIGMAS, SAMPLER, CFG) reproducing a pipeline fixture's sampling with the native nodes' schedules."""
    fixture = json.loads((case / "config.json").read_text())
    sampling = env.native.sampling
    scheduler = fixture["scheduler"]
    if scheduler["class"] == "FlowGeneratorScheduler":
        kw = scheduler["kwargs"]
        config = dataclasses.replace(config, dmd_start_steps=kw["start_timesteps"],
                                     dmd_end_steps=kw["num_train_timesteps"], gen_shift=kw["shift"],
                                     dmd_steps=kw["dmd_steps"])
        return sampling.dmd_sigmas(config), env.comfy.samplers.sampler_object("euler"), 1.0
    sigmas = sampling.release_unipc_sigmas(scheduler["num_inference_steps"], scheduler["config"]["flow_shift"])
    return sigmas, sampling.release_unipc_sampler(scheduler["config"]["solver_order"]), \
        float(fixture["call_kwargs"]["guidance_scale"])


@pytest.mark.parametrize("case", _pipeline_fixtures() or [None], ids=lambda p: p.name if p else "absent")
def test_release_pipeline_through_core_sampler(comfy_host, case):
    """Every pipeline fixture, sampled by ComfyUI's own sampler (sample_custom, as
    SamplerCustomAdvanced runs it, CFG by the core guider) with the native MODEL and the release's
    SIGMAS/SAMPLER: the same model timesteps, final latents within 1e-3, and the ControlNet embeds
    the clip's mask and rays once for the whole run (every step, both CFG halves)."""
    if case is None:
        pytest.skip(f"no pipeline fixtures under {fixtures_root() / 'reference_tiny'}")
    env = comfy_host.env
    fixture = json.loads((case / "config.json").read_text())
    folder = (case / fixture["transformer_fixture"].split()[0]).resolve()
    native = comfy_host.load(folder)
    sigmas, sampler, cfg = _release_sampling(env, case, load_worldstereo_config(folder))

    inputs, outputs = load_file(str(case / "inputs.safetensors")), load_file(str(case / "outputs.safetensors"))
    latent_format = native.model.latent_format
    positive, noise = _release_conditioning(env, case, latent_format, inputs["prompt_embeds"])
    negative, _ = _release_conditioning(env, case, latent_format, inputs["negative_prompt_embeds"],
                                        model_conds=positive[0][1]["model_conds"])
    timesteps, embeddings = [], []
    wan = native.model.diffusion_model
    branches = native.get_additional_models_with_key("worldstereo")[0].model
    hooks = [wan.register_forward_pre_hook(lambda m, args: timesteps.append(args[1][0].item())),
             branches.controlnet.controlnet_mask_embedding.register_forward_hook(lambda *_: embeddings.append(1))]
    try:
        with torch.inference_mode():
            samples = env.comfy.sample.sample_custom(native, noise, cfg, sampler, sigmas, positive, negative,
                                                     torch.zeros_like(noise), disable_pbar=True, seed=0)
    finally:
        for hook in hooks:
            hook.remove()
    calls = fixture["transformer_calls_per_step"]
    expected_t = [outputs[f"call{k}_timestep"].item() for k in range(0, len(timesteps) * calls, calls)]
    assert len(timesteps) == len(sigmas) - 1 and timesteps == pytest.approx(expected_t, abs=1e-3)
    latents = latent_format.process_in(samples)
    err = (latents - outputs["final_latents"]).abs().max().item()
    print(f"comfyui {case.name}: final latents max |diff| {err:.3g}")
    assert torch.allclose(latents, outputs["final_latents"], atol=1e-3), f"max |diff| {err:.3g}"
    assert len(embeddings) == 1


def test_dmd_scheduler_is_core_euler_on_dmd_sigmas(comfy_env):
    """The dmd_scheduler fixture: dmd_sigmas gives its sigmas (then 0), and ComfyUI's euler sampler
    steps exactly as the release's DMD scheduler from every one of them."""
    folder = fixtures_root() / "reference_tiny" / "dmd_scheduler"
    if not folder.is_dir():
        pytest.skip(f"no dmd_scheduler fixture under {folder.parent}")
    fixture = json.loads((folder / "config.json").read_text())
    kw = fixture["scheduler_kwargs"]
    config = SimpleNamespace(**{field: kw[arg] for arg, field in fixture["maps_from_worldstereo_config"].items()})
    data = load_file(str(folder / "dmd.safetensors"))
    sigmas = comfy_env.native.sampling.dmd_sigmas(config)
    assert torch.equal(sigmas[:-1], data["sigmas"]) and sigmas[-1] == 0
    euler = comfy_env.comfy.samplers.sampler_object("euler").sampler_function
    sample, velocity = data["sample"], data["model_output"]
    for i in range(len(sigmas) - 1):
        def flow_model(x, sigma, **_):  # x0 prediction of a flow model predicting ``velocity``
            return x - sigma.reshape(-1, *[1] * (x.ndim - 1)) * velocity

        out = euler(flow_model, sample, sigmas[i:i + 2], disable=True)
        assert torch.allclose(out, data[f"step_{i}_prev_sample"], atol=1e-6), f"step {i}"
