"""The global 3D cache: alignment of lifted frames (known similarities, outliers), growth and hole
coverage on a synthetic scene with exact depth, release mode, persistence, and the per-frame view
of the cache (cull, nearest point per pixel, hole test) against independent computations.

No reference fixture exists (the release has no cache); every expectation is computed
independently from the synthetic scene (a box room whose exact depth is ray-cast), except the merge
itself, which is compared with the merge as of commit 80f6f0b (tests/cache_80f6f0b.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from synthetic_scene import BoxRoom, room_for_scale
from worldstereo_core.cameras import axis_angle_matrix, intrinsics_from_fov, invert_rigid
from worldstereo_core.errors import CheckpointError, InputError
from worldstereo_core.geometry.alignment import Similarity
from worldstereo_core.geometry.depth import depth_map, keep_mask
from worldstereo_core.geometry.trajectories import reconstruction_trajectories
from worldstereo_core.memory.bank import sample_align_nframe
from worldstereo_core.memory.cache import CacheSettings, PointCache, align_frame
from worldstereo_core.memory.cache_view import CacheView

H, W = 72, 108
M = 2.0
SETTINGS = CacheSettings(render_radius=0.03, edge_threshold=0.05)


@pytest.fixture(scope="module")
def scene():
    room = room_for_scale(M)
    K = intrinsics_from_fov(W, H, 60.0)
    trajs = reconstruction_trajectories(torch.eye(4), K, W, H, M)
    eye = torch.eye(4, dtype=torch.float64)
    start = PointCache.from_depth(room.image(K, eye, H, W), room.depth(K, eye, H, W), K, eye, settings=SETTINGS)
    return room, K, trajs, start


def _holes(cache: PointCache, traj) -> float:
    _, mask = cache.render(traj, torch.zeros(3, H, W), H, W)
    return float(mask[1:].mean())


def _split_rows(xyz: torch.Tensor, known: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(mask of the rows of ``xyz`` that are rows of ``known``, the other rows)."""
    seen = {row.tobytes() for row in known.numpy()}
    mask = np.array([row.tobytes() in seen for row in xyz.numpy()], dtype=bool)
    return mask, xyz[torch.from_numpy(~mask)]


def _dense_room_points(room: BoxRoom, n: int = 60) -> torch.Tensor:
    """Points on every face of the room (a grid per face)."""
    lo, hi = room.lo, room.hi
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = torch.meshgrid(u, u, indexing="ij")
    faces = []
    for axis in range(3):
        o1, o2 = [i for i in range(3) if i != axis]
        for bound in (lo[axis], hi[axis]):
            p = torch.empty(n * n, 3, dtype=torch.float64)
            p[:, axis] = bound
            p[:, o1] = lo[o1] + a.flatten() * (hi[o1] - lo[o1])
            p[:, o2] = lo[o2] + b.flatten() * (hi[o2] - lo[o2])
            faces.append(p)
    return torch.cat(faces)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_alignment_recovers_known_similarity(scene, seed):
    """Depth off by a scale s (monocular drift) plus noise, seen from a random trajectory camera:
    the fit must be the similarity that undoes it, scaling by 1/s about the camera centre
    (rotation I, translation c (1 - 1/s)), found among all 7-DoF similarities."""
    room, K, trajs, _ = scene
    rng = np.random.default_rng(seed)
    cache_xyz = _dense_room_points(room, 150)
    name = ("traj_right", "traj_left", "traj_up", "traj_eloop")[seed]
    w2c = trajs[name].w2c[int(rng.integers(2, 19))]
    s = float(rng.uniform(0.6, 1.6))
    noise = torch.from_numpy(rng.normal(1.0, 0.002, (H, W))).float()
    depth = room.depth(K, w2c, H, W) * s * noise
    keep, d = keep_mask(depth, sobel_threshold=SETTINGS.edge_threshold)
    T, record = align_frame(cache_xyz, d, keep, K, w2c, SETTINGS)
    assert T is not None and record.skipped is None and record.inliers >= SETTINGS.min_correspondences
    centre = invert_rigid(w2c)[:3, 3]
    assert abs(T.scale * s - 1) < 2e-3
    assert torch.allclose(T.R, torch.eye(3, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(T.t, centre * (1 - T.scale), atol=5e-3 * M)
    assert record.transform == T.matrix.tolist() and record.scale == T.scale


def test_alignment_is_robust_to_outlier_depth(scene):
    room, K, trajs, _ = scene
    cache_xyz = _dense_room_points(room, 120)
    w2c = trajs["traj_up"].w2c[10]
    depth = room.depth(K, w2c, H, W) * 1.3
    rng = np.random.default_rng(0)
    bad = torch.from_numpy(rng.random(depth.shape) < 0.3)
    noisy = torch.where(bad, depth * torch.from_numpy(rng.uniform(0.3, 3.0, depth.shape)).float(), depth)
    keep = torch.ones_like(depth, dtype=torch.bool)  # keep the outliers in the correspondence set
    T, record = align_frame(cache_xyz, noisy, keep, K, w2c, SETTINGS)
    assert T is not None and record.inliers < 0.8 * record.correspondences
    assert abs(T.scale - 1 / 1.3) < 5e-3
    assert torch.allclose(T.matrix[:3, :3] / T.scale, torch.eye(3, dtype=torch.float64), atol=5e-3)


def test_alignment_skips_frames_without_overlap(scene):
    room, K, trajs, start = scene
    behind = trajs["traj_left"].w2c[-1]  # 180 degrees round: looks back at the wall behind the start camera
    depth = room.depth(K, behind, H, W)
    keep, d = keep_mask(depth, sobel_threshold=SETTINGS.edge_threshold)
    T, record = align_frame(start.cloud.xyz, d, keep, K, behind, SETTINGS)
    assert T is None and "correspondences" in record.skipped
    assert record.correspondences < SETTINGS.min_correspondences


def test_nearest_point_per_pixel_is_the_front_one():
    K = intrinsics_from_fov(8, 6, 90.0)
    eye = torch.eye(4, dtype=torch.float64)
    # three points on the optical ray of pixel (4, 3), plus one behind the camera
    ray = torch.tensor([0.5 / 4, 0.5 / 4, 1.0], dtype=torch.float64) * 1.0
    pts = torch.stack([ray * 3, ray * 1.5, ray * 2, -ray])
    idx, pix, uv = CacheView.cull(pts.float(), K, eye, 6, 8, margin=0.0).nearest_per_pixel()
    assert idx.tolist() == [1] and pix.tolist() == [3 * 8 + 4]
    assert torch.allclose(uv[0], torch.tensor([4.5, 3.5]))


# --------------------------------------------------------------------------------------------
# Growth
# --------------------------------------------------------------------------------------------

def test_cache_grows_onto_the_true_surfaces_and_fills_holes(scene):
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
    keep = sample_align_nframe(21, 8)
    right = trajs["traj_right"]
    drift = np.random.default_rng(1).uniform(0.7, 1.4, size=len(keep))
    frames = [room.image(right.K[i], right.w2c[i], H, W) for i in keep]
    record = cache.update(frames, right.w2c[keep], right.K[keep], room.depth_fn(lambda call: drift[call]),
                          label="right")
    assert record.points_before == len(start) and record.points_after == len(cache) > 2 * len(start)
    assert sum(f.added for f in record.frames) == len(cache) - len(start)
    # the start cloud is kept as it was (new points only fill holes, nothing is thinned or moved)
    kept, added = _split_rows(cache.cloud.xyz, start.cloud.xyz)
    assert kept.sum() == len(start)
    aligned = [(f, d) for f, d in zip(record.frames, drift) if f.skipped is None]
    assert len(aligned) >= 6
    for f, d in aligned:  # the per-frame scale undoes the depth drift
        assert abs(f.scale * d - 1) < 0.02, (f.name, f.scale, d)
    dist = room.surface_distance(added)
    assert float(dist.median()) < 0.01 * M and float(torch.quantile(dist.double(), 0.95)) < 0.04 * M
    # the grown cache covers more of the trajectories than the start cloud alone
    assert _holes(cache, right) < 0.5 * _holes(start, right)
    assert _holes(cache, trajs["traj_left"]) < _holes(start, trajs["traj_left"]) - 0.1
    assert _holes(cache, trajs["traj_eloop"]) <= _holes(start, trajs["traj_eloop"])
    assert cache.history == [record]

    # folding the same views in again adds (almost) nothing: their pixels are covered now
    again = cache.update(frames, right.w2c[keep], right.K[keep], room.depth_fn(lambda call: drift[call]),
                         label="right again")
    assert again.points_after - again.points_before < 0.05 * (record.points_after - record.points_before)


def test_update_runs_torch_ops_on_one_thread_and_restores_the_setting(scene, monkeypatch):
    """Intra-op threads spin-wait on a busy machine; the merge's small ops run on one thread."""
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
    before = torch.get_num_threads()
    seen = []
    fn = room.depth_fn()
    cache.update([room.image(K, trajs["traj_up"].w2c[3], H, W)], trajs["traj_up"].w2c[3:4], K,
                 lambda *a: (seen.append(torch.get_num_threads()), fn(*a))[1])
    assert seen == [1] and torch.get_num_threads() == before


def test_release_mode_keeps_the_start_cloud(scene):
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, mode="release", settings=SETTINGS)
    right = trajs["traj_right"]
    record = cache.update([room.image(K, right.w2c[5], H, W)], right.w2c[5:6], K, None, label="r")
    assert len(cache) == len(start) and all(f.skipped.startswith("release") for f in record.frames)


def test_update_input_errors(scene):
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
    w2c = trajs["traj_up"].w2c[:2]
    frames = [room.image(K, w, H, W) for w in w2c]
    with pytest.raises(InputError, match="depth function"):
        cache.update(frames, w2c, K, None)
    with pytest.raises(InputError, match="one camera"):
        cache.update(frames, w2c[:1], K, room.depth_fn())
    with pytest.raises(InputError, match="one depth per pixel"):
        cache.update(frames, w2c, K, lambda img, k, w: torch.ones(5, 5))
    with pytest.raises(InputError, match="'depth'"):
        depth_map({"mask": torch.ones(2, 2)})
    # an unusable depth map skips that frame instead of stopping the run
    record = cache.update(frames, w2c, K, lambda img, k, w: torch.zeros(H, W))
    assert len(cache) == len(start) and all("unusable depth" in f.skipped for f in record.frames)
    with pytest.raises(InputError, match="mode"):
        PointCache(start.cloud, start.scale, mode="paper")
    with pytest.raises(InputError, match="voxel_fraction"):
        CacheSettings(voxel_fraction=0)


def test_moge_style_depth_output_is_accepted(scene):
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
    w2c = trajs["traj_right"].w2c[6:7]
    fn = room.depth_fn()
    record = cache.update([room.image(K, w2c[0], H, W)], w2c, K,
                          lambda img, k, w: {"depth": fn(img, k, w), "mask": torch.ones(H, W, dtype=torch.bool)})
    assert record.frames[0].skipped is None and len(cache) > len(start)


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip(scene, tmp_path):
    room, K, trajs, start = scene
    cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
    up = trajs["traj_up"]
    cache.update([room.image(K, up.w2c[i], H, W) for i in (10, 20)], up.w2c[[10, 20]], K, room.depth_fn(),
                 label="up")
    cache.thin_size = 0.05
    cache.update([room.image(K, up.w2c[5], H, W)], up.w2c[5:6], K, room.depth_fn(), label="up")  # a short tail
    assert 0 < len(cache) - cache._cells.sorted <= cache._cells.sorted // 8
    path = cache.save(tmp_path / "cache.npz")
    loaded = PointCache.load(path, device="cpu")
    assert loaded == cache and loaded.history[0].frames[0].name == "up/0000" and loaded.thin_size == 0.05
    assert loaded._cells.sorted == cache._cells.sorted  # the order and index are restored, not rebuilt
    assert torch.equal(loaded.cloud.rgb, cache.cloud.rgb) and loaded.settings == SETTINGS
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file
    with pytest.raises(InputError, match=".npz"):
        cache.save(tmp_path / "cache.ply")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="damaged"):
        PointCache.load(tmp_path / "broken.npz")
    with pytest.raises(InputError, match="not found"):
        PointCache.load(tmp_path / "absent.npz")


def test_similarity_helpers_match_alignment_convention():
    """The transform stored per frame maps lifted points onto the cache: x -> s R x + t."""
    T = Similarity(axis_angle_matrix([0, 0, 1], 0.3), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 2.0)
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(T.apply(x), (T.matrix[:3, :3] @ x.T).T + T.matrix[:3, 3])


# --------------------------------------------------------------------------------------------
# The merge against the implementation as of commit 80f6f0b
# --------------------------------------------------------------------------------------------

#: Tolerance of the merged points, as a fraction of the scene scale. The merge now projects the
#: cache in float32 (80f6f0b: float64), so pixel positions differ by ~1e-4 pixel; the depth sampled
#: there for the correspondences, and with it the fitted similarity, moves by ~1e-6 relative, and
#: so do the new points (3e-6 of the scale at most on this scene).
MERGE_TOLERANCE = 1e-5


def _assert_same_cloud(new, old, scale: float) -> None:
    from scipy.spatial import cKDTree

    assert len(new) == len(old)
    dist, match = cKDTree(old.xyz.numpy()).query(new.xyz.numpy())
    back, _ = cKDTree(new.xyz.numpy()).query(old.xyz.numpy())
    assert dist.max() < MERGE_TOLERANCE * scale and back.max() < MERGE_TOLERANCE * scale
    assert len(np.unique(match)) == len(old)  # one to one
    assert torch.equal(new.rgb, old.rgb[torch.from_numpy(match)])


@pytest.mark.parametrize("max_points", [None, 9000])
def test_merge_matches_80f6f0b(scene, max_points):
    """Two trajectories folded in one after the other; with max_points=9000 the first update thins
    the cache (the same adaptive voxel search as before), the second adds to the thinned cache."""
    from cache_80f6f0b import merge_80f6f0b

    room, K, trajs, start = scene
    settings = CacheSettings(render_radius=0.03, edge_threshold=0.05, max_points=max_points)
    cache = PointCache(start.cloud, start.scale, settings=settings)
    old = start.cloud
    keep = sample_align_nframe(21, 8)
    for name, seed in (("traj_right", 1), ("traj_up", 2)):
        traj = trajs[name]
        drift = np.random.default_rng(seed).uniform(0.7, 1.4, size=len(keep))
        frames = [room.image(traj.K[i], traj.w2c[i], H, W) for i in keep]
        record = cache.update(frames, traj.w2c[keep], traj.K[keep], room.depth_fn(lambda c: drift[c]), label=name)
        old, added = merge_80f6f0b(old, start.scale, settings, frames, traj.w2c[keep], traj.K[keep],
                                   room.depth_fn(lambda c: drift[c]))
        if max_points is None or name == "traj_right":  # 80f6f0b re-thins a thinned cache; see the next test
            assert [f.added for f in record.frames] == added
            _assert_same_cloud(cache.cloud, old, start.scale)
    if max_points is not None:
        assert cache.thin_size is not None and len(cache) > 0.8 * max_points


def test_thinned_cache_grows_without_rethinning(scene):
    """Once thinned, new points also need a free voxel of the thinning's size, so the cache keeps one
    point per such voxel and is not thinned as a whole again while it stays within 20% of max_points."""
    from worldstereo_core.geometry.pointcloud import first_in_voxel

    room, K, trajs, start = scene
    keep = sample_align_nframe(21, 8)
    settings = CacheSettings(render_radius=0.03, edge_threshold=0.05, max_points=18000)
    cache = PointCache(start.cloud, start.scale, settings=settings)
    runs = []
    for name, frames_kept in (("traj_right", keep), ("traj_eloop", keep[:2])):
        traj = trajs[name]
        frames = [room.image(traj.K[i], traj.w2c[i], H, W) for i in frames_kept]
        cache.update(frames, traj.w2c[frames_kept], traj.K[frames_kept], room.depth_fn(), label=name)
        runs.append((cache.cloud.xyz.clone(), cache.thin_size))
    (first, size), (second, size_after) = runs
    assert size is not None and size_after == size and len(first) > settings.max_points
    assert len(second) > len(first) and _split_rows(second, first)[0].sum() == len(first)
    assert bool(first_in_voxel(second, size).all())


# --------------------------------------------------------------------------------------------
# The view of the cache from one frame
# --------------------------------------------------------------------------------------------

def _random_view(n=20000, seed=0, margin=3.0, reach=0.0):
    rng = np.random.default_rng(seed)
    xyz = torch.from_numpy(rng.uniform(-3, 3, (n, 3))).float()
    K = intrinsics_from_fov(W, H, 70.0)
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = axis_angle_matrix([0.3, 1.0, 0.2], 0.4)
    w2c[:3, 3] = torch.tensor([0.1, -0.2, 0.5])
    return xyz, K, w2c, CacheView.cull(xyz, K, w2c, H, W, margin=margin, reach=reach)


def test_cull_keeps_exactly_the_points_near_the_frustum_with_one_projection(monkeypatch):
    """Numba kernel, torch path and the cell index give the same view; it holds the points whose
    float64 projection lies in front inside the widened image (up to float32 rounding at the border)
    with their projection to float32 accuracy."""
    from worldstereo_core.cameras import project_points
    from worldstereo_core.memory import cache_view
    from worldstereo_core.memory.cache_view import CellIndex, cell_keys

    xyz, K, w2c, view = _random_view(reach=0.05)
    order = torch.sort(cell_keys(xyz, 0.5), stable=True).indices
    grouped = xyz[order]
    by_cells = CacheView.cull(grouped, K, w2c, H, W, margin=3.0, reach=0.05, cells=CellIndex.of(grouped, 0.5))
    assert torch.equal(order[by_cells.index].sort().values, view.index)
    monkeypatch.setattr(cache_view, "_numba_cull", lambda: None)
    torch_view = CacheView.cull(xyz, K, w2c, H, W, margin=3.0, reach=0.05)
    for a, b in ((view.index, torch_view.index), (view.uv, torch_view.uv), (view.z, torch_view.z)):
        assert torch.equal(a, b)
    uv, z = project_points(xyz.double(), K, w2c)
    front = ((z > 0) & (uv[:, 0] > -3) & (uv[:, 0] < W + 3) & (uv[:, 1] > -3) & (uv[:, 1] < H + 3)).nonzero()[:, 0]
    assert set(front.tolist()) <= set(view.index.tolist())
    assert torch.allclose(view.uv[z[view.index] > 0.1].double(), uv[view.index][z[view.index] > 0.1], atol=2e-3)
    # the points within `reach` outside the frustum are kept too
    rest = view.index[~torch.isin(view.index, front)]
    assert len(rest) > 0


def test_view_contains_every_point_within_reach_of_new_points():
    """Cache points closer than `reach` to a point inside the frustum are in the view."""
    xyz, K, w2c, view = _random_view(margin=2.0, reach=0.1)
    inside = view.index[(view.z > 0.5) & (view.uv[:, 0] > 5) & (view.uv[:, 0] < W - 5)
                        & (view.uv[:, 1] > 5) & (view.uv[:, 1] < H - 5)]
    q = xyz[inside[:200]]
    assert view.contains(q) and not view.contains(torch.tensor([[0.0, 0.0, -10.0]]))
    rng = np.random.default_rng(1)
    offsets = torch.from_numpy(rng.normal(size=(200, 3))).float()
    p = q + 0.099 * offsets / offsets.norm(dim=1, keepdim=True)
    view_p = CacheView.cull(torch.cat([xyz, p]), K, w2c, H, W, margin=2.0, reach=0.1)
    assert set(range(len(xyz), len(xyz) + 200)) <= set(view_p.index.tolist())


@pytest.mark.parametrize("radius", [0.008, 0.02, 0.05, 0.11])
def test_holes_follow_the_renderer_rule(radius):
    """Against a brute-force evaluation of the coverage rule on the view's own positions (exact), and
    against the renderer, which projects in float64 (equal up to points within float32 rounding of
    a pixel's coverage circle)."""
    from worldstereo_core.geometry.renderer import render_point_cloud

    s = min(H, W) / 2
    xyz, K, w2c, view = _random_view(n=3000, margin=radius * s + 1)
    holes = view.holes(radius)
    covered = torch.zeros(H, W, dtype=torch.bool)
    front = view.z > 0
    u, v = view.uv[front, 0].double(), view.uv[front, 1].double()
    jj, ii = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    for a, b in zip(u.tolist(), v.tolist()):
        covered |= ((a - ii - 0.5) ** 2 + (b - jj - 0.5) ** 2) / (s * s) < radius * radius
    assert torch.equal(holes, ~covered)
    assert 0 < float(holes.float().mean()) < 1
    _, mask = render_point_cloud(xyz, torch.zeros_like(xyz), K, w2c, H, W, radius=radius)
    assert int(((mask[0, 0] > 0.5) != holes).sum()) <= 2


def test_dilate_is_a_square_max_filter():
    from worldstereo_core.memory.cache_view import _dilate

    mask = torch.from_numpy(np.random.default_rng(0).random((37, 53)) < 0.02)
    for steps in (1, 2, 4):
        ref = torch.nn.functional.max_pool2d(mask[None].float(), 2 * steps + 1, 1, steps)[0] > 0
        assert torch.equal(_dilate(mask, steps), ref)


def test_merge_without_numba_is_identical(scene, monkeypatch):
    """The torch cull (the path on GPUs and without numba) gives the numba kernel's view, so the
    merged cache is the same bit for bit."""
    from worldstereo_core.memory import cache_view

    room, K, trajs, start = scene
    traj, keep = trajs["traj_right"], sample_align_nframe(21, 8)[:4]
    frames = [room.image(traj.K[i], traj.w2c[i], H, W) for i in keep]
    caches = []
    for kernel in (cache_view._numba_cull, lambda: None):
        monkeypatch.setattr(cache_view, "_numba_cull", kernel)
        cache = PointCache(start.cloud, start.scale, settings=SETTINGS)
        cache.update(frames, traj.w2c[keep], traj.K[keep], room.depth_fn(), label="right")
        caches.append(cache)
    assert caches[0] == caches[1] and len(caches[0]) > len(start)
