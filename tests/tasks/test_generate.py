"""One clip's request (worldstereo_core.tasks.generate): built at the render's size, and the start
image as the one reference of a memory model's clip without retrieved memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worldstereo_core.cameras import CameraTrajectory
from worldstereo_core.errors import InputError
from worldstereo_core.tasks.generate import clip_request, model_inputs


def _trajectory(frames: int, height: int, width: int) -> CameraTrajectory:
    w2c = torch.eye(4).repeat(frames, 1, 1)
    w2c[:, 0, 3] = torch.linspace(0.0, 0.5, frames)
    K = torch.tensor([[0.8 * width, 0, width / 2], [0, 0.8 * width, height / 2], [0, 0, 1]]).repeat(frames, 1, 1)
    return CameraTrajectory(w2c=w2c, K=K, width=width, height=height)


def _render(frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(frames, 3, height, width, generator=g) * 2 - 1,
            (torch.rand(frames, 1, height, width, generator=g) > 0.7).float())


def test_clip_request_is_at_the_render_size():
    render, holes = _render(5, 16, 24)
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    traj = _trajectory(5, 32, 48)
    request = clip_request(image, render, holes, traj, prompt="p", seed=3)
    request.check()
    assert request.image.shape == (16, 24, 3)
    assert (request.trajectory.height, request.trajectory.width) == (16, 24)
    # K is rescaled with the image (half the size: half the focal length and principal point)
    assert torch.allclose(request.trajectory.K[:, :2], traj.K[:, :2] / 2)
    assert torch.equal(request.trajectory.w2c, traj.w2c)
    assert request.references is None and request.seed == 3


def test_start_reference_is_the_start_image_at_frame_one():
    render, holes = _render(4, 16, 24)
    image = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    request = clip_request(image, render, holes, _trajectory(4, 16, 24)).with_start_reference()
    request.check()
    assert np.array_equal(request.references, image[None])
    assert request.ref_index.tolist() == [0]
    assert torch.equal(request.ref_w2cs, request.trajectory.w2c[:1])
    inputs = model_inputs(request, memory=True)
    assert inputs.reference_video.shape == (1, 3, 1, 16, 24)


@pytest.mark.parametrize("what, fragment", [("mask", "hole mask"), ("trajectory", "trajectory has 3 cameras")])
def test_clip_request_names_the_input_that_does_not_fit(what, fragment):
    render, holes = _render(4, 16, 24)
    traj = _trajectory(4, 16, 24)
    if what == "mask":
        holes = holes[:, :, :8]
    else:
        traj = _trajectory(3, 16, 24)
    with pytest.raises(InputError, match=fragment):
        clip_request(np.zeros((16, 24, 3), np.uint8), render, holes, traj)
