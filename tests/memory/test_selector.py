"""CameraSelector against camera_selector.json (stand-in image features), fallback and DINOv2 loading."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_file
from worldstereo_core.errors import CheckpointError
from worldstereo_core.memory import selector as selector_module
from worldstereo_core.memory.selector import (
    CameraSelector, DinoV2Features, camera_features, image_quality_scores, quality_aware_fps, standardize,
)


def box_features(frames) -> np.ndarray:
    """The fixtures' stand-in for DINOv2: each image BOX-resized to 4x4 (PIL), flattened, / 255."""
    return np.stack([np.asarray(Image.fromarray(f).resize((4, 4), Image.BOX), dtype=np.float64).ravel() / 255
                     for f in frames])


def _fixture():
    d = json.loads(fixture_file("geometry", "camera_selector.json").read_text())
    images = np.load(fixture_file("geometry", "camera_selector_images.npz"))["images"]
    return d, images


def test_camera_features_match_fixture_bit_for_bit():
    """Near-ties in the farthest-point order depend on the last bits: the reference's float32 centres
    and its quaternions are reproduced exactly (float64 centres miss by ~4e-8)."""
    d, _ = _fixture()
    exp = np.asarray(d["camera_features(pos+quat_xyzw_w>=0)"])
    got = camera_features(d["w2cs"])
    assert got.shape == exp.shape and got.dtype == np.float64
    assert np.array_equal(got[:, :3], np.asarray(d["positions"]))
    assert np.array_equal(got, exp)


def test_quality_scores_match_fixture_bit_for_bit():
    d, images = _fixture()
    assert np.array_equal(image_quality_scores(images), np.asarray(d["quality_scores"]))


def test_image_features_are_standardised_in_their_own_precision():
    """DINOv2 gives float32 features; the reference z-scores them in float32, not float64."""
    feats = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    z = standardize(feats)
    assert z.dtype == np.float32
    assert np.array_equal(z, (feats - feats.mean(axis=0)) / (feats.std(axis=0) + np.float32(1e-8)))
    assert standardize(feats.astype(np.float64)).dtype == np.float64


def test_quality_uses_bgr_formula_on_rgb():
    """Independent check of the grey conversion: 0.299 * channel 2 + 0.587 * channel 1 + 0.114 * channel 0."""
    rng = np.random.default_rng(0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = rng.integers(0, 256, (32, 32))  # only "R" varies: weight 0.114 under the BGR formula
    gray = np.round(0.114 * img[..., 0].astype(np.float64)).astype(np.uint8)
    h = np.histogram(gray, bins=256, range=(0, 256))[0] / gray.size + 1e-10  # the reference's entropy
    lap = cv2.filter2D(gray.astype(np.float64), -1, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float),
                       borderType=cv2.BORDER_REFLECT_101)
    expected = 0.4 * np.log1p(lap.var()) + 0.3 * -np.sum(h * np.log2(h)) + 0.3 * gray.std() / 128
    assert image_quality_scores([img])[0] == pytest.approx(expected, abs=1e-6)


def test_select_matches_fixture():
    d, images = _fixture()
    s = d["select"]
    sel = CameraSelector(box_features, camera_weight=s["camera_weight"], image_weight=s["image_weight"],
                         quality_bias=s["quality_bias"])
    result = sel.select(d["w2cs"], list(images), s["topk"])
    assert result.indices == s["expected_indices"]
    assert result.used_image_features and result.message is None


@pytest.mark.parametrize("key", ["bias0.1_expected", "bias2.0_expected"])
def test_fps_only_matches_fixture(key):
    d, _ = _fixture()
    f = d["fps_only"]
    bias = float(key[len("bias"):-len("_expected")])
    assert quality_aware_fps(np.asarray(f["features"]), np.asarray(f["quality"]), f["k"], bias) == f[key]


def test_fps_picks_farthest_without_bias():
    pts = np.array([[0.0, 0], [1, 0], [11, 0], [0, 12], [5, 5]])
    order = quality_aware_fps(pts, np.zeros(5), 5, bias=0.0)
    # start nearest the mean (3.4, 3.4); then farthest from the chosen set each time
    assert order == [4, 3, 2, 0, 1]
    assert quality_aware_fps(pts, np.zeros(5), 9, bias=0.0) == order  # k > N returns all


def test_fallback_without_dinov2_warns_and_flags(caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(selector_module, "_warned", set())
    d, images = _fixture()
    for selector, where in ((CameraSelector(), "no dinov2_path"), (CameraSelector(dinov2_path=tmp_path), str(tmp_path))):
        with caplog.at_level(logging.WARNING, logger="worldstereo_core.memory.selector"):
            caplog.clear()
            result = selector.select(d["w2cs"], list(images), 5)
            selector.select(d["w2cs"], list(images), 5)
        assert not result.used_image_features
        assert where in result.message and "dinov2" in result.message.lower()
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # warned once per process
        assert len(set(result.indices)) == 5


def _tiny_dinov2(folder):
    from transformers import Dinov2Config, Dinov2Model

    from test_image_processors import pil_processor_class

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(folder)
    proc = pil_processor_class("BitImageProcessor")(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc.save_pretrained(folder)
    return model, proc


def test_dinov2_from_local_folder(tmp_path):
    d, images = _fixture()
    model, proc = _tiny_dinov2(tmp_path)
    feats = DinoV2Features(tmp_path, batch_size=5)(list(images))
    with torch.no_grad():
        direct = model(**proc(images=list(images), return_tensors="pt")).pooler_output.numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5, rtol=0)
    assert feats.dtype == np.float32 and DinoV2Features(tmp_path).batch_size == 1  # one frame at a time
    result = CameraSelector(dinov2_path=tmp_path).select(d["w2cs"], list(images), 6)
    assert result.used_image_features and result.message is None and len(set(result.indices)) == 6


def test_broken_dinov2_folder_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    d, images = _fixture()
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        CameraSelector(dinov2_path=tmp_path).select(d["w2cs"], list(images), 3)
