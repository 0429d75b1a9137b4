"""The camera / memory / DMD samplers end to end on the tiny reference models.

Golden checks iterate over every reference_tiny folder whose config.json fixture_kind starts with
"pipeline": the transformer comes from the folder named by ``transformer_fixture``, the VAE and
CLIP from ``common/``, the scheduler from the fixture config. Every transformer call, the final
latents and the decoded keyframes are compared, with CFG batched and with separate calls.
"""
from __future__ import annotations

import gc
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import fixtures_root
from tiny_components import load_fixture_common, reference_tiny_dirs, write_tiny_base
from worldstereo_core.errors import CheckpointError, InputError, Interrupted, MissingWeightsError
from worldstereo_core.loading import load_base_components, load_state_dict_strict
from worldstereo_core.models import WorldStereoConfig, build_transformer
from worldstereo_core.pipelines import (CameraPipeline, DMDScheduler, MemoryDMDPipeline, MemoryPipeline,
                                        build_pipeline, make_generator)
from worldstereo_core.pipelines.schedulers import initial_noise

TINY = fixtures_root() / "reference_tiny"
PIPELINE_DIRS = reference_tiny_dirs(TINY, "pipeline")
#: The reference pipeline classes the fixtures name, and ours.
CLASSES = {"KFPCDControllerPipeline": CameraPipeline, "KFPCDControllerRefPipeline": MemoryPipeline,
           "RefKFDMDGeneratorPipeline": MemoryDMDPipeline}
SETTINGS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "latent_cond_mode")


def _need_fixtures():
    if not PIPELINE_DIRS or not (TINY / "common").is_dir():
        pytest.skip(f"no pipeline fixtures under {TINY} (set WORLDSTEREO_FIXTURES)")


@pytest.fixture(scope="module")
def common():
    _need_fixtures()
    return load_fixture_common(TINY / "common")


def _transformer(case: Path, memory: bool) -> torch.nn.Module:
    cfg = json.loads((case / "config.json").read_text())
    folder = (case / cfg["transformer_fixture"].split()[0]).resolve()
    tcfg = json.loads((folder / "config.json").read_text())
    model = build_transformer(tcfg["transformer"], tcfg["controlnet_cfg"], memory=memory, device="cpu",
                              dtype=torch.float32)
    load_state_dict_strict(model, load_file(str(folder / "model.safetensors")), source=str(folder))
    return model.eval()


def _pipeline(case: Path, common: dict, **options):
    cfg = json.loads((case / "config.json").read_text())
    cls = CLASSES[cfg["pipeline_class"]]
    model = _transformer(case, cls.uses_references)
    parts = dict(image_encoder=common["clip"], image_processor=common["processor"], **options)
    if cls is MemoryDMDPipeline:
        # The reference constructor also takes flags it never uses (use_timestep_transform, t_min, ...).
        known = inspect.signature(DMDScheduler).parameters
        kw = {k: v for k, v in cfg["scheduler"]["kwargs"].items() if k in known}
        return cls(model, common["vae"], scheduler=DMDScheduler(**kw), **parts), cfg
    return cls(model, common["vae"], scheduler_config=cfg["scheduler"]["config"], **parts), cfg


def _call_kwargs(case: Path, cfg: dict) -> dict:
    inp = load_file(str(case / "inputs.safetensors"))
    kw = {k: inp[k] for k in cfg["call_kwargs"] if k in inp}
    kw.update({k: v for k, v in cfg["call_kwargs"].items() if k in SETTINGS})
    kw["image"] = Image.fromarray(inp["image_uint8_hwc"].numpy(), "RGB")
    return kw


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched_cfg", "separate_cfg"])
@pytest.mark.parametrize("case", PIPELINE_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_pipeline_matches_reference(case, batch_cfg, common):
    _need_fixtures()
    pipe, cfg = _pipeline(case, common)
    out = load_file(str(case / "outputs.safetensors"))
    calls, embeddings = [], []
    pipe.transformer.controlnet.controlnet_mask_embedding.register_forward_hook(lambda *_: embeddings.append(1))
    result = pipe(**_call_kwargs(case, cfg), output_type="pt", batch_cfg=batch_cfg, model_call_hook=calls.append)
    assert len(embeddings) == 1  # the mask/Plücker embedding: once per clip, for every step and both CFG halves

    n_calls = len([k for k in out if k.endswith("_noise_pred")])
    assert len(calls) == n_calls
    assert len(calls) == cfg["transformer_calls_per_step"] * len(result.timesteps)
    assert torch.allclose(calls[0].latent_model_input, out["step0_latent_model_input"], atol=1e-4)
    for k, call in enumerate(calls):
        assert torch.allclose(call.timestep.double(), out[f"call{k}_timestep"].double()), f"call {k} timestep"
        # Spec (Clarification 5): UniPC passes int64 timesteps, the DMD generator float32 ones.
        assert call.timestep.dtype == (torch.float32 if isinstance(pipe, MemoryDMDPipeline) else torch.int64)
        assert torch.allclose(call.noise_pred, out[f"call{k}_noise_pred"], atol=1e-3), f"call {k} noise_pred"
    assert torch.allclose(result.latents, out["final_latents"], atol=1e-3)
    decoded = result.frames.permute(0, 2, 1, 3, 4) * 2 - 1                  # [B,F,3,H,W] in [0,1] -> video
    assert torch.allclose(decoded, out["decoded_video"], atol=1e-3)
    assert len(result.timings["step_s"]) == len(result.timesteps)


@pytest.fixture(scope="module")
def camera_case():
    _need_fixtures()
    for case in PIPELINE_DIRS:
        if json.loads((case / "config.json").read_text())["pipeline_class"] == "KFPCDControllerPipeline":
            return case
    pytest.skip("no camera pipeline fixture")


@pytest.fixture(scope="module")
def memory_case():
    """A reference-conditioned fixture, preferring one with CFG (two calls per step)."""
    _need_fixtures()
    cases = [c for c in PIPELINE_DIRS
             if CLASSES[json.loads((c / "config.json").read_text())["pipeline_class"]].uses_references]
    if not cases:
        pytest.skip("no memory pipeline fixture")
    return max(cases, key=lambda c: json.loads((c / "config.json").read_text())["transformer_calls_per_step"])


def _drop(kw: dict, *names: str) -> dict:
    return {k: v for k, v in kw.items() if k not in names}


def test_seed_reproducibility(camera_case, common):
    pipe, cfg = _pipeline(camera_case, common)
    kw = _drop(_call_kwargs(camera_case, cfg), "latents")
    a = pipe(**kw, seed=7, output_type="latent").latents
    b = pipe(**kw, seed=7, output_type="latent").latents
    c = pipe(**kw, seed=8, output_type="latent").latents
    d = pipe(**kw, generator=make_generator(7, "cpu"), output_type="latent").latents
    noise = initial_noise((1, 16, a.shape[2], a.shape[3], a.shape[4]), make_generator(7, "cpu"), "cpu")
    e = pipe(**kw, latents=noise, output_type="latent").latents
    assert torch.equal(a, b) and torch.equal(a, d) and torch.equal(a, e)
    assert not torch.allclose(a, c)
    # the second clip drawn from one generator seeded with 7 (the release's multi-trajectory noise)
    shared = make_generator(7, "cpu")
    second = [torch.randn(noise.shape, generator=shared) for _ in range(2)][1]
    f = pipe(**kw, seed=7, noise_index=1, output_type="latent").latents
    assert torch.equal(f, pipe(**kw, latents=second, output_type="latent").latents) and not torch.equal(f, a)


def test_batch_of_two_matches_single_runs(memory_case, common):
    pipe, cfg = _pipeline(memory_case, common)
    kw = _call_kwargs(memory_case, cfg)
    single = pipe(**kw, output_type="latent").latents
    g = torch.Generator().manual_seed(3)
    other = torch.randn(kw["latents"].shape, generator=g)
    second = pipe(**{**kw, "latents": other}, output_type="latent").latents
    batched_inputs = {k: torch.cat([v, v]) for k, v in kw.items()
                      if k in ("render_video", "render_mask", "camera_embedding", "reference_video")}
    both = pipe(**{**kw, **batched_inputs, "latents": torch.cat([kw["latents"], other])}, output_type="latent")
    assert torch.allclose(both.latents[:1], single, atol=1e-4)
    assert torch.allclose(both.latents[1:], second, atol=1e-4)


def _interrupted_run(pipe, kw, seen) -> bool:
    def stop_at_first_step(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 1:
            raise Interrupted("stopped by the test")
    try:
        pipe(**kw, progress=stop_at_first_step, output_type="np")
    except Interrupted:
        return True
    return False


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), torch.nn.Parameter):
                total += obj.numel() * obj.element_size()
        except ReferenceError:
            continue
    return total


def test_interrupt_stops_cleanly_and_frees_memory(memory_case, common):
    pipe, cfg = _pipeline(memory_case, common)
    kw = _call_kwargs(memory_case, cfg)
    kw["num_inference_steps"] = 3 if "num_inference_steps" in kw else None
    kw = {k: v for k, v in kw.items() if v is not None}
    calls = []
    full = pipe(**kw, output_type="np")                       # warm-up (lazy caches)
    baseline = _live_tensor_bytes()
    seen: list[tuple[int, int]] = []
    assert _interrupted_run(pipe, {**kw, "model_call_hook": calls.append}, seen)
    total = len(full.timesteps)
    assert [s for s in seen if s[0]] == [(1, total)]          # stopped right after step 1 of total
    assert {c.step for c in calls} == {0}
    calls.clear()
    assert _live_tensor_bytes() <= baseline                  # nothing of the aborted run is kept alive
    # The pipeline is reusable and gives the same result as before the interruption.
    again = pipe(**kw, output_type="np")
    assert (again.frames == full.frames).all()
    assert full.frames.shape[0] == 1 and full.frames.shape[-1] == 3


def test_half_precision_runs_under_autocast(memory_case, common):
    """A bf16 transformer and VAE with float32 masks/poses: the autocast glue must hold together."""
    import copy
    pipe, cfg = _pipeline(memory_case, common)
    kw = _call_kwargs(memory_case, cfg)
    ref = pipe(**kw, output_type="latent").latents
    half = type(pipe)(pipe.transformer.to(torch.bfloat16), copy.deepcopy(common["vae"]).to(torch.bfloat16),
                      image_encoder=common["clip"], image_processor=common["processor"],
                      **({"scheduler": pipe.scheduler} if isinstance(pipe, MemoryDMDPipeline)
                         else {"scheduler_config": pipe.scheduler_config}))
    out = half(**kw, output_type="pt")
    assert out.latents.dtype == torch.float32 and out.frames.dtype == torch.float32
    assert torch.isfinite(out.latents).all()
    assert (out.latents - ref).abs().max() < 0.1 * ref.abs().max()   # bf16-level agreement


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_leaves_nothing_on_the_device(memory_case, common):
    pipe, cfg = _pipeline(memory_case, common, device="cuda")
    kw = _call_kwargs(memory_case, cfg)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = pipe(**kw, output_type="pt")
    assert out.latents.device.type == "cpu" and out.frames.device.type == "cpu"
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() == before
    seen: list = []
    assert _interrupted_run(pipe, kw, seen)
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_input_errors(camera_case, memory_case, common):
    cam, ccfg = _pipeline(camera_case, common)
    ckw = _call_kwargs(camera_case, ccfg)
    with pytest.raises(InputError, match="reference"):
        cam(**ckw, reference_video=ckw["render_video"][:, :, :1], output_type="latent")
    with pytest.raises(InputError, match="render_mask"):
        cam(**{**ckw, "render_mask": ckw["render_mask"][:, :, :2]}, output_type="latent")
    with pytest.raises(InputError, match="multiples of 16"):
        cam(**{**ckw, "height": 40}, output_type="latent")
    with pytest.raises(InputError, match="output_type"):
        cam(**ckw, output_type="pil")
    with pytest.raises(InputError, match="prompt"):
        cam(**_drop(ckw, "prompt_embeds"), output_type="latent")
    with pytest.raises(MissingWeightsError, match="text encoder"):
        cam(**_drop(ckw, "prompt_embeds"), prompt="a room", output_type="latent")

    mem, mcfg = _pipeline(memory_case, common)
    mkw = _call_kwargs(memory_case, mcfg)
    with pytest.raises(InputError, match="ref_index"):
        mem(**_drop(mkw, "ref_index"), output_type="latent")
    n_frames = mkw["render_video"].shape[2]
    bad = torch.full_like(mkw["ref_index"], n_frames - 1)
    with pytest.raises(InputError, match="ref_index values"):
        mem(**{**mkw, "ref_index": bad}, output_type="latent")
    with pytest.raises(InputError, match="camera_qt"):
        mem(**{**mkw, "camera_qt": mkw["camera_qt"][:, :1]}, output_type="latent")
    dmd = MemoryDMDPipeline(mem.transformer, mem.vae, image_encoder=common["clip"],
                            image_processor=common["processor"])
    with pytest.raises(InputError, match="guidance"):
        dmd(**_drop(mkw, "guidance_scale", "num_inference_steps"), guidance_scale=5.0, output_type="latent")
    with pytest.raises(InputError, match="dmd_steps"):
        dmd(**_drop(mkw, "num_inference_steps", "guidance_scale"), num_inference_steps=40, output_type="latent")


# ------------------------------------------------------------------------------------------------
# Base components: loading from the real diffusers layout, missing-weight errors, text prompts
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("wan_base"))


def _fixture_model_config(case: Path) -> dict:
    """config.json of the model fixture a pipeline fixture takes its transformer from."""
    cfg = json.loads((case / "config.json").read_text())
    return json.loads(((case / cfg["transformer_fixture"].split()[0]).resolve() / "config.json").read_text())


@pytest.fixture(scope="module")
def camera_case_base(camera_case, tmp_path_factory):
    """A tiny base whose UMT5 and CLIP widths are those of the camera fixture's transformer."""
    tcfg = _fixture_model_config(camera_case)["transformer"]
    return write_tiny_base(tmp_path_factory.mktemp("wan_base_fixture_widths"), text_dim=tcfg["text_dim"],
                           image_dim=tcfg["image_dim"])


def test_text_prompt_end_to_end_with_loaded_base(camera_case_base, camera_case):
    tiny_base = camera_case_base
    base = load_base_components(tiny_base)
    cfg = json.loads((camera_case / "config.json").read_text())
    folder = (camera_case / cfg["transformer_fixture"].split()[0]).resolve()
    controlnet_cfg = json.loads((folder / "config.json").read_text())["controlnet_cfg"]
    config = WorldStereoConfig.from_dict({"base_model": str(tiny_base), "negative_prompt": "blurry",
                                          "controlnet_cfg": controlnet_cfg}, "worldstereo-camera")
    pipe = build_pipeline(config, _transformer(camera_case, memory=False), base)
    assert isinstance(pipe, CameraPipeline) and pipe.negative_prompt == "blurry"
    kw = _drop(_call_kwargs(camera_case, cfg), "prompt_embeds", "negative_prompt_embeds", "num_inference_steps")
    a = pipe(**kw, prompt="a quiet street", num_inference_steps=2, output_type="np")
    b = pipe(**kw, prompt="a quiet street", num_inference_steps=2, output_type="np")
    c = pipe(**kw, prompt="a stormy sea", num_inference_steps=2, output_type="np")
    F, H, W = kw["render_video"].shape[2:]
    assert a.frames.shape == (1, F, H, W, 3) and a.frames.min() >= 0 and a.frames.max() <= 1
    assert (a.frames == b.frames).all() and not torch.equal(a.latents, c.latents)
    assert a.timesteps == [999.0, 833.0]                     # tiny base scheduler: flow_shift 5


def test_encoders_of_another_width_are_refused_by_name(camera_case, tmp_path):
    fixture = _fixture_model_config(camera_case)
    tcfg, model = fixture["transformer"], _transformer(camera_case, memory=False)
    config = WorldStereoConfig.from_dict({"base_model": "x", "controlnet_cfg": fixture["controlnet_cfg"]},
                                         "worldstereo-camera")
    for field, widths in (("text_dim", dict(text_dim=tcfg["text_dim"] + 8, image_dim=tcfg["image_dim"])),
                          ("image_dim", dict(text_dim=tcfg["text_dim"], image_dim=tcfg["image_dim"] + 8))):
        base = load_base_components(write_tiny_base(tmp_path / field, **widths), scheduler=False)
        with pytest.raises(InputError, match=f"{field} {tcfg[field]}"):
            build_pipeline(config, model, base)


def test_build_pipeline_picks_sampler_and_dmd_schedule(tiny_base, memory_case):
    base = load_base_components(tiny_base, text=False, image=False)
    cfg = json.loads((memory_case / "config.json").read_text())
    folder = (memory_case / cfg["transformer_fixture"].split()[0]).resolve()
    controlnet_cfg = json.loads((folder / "config.json").read_text())["controlnet_cfg"]
    model = _transformer(memory_case, memory=True)
    fields = {"base_model": str(tiny_base), "controlnet_cfg": controlnet_cfg, "dmd_start_steps": 200,
              "gen_shift": 3.0, "dmd_steps": 3, "latent_cond_mode": "first_frame_only"}
    dmd = build_pipeline(WorldStereoConfig.from_dict(fields, "worldstereo-memory-dmd"), model, base)
    assert isinstance(dmd, MemoryDMDPipeline) and dmd.latent_cond_mode == "first_frame_only"
    assert torch.equal(dmd.scheduler.timesteps, DMDScheduler(200, 1000, 3.0, 3).timesteps)
    mem = build_pipeline(WorldStereoConfig.from_dict(fields, "worldstereo-memory"), model, base)
    assert type(mem) is MemoryPipeline and mem.make_scheduler(None).timesteps.numel() == 40


@pytest.mark.parametrize("model_type", ["worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd"])
def test_real_layout_end_to_end(model_type, tiny_base, tmp_path):
    """Variant overlay + diffusers base (transformer/ + our parts) -> loaders -> sampler -> frames."""
    import shutil
    from tiny_checkpoints import (random_state_dict, split_backbone, tiny_transformer_config, write_diffusers_base,
                                  write_variant)
    from worldstereo_core.loading import load_worldstereo_transformer
    from worldstereo_core.models import load_worldstereo_config
    base_dir = shutil.copytree(tiny_base, tmp_path / "Wan2.1-I2V-tiny-Diffusers")
    tcfg = tiny_transformer_config()
    backbone, extra = split_backbone(random_state_dict(model_type, tcfg))
    write_diffusers_base(base_dir, tcfg, backbone)
    variant = write_variant(tmp_path / "worldstereo", model_type, extra, negative_prompt="low quality")
    config = load_worldstereo_config(variant)
    model = load_worldstereo_transformer(variant, base=base_dir, dtype=torch.float32, device="cpu")
    pipe = build_pipeline(config, model, load_base_components(base_dir, scheduler=not config.is_dmd))
    F, H, W = 3, 32, 48
    g = torch.Generator().manual_seed(0)
    inputs = dict(render_video=torch.rand(1, 3, F, H, W, generator=g) * 2 - 1,
                  render_mask=(torch.rand(1, 1, F, H, W, generator=g) > 0.5).float(),
                  camera_embedding=torch.randn(1, 6, F, H, W, generator=g))
    if pipe.uses_references:
        inputs.update(reference_video=torch.rand(1, 3, 1, H, W, generator=g) * 2 - 1,
                      ref_index=torch.tensor([0]), camera_qt=torch.randn(1, F, 7, generator=g),
                      camera_qt_ref=torch.randn(1, 1, 7, generator=g))
    steps = None if config.is_dmd else 2
    image = (torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy()
    ticks: list[tuple[int, int]] = []
    out = pipe(image, **inputs, prompt="a stone bridge", num_inference_steps=steps, output_type="np",
               progress=lambda d, t: ticks.append((d, t)))
    n = 4 if config.is_dmd else 2
    assert [t for t in ticks if t[0]] == [(i + 1, n) for i in range(n)]
    assert ticks[0] == (0, n)  # a chance to interrupt before the encoders run
    assert out.frames.shape == (1, F, H, W, 3) and np.isfinite(out.frames).all()
    assert out.latents.shape == (1, 16, F, H // 8, W // 8)


def _copy_base(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_weights_name_file_folder_and_fix(tiny_base, tmp_path):
    base = _copy_base(tiny_base, tmp_path / "base")
    (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as err:
        load_base_components(base)
    msg = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in msg and str(base / "vae") in msg
    assert "hf download" in msg and '"vae/*"' in msg

    import shutil
    shutil.copy(tiny_base / "vae" / "diffusion_pytorch_model.safetensors", base / "vae")
    shutil.rmtree(base / "tokenizer")
    with pytest.raises(MissingWeightsError, match="tokenizer/ not found"):
        load_base_components(base, image=False, scheduler=False)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_base_components(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", ["nan", "int32"])
def test_base_folder_weights_that_are_not_finite_floats_name_the_file(tiny_base, tmp_path, bad):
    base = _copy_base(tiny_base, tmp_path / "base")
    path = base / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    name = "decoder.conv_out.weight"
    state[name] = (torch.full_like(state[name], float("nan")) if bad == "nan"
                   else torch.ones(state[name].shape, dtype=torch.int32))
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="NaN" if bad == "nan" else "integers") as info:
        load_base_components(base, text=False, image=False, scheduler=False)
    assert str(base / "vae") in str(info.value) and name in str(info.value)


def test_sharded_and_pickle_weights(tiny_base, tmp_path):
    base = _copy_base(tiny_base, tmp_path / "base")
    enc = base / "text_encoder"
    sd = load_file(str(enc / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(enc / name), metadata={"format": "pt"})
    (enc / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (enc / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_base_components(base, image=False, scheduler=False)
    assert torch.equal(loaded.text_encoder.shared.weight, sd["shared.weight"])

    (enc / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="model-00002-of-00002.safetensors"):
        load_base_components(base, image=False, scheduler=False)

    clip = base / "image_encoder"
    (clip / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, clip / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_base_components(base, text=False, scheduler=False)


# ------------------------------------------------------------------------------------------------
# The step loop makes no host sync; text embeddings are kept across runs
# ------------------------------------------------------------------------------------------------
def _short_run_kwargs(case: Path, cfg: dict) -> dict:
    kw = _call_kwargs(case, cfg)
    if "num_inference_steps" in kw:      # UniPC: enough steps for the corrector and the order-2 predictor
        kw["num_inference_steps"] = 3
    return kw


@pytest.mark.parametrize("variant", ["plain", "pairs", "fp8"])
@pytest.mark.parametrize("case", PIPELINE_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_step_loop_makes_no_host_sync(case, variant, common, monkeypatch):
    """Every step of every pipeline (CFG batched and separate; the pairs scope; fp8 weights) under
    the sync probe; on CUDA the probe also turns on torch's sync debug mode "error"."""
    from sync_probe import probe_step_loop
    from worldstereo_core.pipelines.base import KeyframePipeline
    from worldstereo_core.runtime.fp8 import convert_worldstereo_fp8

    _need_fixtures()
    pipe, cfg = _pipeline(case, common)
    if variant == "pairs":
        if not pipe.uses_references:
            pytest.skip("the pairs scope is a memory-model option")
        pipe.transformer.set_attention_scope("pairs")
    if variant == "fp8":
        convert_worldstereo_fp8(pipe.transformer, "channel")
    kw = _short_run_kwargs(case, cfg)
    expected = pipe(**kw, output_type="latent").latents
    probed = probe_step_loop(monkeypatch, KeyframePipeline)
    steps = []
    for batch_cfg in (True, False):
        out = pipe(**kw, output_type="latent", batch_cfg=batch_cfg, progress=lambda done, total: steps.append(done))
        assert torch.allclose(out.latents, expected, atol=1e-5)
    assert len(probed) == 2 and steps.count(len(out.timesteps)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU form runs above)")
@pytest.mark.parametrize("case", PIPELINE_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_step_loop_makes_no_cuda_sync(case, common, monkeypatch):
    from sync_probe import probe_step_loop
    from worldstereo_core.pipelines.base import KeyframePipeline

    _need_fixtures()
    pipe, cfg = _pipeline(case, common, device="cuda", keep_on_device=True)
    kw = _short_run_kwargs(case, cfg)
    pipe(**kw, output_type="latent")     # first run: lazy CUDA initialisation outside the probe
    probed = probe_step_loop(monkeypatch, KeyframePipeline)
    pipe(**kw, output_type="latent")
    assert probed == [1]


def test_sync_probe_catches_an_inserted_sync(memory_case, common, monkeypatch):
    """The probe can fail: a model-call hook that reads the prediction on the host is caught, for
    each kind of read."""
    from sync_probe import HostSyncError, probe_step_loop
    from worldstereo_core.pipelines.base import KeyframePipeline

    pipe, cfg = _pipeline(memory_case, common)
    kw = {**_short_run_kwargs(memory_case, cfg), "output_type": "latent"}
    reads = {"item": lambda t: t.abs().max().item(), "tolist": lambda t: t.flatten()[:2].tolist(),
             "cpu": lambda t: t.cpu(), "numpy": lambda t: t.detach().numpy(), "to_cpu": lambda t: t.to("cpu")}
    pipe(**kw, model_call_hook=lambda call: [read(call.noise_pred) for read in reads.values()])  # unprobed: fine
    probe_step_loop(monkeypatch, KeyframePipeline)
    for name, read in reads.items():
        with pytest.raises(HostSyncError, match="step loop"):
            pipe(**kw, model_call_hook=lambda call: read(call.noise_pred))
    pipe(**kw)                                                           # the probe leaves a clean run alone


def test_prompt_embeddings_are_kept_across_runs(camera_case_base, camera_case):
    """Four trajectories with one prompt encode each distinct text (prompt, negative prompt) once,
    also through another pipeline over the same encoder; a new prompt, or a change of the
    encoder's weights, is encoded anew."""
    base = load_base_components(camera_case_base)
    cfg = json.loads((camera_case / "config.json").read_text())
    folder = (camera_case / cfg["transformer_fixture"].split()[0]).resolve()
    controlnet_cfg = json.loads((folder / "config.json").read_text())["controlnet_cfg"]
    config = WorldStereoConfig.from_dict({"base_model": str(camera_case_base), "negative_prompt": "blurry",
                                          "controlnet_cfg": controlnet_cfg}, "worldstereo-camera")
    pipe = build_pipeline(config, _transformer(camera_case, memory=False), base)
    pipe.prompt_cache.clear()
    encoded: list[tuple] = []
    pipe.text_encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape))
    kw = _drop(_call_kwargs(camera_case, cfg), "prompt_embeds", "negative_prompt_embeds", "num_inference_steps")
    runs = [pipe(**kw, prompt="a quiet street", num_inference_steps=1, output_type="latent").latents
            for _ in range(4)]
    assert len(encoded) == 2                                   # "a quiet street" and "blurry", once each
    assert all(torch.equal(r, runs[0]) for r in runs)
    again = build_pipeline(config, pipe.transformer, base)     # a new pipeline over the same encoder (a node)
    assert torch.equal(again(**kw, prompt="a quiet street", num_inference_steps=1, output_type="latent").latents,
                       runs[0])
    assert len(encoded) == 2
    other = pipe(**kw, prompt="a stormy sea", num_inference_steps=1, output_type="latent").latents
    assert len(encoded) == 3 and not torch.equal(other, runs[0])
    with torch.no_grad():                                      # an in-place weight change: nothing stale
        next(pipe.text_encoder.parameters()).mul_(1.5)
    changed = pipe(**kw, prompt="a quiet street", num_inference_steps=1, output_type="latent").latents
    assert len(encoded) == 5 and not torch.equal(changed, runs[0])
    pipe.prompt_cache.clear()
    assert torch.equal(pipe(**kw, prompt="a quiet street", num_inference_steps=1, output_type="latent").latents,
                       changed)
    assert len(encoded) == 7


def test_prompt_cache_takes_encoders_loaded_in_inference_mode():
    """ComfyUI creates models under inference mode: their weights have no version counter."""
    from worldstereo_core.pipelines.conditioning import PromptCache

    with torch.inference_mode():
        encoder = torch.nn.Linear(3, 3)
    cache, calls = PromptCache(), []
    for _ in range(2):
        cache.get("a prompt", object, encoder, torch.device("cpu"), 512, lambda: calls.append(1) or torch.zeros(1))
    assert calls == [1]
