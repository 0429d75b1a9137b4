"""WorldMirror export against memory_bank_reconstruction.json, K consistency, safety, optional run."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_file
from worldstereo_core.errors import InputError, ToolError
from worldstereo_core.io import worldmirror as wm
from worldstereo_core.io.worldmirror import (
    camera_id, export_worldmirror, name_map_key, run_worldmirror, worldmirror_command,
)
from worldstereo_core.memory.bank import MemoryBank


def _fixture() -> dict:
    return json.loads(fixture_file("geometry", "memory_bank_reconstruction.json").read_text())


def _fixture_bank(fx: dict) -> MemoryBank:
    """The fixture's final bank: its names and cameras, flat frames at the working size."""
    W, H = fx["image_size_wh"]
    h, w = fx["assign_scale_hw"]
    bank = MemoryBank(W, H)
    n = len(fx["final_fnames"])
    bank.add([np.full((h, w, 3), (7 * i) % 256, dtype=np.uint8) for i in range(n)],
             fx["final_ref_w2cs"], fx["final_ref_Ks"], fx["final_fnames"])
    return bank


def test_reference_compatible_export_matches_fixture(tmp_path):
    fx = _fixture()
    bank = _fixture_bank(fx)
    out = export_worldmirror(bank, tmp_path / "wm", fx["scene"], reference_compatible=True)
    assert not out.skipped
    cams = json.loads((tmp_path / "wm" / "cameras.json").read_text())
    exp = fx["worldmirror_cameras_json"]
    assert cams["num_cameras"] == exp["num_cameras"] == len(bank)
    for key in ("extrinsics", "intrinsics"):
        assert [e["camera_id"] for e in cams[key]] == [e["camera_id"] for e in exp[key]]
        got = np.array([e["matrix"] for e in cams[key]])
        want = np.array([e["matrix"] for e in exp[key]])
        scale = max(1.0, np.abs(want[:, :3, 3]).max()) if key == "extrinsics" else np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
    name_map = json.loads((tmp_path / "wm" / "name_map.json").read_text())
    assert name_map == fx["worldmirror_name_map_json"]
    assert sorted(p.name for p in (tmp_path / "wm" / "images").iterdir()) == sorted(fx["worldmirror_image_files"])
    for cid, frame in zip(out.camera_ids, bank.frames):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "wm" / "images" / f"{cid}.png")), frame)


def test_default_export_has_intrinsics_of_the_saved_image(tmp_path):
    fx = _fixture()
    bank = _fixture_bank(fx)
    export_worldmirror(bank, tmp_path, fx["scene"])
    cams = json.loads((tmp_path / "cameras.json").read_text())
    for e, K_bank in zip(cams["intrinsics"], bank.K):
        K = np.array(e["matrix"])
        w, h = Image.open(tmp_path / "images" / f"{e['camera_id']}.png").size
        # independent: row 0 scales with width, row 1 with height
        np.testing.assert_allclose(K[0], K_bank[0].numpy() * w / bank.width, rtol=1e-12)
        np.testing.assert_allclose(K[1], K_bank[1].numpy() * h / bank.height, rtol=1e-12)
        if np.isclose(K_bank[0, 2].item(), bank.width / 2) and np.isclose(K_bank[1, 2].item(), bank.height / 2):
            assert K[0, 2] == pytest.approx(w / 2) and K[1, 2] == pytest.approx(h / 2)


def _pixel_K(K: np.ndarray, size_wh: tuple[int, int], bank_wh: tuple[int, int]) -> np.ndarray:
    """Independent rescale: row 0 scales with the width, row 1 with the height."""
    out = K.copy()
    out[0] *= size_wh[0] / bank_wh[0]
    out[1] *= size_wh[1] / bank_wh[1]
    return out


def test_mixed_sizes_are_exported_at_one_size_with_matching_K(tmp_path):
    """Issue 10 item 9(a): bank views at their own size and generated frames at the working size
    go out at one size (HY-World refuses mixed sizes), each K in pixels of its saved image."""
    bank = MemoryBank(64, 32)
    K = torch.tensor([[32.0, 0, 32], [0, 32, 16], [0, 0, 1]], dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    w2c[1, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 64, 3), dtype=np.uint8), rng.integers(0, 255, (16, 48, 3), dtype=np.uint8),
              rng.integers(0, 255, (16, 48, 3), dtype=np.uint8)]
    bank.add(frames, w2c, K, ["scene/pano_bank/0000", "view0/traj2/0003", "view0/traj2/0007"])
    for folder, size in ((tmp_path / "default", None), (tmp_path / "given", (24, 40))):
        export_worldmirror(bank, folder, "scene", size=size)
        h, w = size or (16, 48)  # default: the newest frame's size
        cams = json.loads((folder / "cameras.json").read_text())
        assert [e["camera_id"] for e in cams["extrinsics"]] == ["pano-0000", "view0-traj2-0003", "view0-traj2-0007"]
        assert np.allclose(cams["extrinsics"][1]["matrix"], np.linalg.inv(w2c[1].numpy()))
        for i, e in enumerate(cams["intrinsics"]):
            saved = Image.open(folder / "images" / f"{e['camera_id']}.png")
            assert saved.size == (w, h)
            np.testing.assert_allclose(e["matrix"], _pixel_K(K.numpy(), (w, h), (64, 32)), rtol=1e-12)
            expected = frames[i] if frames[i].shape[:2] == (h, w) else \
                np.asarray(Image.fromarray(frames[i]).resize((w, h), Image.Resampling.BICUBIC))
            assert np.array_equal(np.asarray(saved), expected)
    assert json.loads((tmp_path / "default" / "name_map.json").read_text()) == {
        "scene/pano_bank/0000": "0000", "view0/traj2/0003": "0001", "view0/traj2/0007": "0002"}


def test_pose_override_replaces_only_the_named_entry(tmp_path):
    bank = MemoryBank(32, 16)
    bank.add([np.zeros((16, 32, 3), np.uint8)] * 2, torch.eye(4).repeat(2, 1, 1), torch.eye(3),
             ["renders/pano_bank/image.png", "renders/traj_up/0003"])
    pitch = torch.tensor([[1.0, 0, 0, 0], [0, 0.96, -0.28, 0.1], [0, 0.28, 0.96, 0.2], [0, 0, 0, 1]], dtype=torch.float64)
    export_worldmirror(bank, tmp_path, "s", poses={"renders/pano_bank/image.png": pitch})
    cams = json.loads((tmp_path / "cameras.json").read_text())
    np.testing.assert_allclose(cams["extrinsics"][0]["matrix"], np.linalg.inv(pitch.numpy()), atol=1e-12)
    np.testing.assert_allclose(cams["extrinsics"][1]["matrix"], np.eye(4))
    with pytest.raises(InputError, match="not in the memory bank"):
        export_worldmirror(bank, tmp_path / "x", "s", poses={"view/traj/0001": pitch})


def test_existing_export_is_skipped(tmp_path):
    fx = _fixture()
    (tmp_path / "cameras.json").write_text("{}")
    out = export_worldmirror(_fixture_bank(fx), tmp_path, fx["scene"])
    assert out.skipped and not (tmp_path / "images").exists()
    assert (tmp_path / "cameras.json").read_text() == "{}"


def test_camera_ids_and_keys():
    assert camera_id("bicycle/pano_bank/0003") == "pano-0003"
    assert camera_id("renders/traj_eloop/0003") == "renders-traj_eloop-0003"
    assert name_map_key("renders/pano_bank/image.png", "bicycle") == "bicycle/pano_bank/image.png"
    assert name_map_key("view0/traj2/0020", "x") == "view0/traj2/0020"


@pytest.mark.parametrize("fname", ["../../evil/traj0/0003", "a/b/../c/0003"])
def test_names_cannot_escape(tmp_path, fname):
    bank = MemoryBank(32, 16)
    bank.add([np.zeros((16, 32, 3), np.uint8)], torch.eye(4)[None], torch.eye(3)[None], [fname])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="path separators"):
        export_worldmirror(bank, out, "scene")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_duplicate_names_rejected(tmp_path):
    bank = MemoryBank(32, 16)
    frames = [np.zeros((16, 32, 3), np.uint8)] * 2
    bank.add(frames, torch.eye(4).repeat(2, 1, 1), torch.eye(3), ["a-b/c/0003", "a/b-c/0003"])  # both a-b-c-0003
    with pytest.raises(InputError, match="duplicate"):
        export_worldmirror(bank, tmp_path, "scene")


def test_run_skips_cleanly_without_hyworld2(tmp_path, monkeypatch):
    monkeypatch.setattr(wm.importlib.util, "find_spec", lambda name: None)
    result = run_worldmirror(tmp_path, runner=lambda *a, **k: pytest.fail("must not run"))
    assert not result.ran and "hyworld2" in result.message


def test_run_builds_documented_command(tmp_path, monkeypatch):
    monkeypatch.setattr(wm, "worldmirror_available", lambda: True)
    with pytest.raises(InputError, match="export_worldmirror"):
        run_worldmirror(tmp_path)
    bank = MemoryBank(32, 16)
    bank.add([np.zeros((16, 32, 3), np.uint8)], torch.eye(4)[None], torch.eye(3)[None], ["s/pano_bank/0000"])
    export_worldmirror(bank, tmp_path, "s")
    seen = {}

    def runner(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="done\n")

    def runner_writing(cmd, **kwargs):
        for name in wm.WORLDMIRROR_OUTPUTS:
            (tmp_path / "results" / name).write_text("x")
        return runner(cmd, **kwargs)

    result = run_worldmirror(tmp_path, runner=runner_writing)
    for name in wm.WORLDMIRROR_OUTPUTS:
        (tmp_path / "results" / name).unlink()
    cmd = seen["cmd"]
    assert result.ran and result.returncode == 0 and (tmp_path / "results" / "worldmirror.log").read_text() == "done\n"
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=1"]
    assert cmd[cmd.index("-m", 2) + 1] == "hyworld2.worldrecon.pipeline"
    for flag, value in (("--input_path", tmp_path / "images"), ("--prior_cam_path", tmp_path / "cameras.json"),
                        ("--strict_output_path", tmp_path / "results"), ("--target_size", "832"),
                        ("--confidence_percentile", "15.0")):
        assert cmd[cmd.index(flag) + 1] == str(value)
    for flag in ("--use_fsdp", "--enable_bf16", "--no_save_normal", "--no_save_gs", "--no_sky_mask",
                 "--apply_edge_mask", "--apply_confidence_mask", "--compress_pts", "--no_interactive"):
        assert flag in cmd
    assert cmd[cmd.index("--disable_heads") + 1:cmd.index("--disable_heads") + 3] == ["gs", "points"]
    assert worldmirror_command(tmp_path, nproc=4)[3] == "--nproc_per_node=4"

    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 3, stdout="boom")

    with pytest.raises(RuntimeError, match="exit code 3"):
        run_worldmirror(tmp_path, runner=failing)
    (tmp_path / "results" / "points.ply").write_text("ply")
    assert not run_worldmirror(tmp_path, runner=failing).ran  # already reconstructed


def test_run_that_makes_nothing_is_an_error_quoting_the_tool(tmp_path, monkeypatch):
    """Issue 10 item 9(b): HY-World prints "Skipping", writes nothing and exits 0; that is not success."""
    monkeypatch.setattr(wm, "worldmirror_available", lambda: True)
    bank = MemoryBank(32, 16)
    bank.add([np.zeros((16, 32, 3), np.uint8)], torch.eye(4)[None], torch.eye(3)[None], ["s/pano_bank/0000"])
    export_worldmirror(bank, tmp_path, "s")
    lines = [f"loading {i}" for i in range(30)] + ["Inconsistent resolutions after preprocessing", "Skipping"]

    def skipping(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout="\n".join(lines))

    with pytest.raises(ToolError) as err:
        run_worldmirror(tmp_path, runner=skipping)
    message = str(err.value)
    assert "points.ply" in message and "Inconsistent resolutions" in message and "Skipping" in message
    assert "loading 0" not in message  # only the last lines are quoted
    assert isinstance(err.value, RuntimeError)

    def partial(cmd, **kwargs):  # points written, cameras missing
        (tmp_path / "results" / "points.ply").write_text("ply")
        return subprocess.CompletedProcess(cmd, 0, stdout="done")

    with pytest.raises(ToolError, match="camera_params.json"):
        run_worldmirror(tmp_path, runner=partial)
    (tmp_path / "results" / "points.ply").unlink()

    def complete(cmd, **kwargs):
        for name in wm.WORLDMIRROR_OUTPUTS:
            (tmp_path / "results" / name).write_text("x")
        return subprocess.CompletedProcess(cmd, 0, stdout="done")

    assert run_worldmirror(tmp_path, runner=complete).ran
