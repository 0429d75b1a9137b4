"""Depth -> point cloud (spec/geometry.md §4) against the reference fixture and independent math."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import fixtures_root
from worldstereo_core.cameras import invert_rigid
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.depth import (
    DEPTH_ENCODINGS, boundary_mask, contract_depth, depth_from_values, image_to_rgb01, lift_depth, load_depth_map,
    load_point_map, points_from_pointmap, resize_depth,
)


def _depth_fixtures() -> list:
    root = fixtures_root() / "geometry"
    return sorted(root.glob("pointcloud_from_depth*.npz")) if root.is_dir() else []


def _case_ids(paths):
    return [p.stem for p in paths]


@pytest.fixture(params=_depth_fixtures() or [None], ids=_case_ids(_depth_fixtures()) or ["absent"])
def depth_case(request):
    if request.param is None:
        pytest.skip(f"no pointcloud_from_depth*.npz under {fixtures_root() / 'geometry'} (set WORLDSTEREO_FIXTURES)")
    with np.load(request.param, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _tol(depth: np.ndarray) -> float:
    """Fixture README: atol = 1e-4 * max(1, scale), scale = median depth."""
    return 1e-4 * max(1.0, float(np.median(depth[depth > 0])))


def test_lift_depth_matches_reference(depth_case):
    c = depth_case
    cloud = lift_depth(c["depth"], c["image"], c["K"], c["w2c"], mask=c.get("valid_mask"),
                       sobel_threshold=float(c["sobel_threshold"]), contract=float(c["contract"]))
    exp_p, exp_c = c["expected_points"], c["expected_colors"]
    assert cloud.xyz.shape == exp_p.shape  # same survivors, same row-major order
    assert np.abs(cloud.xyz.numpy() - exp_p).max() <= _tol(c["depth"])
    assert np.abs(cloud.rgb_signed.numpy() - exp_c).max() <= 1e-5


def test_boundary_mask_matches_reference(depth_case):
    expected = depth_case["expected_boundary_mask_of_input"].reshape(depth_case["depth"].shape)
    got = boundary_mask(depth_case["depth"], float(depth_case["sobel_threshold"])).numpy()
    assert np.array_equal(got, expected)


def test_contraction_independent():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 4.0, size=(10, 12)).astype(np.float64)
    depth[0, :4] = [0.0, 50.0, 200.0, 1e4]
    depth[3, 3] = 0.0
    pos = np.sort(depth[depth > 0])
    mid = 8.0 * pos[(len(pos) - 1) // 2]  # lower median
    expected = np.where(depth > mid, 2 * mid - mid ** 2 / (depth + 1e-6), depth)
    got = contract_depth(torch.from_numpy(depth)).numpy()
    assert np.abs(got - expected).max() < 1e-9
    assert got.max() < 2 * mid and np.all(np.diff(got[0, 1:4]) > 0)  # monotone, bounded


def test_boundary_mask_independent_sobel():
    """Edge map of a hole-free depth checked against scipy's Sobel (unnormalised, 'nearest' = replicate)."""
    yy, xx = np.mgrid[0:20, 0:28]
    depth = (2.0 + 0.05 * xx + 0.3 * np.sin(yy / 3.0)).astype(np.float64)
    depth[5:12, 8:15] = 0.8  # a near box: strong disparity edges
    disp = 1.0 / (depth + 1e-7)
    disp = (disp - disp.min()) / (disp.max() - disp.min() + 1e-6)
    g = np.hypot(ndimage.sobel(disp, axis=1, mode="nearest"), ndimage.sobel(disp, axis=0, mode="nearest"))
    for thr in (0.35, 0.8):
        expected = np.exp(-10 * g) < thr
        got = boundary_mask(torch.from_numpy(depth), thr).numpy()
        assert np.array_equal(got, expected)
    assert boundary_mask(torch.from_numpy(depth), 0.35).any()


def _independent_keep(depth: np.ndarray, thr: float, contract: bool) -> np.ndarray:
    d = depth.astype(np.float64)
    if contract:
        pos = np.sort(d[d > 0])
        mid = 8.0 * pos[(len(pos) - 1) // 2]
        d = np.where(d > mid, 2 * mid - mid ** 2 / (d + 1e-6), d)
    disp = 1.0 / (d + 1e-7)
    disp = (disp - disp.min()) / (disp.max() - disp.min() + 1e-6)
    g = np.hypot(ndimage.sobel(disp, axis=1, mode="nearest"), ndimage.sobel(disp, axis=0, mode="nearest"))
    return (depth > 0) & ~(np.exp(-10 * g) < thr)


def test_edges_come_from_contracted_depth():
    """Near / middle / far bands: at this threshold only the raw depth would make the middle-far
    step an edge, so the surviving points tell which depth the edge test used."""
    depth = np.ones((12, 24))
    depth[:, 14:19] = 5.0
    depth[:, 19:] = 100.0  # beyond 8 x median -> contracted
    thr = float(np.exp(-6.7))
    keep_c, keep_r = _independent_keep(depth, thr, True), _independent_keep(depth, thr, False)
    assert keep_c.sum() != keep_r.sum()
    cloud = lift_depth(depth, np.zeros((12, 24, 3), np.uint8), np.diag([10.0, 10.0, 1.0]), np.eye(4),
                       sobel_threshold=thr)
    assert len(cloud) == keep_c.sum()
    v, u = np.nonzero(keep_c)
    assert np.allclose(cloud.xyz[:, 0].numpy() / cloud.xyz[:, 2].numpy(), (u + 0.5) / 10.0, atol=1e-6)


def test_lift_depth_unprojects_through_pixel_centres():
    H, W = 6, 8
    depth = np.full((H, W), 2.0, np.float32)
    K = np.array([[10.0, 0, 4.0], [0, 12.0, 3.0], [0, 0, 1]])
    R = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, [0.5, -1.0, 3.0]
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.arange(W, dtype=np.uint8)[None] * 30
    cloud = lift_depth(depth, img, K, w2c, sobel_threshold=0.0)  # threshold 0: no edges
    v, u = np.mgrid[0:H, 0:W]
    cam = np.stack([(u + 0.5 - 4.0) / 10.0 * 2, (v + 0.5 - 3.0) / 12.0 * 2, np.full_like(u, 2.0, float)], -1)
    world = (cam.reshape(-1, 3) - w2c[:3, 3]) @ R  # R^T (x - t) as row vectors
    assert np.abs(cloud.xyz.numpy() - world).max() < 1e-5
    assert np.allclose(cloud.rgb.numpy()[:, 0], (img[..., 0].reshape(-1) / 255.0))


def test_lift_depth_mask_and_layouts():
    H, W = 8, 10
    depth = np.full((H, W), 3.0, np.float32)
    mask = np.ones((H, W), bool)
    mask[:, :3] = False
    img_chw = np.linspace(-1, 1, 3 * H * W, dtype=np.float32).reshape(3, H, W)
    a = lift_depth(depth, img_chw, np.diag([5.0, 5.0, 1.0]), np.eye(4), mask=mask, sobel_threshold=0.0)
    b = lift_depth(torch.from_numpy(depth)[None, None], torch.from_numpy(img_chw).permute(1, 2, 0)[None] * 0.5 + 0.5,
                   torch.eye(3)[None] * torch.tensor([5.0, 5.0, 1.0]), torch.eye(4)[None], mask=mask, sobel_threshold=0.0)
    assert len(a) == mask.sum() == len(b)
    assert torch.allclose(a.xyz, b.xyz) and torch.allclose(a.rgb, b.rgb, atol=1e-6)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((6, 6)), "zero everywhere"),
    (np.full((6, 6), np.nan), "NaN"),
    (np.full((6, 6), -1.0), "negative"),
])
def test_lift_depth_rejects_bad_depth(bad, msg):
    with pytest.raises(InputError, match=msg):
        lift_depth(bad, np.zeros((6, 6, 3), np.uint8), np.eye(3), np.eye(4))


def test_lift_depth_rejects_too_few_points_and_mismatch():
    depth = np.zeros((6, 6), np.float32)
    depth[0, :8 // 2] = 1.0  # 4 valid pixels
    with pytest.raises(InputError, match="at least"):
        lift_depth(depth, np.zeros((6, 6, 3), np.uint8), np.eye(3), np.eye(4), sobel_threshold=0.0)
    with pytest.raises(InputError, match="does not match"):
        lift_depth(np.ones((6, 6)), np.zeros((5, 6, 3), np.uint8), np.eye(3), np.eye(4))
    with pytest.raises(InputError, match="3x3"):
        lift_depth(np.ones((6, 6)), np.zeros((6, 6, 3), np.uint8), np.eye(4), np.eye(4))


def test_image_ranges():
    assert torch.allclose(image_to_rgb01(torch.full((3, 2, 2), -1.0)), torch.zeros(2, 2, 3))
    assert torch.allclose(image_to_rgb01(np.full((2, 2, 3), 255, np.uint8)), torch.ones(2, 2, 3))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        image_to_rgb01(np.full((2, 2, 3), 2.0, np.float32))


def test_points_from_pointmap_camera_and_world():
    H, W = 5, 7
    rng = np.random.default_rng(1)
    pm = rng.normal(size=(H, W, 3)).astype(np.float32)
    pm[..., 2] = np.abs(pm[..., 2]) + 1
    pm[0, 0] = np.inf
    img = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    world = points_from_pointmap(pm, img)
    assert len(world) == H * W - 1 and np.allclose(world.xyz.numpy(), pm.reshape(-1, 3)[1:])
    w2c = np.eye(4)
    w2c[:3, 3] = [1.0, 2.0, 3.0]
    c2w = invert_rigid(torch.from_numpy(w2c)).numpy()
    placed = points_from_pointmap(pm, img, c2w=c2w, mask=np.arange(H * W).reshape(H, W) % 2 == 0)
    keep = (np.arange(H * W) % 2 == 0) & np.isfinite(pm.reshape(-1, 3)).all(1)
    assert np.allclose(placed.xyz.numpy(), pm.reshape(-1, 3)[keep] - [1.0, 2.0, 3.0], atol=1e-6)
    assert np.allclose(placed.rgb.numpy(), img.reshape(-1, 3)[keep] / 255.0)


def test_depth_files(tmp_path):
    import cv2

    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 9.0, size=(7, 9)).astype(np.float32)
    np.save(tmp_path / "d.npy", depth)
    np.savez(tmp_path / "d.npz", depth=depth, other=np.zeros(3))
    assert torch.equal(load_depth_map(tmp_path / "d.npy"), torch.from_numpy(depth))
    assert torch.equal(load_depth_map(tmp_path / "d.npz"), torch.from_numpy(depth))
    mm = np.rint(depth * 1000).astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "d.png"), mm)
    assert np.allclose(load_depth_map(tmp_path / "d.png").numpy(), mm / 1000.0)
    assert np.allclose(load_depth_map(tmp_path / "d.png", png_scale=100.0).numpy(), mm / 100.0)
    cv2.imwrite(str(tmp_path / "d8.png"), (depth * 10).astype(np.uint8))
    with pytest.raises(InputError, match="16-bit"):
        load_depth_map(tmp_path / "d8.png")
    np.savez(tmp_path / "two.npz", a=depth, b=depth)
    with pytest.raises(InputError, match="key="):
        load_depth_map(tmp_path / "two.npz")
    (tmp_path / "d.txt").write_text("1 2 3")
    with pytest.raises(InputError, match="unsupported"):
        load_depth_map(tmp_path / "d.txt")
    with pytest.raises(InputError, match="not found"):
        load_depth_map(tmp_path / "absent.npy")
    pm = rng.normal(size=(4, 5, 3)).astype(np.float32)
    np.savez(tmp_path / "pm.npz", points=pm[None])
    assert torch.equal(load_point_map(tmp_path / "pm.npz"), torch.from_numpy(pm))


def test_damaged_depth_files_are_named_errors(tmp_path):
    """Issue 10 item 5: truncated, empty or object-dtype .npy files and a corrupt .npz raised raw
    numpy/zipfile errors."""
    depth = np.ones((8, 8), np.float32)
    np.save(tmp_path / "good.npy", depth)
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"depth": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "no_values.npy", np.zeros((0,), np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    np.savez(tmp_path / "good.npz", depth=depth)
    zdata = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "corrupt.npz").write_bytes(zdata[:40] + b"\0" * 64 + zdata[104:])
    (tmp_path / "cut.npz").write_bytes(zdata[: len(zdata) // 2])
    for name in ("truncated.npy", "empty.npy", "objects.npy", "no_values.npy", "text.npy", "corrupt.npz", "cut.npz"):
        with pytest.raises(InputError) as err:
            load_depth_map(tmp_path / name)
        assert name in str(err.value), name
    with pytest.raises(InputError, match="objects"):
        load_depth_map(tmp_path / "objects.npy")


def test_resize_depth_keeps_values():
    depth = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    out = resize_depth(depth, 4, 6)
    assert out.shape == (4, 6) and set(out.unique().tolist()) == {0.0, 2.0, 3.0, 4.0}


def test_depth_from_values_encodings():
    v = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    scaled, near_bright, far_bright = DEPTH_ENCODINGS
    assert torch.equal(depth_from_values(v, scaled, 4.0, 0.5, 10.0), v * 4.0)  # 0 stays invalid
    near, far = 0.5, 10.0
    disparity = 1.0 / far + v.double() * (1.0 / near - 1.0 / far)  # bright = near: linear in 1/depth
    assert torch.allclose(depth_from_values(v, near_bright, 1.0, near, far).double(), 1.0 / disparity, rtol=1e-6)
    assert torch.allclose(depth_from_values(v, far_bright, 1.0, near, far), torch.tensor([[0.5, 2.875], [5.25, 10.0]]))
    with pytest.raises(InputError, match="near < far"):
        depth_from_values(v, far_bright, 1.0, 10.0, 0.5)
    with pytest.raises(InputError, match="encoding must be one of"):
        depth_from_values(v, "inverse", 1.0, near, far)
