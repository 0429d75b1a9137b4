"""``python -m worldstereo_core``: camera-control and multi-traj end to end on tiny checkpoints written
in the real models-folder layout, from example scenes copied to a temporary folder (working size
overridden to 32x48, 2 steps); missing weights, offline mode and Ctrl-C."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, example_dirs
from tiny_models_root import write_models_root
from worldstereo_core import cli
from worldstereo_core.io.video import read_mask_video, read_video

SIZE = "32x48"
IMAGE_SCENES = example_dirs("images")
RECON_SCENES = example_dirs("reconstruction")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models_root(tmp_path_factory.mktemp("models"), ("worldstereo-camera", "worldstereo-memory"), moge=True)


def _run(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.mark.parametrize("scene_dir", IMAGE_SCENES[:1], ids=lambda p: p.name)
def test_camera_control_end_to_end_with_moge(scene_dir, models, tmp_path):
    scene = shutil.copytree(scene_dir, tmp_path / "in" / scene_dir.name)
    out = tmp_path / "out"
    assert _run("camera-control", scene, "--out", out, "--models", models, "--size", SIZE, "--steps", 2) == 0
    folder = out / scene.name
    frames = read_video(folder / "worldstereo-camera_result.mp4")
    assert frames.shape == (21, 32, 48, 3)
    pngs = sorted((folder / "worldstereo-camera_frames").glob("*.png"))
    assert len(pngs) == 21 and np.array_equal(np.asarray(Image.open(pngs[-1])), frames[-1])
    assert read_video(folder / "render.mp4").shape == (21, 32, 48, 3)
    mask = read_mask_video(folder / "render_mask.mp4")
    assert mask.shape == (21, 32, 48) and mask[0].sum() == 0
    saved = json.loads((folder / "camera.json").read_text())
    assert len(saved["extrinsic"]) == 21 and (saved["height"], saved["width"]) == (32, 48)


@pytest.mark.parametrize("scene_dir", IMAGE_SCENES, ids=lambda p: p.name)
def test_camera_control_memory_model_with_depth_file(scene_dir, models, tmp_path):
    scene = shutil.copytree(scene_dir, tmp_path / "in" / scene_dir.name)
    h, w = np.asarray(Image.open(scene / "image.png")).shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    np.save(tmp_path / "depth.npy", (2.0 + xx / w + 0.5 * yy / h).astype(np.float32))
    out = tmp_path / "out"
    assert _run("camera-control", scene, "--out", out, "--models", models, "--size", SIZE, "--steps", 2,
                "--model-type", "worldstereo-memory", "--depth", tmp_path / "depth.npy") == 0
    assert read_video(out / scene.name / "worldstereo-memory_result.mp4").shape == (21, 32, 48, 3)


@pytest.mark.parametrize("scene_dir", RECON_SCENES[:1], ids=lambda p: p.name)
def test_multi_traj_reconstruction_release(scene_dir, models, tmp_path, capsys):
    scene = shutil.copytree(scene_dir, tmp_path / "in" / scene_dir.name)
    out = tmp_path / "out"
    args = ("multi-traj", scene, "--task", "reconstruction", "--out", out, "--models", models, "--size", SIZE,
            "--steps", 2, "--align-nframe", 8)
    assert _run(*args) == 0
    printed = capsys.readouterr().out
    for traj in ("traj_eloop", "traj_up", "traj_right", "traj_left"):
        result = out / scene.name / "renders" / traj / "worldstereo-memory_result.mp4"
        assert read_video(result).shape == (21, 32, 48, 3)
        assert f"renders/{traj}: generated from scene renders" in printed
    wm = json.loads((out / scene.name / "world_mirror_data" / "worldstereo-memory" / "cameras.json").read_text())
    assert wm["num_cameras"] == 33
    assert _run(*args) == 0  # rerun resumes: everything already done
    assert capsys.readouterr().out.count(": skipped") == 4


def test_missing_weights_and_offline(tmp_path, monkeypatch, capsys):
    scene = tmp_path / "scene"
    scene.mkdir()
    empty = tmp_path / "empty_models"
    assert _run("camera-control", scene, "--out", tmp_path / "o", "--models", empty) == 2
    err = capsys.readouterr().err
    assert "worldstereo-camera/config.json" in err and str(empty / "worldstereo") in err
    assert "hf download hanshanxue/WorldStereo --include 'worldstereo-camera/*'" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _run("camera-control", scene, "--out", tmp_path / "o", "--models", empty, "--download") == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_bad_scene_and_ctrl_c(models, tmp_path, monkeypatch, capsys):
    assert _run("camera-control", tmp_path / "absent", "--out", tmp_path / "o", "--models", models,
                "--size", SIZE) == 2
    assert "not found" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import worldstereo_core.tasks.camera_control as cc

    monkeypatch.setattr(cc, "run_camera_control", interrupted)
    assert _run("camera-control", tmp_path, "--out", tmp_path / "o", "--models", models, "--size", SIZE) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("camera-control", tmp_path, "--out", tmp_path / "o", "--size", "32by48")


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "worldstereo_core", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("camera-control", "multi-traj", "download"):
        assert command in proc.stdout
