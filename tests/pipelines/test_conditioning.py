"""Conditioning: prompt cleaning + UMT5, CLIP (incl. the do_rescale=False quirk), keyframe VAE.

Fixture checks iterate over every reference_tiny folder whose fixture_kind starts with
"pipeline" and use the tiny VAE / CLIP of ``common/`` (no transformer needed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import fixtures_root
from tiny_components import load_fixture_common, reference_tiny_dirs, write_tiny_base
from worldstereo_core.errors import InputError
from worldstereo_core.loading.components import (clip_vision_from_state_dict, load_image_encoder,
                                                   load_image_processor, load_text_encoder, load_tokenizer,
                                                   load_vae)
from worldstereo_core.pipelines.conditioning import (clean_prompt, clip_pixel_values, encode_image, encode_prompt,
                                                     preprocess_image, to_pil_rgb)
from worldstereo_core.pipelines.vae import (decode_keyframes, encode_keyframes, encode_video, i2v_mask,
                                            image_condition_latent, latent_frames, reference_latent_layout)

TINY = fixtures_root() / "reference_tiny"


PIPELINE_DIRS = reference_tiny_dirs(TINY, "pipeline")
CLIP_PIXEL_FILES = sorted(TINY.glob("common/clip_pixel_values_of_*_image.safetensors")) if TINY.is_dir() else []


def _need(items, what):
    if not items:
        pytest.skip(f"no {what} under {TINY} (set WORLDSTEREO_FIXTURES)")


@pytest.fixture(scope="module")
def common():
    c = TINY / "common"
    if not c.is_dir():
        pytest.skip(f"reference_tiny/common not found at {c} (set WORLDSTEREO_FIXTURES)")
    return load_fixture_common(c)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("wan_base"))


def _image(case: Path) -> Image.Image:
    return Image.fromarray(load_file(str(case / "inputs.safetensors"))["image_uint8_hwc"].numpy(), "RGB")


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def test_clean_prompt_like_wan():
    assert clean_prompt("  a   cat\n\tsits  ") == "a cat sits"
    assert clean_prompt("fish &amp;amp; chips") == "fish & chips"       # unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 on the left") == "caf\u00e9 on the left"  # ftfy mojibake repair


def test_encode_prompt_zeroes_padding_and_matches_unpadded_run(tiny_base):
    tok, enc = load_tokenizer(tiny_base), load_text_encoder(tiny_base)
    prompts = ["A  red &amp; blue house", "x"]
    emb = encode_prompt(tok, enc, prompts)
    assert emb.shape == (2, 512, enc.config.d_model) and emb.dtype == torch.float32
    for row, text in zip(emb, prompts):
        ids = tok(clean_prompt(text), return_tensors="pt").input_ids
        n = ids.shape[1]
        with torch.no_grad():
            alone = enc(ids).last_hidden_state[0]
        assert torch.allclose(row[:n], alone, atol=1e-5)
        assert torch.count_nonzero(row[n:]) == 0
        assert torch.count_nonzero(row[:n].abs().sum(-1)) == n
    long = encode_prompt(tok, enc, "word " * 400)
    assert torch.count_nonzero(long[0].abs().sum(-1)) == 512  # truncated to 512, all real tokens


def test_umt5_embedding_is_tied_after_loading(tiny_base):
    enc = load_text_encoder(tiny_base)
    from safetensors import safe_open
    with safe_open(str(tiny_base / "text_encoder" / "model.safetensors"), "pt") as f:
        assert "encoder.embed_tokens.weight" not in f.keys()  # stored only as shared.weight, like Wan
        shared = f.get_tensor("shared.weight")
    assert torch.equal(enc.encoder.embed_tokens.weight, shared)
    assert enc.encoder.embed_tokens.weight.data_ptr() == enc.shared.weight.data_ptr()


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pixel_file", CLIP_PIXEL_FILES or [None], ids=lambda p: p.stem if p else "absent")
def test_clip_pixel_values_reference_quirk(pixel_file, common):
    _need(CLIP_PIXEL_FILES, "clip_pixel_values_of_*_image fixtures")
    case = TINY / pixel_file.stem[len("clip_pixel_values_of_"):-len("_image")]
    ref = load_file(str(pixel_file))["pixel_values"]
    ours = clip_pixel_values(common["processor"], _image(case))
    assert torch.allclose(ours, ref, atol=1e-4)
    # The standard path divides by 255: undo normalisation of the quirky values to check.
    proc = common["processor"]
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    standard = clip_pixel_values(proc, _image(case), clip_no_rescale=False)
    assert torch.allclose(standard, ((ref * std + mean) / 255 - mean) / std, atol=1e-4)


@pytest.mark.parametrize("case", PIPELINE_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_image_embeds_match_fixture(case, common):
    _need(PIPELINE_DIRS, "pipeline fixtures")
    ref = load_file(str(case / "outputs.safetensors"))["image_embeds"]
    with torch.no_grad():
        ours = encode_image(common["clip"], common["processor"], _image(case))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4)


def test_clip_prefix_both_spellings(common):
    c = TINY / "common"
    cfg = json.loads((c / "clip_vision_config.json").read_text())
    sd = load_file(str(c / "clip_vision.safetensors"))
    stripped = {k.split("vision_model.", 1)[-1]: v for k, v in sd.items()}
    model = clip_vision_from_state_dict(cfg, stripped)
    for k, v in model.state_dict().items():
        assert torch.equal(v, common["clip"].state_dict()[k])


def test_to_pil_rgb_accepts_comfy_and_array_images():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    as_float = torch.from_numpy(arr).float()[None] / 255.0          # ComfyUI IMAGE [1,H,W,3]
    chw = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    for x in (arr, as_float, chw, Image.fromarray(arr)):
        assert np.array_equal(np.asarray(to_pil_rgb(x)), arr)
    with pytest.raises(InputError):
        to_pil_rgb(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InputError):
        to_pil_rgb(np.full((8, 8, 3), np.nan, np.float32))


def test_tiny_base_clip_loads_and_embeds(tiny_base):
    enc, proc = load_image_encoder(tiny_base), load_image_processor(tiny_base)
    img = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        emb = encode_image(enc, proc, img)
        direct = enc(pixel_values=clip_pixel_values(proc, img), output_hidden_states=True).hidden_states[-2]
    assert emb.shape[-1] == enc.config.hidden_size and torch.equal(emb, direct)


# ------------------------------------------------------------------------------------------------
# VAE: keyframe space, I2V condition and layouts vs the pipeline fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", PIPELINE_DIRS or [None], ids=lambda p: p.name if p else "absent")
def test_condition_latents_match_fixture(case, common):
    _need(PIPELINE_DIRS, "pipeline fixtures")
    cfg = json.loads((case / "config.json").read_text())["call_kwargs"]
    inp, out = load_file(str(case / "inputs.safetensors")), load_file(str(case / "outputs.safetensors"))
    vae, (H, W), n = common["vae"], (cfg["height"], cfg["width"]), cfg["num_frames"]
    F, h, w = latent_frames(n), H // 8, W // 8
    with torch.no_grad():
        cond = image_condition_latent(vae, preprocess_image(_image(case), H, W), n, cfg["latent_cond_mode"])
        step0 = torch.cat([inp["latents"], i2v_mask(1, F, h, w), cond], dim=1)
        assert torch.allclose(step0, out["step0_latent_model_input"], atol=1e-4)
        render = encode_keyframes(vae, inp["render_video"])
        assert torch.allclose(render, out["render_latent"], atol=1e-4)
        if "reference_latent" in out:
            ref = reference_latent_layout(encode_keyframes(vae, inp["reference_video"]))
            assert torch.allclose(ref, out["reference_latent"], atol=1e-4)
        decoded = decode_keyframes(vae, out["final_latents"])
        assert torch.allclose(decoded, out["decoded_video"], atol=1e-3)


def test_keyframe_encoding_is_per_frame_and_modes_differ(common):
    vae = common["vae"]
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        keys = encode_keyframes(vae, video)
        assert keys.shape == (1, 16, 3, 4, 6)
        # Frame 2 alone equals frame 2 of the keyframe encoding (no temporal context).
        assert torch.allclose(encode_keyframes(vae, video[:, :, 2:3]), keys[:, :, 2:3], atol=1e-6)
        causal = encode_video(vae, torch.cat([video[:, :, :1]] * 5, dim=2))
        assert causal.shape[2] == 2                       # 5 frames -> 2 latent frames (x4 compression)
        image = video[:, :, 0]
        full = image_condition_latent(vae, image, 9, "full_vae")
        first = image_condition_latent(vae, image, 9, "first_frame_only")
        black = encode_keyframes(vae, torch.zeros_like(video[:, :, :1]))
        assert full.shape == first.shape == (1, 16, 3, 4, 6)
        assert torch.allclose(first[:, :, :1], encode_keyframes(vae, video[:, :, :1]), atol=1e-6)
        assert torch.allclose(first[:, :, 1:], black.expand(-1, -1, 2, -1, -1), atol=1e-6)
        assert torch.allclose(full[:, :, :1], first[:, :, :1], atol=1e-5)  # causal: frame 0 sees only itself
        assert not torch.allclose(full[:, :, 1:], first[:, :, 1:], atol=1e-3)
    with pytest.raises(InputError):
        image_condition_latent(vae, image, 9, "half_vae")


def test_latent_layouts():
    m = i2v_mask(2, 3, 4, 6)
    assert m.shape == (2, 4, 3, 4, 6) and m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()
    r = torch.randn(1, 16, 2, 4, 6)
    lay = reference_latent_layout(r)
    assert lay.shape == (1, 36, 2, 4, 6)
    assert torch.equal(lay[:, :16], r) and torch.equal(lay[:, 20:], r) and lay[:, 16:20].eq(1).all()


def test_tiny_base_vae_roundtrip_shapes(tiny_base):
    vae = load_vae(tiny_base, device="cpu")
    assert next(vae.parameters()).dtype == torch.float32       # fp32 on CPU
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    with torch.no_grad():
        dec = decode_keyframes(vae, encode_keyframes(vae, video))
    assert dec.shape == video.shape and dec.abs().max() <= 1.0
