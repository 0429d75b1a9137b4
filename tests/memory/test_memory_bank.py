"""MemoryBank: keep rule, the two fixture loops replayed through our bank, persistence and resume.

The fixture frames were synthetic (random) images, so the frames here are our own random images:
retrieval never looks at pixels except in the >8-reference branch (CameraSelector). For a step
that takes that branch the exact pick depends on those unknown images, so it is checked for
consistency instead: the fixture's references are a subset of our first-pass picks, at most
``max_reference`` of them, and each target's pick is a best-scored one among them with the
recorded score and angle. Among equally scored references the reference takes the one its
selector picked first, an order that depends on the unknown images, so any of them is accepted.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import angle_close, examples_root, fixture_file, require_path
from worldstereo_core.errors import CheckpointError, InputError
from worldstereo_core.cameras import CameraTrajectory
from worldstereo_core.io.camera_json import load_bank_cameras, load_camera_json
from worldstereo_core.io.images import resize_bicubic
from worldstereo_core.memory import bank as bank_module
from worldstereo_core.memory.bank import MemoryBank, sample_align_nframe, split_n_into_d_parts
from worldstereo_core.geometry.frustums import FrustumSet
from worldstereo_core.memory.retrieval import (
    assign_references, overlap_scores, retrieval_targets, retrieve, shortcut_plan,
)

SCORE_ATOL, ANGLE_ATOL = 1e-5, 1e-3
#: Scores this close count as tied (a few float32 steps of a score in [0, 2]).
TIE_ATOL = 1e-6


def _utilities() -> dict:
    return json.loads(fixture_file("geometry", "utilities.json").read_text())


def _yaw(deg) -> torch.Tensor:
    """w2c (N, 4, 4) of cameras at the origin turned by ``deg`` degrees about y."""
    return torch.stack([torch.tensor([[np.cos(a), 0, -np.sin(a), 0], [0, 1, 0, 0], [np.sin(a), 0, np.cos(a), 0],
                                      [0, 0, 0, 1]], dtype=torch.float64) for a in np.radians(deg)])


def test_split_n_into_d_parts_fixture():
    for case in _utilities()["split_n_into_d_parts"]:
        assert split_n_into_d_parts(case["N"], case["D"]) == case["expected"]


def test_sample_align_nframe_fixture():
    for case in _utilities()["sample_align_nframe"]:
        assert sample_align_nframe(case["N"], case["n"]) == case["expected"]


def test_sample_align_nframe_rejects_impossible_counts():
    with pytest.raises(InputError, match="align_nframe"):
        sample_align_nframe(5, 5)


def _frames(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _check_step(res, step: dict, bank: MemoryBank) -> None:
    """Compare one retrieval with a fixture step (indices exact, scores/angles/poses within tolerance)."""
    assert res.retrieved == step["retrieved_global_indices"]
    assert res.ref_index.tolist() == step["ref_index"]
    exp = step["ref_index_dict"]
    assert sorted(res.ref_index_dict) == sorted(int(k) for k in exp)
    # the release's <model>_ref_index.json: this very dict, keys and their order included
    written = json.loads(json.dumps(res.ref_index_json(), indent=2))
    assert list(written) == list(exp) and all(list(written[k]) == list(exp[k]) for k in exp)
    assert all(written[k][i].keys() == {"score", "angle_diff"} for k in exp for i in exp[k])
    for k, targets in exp.items():
        got = res.ref_index_dict[int(k)]
        assert sorted(got) == sorted(int(i) for i in targets)
        for i, v in targets.items():
            assert got[int(i)]["score"] == pytest.approx(v["score"], abs=SCORE_ATOL)
            assert angle_close(got[int(i)]["angle_diff"], v["angle_diff"], ANGLE_ATOL)
    if "ref_w2cs" in step:
        exp_w2c = torch.tensor(step["ref_w2cs"], dtype=torch.float64)
        atol = 1e-4 * max(1.0, exp_w2c[:, :3, 3].abs().max().item())
        assert (res.ref_w2cs - exp_w2c).abs().max().item() <= atol
    assert len(res.frames) == len(res.retrieved)
    assert all(f is bank.frames[g] for f, g in zip(res.frames, res.retrieved))


def _check_selector_step(bank: MemoryBank, traj, view: str, traj_id: str, step: dict, res) -> None:
    """Consistency of a >max_reference step whose selection depended on the fixture's random frames."""
    assert res.selection is not None, "fixture differs from our first pass without the selector branch"
    kept = list(dict.fromkeys(step["retrieved_global_indices"]))
    assert len(kept) <= bank.max_reference
    targets = retrieval_targets(len(traj), bank.nframe)
    K = bank.to_bank_intrinsics(traj.K, (traj.height, traj.width) if traj.height else None)
    tf = FrustumSet.from_cameras(traj.w2c[targets][1:], K[targets][1:], bank.width, bank.height, bank.near, bank.far)
    score, angle = overlap_scores(tf, bank.frustums)
    forced = shortcut_plan(bank.fnames, view, traj_id, len(targets))
    first_pass, _, _ = assign_references(score, angle, list(range(len(bank))), forced)
    assert len(set(first_pass)) > bank.max_reference and set(kept) <= set(first_pass)
    best = score[:, kept].amax(dim=1)
    for row, g in enumerate(step["retrieved_global_indices"]):
        assert score[row, g] >= best[row] - TIE_ATOL, f"target {row + 1}: {g} is not a best-scored reference"
    first: dict[int, int] = {}
    for pos, g in enumerate(step["retrieved_global_indices"]):
        first.setdefault(g, pos)
    assert step["ref_index"] == list(first.values())
    for k, targets in step["ref_index_dict"].items():
        for i, v in targets.items():
            g = step["retrieved_global_indices"][int(i) - 1]
            assert first[g] == int(k)
            assert score[int(i) - 1, g].item() == pytest.approx(v["score"], abs=SCORE_ATOL)
            assert angle_close(angle[int(i) - 1, g].item(), v["angle_diff"], ANGLE_ATOL)


def _replay(bank: MemoryBank, step: dict, traj, view: str, traj_id: str, frames) -> None:
    k_size = (traj.height, traj.width) if traj.height else None
    res = retrieve(bank, traj.w2c, traj.K, view, traj_id, k_size=k_size)
    if res.selection is None:
        _check_step(res, step, bank)
    else:
        _check_selector_step(bank, traj, view, traj_id, step, res)
    bank.update_memory(frames, traj.w2c, traj.K, view, traj_id, k_size=k_size)


# ------------------------------------------------------------------------------------------ reconstruction

def _recon_fixture():
    fx = json.loads(fixture_file("geometry", "memory_bank_reconstruction.json").read_text())
    scene = require_path(examples_root() / "reconstruction" / fx["scene"], f"reconstruction example {fx['scene']}")
    return fx, scene


def test_reconstruction_loop_matches_fixture():
    fx, scene = _recon_fixture()
    W, H = fx["image_size_wh"]
    h, w = fx["assign_scale_hw"]
    eloop = load_camera_json(scene / "renders" / "traj_eloop" / "camera.json")
    bank = MemoryBank.reconstruction(_frames(1, h, w, 0)[0], eloop.K[0], W, H)
    for n, step in enumerate(fx["steps"]):
        traj = load_camera_json(scene / "renders" / step["traj"] / "camera.json")
        assert len(bank) == step["bank_size_before"]
        _replay(bank, step, traj, "renders", step["traj"], _frames(len(traj), h, w, n + 1))
        assert len(bank) == step["bank_size_after"]
    assert bank.fnames == fx["final_fnames"]
    exp_w2c = torch.tensor(fx["final_ref_w2cs"], dtype=torch.float64)
    assert (bank.w2c - exp_w2c).abs().max().item() <= 1e-4 * max(1.0, exp_w2c[:, :3, 3].abs().max().item())
    exp_K = torch.tensor(fx["final_ref_Ks"], dtype=torch.float64)
    assert (bank.K - exp_K).abs().max().item() <= 1e-4 * exp_K.abs().max().item()



# ------------------------------------------------------------------------------------------ panorama

def _pano_fixture():
    fx = json.loads(fixture_file("geometry", "memory_bank_panorama.json").read_text())
    scene = require_path(examples_root() / "panorama" / fx["scene"], f"panorama example {fx['scene']}")
    return fx, scene


def _pano_bank(fx, scene) -> MemoryBank:
    W, H = fx["image_wh"]
    keys, cams = load_bank_cameras(scene / "pano_bank" / "cameras.json", width=W, height=H)
    return MemoryBank.panorama(fx["scene"], keys, cams, _frames(len(keys), H, W, 0))


def test_panorama_loop_matches_fixture():
    """Replays every fixture step whose camera.json is in the examples (the bank depends on all before)."""
    fx, scene = _pano_fixture()
    W, H = fx["image_wh"]
    bank = _pano_bank(fx, scene)
    done = 0
    for n, step in enumerate(fx["steps"]):
        view, traj_id = step["view_id"], step["traj_id"]
        path = scene / view / traj_id / "camera.json"
        if not path.is_file():
            break
        traj = load_camera_json(path)
        assert len(bank) == step["bank_size_before"]
        _replay(bank, step, traj, view, traj_id, _frames(len(traj), H, W, n + 1))
        done += 1
    if done == 0:
        pytest.skip("the first fixture trajectory's camera.json is not in the examples")
    assert bank.fnames == fx["final_fnames"][: len(bank)]
    assert len(bank) == 27 + done * bank.align_nframe


def test_panorama_bank_from_folder(tmp_path):
    fx, scene = _pano_fixture()
    keys, cams = load_bank_cameras(scene / "pano_bank" / "cameras.json", width=40, height=24)
    # the examples ship only some bank images: the folder loader must say which are missing
    if len(list((scene / "pano_bank" / "images").glob("*.png"))) < len(keys):
        with pytest.raises(InputError, match="missing"):
            MemoryBank.from_panorama_folder(scene)
    # a complete copy (synthetic images) loads in key order with the reference names
    from PIL import Image

    copy = tmp_path / fx["scene"]
    (copy / "pano_bank" / "images").mkdir(parents=True)
    (copy / "pano_bank" / "cameras.json").write_bytes((scene / "pano_bank" / "cameras.json").read_bytes())
    frames = _frames(len(keys), 24, 40, 5)
    for k, f in zip(keys, frames):
        Image.fromarray(f).save(copy / "pano_bank" / "images" / f"{k}.png")
    bank = MemoryBank.from_panorama_folder(copy)
    assert bank.fnames == [f"{fx['scene']}/pano_bank/{k}" for k in keys]
    assert (bank.width, bank.height) == (40, 24)
    assert all(np.array_equal(a, b) for a, b in zip(bank.frames, frames))
    assert torch.equal(bank.w2c, cams.w2c) and torch.equal(bank.K, cams.K)


# ------------------------------------------------------------------------------------------ keep rule / errors

def _small_bank(seed: int = 0, with_extras: bool = False) -> MemoryBank:
    bank = MemoryBank(40, 24)
    K = torch.tensor([[20.0, 0, 20], [0, 20, 12], [0, 0, 1]], dtype=torch.float64)
    bank.add(_frames(2, 24, 40, seed), torch.eye(4).expand(2, 4, 4), K, ["s/pano_bank/0000", "s/pano_bank/0001"])
    w2c = torch.eye(4, dtype=torch.float64).repeat(21, 1, 1)
    w2c[:, 0, 3] = torch.arange(21) * 0.1
    depths = [np.full((24, 40), float(i), np.float32) for i in range(21)] if with_extras else None
    points = [np.random.default_rng(i).normal(size=(5, 3)) for i in range(21)] if with_extras else None
    bank.update_memory(_frames(21, 24, 40, seed + 1), w2c, K, "view0", "traj2", depths=depths, points=points)
    return bank


def test_reference_frames_are_the_chosen_bank_frames_resized():
    bank = _small_bank()
    w2c = torch.eye(4, dtype=torch.float64).repeat(21, 1, 1)
    w2c[:, 0, 3] = torch.arange(21) * 0.05
    found = retrieve(bank, w2c, bank.K[0], "view0", "traj9")
    refs = found.reference_frames(48, 80)
    assert refs.shape == (len(found.ref_index), 48, 80, 3) and refs.dtype == np.uint8
    for ref, g in zip(refs, found.ref_global_indices):
        assert np.array_equal(ref, resize_bicubic(bank.frames[g], (48, 80)))


def test_update_memory_keeps_align_nframe_frames():
    bank = _small_bank(with_extras=True)
    assert bank.fnames[2:] == [f"view0/traj2/{i:04d}" for i in (3, 6, 9, 12, 14, 16, 18, 20)]
    assert bank.w2c[2:, 0, 3].tolist() == pytest.approx([0.3, 0.6, 0.9, 1.2, 1.4, 1.6, 1.8, 2.0])
    assert [float(d[0, 0]) for d in bank.depths[2:]] == [3, 6, 9, 12, 14, 16, 18, 20]
    assert bank.depths[0] is None and bank.points[1] is None
    assert len(bank.frustums) == len(bank) == 10


def test_update_memory_rescales_intrinsics_to_bank_size():
    bank = MemoryBank(40, 24)
    K = torch.tensor([[40.0, 0, 40], [0, 48, 24], [0, 0, 1]], dtype=torch.float64)  # for 48 x 80
    bank.update_memory(_frames(21, 24, 40, 0), torch.eye(4).repeat(21, 1, 1), K, "v", "traj0", k_size=(48, 80))
    assert bank.K[0].tolist() == [[20.0, 0, 20], [0, 24, 12], [0, 0, 1]]


def test_next_traj_id_and_summary():
    bank = MemoryBank(40, 24)
    assert bank.next_traj_id("v") == "traj0" and bank.summary() == "0 entries, 40x24"
    for traj_id in ("traj0", "traj2"):
        bank.update_memory(_frames(21, 24, 40, 0), torch.eye(4).repeat(21, 1, 1), torch.eye(3), "v", traj_id)
    assert bank.next_traj_id("v") == "traj1" and bank.next_traj_id("other") == "traj0"
    assert bank.summary() == f"{len(bank)} entries, 40x24" and len(bank) == 2 * bank.align_nframe


def test_bad_updates_are_input_errors():
    bank = MemoryBank(40, 24)
    with pytest.raises(InputError, match="21 frames but 20 w2c"):
        bank.update_memory(_frames(21, 24, 40, 0), torch.eye(4).repeat(20, 1, 1), torch.eye(3), "v", "traj0")
    with pytest.raises(InputError, match="NaN"):
        w2c = torch.eye(4).repeat(21, 1, 1)
        w2c[3, 0, 3] = float("nan")
        bank.update_memory(_frames(21, 24, 40, 0), w2c, torch.eye(3), "v", "traj0")
    assert len(bank) == 0  # nothing half-added


# ------------------------------------------------------------------------------------------ persistence

def test_save_load_round_trip(tmp_path):
    bank = _small_bank(with_extras=True)
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded == bank
    assert torch.equal(loaded.frustums.mins, bank.frustums.mins)
    assert loaded != _small_bank(seed=7, with_extras=True)


def test_resume_equals_uninterrupted(tmp_path):
    fx, scene = _recon_fixture()
    W, H = fx["image_size_wh"]
    h, w = 48, 72  # small working size: pixels do not matter here
    eloop = load_camera_json(scene / "renders" / "traj_eloop" / "camera.json")
    trajs = [load_camera_json(scene / "renders" / s["traj"] / "camera.json") for s in fx["steps"]]

    def run(bank, start, stop_after=None, folder=None):
        results = []
        for n in range(start, len(trajs)):
            results.append(retrieve(bank, trajs[n].w2c, trajs[n].K, "renders", fx["steps"][n]["traj"]).retrieved)
            bank.update_memory(_frames(21, h, w, n + 1), trajs[n].w2c, trajs[n].K, "renders", fx["steps"][n]["traj"])
            if folder is not None:
                bank.save(folder)
            if stop_after is not None and n == stop_after:
                break
        return results

    full_bank = MemoryBank.reconstruction(_frames(1, h, w, 0)[0], eloop.K[0], W, H)
    full = run(full_bank, 0)
    folder = tmp_path / "bank"
    first = run(MemoryBank.reconstruction(_frames(1, h, w, 0)[0], eloop.K[0], W, H), 0, stop_after=1, folder=folder)
    resumed_bank = MemoryBank.load(folder)
    rest = run(resumed_bank, len(resumed_bank) // 8, folder=folder)
    assert first + rest == full
    assert resumed_bank == full_bank and MemoryBank.load(folder) == full_bank


def test_interrupted_save_keeps_previous_index(tmp_path, monkeypatch):
    folder = tmp_path / "bank"
    bank = _small_bank()
    bank.save(folder)
    before = MemoryBank.load(folder)
    K = torch.tensor([[20.0, 0, 20], [0, 20, 12], [0, 0, 1]], dtype=torch.float64)
    bank.update_memory(_frames(21, 24, 40, 9), torch.eye(4).repeat(21, 1, 1), K, "view0", "traj0")

    real = bank_module.Image.Image.save
    count = {"n": 0}

    def failing_save(self, fp, *args, **kwargs):
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt("simulated crash while writing a frame")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(bank_module.Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        bank.save(folder)
    monkeypatch.undo()
    assert MemoryBank.load(folder) == before  # the old index and its frames are intact
    assert not list(folder.rglob("*.tmp"))  # no temporary files left behind
    bank.save(folder)
    assert MemoryBank.load(folder) == bank
    index = json.loads((folder / "memory_bank.json").read_text())
    assert len(list((folder / "frames").iterdir())) == len(index["entries"])  # stale files pruned


def test_save_refuses_a_folder_that_is_not_a_bank(tmp_path):
    """Issue 10 item 1: a save into a user's folder deleted its frames/*.png and extras/notes.txt."""
    folder = tmp_path / "mine"
    (folder / "frames").mkdir(parents=True)
    (folder / "extras").mkdir()
    (folder / "frames" / "holiday.png").write_bytes(b"user data")
    (folder / "extras" / "notes.txt").write_text("user notes")
    with pytest.raises(InputError, match="not empty and holds no memory bank"):
        _small_bank().save(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        ["extras/notes.txt", "frames/holiday.png"]
    _small_bank().save(tmp_path / "empty")  # a new folder is fine
    (tmp_path / "made").mkdir()
    _small_bank().save(tmp_path / "made")  # and so is an empty one


def test_save_removes_only_its_own_files_and_never_through_a_link(tmp_path):
    """Issue 10 item 1: files a user added to a bank folder stay, files an earlier save wrote and the
    new index no longer names go, and nothing is deleted through a symlink out of the folder."""
    folder = tmp_path / "bank"
    first = _small_bank(with_extras=True)
    first.save(folder)
    old = json.loads((folder / "memory_bank.json").read_text())["entries"]
    (folder / "frames" / "holiday.png").write_bytes(b"user data")
    (folder / "notes.txt").write_text("user notes")
    outside = tmp_path / "outside"  # extras/ now links out; it holds files named like the bank's own
    (folder / "extras").rename(outside)
    (folder / "extras").symlink_to(outside, target_is_directory=True)
    (outside / "keep.txt").write_text("outside data")
    outside_before = sorted(p.name for p in outside.iterdir())

    second = _small_bank(seed=7)  # other frames, no extras: every old file is stale
    second.save(folder)
    assert MemoryBank.load(folder) == second
    assert sorted(p.name for p in outside.iterdir()) == outside_before  # nothing deleted through the link
    assert (folder / "frames" / "holiday.png").read_bytes() == b"user data"
    assert (folder / "notes.txt").read_text() == "user notes"
    assert not any((folder / e["frame"]).exists() for e in old)  # the first save's frames were its own: pruned
    new = {e["frame"] for e in json.loads((folder / "memory_bank.json").read_text())["entries"]}
    assert {f"frames/{p.name}" for p in (folder / "frames").iterdir()} == new | {"frames/holiday.png"}
    assert not (folder / bank_module.JOURNAL_NAME).exists()


def test_damaged_bank_files_are_named_errors(tmp_path):
    """Issue 10 item 5: a garbage bank PNG or a truncated .npy in a saved bank."""
    bank = _small_bank(with_extras=True)
    bank.save(tmp_path)
    entries = json.loads((tmp_path / "memory_bank.json").read_text())["entries"]
    (tmp_path / entries[3]["frame"]).write_bytes(b"\x89PNG garbage")
    with pytest.raises(CheckpointError, match=entries[3]["frame"]):
        MemoryBank.load(tmp_path)
    bank.save(tmp_path / "other")
    npy = tmp_path / "other" / entries[3]["depth"]
    npy.write_bytes(npy.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=entries[3]["depth"]):
        MemoryBank.load(tmp_path / "other")


def test_load_reports_missing_or_damaged_folder(tmp_path):
    with pytest.raises(InputError, match="no memory bank"):
        MemoryBank.load(tmp_path)
    bank = _small_bank()
    bank.save(tmp_path)
    index = json.loads((tmp_path / "memory_bank.json").read_text())
    (tmp_path / index["entries"][0]["frame"]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        MemoryBank.load(tmp_path)
    (tmp_path / "memory_bank.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        MemoryBank.load(tmp_path)


def test_index_cannot_point_outside_folder(tmp_path):
    bank = _small_bank()
    bank.save(tmp_path / "bank")
    index_path = tmp_path / "bank" / "memory_bank.json"
    index = json.loads(index_path.read_text())
    index["entries"][0]["frame"] = "../../outside.png"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="escape"):
        MemoryBank.load(tmp_path / "bank")


def test_selector_step_check_accepts_any_selection_and_rejects_others():
    """The consistency check used for selector steps: a step produced with image-aware selection
    (other frames, other picks) is accepted when replayed with camera-only selection."""
    from PIL import Image

    from worldstereo_core.cameras import CameraTrajectory
    from worldstereo_core.memory.selector import CameraSelector

    def thumbs(frames):
        return np.stack([np.asarray(Image.fromarray(f).resize((4, 4), Image.BOX), float).ravel() for f in frames])

    K = torch.tensor([[16.0, 0, 16], [0, 16, 12], [0, 0, 1]], dtype=torch.float64)
    bank = MemoryBank(32, 24)
    bank.add(_frames(40, 24, 32, 1), _yaw(np.arange(40) * 9.0), K, [f"s/pano_bank/{i:04d}" for i in range(40)])
    bank.update_memory(_frames(21, 24, 32, 2), _yaw(np.linspace(200, 260, 21)), K, "view0", "traj2")
    traj = CameraTrajectory(_yaw(np.linspace(0, 180, 21)), K, 32, 24)
    ref = retrieve(bank, traj.w2c, traj.K, "view0", "traj0", selector=CameraSelector(thumbs))
    step = {"retrieved_global_indices": ref.retrieved, "ref_index": ref.ref_index.tolist(),
            "ref_index_dict": {str(k): {str(i): v for i, v in d.items()} for k, d in ref.ref_index_dict.items()}}
    ours = retrieve(bank, traj.w2c, traj.K, "view0", "traj0")
    _check_selector_step(bank, traj, "view0", "traj0", step, ours)
    wrong = dict(step, retrieved_global_indices=ref.retrieved[:-1] + [0])
    with pytest.raises(AssertionError):
        _check_selector_step(bank, traj, "view0", "traj0", wrong, ours)


def test_names_are_unique_and_trajectories_known():
    bank = _small_bank()
    assert bank.has_trajectory("view0", "traj2") and not bank.has_trajectory("view0", "traj0")
    with pytest.raises(InputError, match="already exist"):
        bank.update_memory(_frames(21, 24, 40, 3), torch.eye(4).repeat(21, 1, 1), torch.eye(3), "view0", "traj2")
    with pytest.raises(InputError, match="already exist"):
        bank.add(_frames(2, 24, 40, 3), torch.eye(4).repeat(2, 1, 1), torch.eye(3), ["a/b/0001", "a/b/0001"])
    assert len(bank) == 10


def test_selector_step_check_accepts_equally_scored_picks():
    """Bank entries with identical cameras tie exactly; the reference takes the one its selector
    picked first, so a step that resolved the ties in either order is consistent."""
    K = torch.tensor([[16.0, 0, 16], [0, 16, 12], [0, 0, 1]], dtype=torch.float64)
    bank = MemoryBank(32, 24)
    bank.add(_frames(40, 24, 32, 1), _yaw(np.arange(40) * 9.0), K, [f"s/pano_bank/{i:04d}" for i in range(40)])
    # kept traj2 frames at yaw 207, 216, 225, 234, ...: several are exact twins of bank views
    bank.update_memory(_frames(21, 24, 32, 2), _yaw(np.linspace(198, 258, 21)), K, "view0", "traj2")
    traj = CameraTrajectory(_yaw(np.linspace(54, 294, 21)), K, 32, 24)  # target 15 looks at yaw 234
    ours = retrieve(bank, traj.w2c, traj.K, "view0", "traj0")
    tf = FrustumSet.from_cameras(traj.w2c[1:], K, 32, 24)
    score, angle = overlap_scores(tf, bank.frustums)
    forced = shortcut_plan(bank.fnames, "view0", "traj0", 21)
    first_pass, _, _ = assign_references(score, angle, list(range(len(bank))), forced)
    twin_view, twin_traj = bank.fnames.index("s/pano_bank/0026"), bank.fnames.index("view0/traj2/0012")
    assert {twin_view, twin_traj} <= set(first_pass) and torch.equal(score[:, twin_view], score[:, twin_traj])
    others = [g for g in dict.fromkeys(first_pass) if g not in (twin_view, twin_traj)][: bank.max_reference - 2]
    steps = []
    for order in ([twin_view, twin_traj, *others], [twin_traj, twin_view, *others]):
        picked, best, ang = assign_references(score[:, order], angle[:, order], order, {})
        first: dict[int, int] = {}
        for pos, g in enumerate(picked):
            first.setdefault(g, pos)
        steps.append({"retrieved_global_indices": picked, "ref_index": list(first.values()),
                      "ref_index_dict": {str(k): {str(i + 1): {"score": best[i], "angle_diff": ang[i]}
                                                  for i, g in enumerate(picked) if first[g] == k}
                                         for k in first.values()}})
    assert steps[0]["retrieved_global_indices"] != steps[1]["retrieved_global_indices"]
    for step in steps:
        _check_selector_step(bank, traj, "view0", "traj0", step, ours)
