"""Loading the Wan2.1 base parts from ComfyUI-style single files (worldstereo_core.loading.single_file).

Tiny checkpoints are written in the layouts ComfyUI users have: the VAE with the original Wan key
names, UMT5 with T5 key names (plain and "scaled fp8", with an embedded tokenizer blob), CLIP vision
with transformers key names plus the projection. When ``COMFYUI_DIR`` points at a ComfyUI checkout,
ComfyUI's OWN implementations (WanVAE, T5, CLIP vision) write the weights and compute reference
outputs, which our loaded diffusers/transformers models must reproduce: an independent check of
the key conversion and of the configs read from the tensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import comfyui_dir
from worldstereo_core.errors import CheckpointError, InputError, MissingWeightsError
from worldstereo_core.loading import single_file as sf


def _umt5(vocab=96, d_model=32, heads=4, d_kv=8, d_ff=48, layers=2, seed=0):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(cfg).eval()
    model.encoder.embed_tokens = model.shared
    return model


def _t5_state(model) -> dict:
    """ComfyUI's text-encoder file layout: T5 names, the embedding stored once as shared.weight."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _ids():
    ids = torch.tensor([[5, 17, 33, 9, 1, 0, 0, 0], [40, 2, 1, 0, 0, 0, 0, 0]])
    return ids, (ids > 0).long() | (torch.arange(8) == 0).long()


# --------------------------------------------------------------------------------------------
# UMT5
# --------------------------------------------------------------------------------------------

def test_umt5_file_matches_the_model_and_reads_sizes_from_tensors(tmp_path):
    ref = _umt5()
    state = _t5_state(ref)
    state["spiece_model"] = torch.arange(10, dtype=torch.uint8)  # an embedded tokenizer blob is ignored here
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file(state, str(path))
    model = sf.load_umt5_file(path)
    for field in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers", "relative_attention_num_buckets"):
        assert getattr(model.config, field) == getattr(ref.config, field), field
    assert model.encoder.embed_tokens is model.shared
    ids, mask = _ids()
    with torch.no_grad():
        np.testing.assert_allclose(model(ids, mask).last_hidden_state.numpy(), ref(ids, mask).last_hidden_state.numpy(),
                                   atol=1e-6)


def test_scaled_fp8_text_encoder_is_dequantised(tmp_path):
    ref = _umt5(seed=1)
    state = _t5_state(ref)
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    expected = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 2 and "relative_attention_bias" not in key and key != "shared.weight":
            scale = value.abs().max() / 448.0
            q = (value / scale).to(torch.float8_e4m3fn)
            scaled[key], scaled[key[:-len("weight")] + "scale_weight"] = q, scale.reshape(())
            scaled[key[:-len("weight")] + "scale_input"] = torch.ones(())
            expected[key] = q.to(torch.float32) * scale
        else:
            scaled[key] = value
            expected[key] = value
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(scaled, str(path))
    deq = sf.dequantize_scaled_fp8(load_file(str(path)))
    assert set(deq) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(deq[key], value, rtol=0, atol=0)
    model = sf.load_umt5_file(path)
    ids, mask = _ids()
    with torch.no_grad():
        got, want = model(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state
    # e4m3 keeps 3 mantissa bits: per-weight relative error <= 2^-4; the outputs stay close
    assert float((got - want).abs().max()) < 0.25 * float(want.abs().max())


class _FakeProcessor:
    def __init__(self, pieces):
        self.pieces = pieces

    def encode(self, text):
        return [self.pieces[w] for w in text.split()]

    def get_piece_size(self):
        return 100


def test_sentencepiece_tokenizer_pads_truncates_and_appends_eos():
    tok = object.__new__(sf.SentencePieceTokenizer)
    tok.processor = _FakeProcessor({"a": 5, "b": 6, "c": 7})
    tok.pad_token_id, tok.eos_token_id = 0, 1
    out = tok(["a b c", "c"], padding="max_length", max_length=6, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    assert out.input_ids.tolist() == [[5, 6, 7, 1, 0, 0], [7, 1, 0, 0, 0, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    short = tok("a b c a b c", max_length=4)
    assert short.input_ids.tolist() == [[5, 6, 7, 1]] and short.attention_mask.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(InputError):
        tok("a", padding="longest")


def test_tokenizer_from_file_needs_the_embedded_model(tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file(_t5_state(_umt5()), str(path))
    with pytest.raises(MissingWeightsError, match="tokenizer"):
        sf.umt5_tokenizer_from_file(path)


def test_embedded_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (it is in requirements.txt)")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["a small stone bridge over the river", "the quick brown fox"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, hard_vocab_limit=False, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    blob = (tmp_path / "sp.model").read_bytes()
    state = _t5_state(_umt5())
    state["spiece_model"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    path = tmp_path / "umt5.safetensors"
    save_file(state, str(path))
    tok = sf.umt5_tokenizer_from_file(path)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    expected = processor.encode("the stone fox") + [1]
    out = tok("the stone fox", max_length=16)
    assert out.input_ids[0, :len(expected)].tolist() == expected and int(out.attention_mask.sum()) == len(expected)


# --------------------------------------------------------------------------------------------
# CLIP vision
# --------------------------------------------------------------------------------------------

def _clip(hidden=40, heads=2, seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                           num_attention_heads=heads, image_size=28, patch_size=14, projection_dim=8)
    torch.manual_seed(seed)
    return CLIPVisionModel(cfg).eval(), cfg


def _clip_file(tmp_path, model, name="clip_vision_h.safetensors", prefix=True):
    state = {}
    for k, v in model.state_dict().items():
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        state[("vision_model." if prefix else "") + bare] = v
    state["visual_projection.weight"] = torch.randn(8, model.config.hidden_size)
    path = tmp_path / name
    save_file(state, str(path))
    return path


def _assert_same_penultimate(model, ref, x: torch.Tensor) -> None:
    """The loaded CLIP vision gives the reference's penultimate hidden states (what Wan uses), exactly."""
    with torch.no_grad():
        got = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("prefix", [True, False])
def test_clip_vision_file_with_config_beside_it(tmp_path, prefix):
    ref, cfg = _clip()
    path = _clip_file(tmp_path, ref, prefix=prefix)
    path.with_suffix(".json").write_text(json.dumps(cfg.to_dict()))
    model, processor = sf.load_clip_vision_file(path)
    _assert_same_penultimate(model, ref, torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    assert processor.crop_size == {"height": 28, "width": 28} and processor.size["shortest_edge"] == 28
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_clip_vision_sizes_from_tensors_for_standard_widths(tmp_path):
    ref, _ = _clip(hidden=768, heads=12)
    model, _ = sf.load_clip_vision_file(_clip_file(tmp_path, ref))
    assert (model.config.num_attention_heads, model.config.num_hidden_layers, model.config.image_size,
            model.config.intermediate_size) == (12, 3, 28, 2 * 768)


def to_open_clip(state: dict) -> dict:
    """transformers CLIP vision names -> open_clip's ``visual.`` layout (fused q/k/v, c_fc/c_proj)."""
    out = {}
    top = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")}
    for k, v in state.items():
        name = k.removeprefix("vision_model.")
        if name in top:
            out["visual." + top[name]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
    for i in layers:
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}.{kind}"]
                                                         for p in ("q_proj", "k_proj", "v_proj")])
            for hf, oc in parts.items():
                out[f"{dst}{oc}.{kind}"] = state[f"{src}{hf}.{kind}"]
    return out


def test_open_clip_layout_is_converted(tmp_path):
    ref, cfg = _clip(seed=3)
    state = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in ref.state_dict().items()}
    state["visual_projection.weight"] = torch.randn(8, 40)
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(to_open_clip(state), str(path))
    path.with_suffix(".json").write_text(json.dumps(cfg.to_dict()))
    model, _ = sf.load_clip_vision_file(path)
    _assert_same_penultimate(model, ref, torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2)))


def test_clip_vision_errors(tmp_path):
    ref, _ = _clip()
    with pytest.raises(CheckpointError, match="CLIPVisionConfig JSON"):
        sf.load_clip_vision_file(_clip_file(tmp_path, ref))  # width 40: heads unknown without a config
    odd = tmp_path / "odd.safetensors"
    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1),
               "visual.transformer.resblocks.0.gate.weight": torch.zeros(1)}, str(odd))
    with pytest.raises(CheckpointError, match="no transformers counterpart"):
        sf.load_clip_vision_file(odd)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

def test_diffusers_named_vae_file(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=4, z_dim=16, num_res_blocks=1).eval()
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"vae." + k: v for k, v in ref.state_dict().items()}, str(path))  # a prefixed file
    vae = sf.load_vae_file(path)
    assert (vae.config.base_dim, vae.config.num_res_blocks, vae.config.z_dim) == (4, 1, 16)
    x = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.mode(), ref.encode(x).latent_dist.mode(), rtol=0, atol=0)


def test_file_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found"):
        sf.load_vae_file(tmp_path / "missing.safetensors")
    pickle = tmp_path / "vae.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="safetensors"):
        sf.load_vae_file(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        sf.load_umt5_file(broken)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3, 3), "post_quant_conv.weight": torch.zeros(16, 16, 1, 1, 1)},
              str(wrong))
    with pytest.raises(CheckpointError, match="missing"):
        sf.load_vae_file(wrong)


@pytest.mark.parametrize("bad", ["nan", "inf", "int32"])
def test_non_finite_or_integer_weights_name_the_file(tmp_path, bad):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    state = AutoencoderKLWan(base_dim=4, z_dim=16, num_res_blocks=1).state_dict()
    name = "decoder.conv_out.weight"
    state[name] = (torch.full_like(state[name], float(bad)) if bad != "int32"
                   else torch.ones(state[name].shape, dtype=torch.int32))
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(state, str(path))
    match = "holds NaN or infinite" if bad != "int32" else r"must be floating point.*torch\.int32"
    with pytest.raises(CheckpointError, match=match) as info:
        sf.load_vae_file(path)
    assert "wan_2.1_vae.safetensors" in str(info.value) and name in str(info.value)


def test_default_scheduler_config_drives_unipc():
    from worldstereo_core.pipelines.schedulers import UniPCFlowScheduler, reference_flow_sigmas

    config = sf.default_scheduler_config()
    assert config["flow_shift"] == 3.0 and sf.default_scheduler_config(5.0)["flow_shift"] == 5.0
    # the shift of the repo the variant's base_model names, not always the 480P one
    for base_model, shift in (("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", 5.0), ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers/", 5.0),
                              ("/models/Wan2.1-I2V-14B-480P-Diffusers", 3.0)):
        assert sf.default_scheduler_config(base_model=base_model)["flow_shift"] == shift
    assert sf.default_scheduler_config(4.0, base_model="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")["flow_shift"] == 4.0
    scheduler = UniPCFlowScheduler(config, 10)
    _, timesteps = reference_flow_sigmas(10, 3.0)
    assert scheduler.timesteps.tolist() == timesteps.tolist()


# --------------------------------------------------------------------------------------------
# Against ComfyUI's own implementations
# --------------------------------------------------------------------------------------------

COMFY_REFERENCE = """
import json, sys
comfy_dir, out = sys.argv[1:3]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import numpy as np, torch
from safetensors.torch import save_file
import comfy.ops, comfy.ldm.wan.vae, comfy.text_encoders.t5, comfy.clip_model
gen = torch.Generator().manual_seed(0)

def randomise(module, ones=()):
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if k.endswith(ones) else 0.0)
             for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    return state

arrays = {}
vae = comfy.ldm.wan.vae.WanVAE(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True]).eval()
save_file(randomise(vae, ("gamma",)), out + "/vae.safetensors")
x = torch.rand(1, 3, 5, 32, 32, generator=gen) * 2 - 1
z = torch.randn(1, 16, 2, 4, 4, generator=gen)
with torch.no_grad():
    arrays.update(vae_x=x, vae_mu=vae.encode(x), vae_z=z, vae_decoded=vae.decode(z).clamp(-1, 1))

cfg = {"d_ff": 48, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 96, "model_type": "umt5",
       "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True}
t5 = comfy.text_encoders.t5.T5(cfg, torch.float32, "cpu", comfy.ops.disable_weight_init).eval()
save_file(randomise(t5, ("layer_norm.weight",)), out + "/umt5.safetensors")
ids = torch.tensor([[5, 17, 33, 9, 1, 0, 0, 0]])
mask = (ids > 0).long(); mask[0, 0] = 1
with torch.no_grad():
    arrays.update(t5_ids=ids, t5_mask=mask, t5_out=t5(ids, mask)[0])

clip_cfg = {"hidden_size": 40, "intermediate_size": 80, "num_attention_heads": 2, "num_hidden_layers": 3,
            "image_size": 28, "patch_size": 14, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 8, "model_type": "clip_vision_model"}
clip = comfy.clip_model.CLIPVisionModelProjection(clip_cfg, torch.float32, "cpu", comfy.ops.disable_weight_init).eval()
save_file(randomise(clip, ("layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight")), out + "/clip.safetensors")
json.dump(clip_cfg, open(out + "/clip.json", "w"))
px = torch.randn(1, 3, 28, 28, generator=gen)
with torch.no_grad():
    arrays.update(clip_px=px, clip_penultimate=clip(px, intermediate_output=-2)[1])
# the same tower in open_clip layout, brought back by ComfyUI's own converter
import comfy.clip_vision
from safetensors.torch import load_file
open_clip = load_file(out + "/clip_openclip.safetensors")
converted = comfy.clip_vision.convert_to_transformers(dict(open_clip), "visual.")
clip2 = comfy.clip_model.CLIPVisionModelProjection(clip_cfg, torch.float32, "cpu", comfy.ops.disable_weight_init).eval()
clip2.load_state_dict({k: v for k, v in converted.items() if k in clip2.state_dict()}, strict=False)
with torch.no_grad():
    arrays.update(clip_openclip_penultimate=clip2(px, intermediate_output=-2)[1])
np.savez(out + "/reference.npz", **{k: v.float().numpy() for k, v in arrays.items()})
"""


@pytest.fixture(scope="module")
def comfy_reference(tmp_path_factory):
    comfy = comfyui_dir()  # skips (or fails under WORLDSTEREO_REQUIRE_INTEGRATION=1) without ComfyUI
    out = tmp_path_factory.mktemp("comfy_reference")
    ref, cfg = _clip(seed=5)  # an open_clip-layout tower for ComfyUI's converter and ours
    state = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in ref.state_dict().items()}
    save_file(to_open_clip(state), str(out / "clip_openclip.safetensors"))
    (out / "clip_openclip.json").write_text(json.dumps({**cfg.to_dict(), "hidden_act": "gelu"}))  # as ComfyUI's
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    proc = subprocess.run([python, "-c", textwrap.dedent(COMFY_REFERENCE), comfy, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, dict(np.load(out / "reference.npz"))


def test_original_layout_vae_matches_comfyui(comfy_reference):
    out, ref = comfy_reference
    vae = sf.load_vae_file(out / "vae.safetensors")
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(ref["vae_x"])).latent_dist.mode()
        decoded = vae.decode(torch.from_numpy(ref["vae_z"])).sample.clamp(-1, 1)
    np.testing.assert_allclose(mu.numpy(), ref["vae_mu"], atol=1e-4)
    np.testing.assert_allclose(decoded.numpy(), ref["vae_decoded"], atol=1e-4)


def test_t5_layout_text_encoder_matches_comfyui(comfy_reference):
    out, ref = comfy_reference
    model = sf.load_umt5_file(out / "umt5.safetensors")
    with torch.no_grad():
        got = model(torch.from_numpy(ref["t5_ids"]).long(), torch.from_numpy(ref["t5_mask"]).long()).last_hidden_state
    valid = ref["t5_mask"][0].astype(bool)
    np.testing.assert_allclose(got.numpy()[0][valid], ref["t5_out"][0][valid], atol=1e-4)


def test_clip_vision_matches_comfyui(comfy_reference):
    out, ref = comfy_reference
    (out / "clip.safetensors").with_suffix(".json").write_text((out / "clip.json").read_text())
    model, _ = sf.load_clip_vision_file(out / "clip.safetensors")
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(ref["clip_px"]), output_hidden_states=True).hidden_states[-2]
    np.testing.assert_allclose(got.numpy(), ref["clip_penultimate"], atol=1e-4)
    converted, _ = sf.load_clip_vision_file(out / "clip_openclip.safetensors")
    with torch.no_grad():
        got = converted(pixel_values=torch.from_numpy(ref["clip_px"]), output_hidden_states=True).hidden_states[-2]
    np.testing.assert_allclose(got.numpy(), ref["clip_openclip_penultimate"], atol=1e-4)
