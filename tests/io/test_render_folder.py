"""Render folders (render.mp4, render_mask.mp4, camera.json): round trip and the example scenes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import examples_root
from worldstereo_core.cameras import CameraTrajectory
from worldstereo_core.errors import InputError
from worldstereo_core.io.camera_json import load_camera_json
from worldstereo_core.io.render_folder import load_render_folder, save_render_folder
from worldstereo_core.io.scene_layout import CAMERA_FILE, MASK_VIDEO, RENDER_VIDEO
from worldstereo_core.io.video import read_mask_video, read_video, write_video


def _example_render_folders() -> list[Path]:
    """Every render folder of the example scenes: reconstruction renders/traj_*, panorama <view>/traj*."""
    root = examples_root()
    found = list(root.glob("reconstruction/*/renders/traj_*")) + list(root.glob("panorama/*/*/traj*"))
    return sorted(p for p in found if (p / RENDER_VIDEO).is_file())


def _start_image(folder: Path) -> Path:
    if folder.parent.name == "renders":  # reconstruction: <scene>/renders/traj_*
        return folder.parent.parent / "image.png"
    return folder.parent / "start_frame.png"  # panorama: <scene>/<view>/traj*


def _synthetic(n=5, h=36, w=50, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.stack([np.sin(xx / 9 + k), np.cos(yy / 7), np.full((h, w), 0.2 * k - 0.4)])
                    for k in range(n)])
    rgb = torch.tensor(rgb, dtype=torch.float32) * 0.8
    mask = torch.zeros(n, 1, h, w)
    for k in range(1, n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        mask[k, 0][torch.tensor((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)] = 1.0
    rgb = torch.where(mask > 0.5, torch.zeros_like(rgb), rgb)  # holes carry the background
    w2c = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    w2c[:, 0, 3] = torch.arange(n) * 0.1
    K = torch.tensor([[40.0, 0, w / 2], [0, 40.0, h / 2], [0, 0, 1]], dtype=torch.float64)
    return rgb, mask, CameraTrajectory(w2c=w2c, K=K, width=w, height=h, meta={"type": "test"})


def test_save_and_load_round_trip(tmp_path):
    rgb, mask, traj = _synthetic()
    folder = save_render_folder(tmp_path / "traj0", rgb, mask, traj)
    assert sorted(p.name for p in folder.iterdir()) == sorted([RENDER_VIDEO, MASK_VIDEO, CAMERA_FILE])
    render, m, t = load_render_folder(folder, 36, 50)
    assert render.shape == rgb.shape and m.shape == mask.shape
    assert (render - rgb).abs().mean() < 0.05  # H.264, yuv420p chroma, 8-bit truncation
    assert torch.equal(m[1:], mask[1:]) and (m[0] == 0).all()
    assert torch.allclose(t.w2c, traj.w2c) and torch.allclose(t.K, traj.K) and t.meta == traj.meta
    # reference appearance: holes mid-grey in render.mp4, white in render_mask.mp4
    raw = read_video(folder / RENDER_VIDEO)
    holes = mask[:, 0].numpy() > 0.5
    assert abs(np.median(raw[holes]) - 127) <= 2
    raw_mask = read_video(folder / MASK_VIDEO)
    assert np.median(raw_mask[holes]) >= 250 and np.median(raw_mask[~holes]) <= 5


def test_load_resizes_replaces_frame0_and_clips(tmp_path):
    rgb, mask, traj = _synthetic(h=36, w=50)
    folder = save_render_folder(tmp_path / "t", rgb * 1.3, mask, traj)  # out of range on purpose
    image = torch.rand(3, 24, 40) * 2 - 1
    render, m, _ = load_render_folder(folder, 24, 40, image=image)
    assert render.shape == (5, 3, 24, 40) and m.shape == (5, 1, 24, 40)
    assert torch.equal(render[0], image)
    assert render.min() >= -1 and render.max() <= 1
    # nearest resize picks source pixel floor(i * in / out) (checked independently of torch)
    src = read_mask_video(folder / MASK_VIDEO)
    rows = np.floor(np.arange(24) * 36 / 24).astype(int)
    cols = np.floor(np.arange(40) * 50 / 40).astype(int)
    expected = src[:, rows][:, :, cols]
    assert np.array_equal(m[1:, 0].numpy(), expected[1:]) and (m[0] == 0).all()
    assert set(np.unique(m.numpy())) <= {0.0, 1.0}


def test_frame0_mask_kept_unless_cleared(tmp_path):
    """The release keeps the file's frame-0 hole mask; only iterative trajectories clear it."""
    rgb, mask, traj = _synthetic()
    mask[0, 0, :, :20] = 1.0  # a start view with holes (e.g. a generated start frame's render)
    folder = save_render_folder(tmp_path / "t", rgb, mask, traj)
    _, kept, _ = load_render_folder(folder, 36, 50)
    assert torch.equal(kept, mask)
    _, cleared, _ = load_render_folder(folder, 36, 50, clear_first_mask=True)
    assert (cleared[0] == 0).all() and torch.equal(cleared[1:], mask[1:])


def test_load_subsamples_longer_folders(tmp_path):
    rgb, mask, traj = _synthetic()  # 5 frames
    folder = save_render_folder(tmp_path / "t", rgb, mask, traj)
    full, full_mask, full_traj = load_render_folder(folder, 36, 50)
    render, m, t = load_render_folder(folder, 36, 50, nframe=3)
    keep = [0, 2, 4]  # floor(linspace(0, 4, 3)), as camera files are subsampled
    assert torch.equal(render, full[keep]) and torch.equal(m, full_mask[keep])
    assert torch.equal(t.w2c, full_traj.w2c[keep]) and torch.equal(t.w2c, full_traj.subsample(3).w2c)
    assert len(load_render_folder(folder, 36, 50, nframe=8)[0]) == 5  # never longer


def test_bad_render_folders(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_render_folder(tmp_path / "absent", 16, 16)
    rgb, mask, traj = _synthetic()
    folder = save_render_folder(tmp_path / "t", rgb, mask, traj)
    with pytest.raises(InputError, match="image"):
        load_render_folder(folder, 36, 50, image=torch.zeros(3, 10, 10))
    write_video(folder / MASK_VIDEO, np.zeros((3, 36, 50, 3), np.uint8))
    with pytest.raises(InputError, match="frames"):
        load_render_folder(folder, 36, 50)
    (folder / CAMERA_FILE).unlink()
    with pytest.raises(InputError, match=CAMERA_FILE):
        load_render_folder(folder, 36, 50)
    with pytest.raises(InputError, match="mask"):
        save_render_folder(tmp_path / "u", rgb, mask[:, :, :10], traj)
    with pytest.raises(InputError, match="trajectory"):
        save_render_folder(tmp_path / "u", rgb, mask, traj.select([0, 1]))


@pytest.mark.parametrize("folder", _example_render_folders() or [None],
                         ids=lambda p: "/".join(p.parts[-3:]) if p else "none")
def test_example_render_folders(folder):
    if folder is None:
        pytest.skip(f"no example render folders under {examples_root()} (set WORLDSTEREO_EXAMPLES)")
    raw = read_video(folder / RENDER_VIDEO)
    raw_mask = read_mask_video(folder / MASK_VIDEO)
    n, h, w, _ = raw.shape
    assert raw_mask.shape == (n, h, w) and n == len(load_camera_json(folder / CAMERA_FILE))
    assert 0 < raw_mask[1:].mean() < 1
    assert abs(np.median(raw[1:][raw_mask[1:] > 0.5]) - 127) <= 3  # holes are mid-grey
    start = np.asarray(Image.open(_start_image(folder)).convert("RGB"))
    if start.shape == raw[0].shape:
        assert np.abs(raw[0].astype(int) - start).mean() < 15  # frame 0 = input image (codec error)

    render, mask, traj = load_render_folder(folder, h, w)
    assert len(traj) == n and render.shape == (n, 3, h, w) and mask.shape == (n, 1, h, w)
    assert torch.equal(mask[:, 0], torch.from_numpy(raw_mask))  # the file's mask, frame 0 included
    assert torch.allclose(render, torch.from_numpy(raw).permute(0, 3, 1, 2) / 255 * 2 - 1)


def test_example_render_folder_at_a_working_size():
    folders = _example_render_folders()
    if not folders:
        pytest.skip(f"no example render folders under {examples_root()} (set WORLDSTEREO_EXAMPLES)")
    raw_mask = read_mask_video(folders[0] / MASK_VIDEO)
    render, mask, _ = load_render_folder(folders[0], 480, 768)  # a bucket size, aspect changed
    n = len(raw_mask)
    assert render.shape == (n, 3, 480, 768) and mask.shape == (n, 1, 480, 768)
    assert render.min() >= -1 and render.max() <= 1
    assert abs(mask.mean().item() - raw_mask.mean()) < 0.01
