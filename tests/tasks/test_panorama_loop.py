"""The panorama task from one equirectangular image (issue 13 item 4): the loop renders from the
scene's 360-degree cloud, grows it with the generated frames in global mode and renders the
next trajectories from the grown cache, retrieves over the bank and the generated frames, and
exports one image size; scene folders under the run lock and the resume key; the library call
and the CLI form on tiny checkpoints.

Scene: the synthetic room (:func:`synthetic_scene.panorama_room`), 128 x 256, bank crops 104 x 60
(the release's cameras at 1/8 size), working size 32 x 48, 9-frame clips. Its depth is given
(exact) except in a cone around bank view 0000, where view0 starts: the cloud has a hole there,
which the first trajectory's frames fill. The stand-in generator returns the render with holes
painted magenta, so points lifted from generated frames are told by their colour."""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_scene import panorama_room
from tiny_models import write_models_root
from worldstereo_core import cli
from worldstereo_core.cameras import invert_rigid, scale_intrinsics
from worldstereo_core.errors import InputError, Interrupted, RunFolderLocked
from worldstereo_core.geometry.equirect import equirect_directions
from worldstereo_core.geometry.trajectories import panorama_bank_cameras
from worldstereo_core.geometry.wander import WanderOptions
from worldstereo_core.io.camera_json import load_camera_json
from worldstereo_core.io.run_lock import LOCK_NAME, locked_run_folder
from worldstereo_core.io.video import read_video
from worldstereo_core.memory.bank import sample_align_nframe
from worldstereo_core.memory.cache import CacheSettings
from worldstereo_core.tasks.generate import load_pipeline_clip_generator
from worldstereo_core.tasks.loop import LoopOptions, run_multi_trajectory, run_panorama_image
from worldstereo_core.io.scene_layout import PANORAMA_CLOUD, PANORAMA_MANIFEST, PANORAMA_SCENES
from worldstereo_core.tasks.panorama_scene import PanoramaSceneOptions, make_panorama_scene

SIZE = (32, 48)
MODEL = "worldstereo-memory"
NFRAME, ALIGN = 9, 4
MAGENTA = np.array([255, 0, 255], np.uint8)
#: The bank and trajectories at 1/8 of the release's size, one view group (traj2, traj0, traj1).
SCENE = PanoramaSceneOptions(bank_width=104, bank_height=60, view_size=48, edge_threshold=0.05, renders=False,
                             wander=WanderOptions(views=1, explorations=0, reconstructs=0))
#: Tiny frames: wide splats, a low edge threshold, fewer correspondences needed.
CACHE = CacheSettings(render_radius=0.06, edge_threshold=0.05, min_correspondences=16)
LOOP = LoopOptions(task="panorama", model_name=MODEL, scale_map=(SIZE,), nframe=NFRAME, align_nframe=ALIGN,
                   cache=CACHE)
#: Half-angle (degrees) of the cone around bank view 0000 without depth.
HOLE_DEG = 25.0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _magenta_generator(req, progress):
    """The render with its holes painted magenta (frames at the working size, uint8)."""
    rgb = ((req.render + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rgb[req.render_mask[:, 0].numpy() > 0.5] = MAGENTA
    return rgb


def _view0_forward() -> torch.Tensor:
    """Viewing direction of bank view 0000, where view0 starts."""
    _, bank = panorama_bank_cameras(104, 60)
    return invert_rigid(bank.w2c[0])[:3, 2]


@pytest.fixture(scope="module")
def room():
    room = panorama_room()
    pano, distance = room.equirect(128, 256)
    hole = equirect_directions(128, 256) @ _view0_forward() > math.cos(math.radians(HOLE_DEG))
    return room, pano, torch.where(hole, torch.zeros_like(distance), distance)


def _run(room, out, mode: str):
    """A run of the room through the library call; the generator's requests by trajectory name."""
    r, pano, depth = room
    seen = {}

    def generator(req, progress):
        seen[req.name] = req
        return _magenta_generator(req, progress)

    res = run_panorama_image(pano, out, generator, name="room", prompt="An empty room.", depth=depth,
                             depth_fn=r.depth_fn(), scene_options=SCENE, options=replace(LOOP, cache_mode=mode))
    return res, seen


@pytest.fixture(scope="module")
def runs(room, tmp_path_factory):
    """The same scene in global mode and in release mode (its trajectories rendered from the cloud)."""
    return {mode: _run(room, tmp_path_factory.mktemp(mode), mode) for mode in ("global", "release")}


def _is_magenta(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) colours in [-1, 1] that are magenta (the room's colours have R, B <= 166 and G >= 13)."""
    c = (rgb + 1) / 2 * 255
    return (c[..., 0] > 190) & (c[..., 2] > 190) & (c[..., 1] < 90)


def test_global_cache_renders_points_lifted_from_earlier_trajectories(room, runs):
    room, forward = room[0], _view0_forward()
    glob, seen_g = runs["global"]
    rel, seen_r = runs["release"]
    names = [f"{t.view_id}/{t.traj_id}" for t in glob.trajectories]
    assert names == ["view0/traj2", "view0/traj0", "view0/traj1"]
    assert all(t.status == "generated" and t.render_source == "global cache" for t in glob.trajectories)
    assert all(t.render_source == "360-degree cloud" for t in rel.trajectories)
    # the first trajectory sees the same cloud in both modes, hole included
    first_g, first_r = seen_g[names[0]], seen_r[names[0]]
    assert torch.equal(first_g.render, first_r.render) and torch.equal(first_g.render_mask, first_r.render_mask)
    assert first_r.render_mask[1:].mean() > 0.03
    # its kept frames were lifted into the cache where the cloud had holes: the cloud has no magenta
    # point; most points added are magenta (the holes painted; the MP4 round trip blends their rims
    # with the room), on the room's walls inside the cone without depth
    update = glob.cache.history[0]
    assert update.label == names[0] and len(update.frames) == ALIGN
    assert all(f.skipped is None for f in update.frames) and update.points_after > update.points_before
    cloud = rel.cache.cloud  # release mode never grows its cache
    assert rel.cache.history == [] and len(cloud) == update.points_before
    assert not _is_magenta(cloud.rgb * 2 - 1).any()
    magenta = glob.cache.cloud.xyz[_is_magenta(glob.cache.cloud.rgb * 2 - 1)].double()
    assert len(magenta) > 0.6 * (update.points_after - update.points_before)
    assert room.surface_distance(magenta).median() < 0.01
    cosines = magenta @ forward / magenta.norm(dim=1)
    assert (cosines > math.cos(math.radians(HOLE_DEG + 10))).float().mean() > 0.9
    # the next trajectories are rendered from the grown cache: where the cloud alone leaves holes,
    # the global render shows the lifted magenta points
    for name in names[1:]:
        holes_r = seen_r[name].render_mask[1:, 0] > 0.5
        holes_g = seen_g[name].render_mask[1:, 0] > 0.5
        filled = holes_r & ~holes_g
        assert holes_g.sum() < 0.5 * holes_r.sum() and filled.sum() > 0.5 * holes_r.sum(), name
        colours = seen_g[name].render[1:].permute(0, 2, 3, 1)[filled]
        assert _is_magenta(colours.median(dim=0).values) and _is_magenta(colours).float().mean() > 0.6, name
        assert not _is_magenta(seen_r[name].render[1:].permute(0, 2, 3, 1)).any()
    assert glob.cloud_ply.is_file() and glob.cloud_glb.is_file()


def test_retrieval_includes_generated_frames(runs):
    glob, seen = runs["global"]
    scene = glob.scene_out.parent / PANORAMA_SCENES / "room"
    traj2 = load_camera_json(scene / "view0" / "traj2" / "camera.json").subsample(NFRAME)
    kept = sample_align_nframe(NFRAME, ALIGN)
    _, bank = panorama_bank_cameras(104, 60)

    def source(w2c: torch.Tensor) -> str:
        if any(torch.allclose(w2c, traj2.w2c[k]) for k in kept):
            return "generated"
        assert any(torch.allclose(w2c, b) for b in bank.w2c)
        return "bank"

    req = seen["view0/traj0"]
    sources = [source(w2c) for w2c in req.ref_w2cs]
    assert "generated" in sources
    saved = json.loads((glob.scene_out / "view0" / "traj0" / "memory_inputs" / f"{MODEL}_ref_w2cs.json").read_text())
    assert torch.allclose(torch.tensor(saved, dtype=torch.float64), req.ref_w2cs)
    # the frames given as references are the generated ones (magenta where view0/traj2 painted its holes)
    for w2c, frame in zip(req.ref_w2cs, req.references):
        if source(w2c) == "generated":
            assert (np.abs(frame.astype(int) - MAGENTA).max(axis=-1) < 60).any()
    assert len(glob.bank) == 27 + ALIGN * 3


def test_export_has_one_image_size_and_K_in_its_pixels(room, runs):
    r, _, _ = room
    glob, _ = runs["global"]
    folder = glob.worldmirror
    cams = json.loads((folder / "cameras.json").read_text())
    K = {e["camera_id"]: np.asarray(e["matrix"]) for e in cams["intrinsics"]}
    c2w = {e["camera_id"]: np.asarray(e["matrix"]) for e in cams["extrinsics"]}
    assert len(K) == len(glob.bank) == cams["num_cameras"]
    sizes = {cid: Image.open(folder / "images" / f"{cid}.png").size[::-1] for cid in K}
    assert set(sizes.values()) == {SIZE}
    # bank views: the release's bank cameras at the saved size; the saved image is the room seen
    # through that camera (a K left at the crops' size would put it elsewhere)
    keys, bank = panorama_bank_cameras(SIZE[1], SIZE[0])
    for i, key in enumerate(keys):
        cid = f"pano-{key}"
        np.testing.assert_allclose(K[cid], bank.K[i].numpy(), rtol=1e-9)
        np.testing.assert_allclose(c2w[cid], invert_rigid(bank.w2c[i]).numpy(), atol=1e-9)
        saved = np.asarray(Image.open(folder / "images" / f"{cid}.png")).astype(float)
        direct = r.image(torch.from_numpy(K[cid]), bank.w2c[i], *SIZE).astype(float)
        assert np.abs(saved - direct).mean() < 1.0, cid  # (about 0.2 levels; with the crops' K: 20 to 35)
    # generated frames: the trajectory's camera rescaled to the saved size
    scene = glob.scene_out.parent / PANORAMA_SCENES / "room"
    for t in glob.trajectories:
        traj = load_camera_json(scene / t.view_id / t.traj_id / "camera.json").subsample(NFRAME)
        for k in t.kept:
            cid = f"{t.view_id}-{t.traj_id}-{k:04d}"
            np.testing.assert_allclose(K[cid], scale_intrinsics(traj.K[k], (traj.height, traj.width), SIZE).numpy(),
                                       rtol=1e-9)
            np.testing.assert_allclose(c2w[cid], invert_rigid(traj.w2c[k]).numpy(), atol=1e-9)


# --------------------------------------------------------------------------------------------
# Scene folders with the run lock and the resume key
# --------------------------------------------------------------------------------------------

def test_a_rebuilt_scene_from_other_inputs_is_not_resumed(room, tmp_path):
    _, pano, depth = room
    scene, out = tmp_path / "scene", tmp_path / "out"
    opts = replace(LOOP, nframe=5, align_nframe=2)
    scene_options = replace(SCENE, wander=WanderOptions(views=0, explorations=1, reconstructs=0))

    def build(image=pano, d=depth, options=scene_options):
        if scene.exists():
            shutil.rmtree(scene)
        make_panorama_scene(image, scene, depth=d, options=options)

    def run():
        return run_multi_trajectory(scene, out, _magenta_generator, options=opts)

    build()
    run()
    brighter = pano.copy()
    brighter[:4] = 255
    changes = {"image": dict(image=brighter), "depth": dict(d=depth * 1.1),
               "options": dict(options=replace(scene_options, edge_threshold=0.06))}
    for change in changes.values():
        build(**change)
        with pytest.raises(InputError, match=f"other inputs.*{PANORAMA_MANIFEST}"):
            run()
    build()  # the same inputs again: the same scene, resumed
    assert {t.status for t in run().trajectories} == {"skipped"}


def test_scene_builds_hold_the_lock_and_the_loop_refuses_an_unfinished_scene(room, tmp_path):
    _, pano, depth = room
    folder = tmp_path / "scene"
    held, release = threading.Event(), threading.Event()

    def hold():
        with locked_run_folder(folder):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        with pytest.raises(RunFolderLocked, match="in use by another run"):
            make_panorama_scene(pano, folder, depth=depth, options=SCENE)
    finally:
        release.set()
        thread.join()
    assert not (folder / PANORAMA_MANIFEST).exists()
    # a lock left by a process that is gone does not make the folder foreign
    (folder / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))

    def stop(done, total):
        if done == 2:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        make_panorama_scene(pano, folder, depth=depth, options=SCENE, progress=stop)
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(InputError, match="not finished"):
        run_multi_trajectory(folder, tmp_path / "out", _magenta_generator, options=LOOP)
    make_panorama_scene(pano, folder, depth=depth, options=SCENE)  # finishes it
    (folder / PANORAMA_CLOUD).rename(tmp_path / "cloud.ply")
    with pytest.raises(InputError, match=f"{PANORAMA_CLOUD} is missing"):
        run_multi_trajectory(folder, tmp_path / "out", _magenta_generator, options=LOOP)


def test_release_scene_folders_and_bad_names(room, tmp_path):
    """A release scene folder has no 360-degree cloud: global mode and missing warps are refused
    with the fix; names that are not one folder are refused."""
    r, pano, depth = room
    scene = tmp_path / "release"
    make_panorama_scene(pano, scene, depth=depth, options=replace(SCENE, renders=True))
    for name in (PANORAMA_MANIFEST, PANORAMA_CLOUD):
        (scene / name).unlink()  # what a release folder lacks
    res = run_multi_trajectory(scene, tmp_path / "out", _magenta_generator, options=LOOP)
    assert {t.render_source for t in res.trajectories} == {"scene renders"} and res.cache is None
    with pytest.raises(InputError, match="360-degree cloud"):
        run_multi_trajectory(scene, tmp_path / "g", _magenta_generator, options=replace(LOOP, cache_mode="global"),
                             depth_fn=r.depth_fn())
    with pytest.raises(InputError, match="pre-rendered"):
        run_multi_trajectory(scene, tmp_path / "n", _magenta_generator, options=replace(LOOP, scene_renders=False))
    with pytest.raises(InputError, match="plain folder name"):
        run_panorama_image(pano, tmp_path, _magenta_generator, name="../x", depth=depth)


# --------------------------------------------------------------------------------------------
# Tiny checkpoints: the library call and the CLI
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models_root(tmp_path_factory.mktemp("models"), (MODEL,), moge=True)


def test_library_call_on_tiny_models(room, models, tmp_path):
    r, pano, depth = room
    generator, _ = load_pipeline_clip_generator(models, MODEL, num_inference_steps=2)
    scene = replace(SCENE, wander=WanderOptions(views=0, explorations=0, reconstructs=1))
    ticks = []
    res = run_panorama_image(pano, tmp_path, generator, depth=depth, depth_fn=r.depth_fn(), scene_options=scene,
                             options=replace(LOOP, cache_mode="global"), progress=lambda d, n: ticks.append((d, n)))
    assert [(t.view_id, t.traj_id, t.render_source) for t in res.trajectories] == [
        ("reconstruct_0", "traj0", "global cache"), ("reconstruct_0", "traj1", "global cache")]
    assert res.scene_out == tmp_path / "panorama" and ticks[-1][0] == ticks[-1][1]
    for t in res.trajectories:
        assert read_video(t.result).shape == (NFRAME, *SIZE, 3)
    # the iterative trajectory starts from traj0's last frame, its render from the grown cache
    assert [h.label for h in res.cache.history] == ["reconstruct_0/traj0", "reconstruct_0/traj1"]
    assert res.cache.history[0].points_after > res.cache.history[0].points_before
    assert {Image.open(p).size for p in (res.worldmirror / "images").glob("*.png")} == {SIZE[::-1]}
    again = run_panorama_image(pano, tmp_path, generator, depth=depth, depth_fn=r.depth_fn(), scene_options=scene,
                               options=replace(LOOP, cache_mode="global"))
    assert [t.status for t in again.trajectories] == ["skipped", "skipped"]


@pytest.mark.parametrize("cache", ["global", "release"])
def test_cli_panorama_image_on_tiny_models(room, models, tmp_path, capsys, cache):
    """The scene's depth from a file (MoGe on the panorama is covered in test_panorama_scene); in
    global mode the tiny MoGe lifts the kept frames (two per clip: MoGe is the slow part here)."""
    _, pano, depth = room
    Image.fromarray(pano).save(tmp_path / "room.png")
    np.save(tmp_path / "room_distance.npy", depth.numpy())
    args = ["multi-traj", str(tmp_path / "room.png"), "--task", "panorama", "--cache", cache, "--out",
            str(tmp_path / "out"), "--models", str(models), "--size", f"{SIZE[0]}x{SIZE[1]}", "--nframe", str(NFRAME),
            "--align-nframe", "2", "--steps", "2", "--bank-size", "60x104", "--views", "0",
            "--explorations", "0", "--reconstructs", "1", "--render-radius", "0.06", "--prompt", "A room.",
            "--pano-depth", str(tmp_path / "room_distance.npy")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    source = "global cache" if cache == "global" else "scene renders"
    for traj in ("traj0", "traj1"):
        assert f"reconstruct_0/{traj}: generated from {source}" in printed
        result = tmp_path / "out" / "room" / "reconstruct_0" / traj / f"{MODEL}_result.mp4"
        assert read_video(result).shape == (NFRAME, *SIZE, 3)
    cams = json.loads((tmp_path / "out" / "room" / "world_mirror_data" / MODEL / "cameras.json").read_text())
    assert cams["num_cameras"] == 27 + 2 * 2
    assert cli.main(args) == 0  # a rerun reuses the scene and skips the finished trajectories
    assert capsys.readouterr().out.count(": skipped") == 2
