"""Wander trajectories of a panorama scene: our planner in place of the release's unreleased one,
in the z-up world of the panorama bank with the panorama centre at the
origin.

Every trajectory starts at the centre, so each group's start frame is an exact crop of the
panorama. Moves are the reference's (:func:`.trajectories.get_c2w` with azimuths about world +z),
whose obstacle test halves a move that comes too close to the cloud; every trajectory is then
checked strictly (see *Safety*). Lengths below are in units of the scene scale m (median panoramic
distance); "free distance" along a horizontal direction is how far the centre can go before a
cloud point is nearer than 2 x the margin (the cloud's KD-tree sampled every half margin).

Groups, in the release's naming (``type`` is written to camera.json):

* ``view<k>`` (``views`` of them): yaw 180 - 360 k / views (view0 faces the panorama's centre
  column, bank view 0000); pivot = half the free distance ahead (at most m). traj0
  ``right-rotation`` and traj1 ``left-rotation`` orbit the pivot by -/+ ``orbit_deg``; traj2
  ``up-right-aerial`` rises by ``aerial_deg[1]`` (looking down) and then circles right by
  ``aerial_deg[0]``. Evenly spaced yaws and the orbits turn the cameras round the whole horizon;
  the aerials look down towards the floor.
* ``wonder_<k>`` (``explorations``): the most open directions (largest free distance, at least
  360 / (2 x groups) deg apart). traj0 ``exploration`` walks ``walk_fraction`` of the free
  distance (at most ``max_walk`` m) straight into the open space, then turns by ``look_deg``
  (alternately right and left) about a pivot ahead; traj1 does the same walk while rising by
  ``rise`` m and pitching down by ``look_down_deg``.
* ``reconstruct_<k>`` (``reconstructs``): the next most open directions. traj0 ``reconstruct``
  walks half as far as an exploration; traj1 ``reconstruct`` is an ellipse loop (eloop radii 0.3,
  0.4 of a pivot half the free distance ahead) starting and ending at traj0's last pose; the
  multi-trajectory loop starts it from traj0's last generated frame.

Safety: the margin is ``min(clearance m, half the centre's distance to the nearest point)``. A
trajectory is accepted when its camera path (keyframe centres joined by straight segments, sampled
every half margin) stays at least the margin away from every cloud point; otherwise all its move
magnitudes are halved and it is rebuilt (at most :data:`MAX_HALVINGS` times), and as a last resort
the camera keeps its start position (turning in place is not attempted).

Coverage (:func:`sphere_coverage`): the fraction of the scene's directions (equal-area samples of
the sphere; each direction's point at its panoramic distance) that fall inside at least one
trajectory frame.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..cameras import (CameraTrajectory, as_tensor, intrinsics_from_fov, invert_rigid, project_points,
                       world_up_vector)
from ..constants import DEPTH_CONTRACT_FACTOR, NFRAME, PANO_BANK_SIZE
from ..errors import InputError
from .equirect import sample_equirect
from .panorama_depth import panorama_surface
from .trajectories import PANO_BANK_FOV_DEG, get_c2w, median_depth, panorama_look_c2w

#: World up of the panorama frame (azimuth axis of every move).
PANORAMA_UP = world_up_vector("panorama")
#: How often a rejected trajectory's moves are halved before the camera stays put.
MAX_HALVINGS = 4
#: Horizontal directions examined for open space.
OPEN_SPACE_DIRECTIONS = 72
#: Sphere samples of the coverage statistic.
COVERAGE_SAMPLES = 4096


@dataclass(frozen=True)
class WanderOptions:
    """Counts and sizes of the planned trajectories (module docstring). Lengths in units of m."""

    views: int = 4
    explorations: int = 2
    reconstructs: int = 1
    nframe: int = NFRAME
    clearance: float = 0.1
    orbit_deg: float = 50.0
    aerial_deg: tuple[float, float] = (60.0, 45.0)
    walk_fraction: float = 0.6
    max_walk: float = 1.5
    look_deg: float = 45.0
    rise: float = 0.15
    look_down_deg: float = 30.0

    def __post_init__(self) -> None:
        for name in ("views", "explorations", "reconstructs"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 <= value <= 64):
                raise InputError(f"WanderOptions.{name} must be an integer in 0..64, got {value!r}")
        if self.views + self.explorations + self.reconstructs == 0:
            raise InputError("WanderOptions: plan at least one group (views, explorations or reconstructs)")
        if not (isinstance(self.nframe, int) and self.nframe >= 2):
            raise InputError(f"WanderOptions.nframe must be an integer >= 2, got {self.nframe!r}")
        numbers = {"clearance": self.clearance, "orbit_deg": self.orbit_deg, "walk_fraction": self.walk_fraction,
                   "max_walk": self.max_walk, "look_deg": self.look_deg, "rise": self.rise,
                   "look_down_deg": self.look_down_deg, "aerial_deg[0]": self.aerial_deg[0],
                   "aerial_deg[1]": self.aerial_deg[1]}
        for name, value in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InputError(f"WanderOptions.{name} must be a number >= 0, got {value!r}")
        if not 0 < self.clearance < 1 or not 0 < self.walk_fraction <= 1:
            raise InputError("WanderOptions: clearance must be in (0, 1) and walk_fraction in (0, 1]")

    @property
    def trajectory_count(self) -> int:
        """Trajectories planned: three per view group, two per exploration or reconstruct group."""
        return 3 * self.views + 2 * (self.explorations + self.reconstructs)


@dataclass
class PlannedTrajectory:
    """One planned trajectory: where it goes in the scene folder and its cameras (w2c + bank K)."""

    group: str
    traj: str
    kind: str
    trajectory: CameraTrajectory
    #: (group, traj) whose last frame starts this one (the loop's iterative trajectories), else None.
    start_from: tuple[str, str] | None = None
    #: Shrinks by get_c2w's own obstacle test, summed over the moves.
    obstacle_shrinks: int = 0
    #: How often the moves were halved to keep the margin (MAX_HALVINGS + 1 = the camera stayed put).
    halvings: int = 0
    #: Smallest distance of the camera path to the cloud.
    clearance: float = math.inf
    #: A sentence describing the camera motion (appended to the scene prompt in captions).
    caption: str = ""


@dataclass
class WanderPlan:
    """The planned trajectories and the numbers they were planned with."""

    trajectories: list[PlannedTrajectory]
    scale: float
    margin: float
    coverage: float = 0.0
    open_directions: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready numbers of the plan (for the scene's manifest)."""
        return {"scale": self.scale, "margin": self.margin, "coverage": self.coverage,
                "open_directions_deg": self.open_directions,
                "trajectories": [{"group": t.group, "traj": t.traj, "type": t.kind,
                                  "obstacle_shrinks": t.obstacle_shrinks, "halvings": t.halvings,
                                  "clearance": t.clearance} for t in self.trajectories]}


# --------------------------------------------------------------------------------------------
# Distances to the cloud
# --------------------------------------------------------------------------------------------

def path_clearance(c2w: torch.Tensor, tree: cKDTree, step: float) -> float:
    """Smallest distance to the cloud of the camera path: keyframe centres (N, 4, 4 c2w) joined by
    straight segments, sampled at most ``step`` apart."""
    centres = as_tensor(c2w, dtype=torch.float64)[:, :3, 3].numpy()
    samples = [centres[:1]]
    for a, b in zip(centres[:-1], centres[1:]):
        n = max(1, math.ceil(np.linalg.norm(b - a) / step))
        t = np.arange(1, n + 1)[:, None] / n
        samples.append(a + t * (b - a))
    dist, _ = tree.query(np.concatenate(samples), k=1)
    return float(dist.min())


def free_distance(tree: cKDTree, start, direction, margin: float, limit: float) -> float:
    """How far from ``start`` along ``direction`` every point keeps ``margin`` from the cloud (<= limit)."""
    start, direction = np.asarray(start, dtype=np.float64), np.asarray(direction, dtype=np.float64)
    direction = direction / np.linalg.norm(direction)
    step = margin / 2.0
    s = np.arange(1, math.ceil(limit / step) + 1) * step
    dist, _ = tree.query(start + s[:, None] * direction, k=1)
    blocked = np.nonzero(dist < margin)[0]
    return float(limit if len(blocked) == 0 else (s[blocked[0] - 1] if blocked[0] > 0 else 0.0))


def _horizontal(yaw_deg: float) -> np.ndarray:
    a = math.radians(yaw_deg)
    return np.array([math.cos(a), math.sin(a), 0.0])


def open_directions(tree: cKDTree, margin: float, limit: float, count: int,
                    samples: int = OPEN_SPACE_DIRECTIONS) -> tuple[list[float], list[float]]:
    """``count`` horizontal yaws (degrees) with the largest free distance from the centre, at least
    360 / (2 count) deg apart, and their free distances."""
    if count == 0:
        return [], []
    yaws = [360.0 * k / samples - 180.0 for k in range(samples)]
    free = [free_distance(tree, np.zeros(3), _horizontal(y), 2 * margin, limit) for y in yaws]
    separation = 360.0 / (2 * count)
    chosen: list[int] = []
    for k in sorted(range(samples), key=lambda i: (-free[i], i)):
        if all(abs((yaws[k] - yaws[c] + 180.0) % 360.0 - 180.0) >= separation for c in chosen):
            chosen.append(k)
        if len(chosen) == count:
            break
    return [yaws[k] for k in chosen], [free[k] for k in chosen]


# --------------------------------------------------------------------------------------------
# Safe trajectories from reference moves
# --------------------------------------------------------------------------------------------

@dataclass
class _Move:
    """One get_c2w move, its pivot depth and its frame count."""

    move: dict
    pivot: float
    frames: int

    def scaled(self, factor: float) -> "_Move":
        out = copy.deepcopy(self.move)
        for key, value in out.items():
            if key == "rotation":
                out[key] = [v * factor for v in value]
            elif key != "type":
                out[key] = value * factor
        return replace(self, move=out)


def _chain(start: torch.Tensor, moves: list[_Move], tree: cKDTree, margin: float) -> tuple[torch.Tensor, int]:
    poses, shrinks = [start], 0
    for mv in moves:
        new, iterations = get_c2w(poses[-1], mv.move, mv.pivot, 1.0, mv.frames, scene_points=tree,
                                  distance_threshold=margin, up=PANORAMA_UP)
        poses.extend(new)
        shrinks += iterations
    return torch.stack(poses), shrinks


def safe_trajectory(start: torch.Tensor, moves: list[_Move], tree: cKDTree, margin: float
                    ) -> tuple[torch.Tensor, int, int, float]:
    """(c2w (1 + frames, 4, 4), get_c2w shrinks, halvings, clearance) of the chained moves, halved
    until the camera path keeps ``margin`` from the cloud (module docstring, *Safety*)."""
    step = margin / 2.0
    for halvings in range(MAX_HALVINGS + 1):
        c2w, shrinks = _chain(start, [m.scaled(0.5 ** halvings) for m in moves], tree, margin)
        clearance = path_clearance(c2w, tree, step)
        if clearance >= margin:
            return c2w, shrinks, halvings, clearance
    frames = 1 + sum(m.frames for m in moves)
    c2w = start.expand(frames, 4, 4).clone()
    return c2w, shrinks, MAX_HALVINGS + 1, path_clearance(c2w, tree, step)


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------

def _split(total: int, first: float) -> tuple[int, int]:
    a = min(total - 1, max(1, round(first * total)))
    return a, total - a


def plan_wander(distance, mask=None, *, options: WanderOptions | None = None, width: int = PANO_BANK_SIZE[1],
                height: int = PANO_BANK_SIZE[0],
                contract: float | None = DEPTH_CONTRACT_FACTOR) -> WanderPlan:
    """Plan the trajectories of a panorama scene from its equirectangular distance map (H, W; 0 =
    unknown) and mask. The obstacles are every valid pixel's point
    (:func:`.panorama_depth.panorama_surface`, with the cloud's ``contract``), a superset of the
    scene's cloud, so a path clear of them is clear of the cloud. Cameras use the bank's K for
    ``width`` x ``height``."""
    opts = options or WanderOptions()
    surface, valid = panorama_surface(distance, mask, contract)
    pts = surface[valid]
    if len(pts) < 8:
        raise InputError(f"the panorama depth has {len(pts)} valid pixels; planning needs a panoramic depth map")
    tree = cKDTree(pts.numpy())
    m = median_depth(distance, valid)
    nearest = float(tree.query(np.zeros(3), k=1)[0])
    if nearest <= 0:
        raise InputError("a point of the panorama depth lies at the panorama centre; the camera has no room to move")
    margin = min(opts.clearance * m, 0.5 * nearest)
    limit = 4.0 * m
    K = intrinsics_from_fov(width, height, *PANO_BANK_FOV_DEG)
    n = opts.nframe - 1
    plans: list[PlannedTrajectory] = []
    group_ids: dict[str, int] = {}

    def add(group: str, traj: str, kind: str, start: torch.Tensor, moves: list[_Move], caption: str,
            start_from: tuple[str, str] | None = None) -> torch.Tensor:
        c2w, shrinks, halvings, clearance = safe_trajectory(start, moves, tree, margin)
        cams = CameraTrajectory(w2c=invert_rigid(c2w), K=K, width=width, height=height,
                                meta={"id": group_ids.setdefault(group, len(group_ids)), "type": kind})
        plans.append(PlannedTrajectory(group, traj, kind, cams, start_from, shrinks, halvings, clearance, caption))
        return c2w

    def ahead(c2w: torch.Tensor) -> float:
        look = c2w[:3, 2].numpy().copy()
        look[2] = 0.0
        if np.linalg.norm(look) < 1e-6:
            return 0.0
        return free_distance(tree, c2w[:3, 3].numpy(), look, 2 * margin, limit)

    def pivot(free: float) -> float:
        return max(min(0.5 * free, m), margin)

    for k in range(opts.views):
        start = panorama_look_c2w(180.0 - 360.0 * k / opts.views, 0.0)
        p = pivot(ahead(start))
        group = f"view{k}"
        add(group, "traj0", "right-rotation", start,
            [_Move({"type": "normal", "rotation": [-opts.orbit_deg, 0.0]}, p, n)],
            "The camera arcs to the right, turning to keep the view ahead in sight.")
        add(group, "traj1", "left-rotation", start,
            [_Move({"type": "normal", "rotation": [opts.orbit_deg, 0.0]}, p, n)],
            "The camera arcs to the left, turning to keep the view ahead in sight.")
        add(group, "traj2", "up-right-aerial", start,
            [_Move({"type": "aerial", "rotation": [-opts.aerial_deg[0], -opts.aerial_deg[1]]}, p, n)],
            "The camera rises and tilts down, then circles to the right above the scene.")

    yaws, frees = open_directions(tree, margin, limit, opts.explorations + opts.reconstructs)
    walk_frames, turn_frames = _split(n, 0.7)
    for k, (yaw, free) in enumerate(zip(yaws[:opts.explorations], frees[:opts.explorations])):
        start = panorama_look_c2w(yaw, 0.0)
        walk = min(opts.walk_fraction * free, opts.max_walk * m)
        end = start.clone()
        end[:3, 3] += walk * start[:3, 2]
        side = "right" if k % 2 == 0 else "left"
        group = f"wonder_{k}"
        add(group, "traj0", "exploration", start,
            [_Move({"type": "normal", "backward-forward": walk}, m, walk_frames),
             _Move({"type": "normal", "rotation": [opts.look_deg * (-1.0 if side == "right" else 1.0), 0.0]},
                   pivot(ahead(end)), turn_frames)],
            f"The camera moves forward into the open space, then turns to the {side} to look around.")
        lift = opts.rise * m / max(math.sin(math.radians(opts.look_down_deg)), 1e-6)
        add(group, "traj1", "exploration", start,
            [_Move({"type": "normal", "backward-forward": walk, "rotation": [0.0, -opts.look_down_deg]}, lift, n)],
            "The camera moves forward while rising and tilting down towards the floor.")
    for k, (yaw, free) in enumerate(zip(yaws[opts.explorations:], frees[opts.explorations:])):
        start = panorama_look_c2w(yaw, 0.0)
        walk = 0.5 * min(opts.walk_fraction * free, opts.max_walk * m)
        group = f"reconstruct_{k}"
        last = add(group, "traj0", "reconstruct", start, [_Move({"type": "normal", "backward-forward": walk}, m, n)],
                   "The camera moves slowly forward.")[-1]
        add(group, "traj1", "reconstruct", last,
            [_Move({"type": "eloop", "radius_x": 0.3, "radius_y": 0.4}, pivot(ahead(last)), n)],
            "The camera circles in a small loop, looking at the scene ahead.", start_from=(group, "traj0"))

    plan = WanderPlan(plans, m, margin, open_directions=yaws)
    plan.coverage = sphere_coverage([p.trajectory for p in plans], distance, valid)
    return plan


# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------

def fibonacci_sphere(n: int) -> torch.Tensor:
    """``n`` near-uniform unit directions (n, 3) (golden-angle spiral, equal-area bands)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    a = i * math.pi * (3.0 - math.sqrt(5.0))
    r = (1.0 - z * z).clamp_min(0).sqrt()
    return torch.stack([r * a.cos(), r * a.sin(), z], dim=-1)


def sphere_coverage(trajectories: list[CameraTrajectory], distance, mask=None,
                    samples: int = COVERAGE_SAMPLES) -> float:
    """Fraction of the scene's directions seen by at least one frame (module docstring). Directions
    with unknown distance (sky) count with a point far away (1000 x the scene scale)."""
    dist = as_tensor(distance, dtype=torch.float64)
    valid = torch.isfinite(dist) & (dist > 0)
    if mask is not None:
        valid &= torch.as_tensor(mask, dtype=torch.bool)
    far = 1000.0 * median_depth(dist, valid)
    dirs = fibonacci_sphere(samples)
    r = sample_equirect(torch.where(valid, dist, torch.zeros_like(dist)), dirs, mode="nearest")[:, 0].double()
    points = dirs * torch.where(r > 0, r, torch.full_like(r, far))[:, None]
    seen = torch.zeros(samples, dtype=torch.bool)
    for traj in trajectories:
        uv, z = project_points(points, traj.K, traj.w2c)
        seen |= ((z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < traj.width) & (uv[..., 1] >= 0)
                 & (uv[..., 1] < traj.height)).any(dim=0)
    return float(seen.double().mean())
