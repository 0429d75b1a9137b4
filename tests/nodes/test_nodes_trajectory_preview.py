"""The trajectory-preview payload (what web/trajectory_preview.js draws) and its route."""
from __future__ import annotations

import asyncio
import importlib
import json

import numpy as np
import pytest
import torch
from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)


@pytest.fixture
def tp(comfy_stub):
    return importlib.import_module(f"{comfy_stub.pack.__name__}.nodes.trajectory_preview")


@pytest.fixture
def core(comfy_stub):
    name = comfy_stub.pack.__name__
    return {m: importlib.import_module(f"{name}.worldstereo_core.{m}") for m in ("cameras", "errors")}


def _random_w2c(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] *= -1
        out[i, :3, :3] = q
        out[i, :3, 3] = rng.normal(size=3)
    return out


def _trajectory(core, n=5, width=64, height=48, seed=0):
    K = np.array([[50.0, 0, width / 2], [0, 52.0, height / 2], [0, 0, 1]])
    return core["cameras"].CameraTrajectory(w2c=torch.tensor(_random_w2c(n, seed)), K=torch.tensor(K),
                                            width=width, height=height)


def test_entry_holds_c2w_and_K(tp, core):
    traj = _trajectory(core, n=6)
    entry = tp.trajectory_entry(traj, label="orbit")
    json.dumps(entry)  # plain JSON
    c2w = np.array(entry["c2w"])
    assert c2w.shape == (6, 4, 4)
    np.testing.assert_allclose(c2w, np.linalg.inv(traj.w2c.numpy()), atol=2e-6)
    np.testing.assert_allclose(np.array(entry["K"]), traj.K.numpy(), atol=1e-4)
    assert (entry["width"], entry["height"], entry["label"]) == (64, 48, "orbit")
    assert "points" not in entry and "depth_range" not in entry


def test_points_are_subsampled_deterministically(tp, core):
    traj = _trajectory(core)
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(1000, 3, generator=gen)
    points[5] = float("nan")
    colors = torch.rand(1000, 3, generator=gen)
    entry = tp.trajectory_entry(traj, points=points, colors=colors, max_points=100)
    again = tp.trajectory_entry(traj, points=points, colors=colors, max_points=100)
    assert entry["points"] == again["points"] and len(entry["points"]) == 100
    kept = np.array(entry["points"], dtype=np.float64)
    dist = np.linalg.norm(kept[:, None, :3] - points.numpy()[None].astype(np.float64), axis=2)
    dist = np.nan_to_num(dist, nan=np.inf)
    nearest = dist.argmin(axis=1)  # every kept point is an input point, with its own colour
    assert dist.min(axis=1).max() < 1e-4 and len(set(nearest.tolist())) == 100
    np.testing.assert_allclose(kept[:, 3:], np.round(colors.numpy()[nearest] * 255), atol=0.5)
    small = tp.trajectory_entry(traj, points=points[:10], colors=(colors[:10] * 255).to(torch.uint8))
    assert len(small["points"]) == 9  # the NaN point is dropped
    assert all(0 <= v <= 255 for p in small["points"] for v in p[3:])


def test_entry_validation(tp, core):
    errors = core["errors"]
    traj = _trajectory(core)
    with pytest.raises(errors.InputError, match="depth_range"):
        tp.trajectory_entry(traj, depth_range=(2.0, 1.0))
    assert tp.trajectory_entry(traj, depth_range=(0.5, 3.0))["depth_range"] == [0.5, 3.0]
    with pytest.raises(errors.InputError, match="colours"):
        tp.trajectory_entry(traj, points=torch.zeros(4, 3), colors=torch.zeros(3, 3))
    with pytest.raises(errors.InputError, match="no cameras"):
        tp.trajectory_entry(traj.select([]))
    long = _trajectory(core, n=tp.MAX_CAMERAS + 40)
    assert len(tp.trajectory_entry(long)["c2w"]) == tp.MAX_CAMERAS


class _PreviewNode:
    """A trajectory node as phase 2 will write it: a widget-driven preview classmethod."""

    calls: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 3})}, "optional": {"radius": ("FLOAT", {"default": 1.0})}}

    @classmethod
    def preview_trajectory(cls, frames, radius=1.0):
        cls.calls.append((frames, radius))
        if frames < 1:
            raise cls.errors.InputError("frames: must be at least 1")
        w2c = torch.eye(4).repeat(frames, 1, 1)
        w2c[:, 0, 3] = torch.arange(frames) * radius
        traj = cls.cameras.CameraTrajectory(w2c=w2c, K=torch.tensor([[10.0, 0, 8], [0, 10.0, 6], [0, 0, 1]]),
                                            width=16, height=12)
        return cls.tp.preview_ui(cls.tp.trajectory_entry(traj))


@pytest.fixture
def preview_node(comfy_stub, tp, core, monkeypatch):
    node = type("PreviewNode", (_PreviewNode,), {"calls": [], "tp": tp, **core})
    monkeypatch.setitem(comfy_stub.pack.nodes.NODE_CLASS_MAPPINGS, "WorldStereoTestPreview", node)
    return node


def test_request_dispatches_to_node(tp, preview_node):
    status, body = tp.handle_preview_request(
        {"node_type": "WorldStereoTestPreview", "inputs": {"frames": 4, "radius": 0.5, "control_after_generate": "fixed"}})
    assert status == 200 and preview_node.calls == [(4, 0.5)]
    (entry,) = body[tp.PAYLOAD_KEY]
    centers = np.array(entry["c2w"])[:, :3, 3]
    np.testing.assert_allclose(centers[:, 0], -0.5 * np.arange(4), atol=1e-9)  # C = -R^T t
    assert (entry["width"], entry["height"]) == (16, 12)


@pytest.mark.parametrize("body, fragment", [
    ({"node_type": "WorldStereoTestPreview", "inputs": {"frames": 0}}, "frames: must be at least 1"),
    ({"node_type": "WorldStereoNoSuchNode", "inputs": {}}, "no trajectory preview"),
    ({"node_type": "WorldStereoTestPreview", "inputs": "frames=3"}, "'inputs' must be an object"),
    ({"inputs": {}}, "node_type"),
    (None, "node_type"),
    ({"node_type": "WorldStereoTestPreview", "inputs": {}}, "frames"),  # missing required widget
])
def test_bad_requests_get_400_with_reason(tp, preview_node, body, fragment):
    status, payload = tp.handle_preview_request(body)
    assert status == 400 and fragment in payload["error"]


def test_route_registered_once_on_server(comfy_stub, tp):
    routes = comfy_stub.server.PromptServer.instance.routes
    handler = routes.find("POST", tp.ROUTE)
    assert handler is not None and asyncio.iscoroutinefunction(handler)
    comfy_stub.pack.nodes.register_with_comfy()
    assert sum(1 for m, p, _h in routes if (m, p) == ("POST", tp.ROUTE)) == 1
    assert tp.ROUTE.startswith("/worldstereo/")
