"""Multi-trajectory loops: reconstruction end to end on tiny models (global 3D cache, interrupt and
resume), release mode with the scene's pre-rendered warps, image-only scenes, panorama order and
the iterative start image. Scenes come from the examples root (every reconstruction scene found;
the interrupt/resume run uses the first)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import example_dirs
from synthetic_scene import room_for_scale
from tiny_models import write_models_root
from worldstereo_core.cameras import invert_rigid
from worldstereo_core.errors import CheckpointError, InputError, Interrupted
from worldstereo_core.geometry.trajectories import median_depth, reconstruction_trajectories
from worldstereo_core.io.camera_json import load_camera_json
from worldstereo_core.io.images import load_image, resize_bicubic, to_tensor_m11
from worldstereo_core.io.pointcloud_files import read_glb, read_ply
from worldstereo_core.io.video import read_mask_video, read_video, read_video_frames, write_video
from worldstereo_core.memory.bank import MemoryBank, sample_align_nframe
from worldstereo_core.memory.cache import CacheSettings, PointCache
from worldstereo_core.memory.selector import CameraSelector
from worldstereo_core.pipelines.schedulers import initial_noise, make_generator
from worldstereo_core.tasks.generate import load_pipeline_clip_generator
from worldstereo_core.tasks.loop import (PREPARE_TICKS, TRAJECTORY_TICKS, LoopOptions, progress_total,
                                         run_multi_trajectory)
from worldstereo_core.tasks.ordering import sort_trajs

SIZE = (32, 48)
MODEL = "worldstereo-memory"
#: Tiny images: wide splats and a low edge threshold (the reference's 0.35 flags any depth ramp
#: narrower than ~76 px as an edge, i.e. almost everything at 32x48).
CACHE = CacheSettings(render_radius=0.08, edge_threshold=0.01, min_correspondences=16)
RECON_SCENES = example_dirs("reconstruction")
PANO_SCENES = example_dirs("panorama")


def _scene_scale(scene: Path) -> float:
    """Scene scale for the synthetic room: the eloop radius implies m (spec §3.3)."""
    traj = load_camera_json(scene / "renders" / "traj_eloop" / "camera.json")
    centres = invert_rigid(traj.w2c)[:, :3, 3]
    return float((centres[:, 1].max() - centres[:, 1].min()) / 0.8)


def _copy_scene(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    root = write_models_root(tmp_path_factory.mktemp("models"), (MODEL,))
    generator, _ = load_pipeline_clip_generator(root, MODEL, num_inference_steps=2)
    return generator


class StopAt:
    """Progress callback raising Interrupted at a given tick; records every tick."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.ticks = at, []

    def __call__(self, done: int, total: int) -> None:
        self.ticks.append((done, total))
        if self.at is not None and done == self.at:
            raise Interrupted(f"stop at {done}/{total}")


def _nearest_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A (H, W) {0, 1} mask nearest-resized to ``size`` (source pixel floor(i * in / out))."""
    rows = np.floor(np.arange(size[0]) * mask.shape[0] / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * mask.shape[1] / size[1]).astype(int)
    return torch.from_numpy(mask[rows][:, cols])


def _fake_generator(req, progress):
    """A deterministic stand-in: the render with holes filled by a grey that depends on the noise."""
    for step in (1, 2):
        if progress:
            progress(step, 2)
    rgb = (req.render + 1) / 2
    fill = ((req.seed + req.noise_index) % 7) / 7.0
    return torch.where(req.render_mask > 0.5, torch.full_like(rgb, fill), rgb).permute(0, 2, 3, 1).numpy()


_fake_generator.steps = 2


# --------------------------------------------------------------------------------------------
# Reconstruction end to end (issue 5 "Done means")
# --------------------------------------------------------------------------------------------

def _state(out: Path) -> dict:
    return json.loads((out / f"{MODEL}_state" / "state.json").read_text())


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_reconstruction_global_cache_interrupt_and_resume(tmp_path, tiny_generator):
    src = RECON_SCENES[0]
    scene = _copy_scene(src, tmp_path / "in" / src.name)
    room = room_for_scale(_scene_scale(scene))
    opts = LoopOptions(task="reconstruction", model_name=MODEL, cache_mode="global", scale_map=(SIZE,), cache=CACHE)

    ticks = StopAt()
    full = run_multi_trajectory(scene, tmp_path / "a", tiny_generator, options=opts, depth_fn=room.depth_fn(),
                                progress=ticks)
    steps = tiny_generator.steps
    total = progress_total(4, steps)
    assert ticks.ticks[0] == (0, total) and ticks.ticks[-1] == (total, total)
    assert all(t == total for _, t in ticks.ticks)
    assert [d for d, _ in ticks.ticks] == sorted(d for d, _ in ticks.ticks)

    # four trajectories in the release order, each generated from a cache render
    order = [t.traj_id for t in full.trajectories]
    assert order == ["traj_eloop", "traj_up", "traj_right", "traj_left"]
    assert all(t.status == "generated" and t.render_source == "global cache" for t in full.trajectories)
    # memory grows as specified: 1 input frame, then align_nframe frames per trajectory
    keep = sample_align_nframe(21, 8)
    assert [t.bank_size for t in full.trajectories] == [1 + 8 * (i + 1) for i in range(4)]
    assert all(t.kept == keep for t in full.trajectories)
    assert full.bank.fnames[0] == "renders/pano_bank/image.png"
    assert full.bank.fnames[1:] == [f"renders/{t}/{k:04d}" for t in order for k in keep]

    # the cache grows, and its render of the last trajectory has fewer holes than the start cloud's
    points = [t.cache_points for t in full.trajectories]
    image = resize_bicubic(load_image(scene / "image.png"), SIZE)
    eloop = load_camera_json(scene / "renders" / "traj_eloop" / "camera.json")
    start = PointCache.from_depth(image, room.depth_fn()(image, eloop.resized(*SIZE).K[0], eloop.w2c[0]),
                                  eloop.resized(*SIZE).K[0], eloop.w2c[0], settings=CACHE)
    assert points[-1] > points[0] > len(start) and points == sorted(points)
    left = load_camera_json(scene / "renders" / "traj_left" / "camera.json").resized(*SIZE)
    _, start_holes = start.render(left, to_tensor_m11(image), *SIZE)
    cache_holes = read_mask_video(full.scene_out / "renders" / "traj_left" / "render_mask.mp4")
    assert cache_holes[1:].mean() < start_holes[1:].mean() - 0.05
    for t in full.trajectories:  # every trajectory was re-rendered from the cache at the working size
        assert read_video(full.scene_out / t.view_id / t.traj_id / "render.mp4").shape == (21, *SIZE, 3)

    # results: playable 16 fps 21-frame MP4s; memory inputs saved next to them
    for t in full.trajectories:
        assert read_video(t.result).shape == (21, *SIZE, 3)
        inputs = t.result.parent / "memory_inputs"
        ref = json.loads((inputs / f"{MODEL}_ref_index.json").read_text())
        w2cs = json.loads((inputs / f"{MODEL}_ref_w2cs.json").read_text())
        # the release's layout: {"<k>": {"<target i>": {"score", "angle_diff"}}}, one key per reference
        assert len(ref) == len(w2cs) <= 8 and sum(len(v) for v in ref.values()) == 20
        assert sorted(int(i) for v in ref.values() for i in v) == list(range(1, 21))
        assert all(set(e) == {"score", "angle_diff"} for v in ref.values() for e in v.values())
        assert read_video(inputs / f"{MODEL}.mp4").shape == (20, *SIZE, 3)

    # exports: WorldMirror folder, PLY and GLB, read back
    wm = json.loads((full.worldmirror / "cameras.json").read_text())
    assert wm["num_cameras"] == len(full.bank) == len(list((full.worldmirror / "images").glob("*.png")))
    for i, e in enumerate(wm["extrinsics"]):
        assert np.allclose(np.asarray(e["matrix"]) @ full.bank.w2c[i].numpy(), np.eye(4), atol=1e-6)
    ply = read_ply(full.cloud_ply)
    assert torch.equal(ply.xyz, full.cache.cloud.xyz)
    assert (ply.rgb - full.cache.cloud.rgb).abs().max() <= 0.5 / 255 + 1e-6
    glb = read_glb(full.cloud_glb, world_up="-y")
    assert torch.allclose(glb.xyz, full.cache.cloud.xyz, atol=1e-4 * room.hi.abs().max().item())

    # interrupt in the middle of trajectory 3 (after its conditioning and retrieval), then resume
    stop = StopAt(at=PREPARE_TICKS + 2 * (steps + TRAJECTORY_TICKS) + 2)
    with pytest.raises(Interrupted):
        run_multi_trajectory(scene, tmp_path / "b", tiny_generator, options=opts, depth_fn=room.depth_fn(),
                             progress=stop)
    out_b = tmp_path / "b" / scene.name
    assert _state(out_b)["done"] == [["renders", "traj_eloop"], ["renders", "traj_up"]]
    assert not (out_b / "renders" / "traj_right" / f"{MODEL}_result.mp4").exists()
    resumed = run_multi_trajectory(scene, tmp_path / "b", tiny_generator, options=opts, depth_fn=room.depth_fn())
    assert [t.status for t in resumed.trajectories] == ["skipped", "skipped", "generated", "generated"]

    for a, b in zip(full.trajectories, resumed.trajectories):
        assert np.array_equal(read_video(a.result), read_video(b.result)), a.traj_id
    assert resumed.bank == full.bank
    assert MemoryBank.load(out_b / f"{MODEL}_state" / "step-0004" / "memory_bank") == full.bank
    assert resumed.cache == full.cache
    assert torch.equal(read_ply(resumed.cloud_ply).xyz, ply.xyz)
    for name in ("cameras.json", "name_map.json"):
        assert (resumed.worldmirror / name).read_text() == (full.worldmirror / name).read_text()

    # a rerun of a finished scene changes nothing
    again = run_multi_trajectory(scene, tmp_path / "b", tiny_generator, options=opts, depth_fn=room.depth_fn())
    assert all(t.status == "skipped" for t in again.trajectories) and again.bank == full.bank


@pytest.mark.parametrize("scene_dir", RECON_SCENES, ids=lambda p: p.name)
def test_reconstruction_release_mode_uses_scene_renders(scene_dir, tmp_path):
    scene = _copy_scene(scene_dir, tmp_path / "in" / scene_dir.name)
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,))
    seen = []

    def gen(req, progress):
        seen.append(req)
        return _fake_generator(req, progress)

    res = run_multi_trajectory(scene, tmp_path / "out", gen, options=opts)  # no depth needed
    assert res.cache is None and res.cloud_ply is None
    assert all(t.render_source == "scene renders" for t in res.trajectories)
    for req, t in zip(seen, res.trajectories):
        ref = json.loads((t.result.parent / "memory_inputs" / f"{MODEL}_ref_index.json").read_text())
        assert [int(k) for k in ref] == req.ref_index.tolist()  # the release's ref_index.json layout
        traj = load_camera_json(scene / "renders" / t.traj_id / "camera.json")
        assert torch.allclose(req.trajectory.w2c, traj.w2c)
        assert req.ref_index.max() <= 19
        assert req.references.shape[1:] == (*SIZE, 3) and len(req.references) == len(req.ref_index) <= 8
        assert (req.seed, req.noise_index) == (opts.seed, res.trajectories.index(t))  # one generator, as released
        mask = read_mask_video(scene / "renders" / t.traj_id / "render_mask.mp4")
        assert mask[1:].mean() > 0 and req.render_mask[1:].mean() > 0  # holes survive the resize
        assert torch.equal(req.render_mask[0, 0], _nearest_mask(mask[0], SIZE))  # frame 0 as in the file
    # results read back into memory exactly: bank frames are the kept result frames
    last = res.trajectories[-1]
    frames = read_video(last.result)
    assert all(np.array_equal(res.bank.frames[-8 + j], frames[k]) for j, k in enumerate(last.kept))


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_image_only_scene_builds_trajectories_and_renders_start_cloud(tmp_path):
    src = RECON_SCENES[0]
    scene = tmp_path / "in" / src.name
    scene.mkdir(parents=True)
    for name in ("image.png", "prompt.json"):
        shutil.copy(src / name, scene / name)
    m = _scene_scale(src)
    room = room_for_scale(m)
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), cache=CACHE)
    with pytest.raises(InputError, match="depth"):
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts)
    res = run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts, depth_fn=room.depth_fn())
    assert [t.render_source for t in res.trajectories] == ["start-view cloud"] * 4
    h0, w0 = load_image(scene / "image.png").shape[:2]
    from worldstereo_core.cameras import intrinsics_from_fov, scale_intrinsics

    K0 = intrinsics_from_fov(w0, h0, opts.fov_deg)
    depth = room.depth(scale_intrinsics(K0, (h0, w0), SIZE), torch.eye(4), *SIZE)
    expected = reconstruction_trajectories(torch.eye(4), K0, w0, h0, median_depth(depth))
    for t in res.trajectories:
        saved = load_camera_json(res.scene_out / t.view_id / t.traj_id / "camera.json")
        assert torch.allclose(saved.w2c, expected[t.traj_id].w2c, atol=1e-9)
        assert torch.allclose(saved.K, expected[t.traj_id].resized(*SIZE).K, atol=1e-9)
    assert res.cache is not None and res.cloud_glb.is_file()  # the start-view cloud is exported


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_resume_checks(tmp_path):
    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,))
    with pytest.raises(Interrupted):
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts,
                             progress=StopAt(at=PREPARE_TICKS + _fake_generator.steps + TRAJECTORY_TICKS + 1))
    other = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), align_nframe=4)
    with pytest.raises(InputError, match="align_nframe"):
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=other)
    out = tmp_path / "out" / scene.name
    result = out / "renders" / "traj_eloop" / f"{MODEL}_result.mp4"
    shutil.move(result, tmp_path / "kept.mp4")
    with pytest.raises(InputError, match="missing"):
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts)
    shutil.move(tmp_path / "kept.mp4", result)
    # without a state, existing results are read back into memory instead of regenerated (release behaviour)
    shutil.rmtree(out / f"{MODEL}_state")
    calls = []
    res = run_multi_trajectory(scene, tmp_path / "out", lambda r, p: calls.append(r.name) or _fake_generator(r, p),
                               options=opts)
    assert [t.status for t in res.trajectories] == ["read back", "generated", "generated", "generated"]
    assert calls == ["renders/traj_up", "renders/traj_right", "renders/traj_left"]
    assert len(res.bank) == 33 and res.bank.fnames[1] == "renders/traj_eloop/0003"
    with pytest.raises(InputError, match="360-degree cloud"):  # only panorama scenes made from an image have one
        run_multi_trajectory(scene, tmp_path / "x", _fake_generator,
                             options=LoopOptions(task="panorama", cache_mode="global"))


def _noise_of(req, shape=(1, 4, 3, 2)) -> torch.Tensor:
    """The initial noise a pipeline draws for ``req`` (CPU generator, a small stand-in shape)."""
    return initial_noise(shape, make_generator(req.seed), "cpu", skip=req.noise_index)


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_noise_is_drawn_as_the_release_draws_it_also_after_a_resume(tmp_path):
    """The release seeds one generator before its loop and every generated trajectory draws from it
    in turn; a resumed run draws the same noise for the remaining trajectories."""
    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), seed=11)
    release = torch.Generator().manual_seed(11)
    expected = [torch.randn((1, 4, 3, 2), generator=release) for _ in range(4)]
    drawn = {}

    def gen(req, progress):
        drawn[req.name] = _noise_of(req)
        return _fake_generator(req, progress)

    with pytest.raises(Interrupted):
        run_multi_trajectory(scene, tmp_path / "out", gen, options=opts,
                             progress=StopAt(at=PREPARE_TICKS + _fake_generator.steps + TRAJECTORY_TICKS + 1))
    res = run_multi_trajectory(scene, tmp_path / "out", gen, options=opts)
    statuses = [t.status for t in res.trajectories]
    assert statuses[0] == "skipped" and statuses[-1] == "generated"
    for k, t in enumerate(res.trajectories):
        assert torch.equal(drawn[f"{t.view_id}/{t.traj_id}"], expected[k])
    # the other scheme: seed + trajectory index, each from a fresh generator
    seeds = []
    other = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), seed=11, noise="per-trajectory")
    run_multi_trajectory(scene, tmp_path / "other", lambda r, p: seeds.append((r.seed, r.noise_index))
                         or _fake_generator(r, p), options=other)
    assert seeds == [(11 + k, 0) for k in range(4)]
    with pytest.raises(InputError, match="noise"):  # a resume may not switch schemes
        run_multi_trajectory(scene, tmp_path / "out", gen, options=other)
    with pytest.raises(InputError, match="noise"):
        LoopOptions(noise="fresh").check()


# --------------------------------------------------------------------------------------------
# Panorama
# --------------------------------------------------------------------------------------------

def _panorama_scene(src: Path, dst: Path) -> Path:
    """The example scene with every bank image present and an extra iterative reconstruct group."""
    scene = _copy_scene(src, dst)
    images = scene / "pano_bank" / "images"
    keys = sorted(json.loads((scene / "pano_bank" / "cameras.json").read_text()))
    present = sorted(images.glob("*.png"))
    for i, key in enumerate(keys):
        if not (images / f"{key}.png").exists():
            shutil.copy(present[i % len(present)], images / f"{key}.png")
    view = next(p for p in sorted(scene.iterdir()) if p.name.startswith("view"))
    group = scene / "reconstruct-extra"
    group.mkdir()
    shutil.copy(view / "start_frame.png", group / "start_frame.png")
    trajs = sorted(p for p in view.iterdir() if p.name.startswith("traj"))
    for k, traj in enumerate(trajs[:2]):
        shutil.copytree(traj, group / f"traj{k}")
        masks = read_video(group / f"traj{k}" / "render_mask.mp4")
        masks[0, :, : masks.shape[2] // 3] = 255  # holes in the start view's mask
        write_video(group / f"traj{k}" / "render_mask.mp4", masks)
    return scene


@pytest.mark.parametrize("scene_dir", PANO_SCENES, ids=lambda p: p.name)
def test_panorama_order_bank_and_iterative_start(scene_dir, tmp_path):
    scene = _panorama_scene(scene_dir, tmp_path / "in" / scene_dir.name)
    opts = LoopOptions(task="panorama", model_name=MODEL, scale_map=(SIZE,))
    seen = {}

    def gen(req, progress):
        seen[req.name] = req
        return _fake_generator(req, progress)

    res = run_multi_trajectory(scene, tmp_path / "out", gen, options=opts)
    expected = [(j.view_id, j.traj_id) for j in sort_trajs(scene)]
    assert [(t.view_id, t.traj_id) for t in res.trajectories] == expected
    assert ("reconstruct_extra", "traj1") == expected[-1]  # hyphen renamed, iterative trajectory last
    assert (res.scene_out / "reconstruct_extra" / "traj1" / f"{MODEL}_result.mp4").is_file()
    n_bank = len(json.loads((scene / "pano_bank" / "cameras.json").read_text()))
    assert len(res.bank) == n_bank + 8 * len(expected)
    assert res.bank.fnames[:n_bank] == [f"{scene.name}/pano_bank/{i:04d}" for i in range(n_bank)]
    # the iterative trajectory starts from the last generated frame of its traj0, mask frame 0 covered
    last = read_video_frames(res.scene_out / "reconstruct_extra" / "traj0" / f"{MODEL}_result.mp4", [-1])[0]
    req = seen["reconstruct_extra/traj1"]
    assert np.array_equal(req.image, resize_bicubic(last, SIZE))
    assert req.render_mask[0].sum() == 0  # the release clears it for iterative trajectories only
    assert torch.allclose(req.render[0], to_tensor_m11(req.image))
    first = read_mask_video(scene / "reconstruct-extra" / "traj0" / "render_mask.mp4")[0]
    assert first.mean() > 0.3 and torch.equal(seen["reconstruct_extra/traj0"].render_mask[0, 0],
                                              _nearest_mask(first, SIZE))
    # WorldMirror export names bank views pano-<key>; bank views and generated frames at one size
    names = sorted(p.stem for p in (res.worldmirror / "images").glob("*.png"))
    assert f"pano-{0:04d}" in names and "reconstruct_extra-traj1-0020" in names
    assert res.bank.frames[0].shape[:2] != SIZE  # the bank's own views are at another size than the clips
    _assert_one_size_with_pixel_K(res.worldmirror, res.bank)


# --------------------------------------------------------------------------------------------
# Trust (issue 10): resume keys, results checked on resume, the run-folder lock, temporaries,
# the WorldMirror export, interruption between units of work
# --------------------------------------------------------------------------------------------

def _release_run(scene: Path, out: Path, generator=_fake_generator, selector=None, **options):
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), **options)
    return run_multi_trajectory(scene, out, generator, options=opts, selector=selector)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_changed_inputs_settings_or_models_are_refused_by_name(tmp_path):
    """Item 2: a rerun into the same folder with another image, prompt, camera file, seed or model
    returned the old results as "skipped"; now it is refused, naming what changed, and the folder
    is left as it was."""
    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    out = tmp_path / "out"
    _release_run(scene, out)
    before = _tree(out)

    def refused(match: str, generator=_fake_generator, **options) -> None:
        with pytest.raises(InputError, match=match) as err:
            _release_run(scene, out, generator, **options)
        assert "another output folder" in str(err.value) and str(out / scene.name) in str(err.value)
        assert _tree(out) == before

    original = (scene / "image.png").read_bytes()
    image = np.asarray(Image.open(scene / "image.png").convert("RGB")).copy()
    image[:8] = 255 - image[:8]
    Image.fromarray(image).save(scene / "image.png")
    refused(r"inputs \(image\.png\)")
    (scene / "image.png").write_bytes(original)

    prompt = json.loads((scene / "prompt.json").read_text())
    (scene / "prompt.json").write_text(json.dumps({**prompt, "prompt": prompt["prompt"] + " At night."}))
    refused(r"inputs \(prompt\)")
    (scene / "prompt.json").write_text(json.dumps(prompt))

    camera = scene / "renders" / "traj_up" / "camera.json"
    cams = json.loads(camera.read_text())
    cams["intrinsic"][5][0][0] *= 1.01
    original_camera = camera.read_text()
    camera.write_text(json.dumps(cams))
    refused("renders/traj_up/camera.json")
    camera.write_text(original_camera)

    refused(r"settings \(seed\)", seed=7)

    def other_model(req, progress):
        return _fake_generator(req, progress)

    other_model.steps = _fake_generator.steps
    other_model.resume_key = lambda: {"weights": "other"}
    refused(r"models \(generator\)", other_model)

    # the same inputs again: everything is skipped, nothing rewritten
    again = _release_run(scene, out)
    assert all(t.status == "skipped" for t in again.trajectories)


class _Features:
    """Image features of a stand-in DINOv2 with a weights identity."""

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def __call__(self, frames):
        return np.ones((len(frames), 4), np.float32)

    def resume_key(self) -> dict:
        return {"dinov2": self.weights}


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_changed_selector_weights_are_refused_by_name(tmp_path):
    """The memory selector's image features decide which references are retrieved: other DINOv2
    weights (or none) are a changed model, not a resumable run; the default selector and no
    selector are the same run."""
    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    out = tmp_path / "out"
    _release_run(scene, out, selector=CameraSelector(feature_fn=_Features("a")))
    for other in (CameraSelector(feature_fn=_Features("b")), None, CameraSelector(camera_weight=0.5)):
        with pytest.raises(InputError, match=r"models \(selector\)"):
            _release_run(scene, out, selector=other)
    again = _release_run(scene, out, selector=CameraSelector(feature_fn=_Features("a")))
    assert all(t.status == "skipped" for t in again.trajectories)
    plain = tmp_path / "plain"
    _release_run(scene, plain)
    assert all(t.status == "skipped" for t in _release_run(scene, plain, selector=CameraSelector()).trajectories)


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_truncated_result_is_found_on_resume(tmp_path):
    """Item 2: a truncated result of a finished trajectory was silently "skipped"."""
    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    out = tmp_path / "out"
    full = _release_run(scene, out)
    result = full.trajectories[1].result
    data = result.read_bytes()
    result.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as err:
        _release_run(scene, out)
    assert str(result) in str(err.value) and f"{MODEL}_state" in str(err.value)
    # the fix the message gives: delete the result and the state; the others are read back
    result.unlink()
    shutil.rmtree(out / scene.name / f"{MODEL}_state")
    again = _release_run(scene, out)
    assert [t.status for t in again.trajectories] == ["read back", "generated", "read back", "read back"]
    assert read_video(result).shape == (21, *SIZE, 3) and again.bank == full.bank


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_image_scene_never_overwrites_the_inputs_of_a_run(tmp_path):
    """Item 2: re-queueing the loop node with a new image and prompt overwrote the saved inputs and
    returned the old results."""
    from worldstereo_core.tasks.loop import run_image_scene

    src = RECON_SCENES[0]
    room = room_for_scale(_scene_scale(src))
    image = load_image(src / "image.png")
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), cache=CACHE)
    out = tmp_path / "out"
    first = run_image_scene(image, "a room", out, _fake_generator, options=opts, depth_fn=room.depth_fn())
    assert [t.status for t in first.trajectories] == ["generated"] * 4
    inputs = out / "inputs" / "scene"
    saved = _tree(inputs)
    with pytest.raises(InputError, match="another image and prompt"):
        run_image_scene(255 - image, "a garden", out, _fake_generator, options=opts, depth_fn=room.depth_fn())
    with pytest.raises(InputError, match="another prompt"):
        run_image_scene(image, "a garden", out, _fake_generator, options=opts, depth_fn=room.depth_fn())
    assert _tree(inputs) == saved
    again = run_image_scene(image, "a room", out, _fake_generator, options=opts, depth_fn=room.depth_fn())
    assert all(t.status == "skipped" for t in again.trajectories)
    other = run_image_scene(255 - image, "a garden", tmp_path / "new", _fake_generator, options=opts,
                            depth_fn=room.depth_fn())
    assert [t.status for t in other.trajectories] == ["generated"] * 4


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
@pytest.mark.parametrize("damage", ["bank frame", "cache"])
def test_damaged_run_state_is_a_named_error_with_the_fix(tmp_path, damage):
    """Item 5: a garbage bank PNG or a truncated cache.npz in a resume state gave raw tracebacks."""
    src = RECON_SCENES[0]
    scene = tmp_path / "in" / src.name
    scene.mkdir(parents=True)
    for name in ("image.png", "prompt.json"):  # image only: the start-view cloud is part of the state
        shutil.copy(src / name, scene / name)
    room = room_for_scale(_scene_scale(src))
    opts = LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,), cache=CACHE, nframe=5,
                       align_nframe=2)
    with pytest.raises(Interrupted):
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts, depth_fn=room.depth_fn(),
                             progress=StopAt(at=PREPARE_TICKS + _fake_generator.steps + TRAJECTORY_TICKS + 1))
    state = tmp_path / "out" / scene.name / f"{MODEL}_state"
    step = state / json.loads((state / "state.json").read_text())["folder"]
    if damage == "cache":
        data = (step / "cache.npz").read_bytes()
        (step / "cache.npz").write_bytes(data[: len(data) // 3])
    else:
        next((step / "memory_bank" / "frames").glob("*.png")).write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(CheckpointError) as err:
        run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts, depth_fn=room.depth_fn())
    message = str(err.value)
    assert str(state) in message and "damaged" in message and "read back" in message
    shutil.rmtree(state)  # the fix the message gives
    res = run_multi_trajectory(scene, tmp_path / "out", _fake_generator, options=opts, depth_fn=room.depth_fn())
    assert [t.status for t in res.trajectories] == ["read back", "generated", "generated", "generated"]


_HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from worldstereo_core.io.run_lock import acquire
acquire({folder!r})
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_a_second_run_is_refused_at_once_and_a_dead_holder_recovered(tmp_path):
    """Item 3: two runs in one folder mixed their outputs; now the second is refused at once,
    naming the holder, and touches nothing; once the holder is killed the next run proceeds."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from worldstereo_core.errors import RunFolderLocked

    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    out = tmp_path / "out"
    run_folder = out / scene.name
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(repo=str(REPO), folder=str(run_folder))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls = []
        start = time.monotonic()
        with pytest.raises(RunFolderLocked) as err:
            _release_run(scene, out, lambda r, p: calls.append(r) or _fake_generator(r, p))
        assert time.monotonic() - start < 30  # at once: no waiting for the holder
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "host" in message and "started" in message
        assert calls == [] and sorted(p.name for p in run_folder.iterdir()) == [".worldstereo.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = _release_run(scene, out)  # the dead holder's lock is recovered
    assert [t.status for t in res.trajectories] == ["generated"] * 4
    assert not (run_folder / ".worldstereo.lock").exists()  # released at the end


_KILLED_WRITE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from worldstereo_core.io.atomic import atomic_path
with atomic_path({path!r}) as tmp:
    tmp.write_bytes(b"half a video")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_temporaries_of_killed_writes_are_removed_at_the_next_start(tmp_path):
    """Item 7: SIGKILL during a write leaves a hidden .tmp file that no rerun removed."""
    import subprocess
    import sys

    from conftest import REPO

    scene = _copy_scene(RECON_SCENES[0], tmp_path / "in" / RECON_SCENES[0].name)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run_multi_trajectory(scene, out, _fake_generator, progress=StopAt(at=PREPARE_TICKS + 1),
                             options=LoopOptions(task="reconstruction", model_name=MODEL, scale_map=(SIZE,)))
    run_folder = out / scene.name
    targets = [run_folder / "renders" / "traj_eloop" / f"{MODEL}_result.mp4",
               run_folder / f"{MODEL}_state" / "step-0000" / "memory_bank" / "frames" / "000009-x.png"]
    for target in targets:
        proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE.format(repo=str(REPO), path=str(target))])
        assert proc.returncode == -9
    leftovers = [p for p in run_folder.rglob("*") if p.name.endswith(".tmp")]
    assert len(leftovers) == 2 and not any(t.exists() for t in targets)
    (run_folder / "notes.tmp").write_text("a user's file")  # not a name atomic writes use: kept
    _release_run(scene, out)
    assert [p.name for p in run_folder.rglob("*") if p.name.endswith(".tmp")] == ["notes.tmp"]


def _pitched_scene(src: Path, dst: Path, degrees: float = 17.0) -> Path:
    """The scene with its whole world turned about x, so that every camera (frame 0 included) is
    pitched; relative poses, and so the pre-rendered warps, are unchanged."""
    scene = _copy_scene(src, dst)
    a = np.radians(degrees)
    T = np.array([[1, 0, 0, 0], [0, np.cos(a), -np.sin(a), 0.3], [0, np.sin(a), np.cos(a), -0.2], [0, 0, 0, 1]])
    for camera in (scene / "renders").glob("traj_*/camera.json"):
        data = json.loads(camera.read_text())
        data["extrinsic"] = [(np.asarray(m) @ np.linalg.inv(T)).tolist() for m in data["extrinsic"]]
        camera.write_text(json.dumps(data))
    return scene


@pytest.mark.parametrize("scene_dir", RECON_SCENES, ids=lambda p: p.name)
def test_reconstruction_export_places_the_start_image_at_its_true_pose(scene_dir, tmp_path):
    """Item 9(c) and (a): the start image was exported at the identity while the scene's frame 0 is
    pitched; every exported image has one size and K in its pixels."""
    scene = _pitched_scene(scene_dir, tmp_path / "in" / scene_dir.name)
    res = _release_run(scene, tmp_path / "out")
    eloop = load_camera_json(scene / "renders" / "traj_eloop" / "camera.json")
    assert not torch.allclose(eloop.w2c[0], torch.eye(4, dtype=torch.float64), atol=1e-3)
    cams = json.loads((res.worldmirror / "cameras.json").read_text())
    c2w = {e["camera_id"]: np.asarray(e["matrix"]) for e in cams["extrinsics"]}
    np.testing.assert_allclose(c2w["pano-image.png"] @ eloop.w2c[0].numpy(), np.eye(4), atol=1e-6)
    for i, name in enumerate(res.bank.fnames[1:], 1):  # the generated frames keep the bank's poses
        np.testing.assert_allclose(c2w[name.replace("/", "-")] @ res.bank.w2c[i].numpy(), np.eye(4), atol=1e-6)
    _assert_one_size_with_pixel_K(res.worldmirror, res.bank)


def _assert_one_size_with_pixel_K(folder: Path, bank: MemoryBank) -> None:
    cams = json.loads((folder / "cameras.json").read_text())
    for e, K_bank in zip(cams["intrinsics"], bank.K.numpy()):
        w, h = Image.open(folder / "images" / f"{e['camera_id']}.png").size
        assert (h, w) == SIZE, e["camera_id"]
        np.testing.assert_allclose(e["matrix"][0], K_bank[0] * w / bank.width, rtol=1e-12)
        np.testing.assert_allclose(e["matrix"][1], K_bank[1] * h / bank.height, rtol=1e-12)


@pytest.mark.skipif(not RECON_SCENES, reason="no examples/reconstruction scenes (set WORLDSTEREO_EXAMPLES)")
def test_cancel_acts_within_one_unit_of_work(tmp_path, monkeypatch):
    """Item 10: preparation (start depth, renders, retrieval), the cache update between
    trajectories and the export ran without a progress call, so Cancel waited for all of it. Now
    the callback runs before any work and after every unit (a depth map, a generator step, a
    written result), so a cancel request stops the run after at most one more unit."""
    from worldstereo_core.tasks import loop as loop_module

    src = RECON_SCENES[0]
    scene = tmp_path / "in" / src.name
    scene.mkdir(parents=True)
    for name in ("image.png", "prompt.json"):  # image only: trajectories from the start depth, cache renders
        shutil.copy(src / name, scene / name)
    room = room_for_scale(_scene_scale(src))
    exact = room.depth_fn()
    opts = LoopOptions(task="reconstruction", model_name=MODEL, cache_mode="global", scale_map=(SIZE,), cache=CACHE,
                       nframe=5, align_nframe=2)  # short clips: the order of calls is what is checked
    events: list[str] = []

    def depth(image, K, w2c):
        events.append("depth")
        return exact(image, K, w2c)

    def generator(req, progress):
        for step in (1, 2):
            events.append("step")
            progress(step, 2)
        return _fake_generator(req, None)

    generator.steps = 2
    real_write = loop_module.write_video
    monkeypatch.setattr(loop_module, "write_video",
                        lambda path, *a, **k: events.append("write") or real_write(path, *a, **k))

    class Cancel:
        """Records calls; once ``at`` calls were made it is "pressed" and the next call raises."""

        def __init__(self, at=None):
            self.at, self.calls, self.work_after_press = at, 0, None

        def __call__(self, done, total):
            events.append("tick")
            self.calls += 1
            if self.at is not None and self.calls > self.at:
                self.work_after_press = sum(e != "tick" for e in events[self.press:])
                raise Interrupted("cancel")
            if self.calls == self.at:
                self.press = len(events)

    run_multi_trajectory(scene, tmp_path / "all", generator, options=opts, depth_fn=depth, progress=Cancel())
    assert events[0] == "tick"  # before the start depth
    runs, work = [], 0
    for e in events:
        if e == "tick":
            runs.append(work)
            work = 0
        else:
            work += 1
    assert max(runs) <= 1 and work == 0, events  # at most one unit between two calls; none after the last
    assert events.count("depth") == 1 + 4 * 2 and events.count("step") == 8

    n_calls = events.count("tick")
    for at in (1, n_calls // 2, n_calls - 2):  # press Cancel at several points
        events.clear()
        cancel = Cancel(at)
        with pytest.raises(Interrupted):
            run_multi_trajectory(scene, tmp_path / f"cancel{at}", generator, options=opts, depth_fn=depth,
                                 progress=cancel)
        assert cancel.work_after_press <= 1


def test_pipeline_checks_for_cancel_before_its_first_step(tiny_generator):
    """Item 10: the text, CLIP and VAE encodings ran before the first progress call."""
    calls: list[int] = []
    with pytest.raises(Interrupted):
        tiny_generator.pipeline(np.zeros((*SIZE, 3), np.uint8), render_video=torch.zeros(1, 3, 3, *SIZE),
                                render_mask=torch.zeros(1, 1, 3, *SIZE), camera_embedding=torch.zeros(1, 6, 3, *SIZE),
                                reference_video=torch.zeros(1, 3, 1, *SIZE), ref_index=torch.tensor([0]),
                                camera_qt=torch.zeros(1, 3, 7), camera_qt_ref=torch.zeros(1, 1, 7), prompt="x",
                                num_inference_steps=2, progress=StopAt(at=0),
                                model_call_hook=lambda call: calls.append(1))
    assert calls == []  # stopped before the transformer ran
