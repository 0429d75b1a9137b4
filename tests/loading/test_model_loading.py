"""Loading WorldStereo variants: base from a diffusers folder or a single file, strict key checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_checkpoints import (CAMERA, MEMORY, MEMORY_DMD, TINY_BASE_MODEL, random_state_dict, split_backbone,
                              tiny_controlnet_cfg, tiny_inputs, tiny_transformer_config, write_diffusers_base,
                              write_single_file_base, write_variant)
from worldstereo_core.constants import DEFAULT_SCALE_MAP, NFRAME
from worldstereo_core.errors import CheckpointError, InputError, Interrupted, MissingWeightsError
from worldstereo_core.loading import load_state_dict_strict, load_worldstereo_transformer
from worldstereo_core.loading.wan_keys import diffusers_to_original, original_to_diffusers
from worldstereo_core.models import build_transformer, load_worldstereo_config, shipped_base_config
from worldstereo_core.models.config import BASE_CONFIG_FILES, shipped_config_for_base_model


def _forward(model, model_type, seed=0):
    with torch.no_grad():
        return model(**tiny_inputs(model_type, seed=seed), return_dict=False)[0]


@pytest.fixture(scope="module", params=[CAMERA, MEMORY, MEMORY_DMD])
def tiny_release(request, tmp_path_factory):
    """A variant overlay + the Wan base in three layouts, all from one random state dict."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    tcfg = tiny_transformer_config()
    full = random_state_dict(model_type, tcfg, seed=7)
    backbone, extra = split_backbone(full)
    overridden = sorted(backbone)[:5]  # the overlay also fine-tunes a few backbone tensors
    overlay = {**extra, **{k: full[k] for k in overridden}}
    base_backbone = {**backbone, **{k: torch.zeros_like(full[k]) for k in overridden}}
    return dict(
        model_type=model_type, full=full, overridden=overridden,
        variant=write_variant(root / "variants", model_type, overlay),
        complete=write_variant(root / "complete", model_type, full, transformer_config=tcfg),
        diffusers=write_diffusers_base(root / "Wan-tiny-Diffusers", tcfg, base_backbone),
        sharded=write_diffusers_base(root / "Wan-tiny-sharded", tcfg, base_backbone, shards=3),
        single=write_single_file_base(root / "wan_tiny_comfy.safetensors", base_backbone),
        single_plain=write_single_file_base(root / "wan_tiny_plain.safetensors", base_backbone, comfy_prefix=False),
        single_diffusers=write_single_file_base(root / "wan_tiny_diffusers_names.safetensors", base_backbone,
                                                original_names=False),
        tcfg=tcfg,
    )


def test_all_base_layouts_give_identical_models(tiny_release):
    r = tiny_release
    complete = load_worldstereo_transformer(r["complete"], dtype=torch.float32)
    reference = _forward(complete, r["model_type"])
    variants = {
        "diffusers folder": load_worldstereo_transformer(r["variant"], base=r["diffusers"], dtype=torch.float32),
        "transformer/ folder": load_worldstereo_transformer(r["variant"], base=r["diffusers"] / "transformer",
                                                            dtype=torch.float32),
        "sharded folder": load_worldstereo_transformer(r["variant"], base=r["sharded"], dtype=torch.float32),
        "single file": load_worldstereo_transformer(r["variant"], base=r["single"], base_config=r["tcfg"],
                                                    dtype=torch.float32),
        "single file, no prefix": load_worldstereo_transformer(r["variant"], base=r["single_plain"],
                                                               base_config=r["tcfg"], dtype=torch.float32),
        "single file, diffusers names": load_worldstereo_transformer(r["variant"], base=r["single_diffusers"],
                                                                     base_config=r["tcfg"], dtype=torch.float32),
    }
    for name, model in variants.items():
        state = model.state_dict()
        assert set(state) == set(r["full"]), name
        assert all(torch.equal(state[k], r["full"][k]) for k in r["full"]), name
        assert torch.equal(_forward(model, r["model_type"]), reference), name
        report = model.load_report
        assert report.backbone_overridden == len(r["overridden"]), name
        assert report.n_from_base + report.n_from_variant == report.n_keys == len(r["full"]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_keeps_backbone_norms_and_modulation_in_fp32(tiny_release, dtype):
    r = tiny_release
    model = load_worldstereo_transformer(r["variant"], base=r["diffusers"], dtype=dtype)
    params = dict(model.named_parameters())
    assert model.dtype == dtype
    assert params["patch_embedding.weight"].dtype == dtype
    assert params["controlnet.proj_out.0.weight"].dtype == dtype
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert params[name].dtype == torch.float32, name
    out = _forward(model, r["model_type"])
    ref = _forward(load_worldstereo_transformer(r["complete"], dtype=torch.float32), r["model_type"])
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_meta_build_then_strict_load_assigns_without_copy():
    tcfg = tiny_transformer_config()
    model = build_transformer(tcfg, tiny_controlnet_cfg(MEMORY, tcfg), memory=True, device="meta",
                              dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters())
    state = random_state_dict(MEMORY, tcfg, seed=1)
    load_state_dict_strict(model, state, source="tiny")
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert all(params[k].data_ptr() == v.data_ptr() for k, v in state.items())  # the tensors themselves


# ----- strict key checks -------------------------------------------------------------------------

def _corrupt_variant(tiny_release, tmp_path, edit):
    r = tiny_release
    tensors = load_file(str(r["complete"] / "model.safetensors"))
    edit(tensors)
    return write_variant(tmp_path, r["model_type"], tensors, transformer_config=r["tcfg"])


def test_renamed_tensor_is_named(tiny_release, tmp_path):
    folder = _corrupt_variant(tiny_release, tmp_path, lambda t: t.__setitem__(
        "controlnet.proj_out.1.weight_renamed", t.pop("controlnet.proj_out.1.weight")))
    with pytest.raises(CheckpointError) as info:
        load_worldstereo_transformer(folder, dtype=torch.float32)
    msg = str(info.value)
    assert "controlnet.proj_out.1.weight_renamed" in msg and "missing tensors: controlnet.proj_out.1.weight " in msg
    assert "re-download" in msg and tiny_release["model_type"] in msg


def test_missing_tensor_is_named(tiny_release, tmp_path):
    folder = _corrupt_variant(tiny_release, tmp_path, lambda t: t.pop("blocks.1.attn2.norm_added_k.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks\.1\.attn2\.norm_added_k\.weight"):
        load_worldstereo_transformer(folder, dtype=torch.float32)


def test_missing_backbone_tensor_with_base_is_named(tiny_release, tmp_path):
    r = tiny_release
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    backbone.pop("blocks.2.ffn.net.2.bias")
    base = write_diffusers_base(tmp_path / "base", r["tcfg"], backbone)
    with pytest.raises(CheckpointError, match=r"neither the base.*blocks\.2\.ffn\.net\.2\.bias"):
        load_worldstereo_transformer(r["variant"], base=base, dtype=torch.float32)


def test_wrongly_shaped_tensor_is_named(tiny_release, tmp_path):
    folder = _corrupt_variant(tiny_release, tmp_path, lambda t: t.__setitem__(
        "controlnet.proj_in.weight", torch.zeros(16, 23)))
    with pytest.raises(CheckpointError, match=r"wrongly shaped tensors: controlnet\.proj_in\.weight \[16, 23\]"):
        load_worldstereo_transformer(folder, dtype=torch.float32)


def test_base_of_another_model_is_rejected(tiny_release, tmp_path):
    r = tiny_release
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    backbone["blocks.0.attn1.to_q.weight"] = torch.zeros(24, 12)
    base = write_diffusers_base(tmp_path / "base", r["tcfg"], backbone)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn1\.to_q\.weight \[24, 12\]"):
        load_worldstereo_transformer(r["variant"], base=base, dtype=torch.float32)
    single = {"model.diffusion_model.vae.encoder.conv1.weight": torch.zeros(2)}
    save_file(single, str(tmp_path / "not_wan.safetensors"))
    with pytest.raises(CheckpointError, match=r"vae\.encoder\.conv1\.weight"):
        load_worldstereo_transformer(r["variant"], base=tmp_path / "not_wan.safetensors", base_config=r["tcfg"],
                                     dtype=torch.float32)


def test_non_safetensors_and_truncated_files_fail_cleanly(tiny_release, tmp_path):
    r = tiny_release
    data = (r["complete"] / "model.safetensors").read_bytes()
    config = (r["complete"] / "config.json").read_text()
    cases = {
        "pickle": None,
        "truncated": data[: len(data) - 1000],
        "header_only": data[:50],
        "garbage": b"\x00" * 64,
    }
    for name, content in cases.items():
        folder = tmp_path / name / r["model_type"]
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(config)
        target = folder / "model.safetensors"
        if content is None:
            torch.save({"x": torch.zeros(2)}, target)
        else:
            target.write_bytes(content)
        with pytest.raises(CheckpointError, match="model.safetensors") as info:
            load_worldstereo_transformer(folder, dtype=torch.float32)
        assert str(target) in str(info.value), name

    bin_only = tmp_path / "bin_base" / "transformer"
    bin_only.mkdir(parents=True)
    (bin_only / "config.json").write_text(json.dumps(r["tcfg"]))
    torch.save({}, bin_only / "diffusion_pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match="only safetensors"):
        load_worldstereo_transformer(r["variant"], base=bin_only.parent, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_worldstereo_transformer(r["variant"], base=bin_only / "diffusion_pytorch_model.bin",
                                     dtype=torch.float32)


def test_missing_files_and_folders(tiny_release, tmp_path):
    r = tiny_release
    with pytest.raises(MissingWeightsError, match="variant folder not found"):
        load_worldstereo_transformer(tmp_path / r["model_type"], dtype=torch.float32)
    with pytest.raises(MissingWeightsError, match="transformer/config.json"):
        load_worldstereo_transformer(r["variant"], base=tmp_path, dtype=torch.float32)
    shard_dir = r["sharded"] / "transformer"
    partial = tmp_path / "partial" / "transformer"
    partial.mkdir(parents=True)
    for f in shard_dir.iterdir():
        if not f.name.startswith("diffusion_pytorch_model-00002"):  # leave one shard out
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MissingWeightsError, match="shard"):
        load_worldstereo_transformer(r["variant"], base=partial.parent, dtype=torch.float32)


# ----- key names and configs -------------------------------------------------------------------

def test_original_key_conversion_agrees_with_diffusers():
    """Our explicit tables against diffusers' own single-file converter (independent code)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    backbone, _ = split_backbone(random_state_dict(CAMERA, seed=2))
    original = {"model.diffusion_model." + diffusers_to_original(k): v for k, v in backbone.items()}
    assert len(original) == len(backbone)
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == set(backbone)
    assert all(original_to_diffusers(k) == converted_k for k, converted_k in
               zip(original, convert_wan_transformer_to_diffusers({k: None for k in original})))
    with pytest.raises(CheckpointError, match="lora_down"):
        original_to_diffusers("blocks.0.self_attn.q.lora_down.weight")


def test_shipped_base_configs_match_diffusers_wan_i2v_14b():
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    cn = tiny_controlnet_cfg(MEMORY, update_ref=False, dim=1024, num_heads=16, ffn_dim=4096, num_layers=2,
                             conv_out_dim=5120, time_embed_dim=5120)
    for name in BASE_CONFIG_FILES:
        cfg = shipped_base_config(name)
        with torch.device("meta"):
            wan = WanTransformer3DModel(**cfg)
        ours = build_transformer(cfg, cn, memory=True, device="meta", dtype=torch.bfloat16)
        wan_shapes = {k: tuple(v.shape) for k, v in wan.state_dict().items()}
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert {k: ours_shapes[k] for k in wan_shapes} == wan_shapes
        assert wan_shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
        assert sum(k.startswith("blocks.") and k.endswith("attn1.to_q.weight") for k in wan_shapes) == 40
        assert ours_shapes["controlnet.proj_out.1.weight"] == (5120, 1024)
        assert ours_shapes["camera_embedding.0.weight"] == (2560, 7)


def test_variant_config_defaults_and_validation(tmp_path):
    folder = tmp_path / MEMORY_DMD
    folder.mkdir()
    cn = tiny_controlnet_cfg(MEMORY_DMD)
    (folder / "config.json").write_text(json.dumps({"base_model": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                                                    "controlnet_cfg": cn}))
    cfg = load_worldstereo_config(folder)
    assert (cfg.model_type, cfg.is_memory, cfg.is_dmd) == (MEMORY_DMD, True, True)
    assert (cfg.negative_prompt, cfg.latent_cond_mode, cfg.nframe) == ("", "full_vae", NFRAME)
    assert cfg.scale_map == DEFAULT_SCALE_MAP
    assert (cfg.dmd_start_steps, cfg.dmd_end_steps, cfg.gen_shift, cfg.dmd_steps) == (250, 1000, 5.0, 4)
    assert cfg.controlnet_cfg.update_ref is True and cfg.controlnet_cfg.mid_channels == 16

    bad = {
        "no_controlnet": {"base_model": "x"},
        "missing_dim": {"base_model": "x", "controlnet_cfg": {k: v for k, v in cn.items() if k != "dim"}},
        "bad_mode": {"base_model": "x", "controlnet_cfg": cn, "latent_cond_mode": "half_vae"},
    }
    for nframe, match in (("abc", "'nframe' must be a number"), (0, "'nframe' must be a whole number >= 2"),
                          (7.5, "'nframe' must be a whole number >= 2")):  # issue 10 item 5: raw ValueError before
        (folder / "config.json").write_text(json.dumps({"base_model": "x", "controlnet_cfg": cn, "nframe": nframe}))
        with pytest.raises(InputError, match=match):
            load_worldstereo_config(folder)
    for name, data in bad.items():
        (folder / "config.json").write_text(json.dumps(data))
        with pytest.raises(InputError):
            load_worldstereo_config(folder)
    # tolerated as the reference tolerates them, with a warning: another model_type field (the folder
    # decides), no update_ref (false), a transformer field that is no Wan config (never read)
    (folder / "config.json").write_text(json.dumps({"base_model": "x", "controlnet_cfg": {**cn, "update_ref": None},
                                                    "model_type": CAMERA, "transformer": "Wan-AI/x"}))
    cfg = load_worldstereo_config(folder)
    assert (cfg.model_type, cfg.controlnet_cfg.update_ref, cfg.transformer_config) == (MEMORY_DMD, False, None)
    warnings = "\n".join(cfg.warnings)
    assert f"model_type {CAMERA!r}" in warnings and "update_ref" in warnings and "'transformer' field" in warnings
    other = tmp_path / "my-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"base_model": "x", "controlnet_cfg": cn}))
    with pytest.raises(InputError, match="name the folder after the model type"):
        load_worldstereo_config(other)


def test_single_file_base_config_resolution(tiny_release):
    r = tiny_release
    with pytest.raises(InputError, match="pass base_config"):
        load_worldstereo_transformer(r["variant"], base=r["single"], dtype=torch.float32)
    assert shipped_config_for_base_model("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers") == "wan2.1-i2v-14b-720p"
    assert shipped_config_for_base_model("/models/Wan2.1-I2V-14B-480P-Diffusers") == "wan2.1-i2v-14b-480p"
    assert shipped_config_for_base_model("Wan-AI/Wan2.1-T2V-14B-Diffusers") is None


def test_progress_is_reported_per_tensor_and_can_abort(tiny_release):
    r = tiny_release
    calls = []
    model = load_worldstereo_transformer(r["variant"], base=r["diffusers"], dtype=torch.float32,
                                         progress=lambda done, total: calls.append((done, total)))
    n = len(model.state_dict())
    assert calls == [(i, n) for i in range(1, n + 1)]

    def stop(done, total):
        if done == 3:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        load_worldstereo_transformer(r["variant"], base=r["diffusers"], dtype=torch.float32, progress=stop)


# ----- what the reference accepts, and what it does not -------------------------------------------

def test_diffusers_base_with_wans_norm_added_q_loads_without_a_word(tiny_release, tmp_path):
    """The Wan-AI Diffusers repos carry 40 all-zero attn2.norm_added_q weights the model has no use for."""
    r = tiny_release
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    D = r["tcfg"]["num_attention_heads"] * r["tcfg"]["attention_head_dim"]
    extra = {f"blocks.{i}.attn2.norm_added_q.weight": torch.zeros(D) for i in range(r["tcfg"]["num_layers"])}
    base = write_diffusers_base(tmp_path / TINY_BASE_MODEL.split("/")[1], r["tcfg"], {**backbone, **extra})
    model = load_worldstereo_transformer(r["variant"], base=base, dtype=torch.float32)
    assert model.load_report.warnings == []
    assert torch.equal(_forward(model, r["model_type"]),
                       _forward(load_worldstereo_transformer(r["complete"], dtype=torch.float32), r["model_type"]))


def test_tensors_the_model_lacks_and_unused_missing_ones_are_warnings(tmp_path):
    tcfg = tiny_transformer_config()
    full = random_state_dict(MEMORY, tcfg, seed=3)  # ref_embedding true: has ref_index_embedding.weight
    reference = load_worldstereo_transformer(write_variant(tmp_path / "a", MEMORY, full, transformer_config=tcfg),
                                             dtype=torch.float32)
    lacking = {k: v for k, v in full.items() if k != "ref_index_embedding.weight"}
    lacking["controlnet.unused_extra.weight"] = torch.ones(3)
    model = load_worldstereo_transformer(write_variant(tmp_path / "b", MEMORY, lacking, transformer_config=tcfg),
                                         dtype=torch.float32)
    warnings = "\n".join(model.load_report.warnings)
    assert "ignoring tensors this model does not have: controlnet.unused_extra.weight" in warnings
    assert "ref_index_embedding.weight (1) is in neither file" in warnings
    assert torch.count_nonzero(model.ref_index_embedding.weight) == 0  # the reference's zero init
    assert torch.equal(_forward(model, MEMORY), _forward(reference, MEMORY))  # the forward never reads it


def _variant_with(tmp_path, tiny_release, name, value):
    r = tiny_release
    tensors = load_file(str(r["complete"] / "model.safetensors"))
    tensors[name] = value
    return write_variant(tmp_path, r["model_type"], tensors, transformer_config=r["tcfg"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load(tiny_release, tmp_path, bad):
    name = "controlnet.proj_out.0.weight"
    value = load_file(str(tiny_release["complete"] / "model.safetensors"))[name].clone()
    value.view(-1)[5] = bad
    folder = _variant_with(tmp_path, tiny_release, name, value.to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor controlnet\.proj_out\.0\.weight holds NaN"):
        load_worldstereo_transformer(folder, dtype=torch.float32)
    # the base's tensors are checked too, and the message names the base file
    r = tiny_release
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    backbone["blocks.1.ffn.net.2.weight"] = torch.full_like(backbone["blocks.1.ffn.net.2.weight"], bad)
    single = write_single_file_base(tmp_path / "nan_base.safetensors", backbone)
    with pytest.raises(CheckpointError, match=r"nan_base\.safetensors: tensor blocks\.1\.ffn\.net\.2\.weight"):
        load_worldstereo_transformer(r["variant"], base=single, base_config=r["tcfg"], dtype=torch.float32)


def test_integer_weights_are_refused_by_name(tiny_release, tmp_path):
    name = "controlnet.proj_in.weight"
    shape = load_file(str(tiny_release["complete"] / "model.safetensors"))[name].shape
    folder = _variant_with(tmp_path, tiny_release, name, torch.ones(shape, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights must be floating point, but "
                                              r"controlnet\.proj_in\.weight \(I32\)"):
        load_worldstereo_transformer(folder, dtype=torch.float32)


@pytest.mark.parametrize("field", ["num_attention_heads", "in_channels", "image_dim"])
def test_base_config_missing_a_field_names_it(tiny_release, tmp_path, field):
    r = tiny_release
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = write_diffusers_base(tmp_path / "base", {k: v for k, v in r["tcfg"].items() if k != field}, backbone)
    with pytest.raises(InputError, match=rf"transformer/config\.json is not a complete .* no '{field}'"):
        load_worldstereo_transformer(r["variant"], base=base, dtype=torch.float32)


def test_a_base_other_than_base_model_is_named(tiny_release, tmp_path):
    r = tiny_release
    repo = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    variant = write_variant(tmp_path / "v", r["model_type"], load_file(str(r["variant"] / "model.safetensors")),
                            base_model=repo)
    backbone = load_file(str(r["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors"))

    def warnings(base):
        return "\n".join(load_worldstereo_transformer(variant, base=base, base_config=r["tcfg"],
                                                      dtype=torch.float32).load_report.warnings)

    assert warnings(write_single_file_base(tmp_path / "wan2.1_i2v_480p_14B_bf16.safetensors", backbone)) == ""
    assert warnings(write_diffusers_base(tmp_path / "Wan2.1-I2V-14B-480P-Diffusers", r["tcfg"], backbone)) == ""
    other = warnings(write_single_file_base(tmp_path / "wan2.1_i2v_720p_14B_bf16.safetensors", backbone))
    assert "wan2.1_i2v_720p_14B_bf16.safetensors is Wan2.1 I2V 14B 720P" in other and repo in other
    folder = warnings(write_diffusers_base(tmp_path / "Wan2.1-I2V-14B-720P-Diffusers", r["tcfg"], backbone))
    assert "Wan2.1-I2V-14B-720P-Diffusers is Wan2.1 I2V 14B 720P" in folder and repo in folder
    unknown = warnings(write_single_file_base(tmp_path / "my_finetune.safetensors", backbone))
    assert "cannot tell from its name whether base my_finetune.safetensors is" in unknown and repo in unknown
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in backbone.items()}
    stored = warnings(write_single_file_base(tmp_path / "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors", fp8))
    assert "stores" in stored and "float8" in stored
