"""``python -m worldstereo_core``: camera-control and multi-traj end to end on tiny checkpoints written
in the real models-folder layout, from example scenes copied to a temporary folder (working size
overridden to 32x48, 2 steps); missing weights, offline mode and Ctrl-C; several scenes per run;
the runtime flags (block swap, fp8, VAE tiling, offload, text-encoder dtype, attention) reaching
the loaded model.

Tolerances: block swap only moves weights, so its frames equal the plain run's exactly (the
generator's float frames and the decoded MP4). fp8 changes the weights; its exact reference is the
plain run of a model whose fp8-stored layers were replaced by their fp8 round trip
(``fp8_roundtrip``, the weights an FP8Linear computes with): equal float frames and MP4.
(How far fp8 moves a model from full precision is bounded per layer in test_runtime.py.)"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, example_dirs
from tiny_models import write_models_root
from worldstereo_core import cli
from worldstereo_core.io.video import read_mask_video, read_video
from worldstereo_core.runtime.options import RuntimeOptions, runtime_options_from_args
from worldstereo_core.tasks import generate

REAL_LOAD = generate.load_pipeline_clip_generator
REAL_CALL = generate.PipelineClipGenerator.__call__

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

    monkeypatch.setattr(cc, "validate_camera_scene", lambda *a, **k: None)
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


# --------------------------------------------------------------------------------------------
# Several scenes per run, runtime flags
# --------------------------------------------------------------------------------------------

@pytest.fixture
def image_inputs(tmp_path):
    """Copies of every example image scene and a depth file for each (skip when there are none)."""
    if not IMAGE_SCENES:
        pytest.skip("no example image scenes (set WORLDSTEREO_EXAMPLES)")
    scenes, depths = [], []
    for src in IMAGE_SCENES:
        scene = shutil.copytree(src, tmp_path / "in" / src.name)
        h, w = np.asarray(Image.open(scene / "image.png")).shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        depths.append(tmp_path / f"{src.name}_depth.npy")
        np.save(depths[-1], (2.0 + xx / w + 0.5 * yy / h).astype(np.float32))
        scenes.append(scene)
    return scenes, depths


class Run:
    """One in-process camera-control run over several scenes, recording the loaded generator, the
    runtime options it got and the frames it returned (before MP4 encoding)."""

    def __init__(self, monkeypatch, on_load=None) -> None:
        self.generator, self.runtime, self.frames = None, None, []

        def load(*args, **kwargs):
            self.generator, config = REAL_LOAD(*args, **kwargs)
            self.runtime = kwargs.get("runtime")
            if on_load is not None:
                on_load(self.generator)
            return self.generator, config

        def call(gen, request, progress=None):
            out = REAL_CALL(gen, request, progress)
            self.frames.append(out)
            return out

        monkeypatch.setattr(generate, "load_pipeline_clip_generator", load)
        monkeypatch.setattr(generate.PipelineClipGenerator, "__call__", call)

    def __call__(self, models, scenes, depths, out, *flags) -> dict[str, np.ndarray]:
        assert _run("camera-control", *scenes, "--out", out, "--models", models, "--size", SIZE, "--steps", 2,
                    "--depth", *depths, *flags) == 0
        assert len(self.frames) == len(scenes)  # one clip per scene, in order
        return {s.name: read_video(out / s.name / "worldstereo-camera_result.mp4") for s in scenes}


def test_runtime_flags_parse_for_both_commands():
    parser = cli.build_parser()
    flags = ["--block-swap", "3", "--prefetch", "2", "--fp8", "tensor", "--compile", "--attention", "sdpa",
             "--vae-tiling", "--offload", "--text-encoder-dtype", "bf16"]
    expected = RuntimeOptions(block_swap=3, prefetch=2, fp8="tensor", compile=True, attention="sdpa",
                              vae_tiling=True, offload=True, text_encoder_dtype="bf16")
    for command in (["camera-control", "a", "b"], ["multi-traj", "a", "b", "--task", "panorama"]):
        args = parser.parse_args([*command, "--out", "o", *flags])
        assert [p.name for p in args.scene] == ["a", "b"]
        assert runtime_options_from_args(args) == expected
        plain = parser.parse_args([*command, "--out", "o"])
        assert runtime_options_from_args(plain) == RuntimeOptions()
        assert runtime_options_from_args(parser.parse_args([*command, "--out", "o", "--fp8"])).fp8 == "channel"
        assert runtime_options_from_args(parser.parse_args([*command, "--out", "o", "--shard-weights"])).shard_weights


def test_block_swap_and_fp8_runs_match_their_references(models, image_inputs, tmp_path, monkeypatch):
    from worldstereo_core import loading as loading_module
    from worldstereo_core.runtime.block_swap import BlockSwap
    from worldstereo_core.runtime.fp8 import FP8_DTYPE, FP8Linear, fp8_roundtrip

    scenes, depths = image_inputs
    plain = Run(monkeypatch)
    plain_mp4 = plain(models, scenes, depths, tmp_path / "plain")
    assert plain.runtime == RuntimeOptions() and getattr(plain.generator.pipeline.transformer, "placement", None) is None

    trace: list = []
    swap = Run(monkeypatch, on_load=lambda g: setattr(g.pipeline.transformer.placement, "trace", trace))
    swap_mp4 = swap(models, scenes, depths, tmp_path / "swap", "--block-swap", "1")
    placement = swap.generator.pipeline.transformer.placement
    assert isinstance(placement, BlockSwap) and placement.resident == 1 and placement.streamed
    assert ("release", placement.streamed[-1]) in trace  # the blocks really streamed during sampling
    for a, b in zip(swap.frames, plain.frames):
        assert np.array_equal(a, b)
    for name in plain_mp4:
        assert np.array_equal(swap_mp4[name], plain_mp4[name])

    quant = Run(monkeypatch)
    fp8_mp4 = quant(models, scenes, depths, tmp_path / "fp8", "--fp8")
    stored = {n: m.mode for n, m in quant.generator.pipeline.transformer.named_modules() if isinstance(m, FP8Linear)}
    assert stored and all(mode == "channel" for mode in stored.values())
    assert all(quant.generator.pipeline.transformer.get_submodule(n).weight.dtype == FP8_DTYPE for n in stored)

    real_loader = loading_module.load_worldstereo_transformer

    def roundtripped(*args, **kwargs):  # the plain model with the fp8-stored layers' weights round-tripped
        model = real_loader(*args, **kwargs)
        with torch.no_grad():
            for name, mode in stored.items():
                layer = model.get_submodule(name)
                layer.weight.copy_(fp8_roundtrip(layer.weight, mode))
        return model

    monkeypatch.setattr(loading_module, "load_worldstereo_transformer", roundtripped)
    reference = Run(monkeypatch)
    ref_mp4 = reference(models, scenes, depths, tmp_path / "fp8_reference")
    for a, b, c in zip(quant.frames, reference.frames, plain.frames):
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)  # fp8 did change the weights
    for name in ref_mp4:
        assert np.array_equal(fp8_mp4[name], ref_mp4[name])


def test_other_runtime_flags_reach_the_pipeline(models, image_inputs, tmp_path, monkeypatch, capsys):
    from worldstereo_core.runtime.attention import attention_backend_of

    scenes, depths = image_inputs
    run = Run(monkeypatch)
    frames = run(models, scenes, depths, tmp_path / "out", "--vae-tiling", "--offload", "--text-encoder-dtype", "bf16",
                 "--attention", "sdpa-math")
    pipe = run.generator.pipeline
    assert run.runtime == RuntimeOptions(vae_tiling=True, offload=True, text_encoder_dtype="bf16", attention="sdpa-math")
    assert pipe.vae.use_tiling
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert attention_backend_of(pipe.transformer) == "sdpa-math"
    assert all(f.shape == (21, 32, 48, 3) for f in frames.values())
    # sharded weights need torchrun: a clear error, not a crash
    assert _run("camera-control", scenes[0], "--out", tmp_path / "o", "--models", models, "--size", SIZE,
                "--depth", depths[0], "--shard-weights") == 2
    assert "torchrun" in capsys.readouterr().err


def test_several_scenes_checks(models, image_inputs, tmp_path, capsys):
    scenes, depths = image_inputs
    assert _run("camera-control", *scenes, "--out", tmp_path / "o", "--models", models,
                "--depth", *depths, depths[0]) == 2
    assert "one depth file per scene" in capsys.readouterr().err
    twin = shutil.copytree(scenes[0], tmp_path / "other" / scenes[0].name)
    assert _run("camera-control", scenes[0], twin, "--out", tmp_path / "o", "--models", models) == 2
    assert "distinct name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scenes_under_a_torchrun_context(models, image_inputs, tmp_path, monkeypatch, capsys):
    """The scene split and the torchrun-only checks, with a 2-process context faked for this process."""
    from worldstereo_core.runtime import parallel

    scenes, depths = image_inputs
    monkeypatch.setattr(parallel, "current", lambda: parallel.DistContext(rank=1, world_size=2))
    assert _run("camera-control", scenes[0], "--out", tmp_path / "o", "--models", models, "--depth", depths[0]) == 0
    assert "[rank 1/2] group 2 of 2: no scenes" in capsys.readouterr().out  # more groups than scenes: nothing to do
    assert not (tmp_path / "o").exists()
    assert _run("camera-control", scenes[0], "--out", tmp_path / "o", "--models", models, "--download") == 2
    assert "not available under torchrun" in capsys.readouterr().err
    twice = [scenes[0], shutil.copytree(scenes[0], tmp_path / "second")]
    assert _run("camera-control", *twice, "--out", tmp_path / "o", "--models", models, "--device", "meta") == 2
    out, err = capsys.readouterr()
    assert "[rank 1/2] group 2 of 2: second" in out and "drop --device" in err


# --------------------------------------------------------------------------------------------
# Bad input, batches and locked folders (issue 10 items 3, 5, 6)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--nframe", "-5"], "--nframe: -5 is outside 2.."),
    (["--seed", "1e23"], "--seed: '1e23' is not a whole number"),
    (["--seed", str(2**64)], "--seed: 18446744073709551616 is outside 0..18446744073709551615"),
    (["--steps", "0"], "--steps: 0 is outside 1.."),
    (["--render-radius", "nan"], "--render-radius: nan must be a positive finite number"),
])
def test_bad_flags_are_named_errors(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_:
        _run("camera-control", tmp_path, "--out", tmp_path / "o", *flags)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_loading(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline_clip_generator", lambda *a, **k: pytest.fail("loaded weights"))
    (tmp_path / "out.txt").write_text("a file")
    assert _run("multi-traj", tmp_path, "--task", "reconstruction", "--out", tmp_path / "out.txt",
                "--models", models) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


@pytest.mark.parametrize("scene_dir", RECON_SCENES[:1], ids=lambda p: p.name)
def test_batch_checks_every_scene_first_and_runs_the_good_ones(scene_dir, models, tmp_path, capsys, monkeypatch):
    """Item 6: scenes were checked only after the weights loaded, and one bad scene stopped the
    batch; item 3 through the CLI: a scene whose output folder another run holds is refused."""
    from worldstereo_core.io.run_lock import LOCK_NAME
    from worldstereo_core.tasks import loop

    good = shutil.copytree(scene_dir, tmp_path / "in" / "good")
    typo = shutil.copytree(scene_dir, tmp_path / "in" / "typo")
    (typo / "renders" / "traj_up" / "camera.json").write_text('{"extrinsic": [[1, 0]], "intrinsic": []}')
    busy = shutil.copytree(scene_dir, tmp_path / "in" / "busy")
    missing = tmp_path / "in" / "missing"
    out = tmp_path / "out"
    (out / "busy").mkdir(parents=True)
    (out / "busy" / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00+00:00"}))
    order = []

    def stand_in(request, progress):  # the model is not what is tested here: grey frames of the right shape
        return np.full((request.num_frames, request.height, request.width, 3), 0.5, np.float32)

    real_validate = loop.validate_scene
    monkeypatch.setattr(loop, "validate_scene", lambda scene, *a: order.append(scene.name) or real_validate(scene, *a))
    monkeypatch.setattr(generate, "load_pipeline_clip_generator", lambda *a, **k: order.append("load") or (stand_in, None))
    code = _run("multi-traj", typo, good, missing, busy, "--task", "reconstruction", "--out", out,
                "--models", models, "--size", SIZE, "--steps", 2)
    err = capsys.readouterr().err
    assert code == 2
    assert order[:5] == ["typo", "good", "missing", "busy", "load"]  # every scene checked before any weights
    assert "error: scene" in err and "traj_up/camera.json" in err and "missing" in err
    assert f"pid {os.getppid()}" in err and "in use by another run" in err
    assert "3 of 4 scene(s) failed" in err
    for traj in ("traj_eloop", "traj_up", "traj_right", "traj_left"):
        assert read_video(out / "good" / "renders" / traj / "worldstereo-memory_result.mp4").shape == (21, 32, 48, 3)
    assert not (out / "typo").exists() and sorted(p.name for p in (out / "busy").iterdir()) == [LOCK_NAME]
