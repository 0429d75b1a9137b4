"""Point-cloud files: binary PLY (xyz float32 + rgb uint8) and GLB for ComfyUI's Preview3D.

* PLY keeps the world coordinates as they are (OpenCV world of the scene). :func:`read_ply`
  reads binary (little/big endian) and ASCII files whose first element is ``vertex``; colours
  may be uchar/ushort/float, missing colours become white. Not through trimesh: its point-cloud
  export always adds an alpha channel, cannot carry normals or confidence, and writes and reads
  more slowly (``benchmarks/ply_files.py``).
* GLB holds one POINTS primitive with COLOR_0 and, optionally, camera frustums as a LINES
  primitive (:func:`camera_frustum_segments`). glTF is +Y up, so the points are rotated from the
  scene's up axis (``world_up``, :data:`worldstereo_core.cameras.WORLD_UP`; '+y' for
  none) to +Y; :func:`read_glb` undoes it.

All writes are atomic (:func:`worldstereo_core.io.atomic.atomic_path`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..cameras import UP_VECTORS, WORLD_UP, as_tensor, unproject_pixels
from ..errors import InputError
from ..geometry.pointcloud import PointCloud
from .atomic import atomic_path


def _rotation_to_gltf_up(up) -> np.ndarray:
    """The rotation about x taking ``up`` (a unit vector with no x part) to glTF's +Y: rows x, up, x cross up."""
    x = np.array([1.0, 0.0, 0.0])
    return np.stack([x, np.asarray(up, dtype=np.float64), np.cross(x, up)])


#: Rotations taking a world whose up axis is the key to glTF's +Y up (all proper, det +1).
GLTF_UP_ROTATIONS: dict[str, np.ndarray] = {name: _rotation_to_gltf_up(up) for name, up in UP_VECTORS.items()}

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_COLOUR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))


# --------------------------------------------------------------------------------------------
# PLY
# --------------------------------------------------------------------------------------------

def write_ply(path: str | os.PathLike, cloud: PointCloud) -> Path:
    """Write a binary little-endian PLY: x y z float32, [nx ny nz float32], red green blue uchar,
    [confidence float32]."""
    n = len(cloud)
    fields: list[tuple[str, str]] = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if cloud.normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if cloud.confidence is not None:
        fields += [("confidence", "<f4")]
    rows = np.empty(n, dtype=fields)
    xyz = cloud.xyz.cpu().numpy()
    rows["x"], rows["y"], rows["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if cloud.normals is not None:
        nrm = cloud.normals.cpu().numpy()
        rows["nx"], rows["ny"], rows["nz"] = nrm[:, 0], nrm[:, 1], nrm[:, 2]
    rgb = cloud.rgb_uint8
    rows["red"], rows["green"], rows["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    if cloud.confidence is not None:
        rows["confidence"] = cloud.confidence.cpu().numpy()
    ply_names = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment written by ComfyUI-WorldStereo",
              f"element vertex {n}"]
    header += [f"property {ply_names[t]} {name}" for name, t in fields]
    header += ["end_header"]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n").encode("ascii"))
            fh.write(rows.tobytes())
    return Path(path)


def _parse_ply_header(fh, path: Path) -> tuple[str, int, list[tuple[str, str]], int]:
    """(format, vertex count, vertex properties [(name, numpy type)], header byte length)."""
    if fh.readline().strip() != b"ply":
        raise InputError(f"{path.name} is not a PLY file (missing 'ply' magic line)")
    fmt, elements, current = None, [], None
    while True:
        line = fh.readline()
        if not line:
            raise InputError(f"{path.name}: PLY header has no 'end_header' line")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            current = (words[1], int(words[2]), [])
            elements.append(current)
        elif words[0] == "property" and current is not None:
            if words[1] == "list":
                current[2].append((words[-1], "list"))
            elif words[1] in _PLY_TYPES:
                current[2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise InputError(f"{path.name}: unknown PLY property type {words[1]!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise InputError(f"{path.name}: unsupported PLY format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise InputError(f"{path.name}: the first PLY element must be 'vertex'")
    props = elements[0][2]
    if any(t == "list" for _, t in props):
        raise InputError(f"{path.name}: list properties on vertices are not supported")
    return fmt, elements[0][1], props, fh.tell()


def read_ply(path: str | os.PathLike) -> PointCloud:
    """Read the vertices of a PLY point cloud (other elements, e.g. faces, are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PLY file not found: {path}")
    with open(path, "rb") as fh:
        fmt, n, props, offset = _parse_ply_header(fh, path)
        names = [p for p, _ in props]
        if fmt == "ascii":
            lines = [fh.readline() for _ in range(n)]
            try:
                table = np.array([ln.split()[: len(props)] for ln in lines], dtype=np.float64).reshape(n, len(props))
            except ValueError as exc:
                raise InputError(f"{path.name}: malformed ASCII PLY vertex data ({exc})") from exc
            data = {name: table[:, i].astype(t) for i, (name, t) in enumerate(props)}
        else:
            order = "<" if fmt == "binary_little_endian" else ">"
            dtype = np.dtype([(name, order + t) for name, t in props])
            raw = fh.read(n * dtype.itemsize)
            if len(raw) < n * dtype.itemsize:
                raise InputError(f"{path.name}: PLY file is truncated ({len(raw)} of {n * dtype.itemsize} vertex bytes)")
            rows = np.frombuffer(raw, dtype=dtype, count=n)
            data = {name: rows[name] for name in names}
    if not all(c in data for c in "xyz"):
        raise InputError(f"{path.name}: PLY vertices have no x/y/z properties (found {names})")
    xyz = np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float32)
    rgb = np.ones((n, 3), dtype=np.float32)
    for trio in _COLOUR_NAMES:
        if all(c in data for c in trio):
            cols = np.stack([data[c] for c in trio], axis=1)
            if np.issubdtype(cols.dtype, np.integer):
                rgb = cols.astype(np.float32) / float(np.iinfo(cols.dtype).max)
            else:
                rgb = np.clip(cols.astype(np.float32), 0.0, 1.0)
            break
    normals = np.stack([data[c] for c in ("nx", "ny", "nz")], axis=1) if all(c in data for c in ("nx", "ny", "nz")) else None
    confidence = data.get("confidence")
    return PointCloud(xyz, rgb, normals=normals, confidence=None if confidence is None else confidence.astype(np.float32))


# --------------------------------------------------------------------------------------------
# GLB
# --------------------------------------------------------------------------------------------

def camera_frustum_segments(c2w, K, width: int, height: int, depth: float) -> np.ndarray:
    """Line segments (F*8, 2, 3) drawing each camera as a pyramid of height ``depth`` (z-depth).

    Per camera: 4 edges from the centre to the image corners (0,0), (W,0), (W,H), (0,H)
    unprojected at ``depth``, then the 4 edges of that rectangle. ``c2w`` (F,4,4) or (4,4);
    ``K`` (F,3,3) or (3,3) in pixels of the (height, width) image.
    """
    c2w = as_tensor(c2w)
    c2w = c2w[None] if c2w.dim() == 2 else c2w
    K = as_tensor(K)
    K = (K[None] if K.dim() == 2 else K).expand(c2w.shape[0], 3, 3)
    if c2w.dim() != 3 or tuple(c2w.shape[1:]) != (4, 4):
        raise InputError(f"c2w must be (F, 4, 4); got {tuple(c2w.shape)}")
    if not depth > 0 or width <= 0 or height <= 0:
        raise InputError("frustum depth, width and height must be > 0")
    uv = torch.tensor([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]], dtype=c2w.dtype)
    corners = unproject_pixels(uv.expand(c2w.shape[0], 4, 2), torch.full((c2w.shape[0], 4), float(depth),
                                                                            dtype=c2w.dtype), K, c2w)  # F,4,3
    centre = c2w[:, None, :3, 3].expand(-1, 4, -1)
    spokes = torch.stack([centre, corners], dim=2)  # F,4,2,3
    rim = torch.stack([corners, corners.roll(-1, dims=1)], dim=2)  # F,4,2,3
    return torch.cat([spokes, rim], dim=1).reshape(-1, 2, 3).numpy()


def _up_rotation(world_up: str) -> np.ndarray:
    if world_up not in GLTF_UP_ROTATIONS:
        raise InputError(f"world_up must be one of {sorted(GLTF_UP_ROTATIONS)}; got {world_up!r}")
    return GLTF_UP_ROTATIONS[world_up]


def write_glb(path: str | os.PathLike, cloud: PointCloud, *, frustum_segments=None,
              world_up: str = WORLD_UP["reconstruction"]) -> Path:
    """Write a GLB with the points (POINTS primitive, COLOR_0 RGBA uint8) and optional frustum
    lines (LINES primitive, segments (M, 2, 3) in world units, e.g. from
    :func:`camera_frustum_segments`)."""
    import trimesh

    if len(cloud) == 0:
        raise InputError("cannot write an empty point cloud to GLB; check the depth / masks upstream")
    A = _up_rotation(world_up)
    rgba = np.concatenate([cloud.rgb_uint8, np.full((len(cloud), 1), 255, np.uint8)], axis=1)
    scene = trimesh.Scene()
    points = (cloud.xyz.cpu().numpy().astype(np.float64) @ A.T).astype(np.float32)
    scene.add_geometry(trimesh.PointCloud(points, colors=rgba), geom_name="points", node_name="points")
    if frustum_segments is not None:
        seg = np.asarray(frustum_segments, dtype=np.float64)
        if seg.ndim != 3 or seg.shape[1:] != (2, 3):
            raise InputError(f"frustum_segments must have shape (M, 2, 3); got {seg.shape}")
        if len(seg):
            scene.add_geometry(trimesh.load_path(seg @ A.T), geom_name="cameras", node_name="cameras")
    data = scene.export(file_type="glb")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_glb(path: str | os.PathLike, *, world_up: str = WORLD_UP["reconstruction"]) -> PointCloud:
    """Read the point primitives of a GLB back into world coordinates (inverse of :func:`write_glb`)."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise InputError(f"GLB file not found: {path}")
    A = _up_rotation(world_up)
    scene = trimesh.load(str(path), file_type="glb", force="scene")
    xyz, rgb = [], []
    for name in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[name]
        geom = scene.geometry[geom_name]
        if not isinstance(geom, trimesh.PointCloud):
            continue
        v = np.asarray(geom.vertices, dtype=np.float64) @ transform[:3, :3].T + transform[:3, 3]
        xyz.append(v @ A)  # A is orthogonal: inverse = transpose
        cols = np.asarray(geom.colors) if len(geom.colors) else np.full((len(v), 4), 255, np.uint8)
        rgb.append(cols[:, :3].astype(np.float32) / 255.0)
    if not xyz:
        raise InputError(f"{path.name} contains no point-cloud primitive")
    return PointCloud(np.concatenate(xyz).astype(np.float32), np.concatenate(rgb))


def write_point_cloud(path: str | os.PathLike, cloud: PointCloud, **glb_options) -> Path:
    """Write ``cloud`` as .ply or .glb according to the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        if glb_options:
            raise InputError(f"options {sorted(glb_options)} apply to .glb files only")
        return write_ply(path, cloud)
    if suffix == ".glb":
        return write_glb(path, cloud, **glb_options)
    raise InputError(f"unsupported point-cloud file type {suffix!r}; use .ply or .glb")


def read_point_cloud(path: str | os.PathLike, **glb_options) -> PointCloud:
    """Read a .ply or .glb point cloud according to the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        return read_ply(path)
    if suffix == ".glb":
        return read_glb(path, **glb_options)
    raise InputError(f"unsupported point-cloud file type {suffix!r}; use .ply or .glb")
