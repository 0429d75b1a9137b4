"""PLY / GLB point-cloud files: round trips through our reader and trimesh, and file validity."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import trimesh

from worldstereo_core.cameras import axis_angle_matrix, make_pose
from worldstereo_core.errors import InputError
from worldstereo_core.geometry.pointcloud import PointCloud
from worldstereo_core.io.pointcloud_files import (
    GLTF_UP_ROTATIONS, camera_frustum_segments, read_glb, read_ply, read_point_cloud, write_glb, write_ply,
    write_point_cloud,
)


@pytest.fixture
def cloud() -> PointCloud:
    rng = np.random.default_rng(0)
    n = 500
    return PointCloud(rng.normal(size=(n, 3)) * 3, rng.integers(0, 256, size=(n, 3), dtype=np.uint8))


def _glb_json(data: bytes) -> dict:
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_len, chunk_type = struct.unpack("<I4s", data[12:20])
    assert chunk_type == b"JSON"
    return json.loads(data[20:20 + chunk_len])


def test_ply_round_trip_ours_and_trimesh(tmp_path, cloud):
    path = write_ply(tmp_path / "out" / "points.ply", cloud)
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary
    back = read_ply(path)
    assert torch.equal(back.xyz, cloud.xyz)
    assert np.array_equal(back.rgb_uint8, cloud.rgb_uint8)
    tm = trimesh.load(str(path))
    assert isinstance(tm, trimesh.PointCloud)
    assert np.allclose(tm.vertices, cloud.xyz.numpy())
    assert np.array_equal(np.asarray(tm.colors)[:, :3], cloud.rgb_uint8)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in header and "property uchar red" in header
    assert path.stat().st_size == len(header) + len("end_header\n") + 500 * (12 + 3)


def test_ply_optional_fields_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = rng.normal(size=(20, 3))
    pc = PointCloud(rng.normal(size=(20, 3)), rng.uniform(size=(20, 3)),
                    normals=n / np.linalg.norm(n, axis=1, keepdims=True), confidence=rng.uniform(size=20))
    back = read_point_cloud(write_point_cloud(tmp_path / "p.ply", pc))
    assert torch.equal(back.normals, pc.normals) and torch.equal(back.confidence, pc.confidence)
    assert torch.allclose(back.rgb, pc.rgb, atol=0.5 / 255 + 1e-6)


def test_ply_reads_foreign_layouts(tmp_path):
    """An ASCII file and a big-endian file with float colours and extra elements (written by hand)."""
    xyz = np.array([[0.0, 1.0, 2.0], [3.0, 4.5, -5.0]])
    ascii_ply = ("ply\nformat ascii 1.0\nelement vertex 2\nproperty double x\nproperty double y\n"
                 "property double z\nproperty uchar r\nproperty uchar g\nproperty uchar b\n"
                 "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
                 "0 1 2 255 0 0\n3 4.5 -5 0 0 255\n")
    (tmp_path / "a.ply").write_text(ascii_ply)
    a = read_ply(tmp_path / "a.ply")
    assert np.allclose(a.xyz.numpy(), xyz) and a.rgb.tolist() == [[1, 0, 0], [0, 0, 1]]
    header = ("ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
              "property float z\nproperty float red\nproperty float green\nproperty float blue\nend_header\n")
    rows = np.zeros(2, dtype=[(c, ">f4") for c in ("x", "y", "z", "red", "green", "blue")])
    for i, c in enumerate("xyz"):
        rows[c] = xyz[:, i]
    rows["green"] = [0.25, 0.75]
    (tmp_path / "b.ply").write_bytes(header.encode() + rows.tobytes())
    b = read_ply(tmp_path / "b.ply")
    assert np.allclose(b.xyz.numpy(), xyz) and np.allclose(b.rgb[:, 1].numpy(), [0.25, 0.75])


@pytest.mark.parametrize("content, msg", [
    (b"not a ply", "not a PLY"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
     b"property float z\nend_header\n" + b"\0" * 10, "truncated"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float a\nend_header\n" + b"\0" * 4, "x/y/z"),
    (b"ply\nformat binary_little_endian 1.0\nelement face 1\nproperty float x\nend_header\n", "first PLY element"),
])
def test_ply_bad_files(tmp_path, content, msg):
    (tmp_path / "bad.ply").write_bytes(content)
    with pytest.raises(InputError, match=msg):
        read_ply(tmp_path / "bad.ply")


@pytest.mark.parametrize("world_up", sorted(GLTF_UP_ROTATIONS))
def test_glb_round_trip(tmp_path, cloud, world_up):
    path = write_glb(tmp_path / "scene.glb", cloud, world_up=world_up)
    data = path.read_bytes()
    gltf = _glb_json(data)
    prims = [p for m in gltf["meshes"] for p in m["primitives"]]
    points = [p for p in prims if p.get("mode") == 0]
    assert len(points) == 1 and "COLOR_0" in points[0]["attributes"]
    assert gltf["accessors"][points[0]["attributes"]["POSITION"]]["count"] == len(cloud)
    back = read_glb(path, world_up=world_up)
    assert torch.allclose(back.xyz, cloud.xyz, atol=1e-5)
    assert np.array_equal(back.rgb_uint8, cloud.rgb_uint8)
    # trimesh sees the rotated coordinates: glTF +Y is the scene's up direction
    tm = trimesh.load(str(path), force="scene")
    verts = next(g for g in tm.geometry.values() if isinstance(g, trimesh.PointCloud)).vertices
    up = {"+y": [0, 1, 0], "-y": [0, -1, 0], "+z": [0, 0, 1]}[world_up]
    assert np.allclose(verts[:, 1], cloud.xyz.numpy() @ np.array(up, float), atol=1e-5)


def test_glb_with_camera_frustums(tmp_path, cloud):
    K = np.array([[50.0, 0, 32.0], [0, 50.0, 24.0], [0, 0, 1]])
    c2w = torch.stack([make_pose(axis_angle_matrix([0, 1, 0], a), [a, 0, -2.0]) for a in (0.0, 0.3, 0.6)])
    seg = camera_frustum_segments(c2w, K, 64, 48, depth=0.5)
    assert seg.shape == (3 * 8, 2, 3)
    # independent check: corner (64, 48) of camera 1 at z = 0.5 is c2w @ (0.5*(64-32)/50, 0.5*(48-24)/50, 0.5)
    corner = c2w[1, :3, :3].numpy() @ np.array([0.32, 0.24, 0.5]) + c2w[1, :3, 3].numpy()
    assert np.allclose(seg[8 + 2, 1], corner) and np.allclose(seg[8 + 2, 0], c2w[1, :3, 3].numpy())
    block = seg[8:16]  # camera 1: 4 spokes centre -> corner i, then rim corner i -> corner i+1
    assert np.allclose(block[4:, 0], block[:4, 1]) and np.allclose(block[4:, 1], np.roll(block[:4, 1], -1, axis=0))
    path = write_glb(tmp_path / "cams.glb", cloud, frustum_segments=seg, world_up="+y")
    gltf = _glb_json(path.read_bytes())
    modes = sorted(p["mode"] for m in gltf["meshes"] for p in m["primitives"])
    assert modes == [0, 1]  # POINTS + LINES
    tm = trimesh.load(str(path), force="scene")
    lines = next(g for g in tm.geometry.values() if isinstance(g, trimesh.path.Path3D))
    got = {tuple(np.round(np.sort(s, axis=0).ravel(), 5)) for s in lines.vertices[np.concatenate(
        [e.points for e in lines.entities]).reshape(-1, 2)]}
    want = {tuple(np.round(np.sort(s, axis=0).ravel(), 5)) for s in seg}
    assert got == want


def test_file_errors(tmp_path, cloud):
    with pytest.raises(InputError, match="empty"):
        write_glb(tmp_path / "e.glb", PointCloud.empty())
    with pytest.raises(InputError, match="world_up"):
        write_glb(tmp_path / "e.glb", cloud, world_up="up")
    with pytest.raises(InputError, match="unsupported"):
        write_point_cloud(tmp_path / "e.xyz", cloud)
    with pytest.raises(InputError, match="not found"):
        read_ply(tmp_path / "missing.ply")
