"""The camera-trajectory preview: payload format, builder dispatch and HTTP route.

``web/trajectory_preview.js`` draws what this module produces, from two sources:

* after execution, a trajectory node returns ``{"ui": preview_ui(entry, ...), "result": ...}``
  and the frontend hands that ``ui`` dict to the node's ``onExecuted``;
* before execution (live, as widgets change), the browser POSTs the node's widget values to
  ``ROUTE``; the server calls the node class's ``preview_trajectory(**inputs)`` classmethod,
  which returns the same ui dict.

Payload (``ui`` dict)::

    {"worldstereo_trajectory": [            # one entry per trajectory
        {"c2w": [[[4x4]], ...],              # camera-to-world per frame, OpenCV axes
         "K": [[[3x3]], ...],                # pixel intrinsics per frame, for width x height
         "width": int, "height": int,
         "label": str,                       # optional
         "depth_range": [near, far],         # optional: scene depth seen from the first camera
         "points": [[x, y, z, r, g, b], ...] # optional: subsampled cloud, rgb 0..255
        }, ...]}
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

from ..worldstereo_core.cameras import CameraTrajectory
from ..worldstereo_core.errors import InputError, WorldStereoError

log = logging.getLogger(__name__)

PAYLOAD_KEY = "worldstereo_trajectory"
ROUTE = "/worldstereo/trajectory_preview"
#: Name of the classmethod a trajectory node implements to serve live previews.
PREVIEW_METHOD = "preview_trajectory"
MAX_POINTS = 4000
MAX_CAMERAS = 512


def _nested(t: torch.Tensor, digits: int) -> list:
    return torch.round(t.detach().to(torch.float64), decimals=digits).tolist()


def trajectory_entry(
    trajectory: CameraTrajectory,
    *,
    label: Optional[str] = None,
    points: Optional[torch.Tensor] = None,
    colors: Optional[torch.Tensor] = None,
    depth_range: Optional[Sequence[float]] = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
) -> dict:
    """One payload entry for ``trajectory``.

    ``points`` (N,3) world coordinates with optional ``colors`` (N,3) (uint8, or float 0..1),
    randomly subsampled (fixed ``seed``) to at most ``max_points``.
    """
    n = len(trajectory)
    if n == 0:
        raise InputError("trajectory preview: the trajectory has no cameras")
    if n > MAX_CAMERAS:
        trajectory = trajectory.select(torch.linspace(0, n - 1, MAX_CAMERAS).round().long().tolist())
    entry: dict = {"c2w": _nested(trajectory.c2w, 6), "K": _nested(trajectory.K, 4), "width": trajectory.width,
                   "height": trajectory.height}
    if label:
        entry["label"] = str(label)
    if depth_range is not None:
        near, far = (float(v) for v in depth_range)
        if not (math.isfinite(near) and math.isfinite(far) and 0 < near < far):
            raise InputError(f"trajectory preview: depth_range must be 0 < near < far, got {near}, {far}")
        entry["depth_range"] = [round(near, 6), round(far, 6)]
    if points is not None:
        entry["points"] = _points(points, colors, max_points, seed)
    return entry


def _points(points: torch.Tensor, colors: Optional[torch.Tensor], max_points: int, seed: int) -> list:
    points = torch.as_tensor(points).detach().cpu().reshape(-1, 3).to(torch.float64)
    if colors is None:
        colors = torch.full_like(points, 200.0)
    else:
        colors = torch.as_tensor(colors).detach().cpu().reshape(-1, 3)
        if colors.shape[0] != points.shape[0]:
            raise InputError(f"trajectory preview: {points.shape[0]} points but {colors.shape[0]} colours")
        colors = colors.to(torch.float64) if colors.dtype == torch.uint8 else colors.to(torch.float64) * 255.0
    keep = torch.isfinite(points).all(dim=1)
    points, colors = points[keep], colors[keep]
    if points.shape[0] > max_points:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(points.shape[0], generator=gen)[:max_points].sort().values
        points, colors = points[idx], colors[idx]
    rgb = colors.round().clamp(0, 255).to(torch.int64).tolist()
    xyz = torch.round(points, decimals=4).tolist()
    return [p + c for p, c in zip(xyz, rgb)]


def preview_ui(*entries: dict) -> dict:
    """The ``ui`` dict (and route response) carrying one or more trajectory entries."""
    return {PAYLOAD_KEY: list(entries)}


def build_preview(node_type: str, inputs: dict) -> dict:
    """Live preview for a node's widget values: dispatch to its ``preview_trajectory``.

    Values for names the node does not declare (frontend-only widgets such as a seed's
    ``control_after_generate``) are dropped.
    """
    from . import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS.get(node_type)
    builder = getattr(cls, PREVIEW_METHOD, None)
    if builder is None:
        raise InputError(f"node type {node_type!r} has no trajectory preview")
    if not isinstance(inputs, dict):
        raise InputError("trajectory preview: 'inputs' must be an object of widget values")
    declared = cls.INPUT_TYPES()
    names = set(declared.get("required", {})) | set(declared.get("optional", {}))
    payload = builder(**{k: v for k, v in inputs.items() if k in names})
    if not isinstance(payload, dict) or not isinstance(payload.get(PAYLOAD_KEY), list):
        raise TypeError(f"{node_type}.{PREVIEW_METHOD} must return preview_ui(...), got {type(payload).__name__}")
    return payload


def handle_preview_request(body) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a POST to ``ROUTE`` with ``{"node_type", "inputs"}``."""
    if not isinstance(body, dict) or not isinstance(body.get("node_type"), str):
        return 400, {"error": "expected a JSON object {\"node_type\": str, \"inputs\": {...}}"}
    try:
        return 200, build_preview(body["node_type"], body.get("inputs") or {})
    except (WorldStereoError, TypeError, ValueError) as err:
        return 400, {"error": str(err)}


def register_routes() -> bool:
    """Add ``POST ROUTE`` to ComfyUI's server (once); False when no server is running."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    if getattr(server, "_worldstereo_routes", False):
        return True

    @server.routes.post(ROUTE)
    async def trajectory_preview(request):
        from aiohttp import web

        try:
            body = await request.json()
        except ValueError:
            body = None
        status, payload = handle_preview_request(body)
        if status != 200:
            log.info("trajectory preview request failed: %s", payload.get("error"))
        return web.json_response(payload, status=status)

    server._worldstereo_routes = True
    return True
