"""MoGe loading / inference with TINY random MoGe-2 and MoGe-1 models built offline."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("moge", reason="dlr-moge is not installed (pip install --no-deps dlr-moge==2.0.0)")

from worldstereo_core.errors import CheckpointError, InputError, MissingWeightsError  # noqa: E402
from worldstereo_core.geometry import moge as wm  # noqa: E402
from tiny_moge import TINY_MOGE_CONFIGS  # noqa: E402

CONFIGS = TINY_MOGE_CONFIGS


class NotAWeight:  # an arbitrary picklable object: weights_only must refuse it
    pass


def _save(path, config, state_dict):
    torch.save({"model_config": config, "model": state_dict}, path)
    return path


@pytest.fixture(scope="module", params=["v2", "v1"])
def saved(request, tmp_path_factory):
    version = request.param
    torch.manual_seed(0)
    model = wm.build_moge(CONFIGS[version], version).eval()
    _balance_mask(model, version)
    path = _save(tmp_path_factory.mktemp(version) / "model.pt", CONFIGS[version], model.state_dict())
    return version, model, path


def _image():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(3, 28, 36, generator=g) * 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def _balance_mask(model, version):
    """Shift the mask head's output bias so that about half of the test image is valid.

    A random model predicts one class everywhere; a mixed mask lets the tests see the 0 fill.
    """
    head = model.head.output_block[1] if version == "v1" else model.mask_head
    conv = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MoGe's CPU autocast notice
        raw = model.forward(_image().permute(2, 0, 1).float()[None] / 255.0, 12)["mask"]
        logit = raw if version == "v1" else torch.logit(raw)  # v1: raw > 0.5; v2: sigmoid > 0.5
        conv.bias += (0.5 if version == "v1" else 0.0) - logit.median()


def test_load_strict_and_same_outputs(saved):
    version, model, path = saved
    loaded = wm.load_moge(path)
    assert not loaded.training
    assert wm.detect_moge_version(*wm.read_moge_checkpoint(path)) == version
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    img = _image()
    a = wm.estimate_depth(model, img, num_tokens=12)
    b = wm.estimate_depth(loaded, img, num_tokens=12)
    for key in ("depth", "mask", "intrinsics_normalised"):
        assert torch.equal(a[key], b[key]), key


def test_estimate_depth_outputs(saved):
    _, model, _ = saved
    img = _image()
    out = wm.estimate_depth(model, img, resolution_level=0)
    H, W = img.shape[:2]
    assert out["depth"].shape == (H, W) and out["depth"].dtype == torch.float32
    assert out["mask"].shape == (H, W) and out["mask"].dtype == torch.bool
    assert out["intrinsics_normalised"].shape == (3, 3)
    assert torch.allclose(out["intrinsics_normalised"][:2, 2], torch.tensor([0.5, 0.5]))
    d, m = out["depth"], out["mask"]
    assert m.any() and (~m).any()  # both kinds present (see _balance_mask)
    assert torch.isfinite(d).all() and (d[~m] == 0).all() and (d[m] > 0).all()
    # the same image as float CHW in [0, 1] (MoGe layout) gives the same result
    chw = img.permute(2, 0, 1).float() / 255.0
    assert torch.equal(wm.estimate_depth(model, chw, resolution_level=0)["depth"], d)
    with pytest.raises(InputError, match="resolution_level"):
        wm.estimate_depth(model, img, resolution_level=12)


def _edited(saved, tmp_path, edit):
    version, model, _ = saved
    sd = dict(model.state_dict())
    edit(sd)
    return _save(tmp_path / "edited.pt", CONFIGS[version], sd)


def test_strict_missing_key(saved, tmp_path):
    key = [k for k in saved[1].state_dict() if k.endswith(".weight")][-1]
    path = _edited(saved, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="missing tensors: " + key.replace(".", r"\.")):
        wm.load_moge(path)


def test_strict_unexpected_key(saved, tmp_path):
    path = _edited(saved, tmp_path, lambda sd: sd.__setitem__("extra.head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: extra\.head\.weight"):
        wm.load_moge(path)


def test_strict_wrong_shape(saved, tmp_path):
    key = [k for k, v in saved[1].state_dict().items() if v.dim() == 4][0]
    path = _edited(saved, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(1, 1, 1, 1)))
    with pytest.raises(CheckpointError, match="wrongly shaped tensors: .*" + key.replace(".", r"\.")):
        wm.load_moge(path)


def test_rebuilt_buffers_may_be_absent(saved, tmp_path):
    path = _edited(saved, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("image_mean")])
    loaded = wm.load_moge(path)
    mean = next(v for k, v in loaded.state_dict().items() if k.endswith("image_mean"))
    assert torch.allclose(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_version_mismatch_and_bad_files(saved, tmp_path):
    version, _, path = saved
    other = "v1" if version == "v2" else "v2"
    with pytest.raises(CheckpointError, match=f"version='{other}'"):
        wm.load_moge(path, version=other)
    torch.save({"model_config": CONFIGS[version], "model": {}, "payload": NotAWeight()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        wm.load_moge(tmp_path / "pickled.pt")
    torch.save({"weights": {}}, tmp_path / "layout.pt")
    with pytest.raises(CheckpointError, match="model_config"):
        wm.load_moge(tmp_path / "layout.pt")
    with pytest.raises(MissingWeightsError):
        wm.load_moge(tmp_path / "absent.pt")


def test_checkpoint_location_and_offline(tmp_path, monkeypatch):
    path = wm.moge_checkpoint_path(tmp_path, "Ruicheng/moge-2-vitl")
    assert path == (tmp_path / "moge-2-vitl" / "model.pt").resolve()
    with pytest.raises(MissingWeightsError, match=r"hf download Ruicheng/moge-2-vitl-normal model\.pt"):
        wm.ensure_moge_checkpoint(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
        wm.ensure_moge_checkpoint(tmp_path, download=True)
    with pytest.raises(InputError, match="owner/name"):
        wm.moge_checkpoint_path(tmp_path, "../../etc")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert wm.ensure_moge_checkpoint(tmp_path, "Ruicheng/moge-2-vitl", download=True) == path


def test_download_goes_to_models_folder(tmp_path, monkeypatch):
    """The Hub call is stubbed (no network): it must be asked for model.pt into <models>/<repo-name>/."""
    import huggingface_hub

    calls = {}

    def fake_download(repo_id, filename, local_dir):
        calls.update(repo_id=repo_id, filename=filename, local_dir=local_dir)
        (local_dir / filename).write_bytes(b"weights")
        return str(local_dir / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = wm.ensure_moge_checkpoint(tmp_path, "Ruicheng/moge-vitl", download=True)
    assert calls == {"repo_id": "Ruicheng/moge-vitl", "filename": "model.pt", "local_dir": path.parent}
    assert path.read_bytes() == b"weights"


def test_depth_fn_resume_key_follows_the_weight_file(saved, tmp_path):
    """A run folder keys MoGe by its file: rewritten weights give another key (a stale resume would
    reuse depth from other weights); the same file gives the same key."""
    from worldstereo_core.memory.cache import moge_depth_fn

    _, model, path = saved
    copy = tmp_path / "model.pt"
    copy.write_bytes(path.read_bytes())
    first = moge_depth_fn(wm.load_moge(copy)).resume_key()
    assert first == moge_depth_fn(wm.load_moge(copy)).resume_key()
    assert first["moge"][0][:2] == ["model.pt", copy.stat().st_size]
    copy.write_bytes(path.read_bytes() + b"")  # same bytes, newer write
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert moge_depth_fn(wm.load_moge(copy)).resume_key() != first
