"""Equirectangular panoramas: the direction convention, seam-free sampling, the 27 bank crops and
re-assembly from perspective views.

The synthetic scene is the inside of a textured box (:func:`synthetic_scene.panorama_room`)
rendered by ray casting, once as a 256 x 512 panorama and once directly into each camera. Stated
tolerances (8-bit levels; measured on this scene: max 1, mean 0.11):

* bank crops (60 x 104, the bank cameras at 1/8 of 832 x 480) vs direct renders: max <= 2, mean <= 0.3,
  including the views across the 0/360 seam (yaw +-20 deg) and views at the poles;
* a panorama re-assembled from the 27 direct renders vs the direct panorama: max <= 3 where covered;
* release bank crops (every example scene): re-assembled at 512 x 1024 and cropped again, mean <= 3.5
  (two bilinear resamplings of a real photo; measured 2.4).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import example_dirs
from synthetic_scene import panorama_room
from worldstereo_core.cameras import CameraTrajectory, intrinsics_from_fov, invert_rigid
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.equirect import (check_panorama_size, directions_to_uv, equirect_directions,
                                                equirect_from_views, panorama_bank_crops, perspective_from_equirect,
                                                pixel_solid_angles, sample_equirect, uv_to_directions)
from worldstereo_core.geometry.trajectories import panorama_bank_cameras, panorama_look_c2w
from worldstereo_core.io.camera_json import load_bank_cameras
from worldstereo_core.io.images import load_image

PANO_SCENES = example_dirs("panorama")


@pytest.fixture(scope="module")
def room_panorama():
    room = panorama_room()
    return room, *room.equirect(256, 512)


def _renders(room, cams: CameraTrajectory) -> np.ndarray:
    return np.stack([room.image(cams.K[i], cams.w2c[i], cams.height, cams.width) for i in range(len(cams))])


def test_convention():
    """Centre column looks along -x (bank view 0000), right in the image = the camera's right,
    top row looks up; pixel solid angles cover the sphere."""
    assert torch.allclose(uv_to_directions(torch.tensor(0.5), torch.tensor(0.5)),
                          torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float32), atol=1e-6)
    _, bank = panorama_bank_cameras()
    right = invert_rigid(bank.w2c[0])[:3, 0]  # camera x of view 0000 in the world
    step = uv_to_directions(torch.tensor(0.51, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    assert float(step @ right) > 0
    dirs = equirect_directions(8, 16)
    assert bool((dirs[0, :, 2] > 0.9).all()) and bool((dirs[-1, :, 2] < -0.9).all())
    assert math.isclose(float((pixel_solid_angles(8, 16) * 16).sum()), 4 * math.pi, rel_tol=1e-12)
    u, v = torch.rand(100, dtype=torch.float64), torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    u2, v2 = directions_to_uv(uv_to_directions(u, v) * 3.0)
    assert torch.allclose(u2, u, atol=1e-12) and torch.allclose(v2, v, atol=1e-12)


def test_sampling_is_continuous_across_seam_and_poles():
    """On a noise panorama (neighbouring pixels unrelated) bilinear samples just either side of the
    0/360 seam, and either side of each pole along a great circle, agree."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    eps = 1e-7
    for z in (-0.6, 0.0, 0.7):
        r = math.sqrt(1 - z * z)
        a = torch.tensor([[r * math.cos(eps), r * math.sin(eps), z], [r * math.cos(eps), -r * math.sin(eps), z]],
                         dtype=torch.float64)
        s = sample_equirect(noise, a)
        assert float((s[0] - s[1]).abs().max()) < 1e-3
    for sign in (1.0, -1.0):
        for azimuth in (0.3, 2.0):
            c, s_ = math.cos(azimuth), math.sin(azimuth)
            pair = torch.tensor([[math.sin(eps) * c, math.sin(eps) * s_, sign * math.cos(eps)],
                                 [-math.sin(eps) * c, -math.sin(eps) * s_, sign * math.cos(eps)]], dtype=torch.float64)
            s = sample_equirect(noise, pair)
            assert float((s[0] - s[1]).abs().max()) < 1e-3
    # far from the pole the two sides differ: the check above can fail
    far = torch.tensor([[0.3, 0.0, 0.95], [-0.3, 0.0, 0.95]], dtype=torch.float64)
    assert float((sample_equirect(noise, far)[0] - sample_equirect(noise, far)[1]).abs().max()) > 1


def test_bank_crops_equal_direct_renders(room_panorama):
    room, pano, _ = room_panorama
    keys, cams, crops = panorama_bank_crops(pano, 104, 60)
    assert keys == [f"{i:04d}" for i in range(27)] and crops.shape == (27, 60, 104, 3) and crops.dtype == np.uint8
    err = np.abs(crops.astype(int) - _renders(room, cams).astype(int))
    assert err.max() <= 2 and err.mean() <= 0.3
    # the views across the 0/360 seam are among them (pixels on both sides of azimuth 0)
    c2w = invert_rigid(cams.w2c)
    from worldstereo_core.cameras import pixel_rays
    rays = torch.einsum("fij,hwj->fhwi", c2w[:, :3, :3], pixel_rays(cams.K[0], 60, 104))
    azimuth = torch.rad2deg(torch.atan2(rays[..., 1], rays[..., 0]))
    crosses = [k for k in range(27) if bool((azimuth[k].abs() < 3).any()) and bool((azimuth[k] > 3).any())
               and bool((azimuth[k] < -3).any())]
    assert {"0006", "0007"} <= {keys[k] for k in crosses}
    for k in crosses:
        assert err[k].max() <= 2


def test_pole_views_equal_direct_renders(room_panorama):
    room, pano, _ = room_panorama
    c2w = panorama_look_c2w([0.0, 37.0, 200.0, 0.0], [90.0, -90.0, 89.9, -89.5])
    cams = CameraTrajectory(invert_rigid(c2w), intrinsics_from_fov(64, 48, 100, 85), 64, 48)
    views = perspective_from_equirect(pano, cams)
    err = np.abs(views.astype(int) - _renders(room, cams).astype(int))
    assert err.max() <= 2 and err.mean() <= 0.3


def test_float_panoramas_give_float_views(room_panorama):
    _, pano, distance = room_panorama
    cams = panorama_bank_cameras(52, 30)[1].select([0, 5])
    views = perspective_from_equirect(distance.float(), cams)
    assert views.dtype == torch.float32 and views.shape == (2, 30, 52, 1)
    assert float(views.min()) > 1.0  # distances of the room, not rounded to uint8


def test_equirect_from_views_inverts_the_crops(room_panorama):
    room, _, _ = room_panorama
    _, cams = panorama_bank_cameras(208, 120)
    pano, covered = equirect_from_views(_renders(room, cams), cams, 128, 256)
    truth, _ = room.equirect(128, 256)
    assert pano.dtype == np.uint8
    # the bank reaches 71.6 + 45 deg up and down at the image corners but not the poles themselves
    assert bool(covered[64].all()) and not bool(covered[0].any())
    err = np.abs(pano.astype(int) - truth.astype(int))[covered.numpy()]
    assert err.max() <= 3
    assert (pano[~covered.numpy()] == 0).all()


@pytest.mark.parametrize("scene", PANO_SCENES, ids=lambda p: p.name)
def test_release_crops_survive_reassembly(scene):
    keys, cams = load_bank_cameras(scene / "pano_bank", width=832, height=480)
    present = [i for i, k in enumerate(keys) if (scene / "pano_bank" / "images" / f"{k}.png").is_file()]
    if not present:
        pytest.skip(f"{scene.name} has no bank images")
    images = np.stack([load_image(scene / "pano_bank" / "images" / f"{keys[i]}.png") for i in present])
    sub = cams.select(present)
    pano, covered = equirect_from_views(images, sub, 512, 1024)
    again = perspective_from_equirect(pano, sub)
    assert again.shape == images.shape
    assert np.abs(again.astype(int) - images.astype(int)).mean() <= 3.5


def test_bad_panoramas():
    for h, w in ((100, 150), (100, 201), (8, 16)):
        with pytest.raises(InputError):
            check_panorama_size(h, w)
    assert check_panorama_size(100, 200) == (100, 200)
    with pytest.raises(InputError, match="2:1"):
        perspective_from_equirect(np.zeros((40, 60, 3), np.uint8), panorama_bank_cameras(52, 30)[1])
