"""Trajectory order and start-image / prompt rules against the memory fixtures and the examples."""
from __future__ import annotations

import json
import random

import pytest

from conftest import example_dirs, fixture_file
from worldstereo_core.errors import InputError
from worldstereo_core.tasks.ordering import group_id, is_iterative, recon_sort_trajs, scene_task, sort_trajs


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _pano_tree(root, rel_paths, extra_groups=()):
    """A panorama scene with the given '<group>/<traj>/render.mp4' entries (created in random order)."""
    rel_paths = list(rel_paths)
    random.Random(0).shuffle(rel_paths)
    for rel in rel_paths:
        group, traj = rel.split("/")[:2]
        _write(root / group / traj / "camera.json", {"extrinsic": [], "intrinsic": []})
        _write(root / group / traj / "traj_caption.json", {"prompt": f"caption of {group}/{traj}"})
        (root / group / "start_frame.png").write_bytes(b"png")
    for group in extra_groups:
        (root / group).mkdir(parents=True, exist_ok=True)
    (root / "pano_bank").mkdir(exist_ok=True)


def test_panorama_order_matches_fixture(tmp_path):
    order = json.loads(fixture_file("geometry", "memory_bank_panorama.json").read_text())["sort_trajs_order"]
    _pano_tree(tmp_path, order)
    # an invalid view and a view with an explicit "yes" next to the fixture's groups
    _pano_tree(tmp_path, ["view9/traj0/render.mp4", "view8/traj2/render.mp4"])
    _write(tmp_path / "view9" / "valid_analysis.json", {"valid": "no"})
    _write(tmp_path / "view8" / "valid_analysis.json", {"valid": "yes"})
    jobs = sort_trajs(tmp_path)
    got = [f"{j.view_id}/{j.traj_id}/render.mp4" for j in jobs if j.view_id not in ("view8", "view9")]
    assert got == order
    assert ("view8", "traj2") in [(j.view_id, j.traj_id) for j in jobs]
    assert "view9" not in {j.view_id for j in jobs}


def test_panorama_start_images_and_prompts(tmp_path):
    _pano_tree(tmp_path, ["view0/traj0/x", "reconstruct_2/traj0/x", "reconstruct_2/traj1/x", "wonder-a_1/traj1/x"])
    jobs = {(j.view_id, j.traj_id): j for j in sort_trajs(tmp_path)}
    it = jobs[("reconstruct_2", "traj1")]
    assert it.is_iterative and it.start_image is None and it.start_from == ("reconstruct_2", "traj0")
    assert it.start_source == "last frame of reconstruct_2/traj0"
    for key, job in jobs.items():
        assert job.prompt == f"caption of {job.group_dir.name}/{job.traj_id}"
        assert job.camera_path == job.group_dir / job.traj_id / "camera.json"
        if key != ("reconstruct_2", "traj1"):
            assert job.start_image == job.group_dir / "start_frame.png" and not job.is_iterative
    # hyphenated group: renamed for outputs, read from its own folder
    w = jobs[("wonder_a_1", "traj1")]
    assert w.group_dir.name == "wonder-a_1" and group_id("wonder-a_1") == "wonder_a_1"
    assert [k for k in jobs][-1] == ("reconstruct_2", "traj1")


def test_only_reconstruct_underscore_traj1_is_iterative(tmp_path):
    """The release's rule: view id starting with "reconstruct_" and traj1; other reconstruct* groups are
    still generated last, from their own start frame."""
    _pano_tree(tmp_path, ["reconstruct-a/traj0/x", "reconstruct-a/traj1/x", "reconstructb/traj1/x"])
    jobs = {(j.view_id, j.traj_id): j for j in sort_trajs(tmp_path)}
    assert jobs[("reconstruct_a", "traj1")].start_from == ("reconstruct_a", "traj0")
    other = jobs[("reconstructb", "traj1")]
    assert not other.is_iterative and other.start_image == tmp_path / "reconstructb" / "start_frame.png"
    assert list(jobs)[-2:] == [("reconstruct_a", "traj1"), ("reconstructb", "traj1")]
    assert is_iterative("reconstruct_0", "traj1") and not is_iterative("reconstruct_0", "traj0")
    assert not is_iterative("view0", "traj1") and not is_iterative("reconstructb", "traj1")


def test_panorama_errors(tmp_path):
    _pano_tree(tmp_path / "a", ["reconstruct_0/traj1/x"])
    with pytest.raises(InputError, match="traj0"):
        sort_trajs(tmp_path / "a")
    _pano_tree(tmp_path / "b", ["view0/traj0/x"])
    (tmp_path / "b" / "view0" / "traj0" / "traj_caption.json").unlink()
    with pytest.raises(InputError, match="traj_caption.json"):
        sort_trajs(tmp_path / "b")
    _pano_tree(tmp_path / "c", ["target_a-1/traj0/x", "target_a_1/traj0/x"])
    with pytest.raises(InputError, match="rename"):
        sort_trajs(tmp_path / "c")


def test_reconstruction_order_matches_fixture(tmp_path):
    fx_order = json.loads(fixture_file("geometry", "memory_bank_reconstruction.json").read_text())["order"]
    (tmp_path / "image.png").write_bytes(b"png")
    _write(tmp_path / "prompt.json", {"prompt": "a park"})
    for t in reversed(fx_order):
        _write(tmp_path / "renders" / t / "camera.json", {})
    jobs = recon_sort_trajs(tmp_path)
    assert [j.traj_id for j in jobs] == fx_order
    assert all(j.view_id == "renders" and j.start_image == tmp_path / "image.png" and j.prompt == "a park"
               and not j.is_iterative for j in jobs)


@pytest.mark.parametrize("scene", example_dirs("reconstruction"), ids=lambda p: p.name)
def test_reconstruction_examples(scene):
    prompt = json.loads((scene / "prompt.json").read_text())["prompt"]
    jobs = recon_sort_trajs(scene)
    present = [p.name for p in (scene / "renders").iterdir() if (p / "camera.json").is_file()]
    assert sorted(j.traj_id for j in jobs) == sorted(t for t in present if t in
                                                     ("traj_eloop", "traj_up", "traj_right", "traj_left"))
    order = ["traj_eloop", "traj_up", "traj_right", "traj_left"]
    assert [j.traj_id for j in jobs] == [t for t in order if t in present]
    assert all(j.prompt == prompt and j.camera_path.is_file() and j.render_path.is_file() for j in jobs)


@pytest.mark.parametrize("scene", example_dirs("panorama"), ids=lambda p: p.name)
def test_panorama_examples(scene):
    jobs = sort_trajs(scene)
    assert jobs and all(j.camera_path.is_file() for j in jobs)
    for j in jobs:
        assert j.prompt == json.loads((j.traj_dir / "traj_caption.json").read_text())["prompt"]
        if j.start_image is not None:
            assert j.start_image.is_file()
    # the example holds a subset of a full scene: its order is the fixture order restricted to it
    fx = json.loads(fixture_file("geometry", "memory_bank_panorama.json").read_text())
    if fx["scene"] == scene.name:
        got = [f"{j.view_id}/{j.traj_id}/render.mp4" for j in jobs]
        assert got == [p for p in fx["sort_trajs_order"] if p in got]


def test_scene_task(tmp_path):
    assert scene_task(tmp_path) == "reconstruction"
    (tmp_path / "pano_bank").write_text("")  # a file is not a bank folder
    assert scene_task(tmp_path) == "reconstruction"
    (tmp_path / "pano_bank").unlink()
    (tmp_path / "pano_bank").mkdir()
    assert scene_task(tmp_path) == "panorama"
