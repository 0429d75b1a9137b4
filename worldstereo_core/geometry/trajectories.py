"""Camera trajectories: the reference ``get_c2w`` vocabulary, the four reconstruction
trajectories, the 27-view panorama bank, chained moves and resampling.

Poses are camera-to-world float64 torch tensors internally; what leaves this module as a
:class:`~worldstereo_core.cameras.CameraTrajectory` holds world-to-camera matrices, like every
camera.json. Conventions (OpenCV axes, pixel K) are those of :mod:`worldstereo_core.cameras`;
primitive moves and their sign semantics are in :mod:`.moves`.

Scale: trajectory magnitudes are relative to the scene scale ``m`` = median depth of the start
view (:func:`median_depth`); ``normal`` translations are ``air_bound * s``.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..cameras import (CameraTrajectory, as_tensor, intrinsics_from_fov, invert_rigid, look_at_rotation,
                       make_pose, rot_x, world_down_vector, world_up_vector)
from ..constants import NFRAME, PANO_BANK_SIZE
from ..errors import InputError
from ..io.scene_layout import ELOOP_TRAJ, LEFT_TRAJ, RIGHT_TRAJ, UP_TRAJ
from .moves import (camera_backward_forward, camera_left_right, camera_rotation, interpolate_poses,
                    native_camera_rotation)

#: Poses are densified to this many before the obstacle (k-NN clearance) test.
OBSTACLE_DENSE_POSES = 80
#: Neighbours averaged for the clearance of a camera centre to the scene points.
OBSTACLE_NEIGHBOURS = 5

MOVE_TYPES = ("normal", "eloop", "aerial")
NORMAL_KEYS = ("rotation", "backward-forward", "left-right")


# --------------------------------------------------------------------------------------------
# Scene scale
# --------------------------------------------------------------------------------------------

def median_depth(depth, mask=None) -> float:
    """Scene scale m: median of the valid (finite, > 0, and in ``mask``) depth values.

    For an even count this is the **lower** middle value (torch.median), the same statistic the
    reference's depth contraction uses, so the pack has one median.
    """
    d = as_tensor(depth, dtype=torch.float64).flatten()
    valid = torch.isfinite(d) & (d > 0)
    if mask is not None:
        valid &= as_tensor(mask, dtype=torch.bool, device=d.device).flatten()
    if not bool(valid.any()):
        raise InputError("depth map has no valid pixels (finite and > 0); check the depth input or its mask")
    return float(d[valid].median())


# --------------------------------------------------------------------------------------------
# get_c2w: one move of the reference vocabulary
# --------------------------------------------------------------------------------------------

def _check_move(move: Mapping) -> str:
    if not isinstance(move, Mapping) or move.get("type") not in MOVE_TYPES:
        raise InputError(f"move {move!r} needs 'type' in {MOVE_TYPES}")
    kind = move["type"]
    if kind == "normal":
        unknown = [k for k in move if k not in NORMAL_KEYS + ("type",)]
        if unknown:
            raise InputError(f"normal move has unknown keys {unknown}; allowed: {NORMAL_KEYS}")
    required = {"normal": (), "eloop": ("radius_x", "radius_y"), "aerial": ("rotation",)}[kind]
    for key in required:
        if key not in move:
            raise InputError(f"{kind} move needs key '{key}'")
    for key, value in move.items():
        if key == "type":
            continue
        values = value if key == "rotation" else [value]
        if key == "rotation" and (not isinstance(value, (list, tuple)) or len(value) != 2):
            raise InputError(f"move key 'rotation' must be [phi_deg, theta_deg], got {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise InputError(f"move key '{key}' must hold finite numbers, got {value!r}")
    return kind


def _normal_poses(start: torch.Tensor, move: Mapping, m: float, air_bound: float, n: int, up) -> list:
    """Each pose j applies every key of ``move`` scaled by j/n, in key order, to the start pose."""
    out = []
    for j in range(1, n + 1):
        f = j / n
        c2w = start.clone()
        for key, value in move.items():
            if key == "rotation":
                phi, theta = value[0] * f, value[1] * f
                if phi != 0 or theta != 0:
                    c2w = camera_rotation(c2w, m, math.radians(phi), math.radians(theta), up=up)
            elif key == "backward-forward" and value != 0:
                c2w = camera_backward_forward(c2w, air_bound * value * f)
            elif key == "left-right" and value != 0:
                c2w = camera_left_right(c2w, air_bound * value * f)
        out.append(c2w)
    return out


def _eloop_poses(start: torch.Tensor, rx: float, ry: float, m: float, n: int) -> list:
    """Closed ellipse (rx sin a, ry cos a - ry, 0) in the start camera frame, looking at (0,0,m)."""
    a = torch.arange(1, n + 1, dtype=torch.float64) * (2 * math.pi / n)
    centres = torch.stack([rx * torch.sin(a), ry * torch.cos(a) - ry, torch.zeros_like(a)], dim=-1)
    target = torch.tensor([0.0, 0.0, m], dtype=torch.float64).expand_as(centres)
    R = look_at_rotation(centres, target, up=(0.0, 1.0, 0.0))
    return list(start @ make_pose(R, centres))


def _aerial_split(phi: float, theta: float, n: int) -> tuple[int, int]:
    """(n_phi, n_theta): frames of the azimuth and the elevation phase."""
    n_phi = round(abs(phi) / (abs(phi) + abs(theta)) * n)
    return n_phi, n - n_phi


def _aerial_poses(start: torch.Tensor, phi: float, theta: float, m: float, n: int, up) -> list:
    """Elevation-only orbit over n_theta poses, then azimuth-only from the last of them."""
    if phi == 0 and theta == 0:
        return [start.clone() for _ in range(n)]
    n_phi, n_theta = _aerial_split(phi, theta, n)
    out = [camera_rotation(start, m, 0.0, math.radians(theta * j / n_theta), up=up)
           for j in range(1, n_theta + 1)]
    base = out[-1] if out else start
    out += [camera_rotation(base, m, math.radians(phi * j / n_phi), 0.0, up=up) for j in range(1, n_phi + 1)]
    return out


def _clearance(poses: torch.Tensor, tree: cKDTree) -> np.ndarray:
    """Mean distance of the k nearest scene points to each (densified) camera centre."""
    dense = poses if len(poses) >= OBSTACLE_DENSE_POSES else interpolate_poses(poses, OBSTACLE_DENSE_POSES)
    k = min(OBSTACLE_NEIGHBOURS, tree.n)
    dist, _ = tree.query(dense[:, :3, 3].numpy(), k=k)
    return dist.reshape(len(dense), k).mean(axis=1)


def _collision_parts(clear: np.ndarray, threshold: float, n: int, n_theta: int) -> tuple[bool, bool]:
    """Whether colliding dense poses fall in the elevation part (original index < n_theta)."""
    hits = np.nonzero(clear < threshold)[0]
    pos = hits * (n - 1) / max(len(clear) - 1, 1)  # dense index -> fractional original index
    in_elev = pos <= n_theta - 1 + 1e-9
    return bool(in_elev.any()), bool((~in_elev).any())


def get_c2w(c2w_start, move: Mapping, median_depth: float, air_bound: float = 1.0, n_inter: int = 20, *,
            scene_points=None, distance_threshold: float = 0.02, obs_decay: float = 0.5, obs_limit: int = 4,
            up=None) -> tuple[torch.Tensor, int]:
    """``n_inter`` c2w poses (start excluded) for one move, and the obstacle shrink count.

    ``move`` (reference schema): ``{"type": "normal", "rotation": [phi_deg, theta_deg],
    "backward-forward": s, "left-right": s}`` (keys applied in dict order, translations
    ``air_bound * s``), ``{"type": "eloop", "radius_x": fx, "radius_y": fy}`` (fractions of m) or
    ``{"type": "aerial", "rotation": [phi_deg, theta_deg]}``.

    ``scene_points`` (N,3 world points or a scipy cKDTree) enables the obstacle test: while the
    smallest clearance (mean distance of the 5 nearest points, over poses densified to 80) is below
    ``min(distance_threshold, 0.1 m)``, at most ``obs_limit + 1`` times: ``normal`` keeps the first
    ``floor(obs_decay * n)`` poses and re-interpolates them to n; ``eloop`` scales both radii by
    ``obs_decay``; ``aerial`` scales theta (collision in the elevation part) and/or phi (azimuth
    part) by ``obs_decay``. (The reference's alternative exact point-mesh distance is not
    offered: pass mesh vertices or surface samples as points.) ``up`` selects the azimuth rule
    (see :func:`moves.camera_rotation`; None = the reference dispatcher).
    """
    kind = _check_move(move)
    start = as_tensor(c2w_start, dtype=torch.float64)
    if start.shape != (4, 4):
        raise InputError(f"c2w_start must be 4x4, got {tuple(start.shape)}")
    m, n = float(median_depth), int(n_inter)
    if not (math.isfinite(m) and m > 0):
        raise InputError(f"median_depth must be a positive number (the scene scale), got {median_depth!r}")
    if n < 1:
        raise InputError(f"n_inter must be >= 1, got {n_inter!r}")
    if not math.isfinite(float(air_bound)):
        raise InputError(f"air_bound must be a finite number, got {air_bound!r}")
    threshold = min(distance_threshold, 0.1 * m)

    params = dict(move)
    if kind == "eloop":
        params["radius_x"], params["radius_y"] = params["radius_x"] * m, params["radius_y"] * m

    def build(p) -> torch.Tensor:
        if kind == "normal":
            poses = _normal_poses(start, p, m, air_bound, n, up)
        elif kind == "eloop":
            poses = _eloop_poses(start, p["radius_x"], p["radius_y"], m, n)
        else:
            poses = _aerial_poses(start, p["rotation"][0], p["rotation"][1], m, n, up)
        return torch.stack(poses)

    poses = build(params)
    tree = _as_tree(scene_points)
    iteration = 0
    while tree is not None and iteration <= obs_limit:
        clear = _clearance(poses, tree)
        if clear.min() >= threshold:
            break
        if kind == "normal":
            keep = max(1, int(obs_decay * len(poses)))
            poses = interpolate_poses(poses[:keep], n)
        else:
            if kind == "eloop":
                params["radius_x"] *= obs_decay
                params["radius_y"] *= obs_decay
            else:
                phi, theta = params["rotation"]
                elev, azim = _collision_parts(clear, threshold, n, _aerial_split(phi, theta, n)[1])
                params["rotation"] = [phi * obs_decay if azim else phi, theta * obs_decay if elev else theta]
            poses = build(params)
        iteration += 1
    return poses, iteration


def _as_tree(scene_points) -> cKDTree | None:
    if scene_points is None or isinstance(scene_points, cKDTree):
        return scene_points
    pts = as_tensor(scene_points, dtype=torch.float64).cpu().numpy().reshape(-1, 3)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        raise InputError("scene_points for the obstacle test holds no finite points")
    return cKDTree(pts)


# --------------------------------------------------------------------------------------------
# The four reconstruction trajectories
# --------------------------------------------------------------------------------------------

#: eloop radii (fractions of m), elevation of traj_up and azimuth of traj_left / traj_right.
RECON_ELOOP_RADII = (0.3, 0.4)
RECON_UP_DEG = -45.0
RECON_SIDE_DEG = 180.0


def start_pitch(c2w) -> float:
    """Downward pitch (radians) of the optical axis in a y-down world: ``asin(R[1,2])``."""
    return math.asin(max(-1.0, min(1.0, float(as_tensor(c2w)[1, 2]))))


def level_frame(c2w, pitch: float) -> torch.Tensor:
    """The start pose with its pitch removed, ``c2w Rx(pitch)``: the frame the orbits are built in."""
    return as_tensor(c2w) @ make_pose(rot_x(pitch), torch.zeros(3))


def _level_orbit(c2w0: torch.Tensor, pitch: float, d: float, phis, thetas) -> torch.Tensor:
    """``L Orbit(I; d, phi, theta) L^-1 c2w0`` for each angle pair, L = level frame of c2w0."""
    L = level_frame(c2w0, pitch)
    rel = invert_rigid(L) @ c2w0  # = Rx(-pitch)
    eye = torch.eye(4, dtype=torch.float64)
    return torch.stack([L @ native_camera_rotation(eye, d, p, t) @ rel for p, t in zip(phis, thetas)])


def reconstruction_trajectories(start_w2c, K, width: int, height: int, median_depth: float,
                                up_distance: float | None = None, *, pitch_deg: float | None = None,
                                nframe: int = NFRAME) -> dict[str, CameraTrajectory]:
    """``traj_eloop``, ``traj_up``, ``traj_left``, ``traj_right`` from a start w2c and scene scale m.

    Frame 0 is the start view in all four; with i = 0..nframe-1 and s = i/(nframe-1):

    * eloop: start + ``get_c2w`` eloop (radius 0.3 m, 0.4 m);
    * up: elevation orbit to -45 deg about the point ``up_distance`` (default m) ahead, built in
      the level frame and re-pitched;
    * left / right: +/-180 deg azimuth orbit about the vertical through the look-at point, radius
      ``m cos(pitch)``, pitch preserved.

    ``pitch_deg`` (downward) defaults to the start pose's pitch in a y-down world (:func:`start_pitch`).
    """
    c2w0 = invert_rigid(as_tensor(start_w2c, dtype=torch.float64))
    if c2w0.shape != (4, 4):
        raise InputError(f"start_w2c must be a 4x4 matrix, got {tuple(c2w0.shape)}")
    m = float(median_depth)
    if not (math.isfinite(m) and m > 0):
        raise InputError(f"median_depth must be a positive number, got {median_depth!r}")
    d_up = m if up_distance is None else float(up_distance)
    if not (math.isfinite(d_up) and d_up > 0):
        raise InputError(f"up_distance must be a positive number, got {up_distance!r}")
    if nframe < 2:
        raise InputError(f"nframe must be >= 2, got {nframe}")
    pitch = start_pitch(c2w0) if pitch_deg is None else math.radians(pitch_deg)
    n = nframe - 1
    s = [i / n for i in range(nframe)]
    zeros = [0.0] * nframe
    eloop, _ = get_c2w(c2w0, {"type": "eloop", "radius_x": RECON_ELOOP_RADII[0],
                              "radius_y": RECON_ELOOP_RADII[1]}, m, n_inter=n)
    side = math.radians(RECON_SIDE_DEG)
    r = m * math.cos(pitch)
    c2ws = {
        ELOOP_TRAJ: torch.cat([c2w0[None], eloop]),
        UP_TRAJ: _level_orbit(c2w0, pitch, d_up, zeros, [math.radians(RECON_UP_DEG) * f for f in s]),
        LEFT_TRAJ: _level_orbit(c2w0, pitch, r, [side * f for f in s], zeros),
        RIGHT_TRAJ: _level_orbit(c2w0, pitch, r, [-side * f for f in s], zeros),
    }
    K0 = _first_intrinsic(K)
    return {name: CameraTrajectory(w2c=invert_rigid(c2w), K=K0.expand(nframe, 3, 3).clone(),
                                   width=width, height=height)
            for name, c2w in c2ws.items()}


def _first_intrinsic(K) -> torch.Tensor:
    """The start view's 3x3 K (every generated frame uses it) from a (3,3) or (F,3,3) input."""
    K = as_tensor(K, dtype=torch.float64)
    if K.shape[-2:] != (3, 3) or K.dim() not in (2, 3) or K.numel() == 0:
        raise InputError(f"K must be a 3x3 pixel intrinsic matrix (or a stack of them), got shape {tuple(K.shape)}")
    return K if K.dim() == 2 else K[0]


# --------------------------------------------------------------------------------------------
# Panorama bank
# --------------------------------------------------------------------------------------------

PANO_BANK_YAWS_DEG = (140.0, 100.0, 60.0, 20.0, -20.0, -60.0, -100.0, -140.0)
PANO_BANK_PITCH_DEG = math.degrees(math.atan(0.5))
PANO_BANK_FOV_DEG = (120.0, 90.0)


def panorama_bank_views() -> list[tuple[float, float]]:
    """(yaw, pitch) in degrees of the 27 bank views, in key order 0000..0026 (world z up)."""
    p = PANO_BANK_PITCH_DEG
    views = [(180.0, 0.0), (180.0, p), (180.0, -p)]
    for pitch in (0.0, p, -p):
        views += [(yaw, pitch) for yaw in PANO_BANK_YAWS_DEG]
    return views


def panorama_look_c2w(yaw_deg, pitch_deg, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """c2w (..., 4, 4) of level cameras (no roll) in the z-up panorama world.

    Look direction ``(cos p cos y, cos p sin y, sin p)`` (yaw y from +x towards +y, pitch p up);
    camera x is horizontal right and y points down the image.
    """
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float64))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float64))
    look = torch.stack([pitch.cos() * yaw.cos(), pitch.cos() * yaw.sin(), pitch.sin()], dim=-1)
    center = torch.as_tensor(center, dtype=torch.float64).expand_as(look)
    R = look_at_rotation(torch.zeros_like(look), look, up=world_down_vector("panorama"))
    return make_pose(R, center)


def panorama_bank_cameras(width: int = PANO_BANK_SIZE[1], height: int = PANO_BANK_SIZE[0]
                          ) -> tuple[list[str], CameraTrajectory]:
    """The 27 perspective bank cameras: centre at the origin, no roll, 120 x 90 deg field of view
    (:func:`panorama_look_c2w` at :func:`panorama_bank_views`)."""
    views = panorama_bank_views()
    c2w = panorama_look_c2w([v[0] for v in views], [v[1] for v in views])
    K = intrinsics_from_fov(width, height, *PANO_BANK_FOV_DEG)
    keys = [f"{i:04d}" for i in range(len(views))]
    return keys, CameraTrajectory(w2c=invert_rigid(c2w), K=K, width=width, height=height)


# --------------------------------------------------------------------------------------------
# Chained moves and resampling
# --------------------------------------------------------------------------------------------

#: Extra per-move keys understood by :func:`trajectory_from_moves` (stripped before get_c2w).
CHAIN_KEYS = ("frames", "pivot")


def _split_frames(moves: Sequence[Mapping], total: int) -> list[int]:
    """Frames per move: explicit ``frames`` kept, the rest of ``total`` shared evenly (later ones +1)."""
    fixed = sum(int(mv["frames"]) for mv in moves if "frames" in mv)
    free = [i for i, mv in enumerate(moves) if "frames" not in mv]
    out = [int(mv.get("frames", 0)) for mv in moves]
    if free:
        q, r = divmod(max(total - fixed, len(free)), len(free))
        for k, i in enumerate(free):
            out[i] = q + (1 if k >= len(free) - r else 0)
    return out


def trajectory_from_moves(start_w2c, K, moves: Sequence[Mapping], median_depth: float, *,
                          width: int, height: int, air_bound: float | None = None, nframe: int | None = NFRAME,
                          up=world_up_vector("reconstruction"), scene_points=None) -> CameraTrajectory:
    """Chain ``get_c2w`` moves, each starting from the last pose of the previous one.

    Each move dict is a ``get_c2w`` move plus optional ``frames`` (poses it adds; moves without
    it share the remaining ``nframe - 1`` evenly) and ``pivot`` (the move's depth m' as a multiple
    of m, default 1: orbit pivot, eloop radius unit and obstacle threshold; 0 turns the camera in
    place, ``normal`` moves only). Frame 0 is the start view. When the moves' frames
    do not add up to ``nframe - 1`` the result is resampled to ``nframe`` (:func:`resample_trajectory`);
    ``nframe=None`` keeps every pose.

    ``air_bound`` (translation unit of ``normal`` moves) defaults to m. ``up`` is the world up
    vector of the azimuth rule (:func:`cameras.world_up_vector`; default: the y-down worlds of the
    single-view and reconstruction files; None = the reference dispatcher, see
    :func:`moves.camera_rotation`). ``scene_points`` enables the obstacle test of :func:`get_c2w`.
    """
    if not moves:
        raise InputError("trajectory_from_moves needs at least one move")
    m = float(median_depth)
    if not (math.isfinite(m) and m > 0):
        raise InputError(f"median_depth must be a positive number, got {median_depth!r}")
    for mv in moves:
        if not isinstance(mv, Mapping):
            raise InputError(f"each move must be a dict like {{'type': 'normal', ...}}, got {mv!r}")
        if "frames" in mv and not (isinstance(mv["frames"], int) and mv["frames"] >= 1):
            raise InputError(f"move 'frames' must be an integer >= 1, got {mv['frames']!r}")
        if "pivot" in mv and not (isinstance(mv["pivot"], (int, float)) and mv["pivot"] >= 0):
            raise InputError(f"move 'pivot' must be a number >= 0, got {mv['pivot']!r}")
    if nframe is not None and nframe < 2:
        raise InputError(f"nframe must be >= 2, got {nframe}")
    frames = _split_frames(moves, (nframe or NFRAME) - 1)
    bound = m if air_bound is None else float(air_bound)
    tree = _as_tree(scene_points)
    c2w = invert_rigid(as_tensor(start_w2c, dtype=torch.float64))
    poses, shrinks = [c2w], []
    for mv, n in zip(moves, frames):
        core = {k: v for k, v in mv.items() if k not in CHAIN_KEYS}
        pivot = float(mv.get("pivot", 1.0))
        if pivot > 0:
            new, it = get_c2w(poses[-1], core, m * pivot, bound, n, scene_points=tree, up=up)
        else:
            new, it = _in_place(poses[-1], core, bound, n, up)
        poses.extend(new)
        shrinks.append(it)
    K0 = _first_intrinsic(K)
    c2w_all = torch.stack(poses)
    meta = {"moves": copy.deepcopy([dict(mv) for mv in moves])}
    if tree is not None:
        meta["obstacle_shrinks"] = shrinks
    traj = CameraTrajectory(w2c=invert_rigid(c2w_all), K=K0.expand(len(c2w_all), 3, 3).clone(),
                            width=width, height=height, meta=meta)
    if nframe is not None and len(traj) != nframe:
        traj = resample_trajectory(traj, nframe)
    return traj


def _in_place(c2w: torch.Tensor, move: Mapping, air_bound: float, n: int, up) -> tuple[torch.Tensor, int]:
    """A ``normal`` move whose rotations pivot on the camera centre (pivot 0)."""
    if _check_move(move) != "normal":
        raise InputError("'pivot': 0 (rotate in place) only applies to 'normal' moves")
    return torch.stack(_normal_poses(c2w, move, 0.0, air_bound, n, up)), 0


def resample_trajectory(traj: CameraTrajectory, n: int) -> CameraTrajectory:
    """``traj`` resampled to ``n`` frames: SLERP/linear poses (:func:`moves.interpolate_poses`), linear K."""
    if n < 1:
        raise InputError(f"resample_trajectory: n must be >= 1, got {n}")
    c2w = interpolate_poses(traj.c2w, n)
    K = traj.K.to(torch.float64)
    if len(K) == 1:
        K_new = K.expand(n, 3, 3).clone()
    else:
        t_in, t_out = np.linspace(0, 1, len(K)), np.linspace(0, 1, n)
        flat = K.reshape(len(K), 9).cpu().numpy()
        K_new = torch.from_numpy(np.stack([np.interp(t_out, t_in, flat[:, i]) for i in range(9)], -1)).reshape(n, 3, 3)
    return CameraTrajectory(w2c=invert_rigid(c2w), K=K_new, width=traj.width, height=traj.height,
                            meta=copy.deepcopy(traj.meta))
