"""A panorama scene folder from one equirectangular image: the release's layout, read back by the
loader code the loop uses, then run through today's multi-trajectory loop (release mode, with a
deterministic stand-in generator); resume and refusal rules; the CLI form
``multi-traj --task panorama <image>`` with a tiny MoGe.

Scene: the synthetic room (:func:`synthetic_scene.panorama_room`), 128 x 256, bank crops 104 x 60
(the release's 832 x 480 cameras at 1/8 size)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_scene import panorama_room
from tiny_moge import write_tiny_moge
from worldstereo_core import cli
from worldstereo_core.errors import InputError, Interrupted
from worldstereo_core.geometry.equirect import panorama_bank_crops
from worldstereo_core.geometry.trajectories import panorama_bank_cameras
from worldstereo_core.geometry.wander import WanderOptions
from worldstereo_core.io.camera_json import load_bank_cameras, load_camera_json
from worldstereo_core.io.images import load_image
from worldstereo_core.io.pointcloud_files import read_ply
from worldstereo_core.io.video import read_mask_video, read_video
from worldstereo_core.tasks import generate
from worldstereo_core.tasks.loop import LoopOptions, run_multi_trajectory
from worldstereo_core.tasks.ordering import sort_trajs
from worldstereo_core.io.scene_layout import PANORAMA_MANIFEST
from worldstereo_core.tasks.panorama_scene import PanoramaSceneOptions, make_panorama_scene, planned_trajectories

SIZE = (32, 48)
#: Tiny images: a low edge threshold (see panorama_points) and wide splats (0.008 NDC is a quarter
#: pixel at 60 px; the release's size with the default 2048-wide cloud leaves ~0 % holes at the start).
OPTIONS = PanoramaSceneOptions(bank_width=104, bank_height=60, view_size=48, edge_threshold=0.05, render_radius=0.06,
                               wander=WanderOptions(views=1, explorations=1, reconstructs=1))


def _fake_generator(req, progress):
    """The render with holes filled grey (what a generator returns: frames at the working size)."""
    rgb = (req.render + 1) / 2
    return torch.where(req.render_mask > 0.5, torch.full_like(rgb, 0.5), rgb).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def room():
    room = panorama_room()
    pano, distance = room.equirect(128, 256)
    return room, pano, distance


@pytest.fixture(scope="module")
def scene(room, tmp_path_factory):
    r, pano, _ = room
    folder = tmp_path_factory.mktemp("scenes") / "room"
    ticks = []
    made = make_panorama_scene(pano, folder, depth_fn=r.depth_fn(), prompt="An empty room.", options=OPTIONS,
                               progress=lambda d, n: ticks.append((d, n)))
    return made, ticks


def test_scene_layout(room, scene):
    _, pano, distance = room
    made, ticks = scene
    folder = made.folder
    assert ticks[-1] == (13 + 1 + 7, 13 + 1 + 7) and not made.reused  # 12 views + merge, plan, 7 trajectories
    # the bank: the release's 27 cameras at this size, the crops of the panorama
    keys, cams = load_bank_cameras(folder / "pano_bank", width=104, height=60)
    ref_keys, ref = panorama_bank_cameras(104, 60)
    assert keys == ref_keys and torch.allclose(cams.w2c, ref.w2c) and torch.allclose(cams.K, ref.K)
    _, _, crops = panorama_bank_crops(pano, 104, 60)
    for key, crop in zip(keys, crops):
        assert np.array_equal(load_image(folder / "pano_bank" / "images" / f"{key}.png"), crop)
    # view0 faces bank view 0000: its start frame is that crop
    assert np.array_equal(load_image(folder / "view0" / "start_frame.png"), crops[0])
    jobs = sort_trajs(folder)
    assert [(j.view_id, j.traj_id) for j in jobs] == [
        ("view0", "traj2"), ("view0", "traj0"), ("view0", "traj1"), ("reconstruct_0", "traj0"),
        ("wonder_0", "traj0"), ("wonder_0", "traj1"), ("reconstruct_0", "traj1")]
    assert jobs[-1].start_from == ("reconstruct_0", "traj0")
    planned_by = {(p.group, p.traj): p for p in made.plan.trajectories}
    for job in jobs:
        planned = planned_by[(job.view_id, job.traj_id)]
        traj = load_camera_json(job.camera_path)
        assert len(traj) == 21 and (traj.width, traj.height) == (104, 60)
        assert traj.meta["type"] == planned.kind and traj.meta["id"] == planned.trajectory.meta["id"]
        assert torch.allclose(traj.w2c, planned.trajectory.w2c)
        assert job.prompt == f"An empty room. {planned.caption}"
        render, mask = read_video(job.render_path), read_mask_video(job.mask_path)
        assert render.shape == (21, 60, 104, 3) and mask.shape == (21, 60, 104)
        if job.start_from is None:
            assert mask[0].sum() == 0  # frame 0 is the start image
        assert mask[1:].mean() < 0.5  # the cloud covers most of every render
    # the cache cloud and the distance map
    cloud = read_ply(folder / "panorama_cloud.ply")
    assert len(cloud) == len(made.cloud) and torch.allclose(cloud.xyz, made.cloud.xyz)
    saved = np.load(folder / "panorama_distance.npy")
    assert saved.shape == (128, 256) and np.median(np.abs(saved - distance.numpy()) / distance.numpy()) < 1e-3
    assert np.array_equal(load_image(folder / "panorama.png"), pano)
    manifest = json.loads((folder / PANORAMA_MANIFEST).read_text())
    assert manifest["complete"] and manifest["plan"]["margin"] > 0 and manifest["cloud_points"] == len(cloud)


def test_planned_trajectories(scene):
    made, _ = scene
    found = planned_trajectories(made.folder)
    assert [label for label, _ in found] == sorted(f"{p.group}/{p.traj}" for p in made.plan.trajectories)
    planned = {f"{p.group}/{p.traj}": p.trajectory for p in made.plan.trajectories}
    assert all(torch.allclose(traj.w2c, planned[label].w2c) for label, traj in found)


def test_scene_runs_through_the_loop(scene, tmp_path):
    made, _ = scene
    res = run_multi_trajectory(made.folder, tmp_path / "out", _fake_generator,
                               options=LoopOptions(task="panorama", scale_map=(SIZE,)))
    assert [(t.view_id, t.traj_id) for t in res.trajectories] == [(j.view_id, j.traj_id) for j in sort_trajs(made.folder)]
    assert all(t.status == "generated" and t.render_source == "scene renders" for t in res.trajectories)
    assert len(res.bank) == 27 + 8 * 7


def test_rerun_reuses_refuses_and_resumes(room, scene, tmp_path):
    r, pano, distance = room
    made, _ = scene
    stamp = (made.folder / PANORAMA_MANIFEST).stat().st_mtime_ns
    again = make_panorama_scene(pano, made.folder, depth_fn=r.depth_fn(), prompt="An empty room.", options=OPTIONS)
    assert again.reused and (made.folder / PANORAMA_MANIFEST).stat().st_mtime_ns == stamp
    assert torch.allclose(again.cloud.xyz, made.cloud.xyz)
    with pytest.raises(InputError, match="another image or with other settings"):
        make_panorama_scene(pano, made.folder, depth_fn=r.depth_fn(), prompt="Another room.", options=OPTIONS)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a panorama scene"):
        make_panorama_scene(pano, foreign, depth=distance, options=OPTIONS)
    assert (foreign / "notes.txt").read_text() == "mine"
    # interrupted while rendering, then resumed: a complete scene equal to an uninterrupted one
    fresh = tmp_path / "fresh"

    def stop(done, total):
        if done == 4:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        make_panorama_scene(pano, fresh, depth=distance, options=OPTIONS, progress=stop)
    assert not json.loads((fresh / PANORAMA_MANIFEST).read_text())["complete"]
    done = make_panorama_scene(pano, fresh, depth=distance, options=OPTIONS)
    assert not done.reused and json.loads((fresh / PANORAMA_MANIFEST).read_text())["complete"]
    assert len(sort_trajs(fresh)) == 7


def test_user_depth_and_bad_input(room, tmp_path):
    _, pano, distance = room
    np.save(tmp_path / "d.npy", distance.numpy().astype(np.float32))
    made = make_panorama_scene(pano, tmp_path / "s", depth=tmp_path / "d.npy",
                               options=PanoramaSceneOptions(bank_width=104, bank_height=60, edge_threshold=0.05,
                                                            renders=False, wander=WanderOptions(views=1, explorations=0,
                                                                                                reconstructs=0)))
    assert torch.equal(made.distance, distance.float())
    assert not (tmp_path / "s" / "view0" / "traj0" / "render.mp4").exists()
    assert (tmp_path / "s" / "view0" / "traj0" / "camera.json").is_file()
    with pytest.raises(InputError, match="needs depth"):
        make_panorama_scene(pano, tmp_path / "t", options=OPTIONS)
    with pytest.raises(InputError, match="2:1"):
        make_panorama_scene(pano[:, :200], tmp_path / "t", depth=distance, options=OPTIONS)
    with pytest.raises(InputError, match="even"):
        PanoramaSceneOptions(bank_width=105)


def test_cli_panorama_image(room, tmp_path, monkeypatch, capsys):
    r, pano, distance = room
    models = tmp_path / "models"
    write_tiny_moge(models / "moge" / "moge-2-vitl-normal" / "model.pt")
    Image.fromarray(pano).save(tmp_path / "room.png")

    def load(*args, **kwargs):  # the video model is covered elsewhere; here it is the stand-in
        return _fake_generator, SimpleNamespace(scale_map=(SIZE,), nframe=21)

    monkeypatch.setattr(generate, "load_pipeline_clip_generator", load)
    args = ["multi-traj", str(tmp_path / "room.png"), "--task", "panorama", "--out", str(tmp_path / "out"),
            "--models", str(models), "--size", f"{SIZE[0]}x{SIZE[1]}", "--nframe", "21",  # no variant config.json
            "--bank-size", "60x104", "--views", "0", "--explorations", "0",
            "--reconstructs", "1", "--prompt", "A room."]
    assert cli.main(args) == 0
    folder = tmp_path / "out" / "panorama_scenes" / "room"
    assert json.loads((folder / PANORAMA_MANIFEST).read_text())["complete"]
    for traj in ("traj0", "traj1"):
        assert read_video(tmp_path / "out" / "room" / "reconstruct_0" / traj / "worldstereo-memory_result.mp4").shape \
            == (21, *SIZE, 3)
    printed = capsys.readouterr().out
    assert f"panorama scene: {folder}" in printed and "reconstruct_0/traj1: generated" in printed
    assert cli.main(args) == 0  # a rerun reuses the scene and skips finished trajectories
    assert capsys.readouterr().out.count(": skipped") == 2
    assert cli.main(["multi-traj", str(tmp_path / "room.png"), "--task", "reconstruction", "--out",
                     str(tmp_path / "out2"), "--models", str(models)]) == 2
    assert cli.main(["panorama-scene", str(tmp_path / "room.png"), "--out", str(tmp_path / "out3"), "--models",
                     str(models), "--pano-depth", "a.npy", "b.npy"]) == 2
    assert "one depth file per panorama image" in capsys.readouterr().err
