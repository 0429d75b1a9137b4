"""The stage nodes executed under the ComfyUI stub on tiny checkpoints in the real models layout.

Each test calls node classes the way ComfyUI does (``comfy_stub.execute``: V1 or V3) and
checks the results against independent computations (pinhole formulas, PIL resizing, matrix
algebra, files read back with other readers), the ComfyUI conventions (IMAGE / MASK shapes,
``ui`` entries, no mutation of inputs) and the behaviour around them (validation messages,
progress ticks, caching of loaded models). The native nodes and the loop run in the real ComfyUI
(``test_native_nodes``, ``test_native_loop``).
"""
from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
import comfy_stub as comfy_stub_module
from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)
from PIL import Image

from tiny_models import (EXAMPLE_IMAGE, FILES, PANORAMA_SCENE, write_example_image,
                         write_panorama_scene, write_tiny_models)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny_models") / "models")


@pytest.fixture
def ws(comfy_stub, models_dir):
    """The stub ComfyUI with the tiny models linked in and example inputs; helpers to run nodes."""
    fp = comfy_stub.folder_paths
    os.makedirs(fp.base_path, exist_ok=True)
    os.symlink(models_dir, fp.models_dir, target_is_directory=True)
    write_example_image(fp.get_input_directory())
    pack = comfy_stub.pack
    core = lambda name: importlib.import_module(f"{pack.__name__}.worldstereo_core.{name}")  # noqa: E731
    nodes = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731

    class WS:
        stub = comfy_stub
        mappings = pack.NODE_CLASS_MAPPINGS
        errors = core("errors")

        @staticmethod
        def run(node_type, **inputs):
            cls = pack.NODE_CLASS_MAPPINGS[node_type]
            out, ui = comfy_stub_module.execute(cls, **inputs)
            if ui is not None:
                WS.last_ui = ui
            assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), node_type
            return out

        @staticmethod
        def example_image():
            rgb = np.asarray(Image.open(os.path.join(fp.get_input_directory(), EXAMPLE_IMAGE)).convert("RGB"))
            return torch.from_numpy(rgb.copy()).float()[None] / 255.0

    WS.core, WS.nodes = core, nodes
    return WS


def _plane_scene(ws, height=32, width=48, depth=2.0):
    image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(0))
    (d, _) = ws.run("WorldStereoDepthFromImage", encoding="depth = value x scale", scale=depth, near=0.5, far=10.0,
                    depth_mask=torch.ones(1, height, width))
    (scene,) = ws.run("WorldStereoLiftDepth", image=image, depth=d, fov_deg=60.0, sobel_threshold=0.35, contract=8.0)
    return image, scene


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def test_resize_to_bucket_default_buckets(ws):
    """Without a MODEL, the release's buckets (with one: test_native_loop)."""
    from worldstereo_core.constants import DEFAULT_SCALE_MAP

    image = torch.rand(2, 90, 150, 3, generator=torch.Generator().manual_seed(1))
    before = image.clone()
    out, width, height = ws.run("WorldStereoResizeToBucket", image=image)
    ratio = 90 / 150
    expected = min(DEFAULT_SCALE_MAP, key=lambda b: abs(b[0] / b[1] - ratio))
    assert (height, width) == tuple(expected) and out.shape == (1, height, width, 3)
    u8 = np.round(image[0].numpy() * 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).resize((width, height), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out[0].numpy(), pil / 255.0, atol=1e-6)
    assert torch.equal(image, before)


@pytest.mark.parametrize("encoding", ["depth = value x scale", "bright = near (near..far)", "bright = far (near..far)"])
def test_depth_from_image_encodings(ws, encoding):
    values = torch.linspace(0, 1, 12).reshape(1, 3, 4)
    (depth, preview) = ws.run("WorldStereoDepthFromImage", encoding=encoding, scale=3.0, near=0.5, far=8.0,
                              depth_mask=values)
    v = values[0].double()
    expected = {"depth = value x scale": 3.0 * v,
                "bright = near (near..far)": 1.0 / (1.0 / 8.0 + v * (1.0 / 0.5 - 1.0 / 8.0)),
                "bright = far (near..far)": 0.5 + v * 7.5}[encoding]
    np.testing.assert_allclose(depth.depth.double().numpy(), expected.numpy(), rtol=1e-6)
    assert preview.shape == (1, 3, 4, 3) and float(preview.max()) <= 1.0
    cls = ws.mappings["WorldStereoDepthFromImage"]
    assert cls.validate_inputs(encoding="bright = near (near..far)", near=5.0, far=1.0) != True  # noqa: E712


def test_lift_depth_plane(ws):
    image, scene = _plane_scene(ws)
    h, w = 32, 48
    fx = (w / 2) / math.tan(math.radians(60.0) / 2)
    np.testing.assert_allclose(scene.K.numpy(), [[fx, 0, w / 2], [0, fx, h / 2], [0, 0, 1]], rtol=1e-12)
    assert torch.equal(scene.w2c, torch.eye(4, dtype=torch.float64)) and scene.median_depth == pytest.approx(2.0)
    assert len(scene.cloud) == h * w  # a constant depth has no edges
    np.testing.assert_allclose(scene.cloud.xyz[:, 2].numpy(), 2.0, rtol=1e-6)
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    np.testing.assert_allclose(scene.cloud.xyz[:, 0].numpy(), ((u - w / 2) / fx * 2.0).ravel(), atol=1e-5)
    np.testing.assert_allclose(scene.cloud.rgb.numpy(), np.round(image[0].numpy() * 255).reshape(-1, 3) / 255, atol=1e-6)
    (entry,) = ws.last_ui["3d"]
    assert entry["type"] == "temp" and entry["filename"].endswith(".glb")
    assert os.path.isfile(os.path.join(ws.stub.folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"]))


def test_moge_depth_node(ws):
    (moge,) = ws.run("WorldStereoMoGeLoader", checkpoint=FILES["moge"], download=False)
    image = torch.rand(1, 28, 42, 3, generator=torch.Generator().manual_seed(2))
    depth, preview, valid = ws.run("WorldStereoMoGeDepth", moge=moge, image=image, resolution_level=0)
    assert depth.depth.shape == (28, 42) and valid.shape == (1, 28, 42) and preview.shape == (1, 28, 42, 3)
    assert bool((depth.depth[depth.mask] > 0).all()) and depth.K.shape == (3, 3)
    assert float(depth.K[0, 2]) == pytest.approx(21.0) and float(depth.K[1, 2]) == pytest.approx(14.0)


def test_load_depth_file_and_point_map(ws, tmp_path):
    inp = ws.stub.folder_paths.get_input_directory()
    depth = np.full((16, 24), 3.0, dtype=np.float32)
    depth[0, 0] = np.nan
    np.save(os.path.join(inp, "d.npy"), depth)
    cls = ws.mappings["WorldStereoLoadDepthFile"]
    assert "d.npy" in comfy_stub_module.v1_input_types(cls)["required"]["depth_file"][0]
    assert cls.validate_inputs(depth_file="nope.npy") != True  # noqa: E712
    stamp = cls.fingerprint_inputs(depth_file="d.npy")
    (d, _) = ws.run("WorldStereoLoadDepthFile", depth_file="d.npy", png_scale=1000.0, npz_key="")
    assert float(d.depth[0, 0]) == 0.0 and float(d.depth[5, 5]) == 3.0
    np.save(os.path.join(inp, "d.npy"), depth * 2)
    os.utime(os.path.join(inp, "d.npy"), ns=(1, 1))
    assert cls.fingerprint_inputs(depth_file="d.npy") != stamp
    points = np.stack(list(np.meshgrid(np.linspace(-1, 1, 24), np.linspace(-1, 1, 16))) + [np.full((16, 24), 4.0)], -1)
    np.savez(os.path.join(inp, "p.npz"), points=points.astype(np.float32))
    (scene,) = ws.run("WorldStereoLoadPointMap", image=torch.rand(1, 16, 24, 3), point_map_file="p.npz", fov_deg=50.0,
                      npz_key="")
    assert len(scene.cloud) == 16 * 24 and scene.median_depth == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------

def test_preset_and_json_moves_agree(ws):
    _, scene = _plane_scene(ws)
    presets = importlib.import_module(f"{ws.stub.pack.__name__}.worldstereo_core.geometry.presets")
    (traj,) = ws.run("WorldStereoTrajectoryPreset", preset="orbit_left", frames=21, scale=1.0, point_cloud=scene)
    assert len(traj) == 21 and (traj.width, traj.height) == (48, 32)
    np.testing.assert_allclose(traj.w2c[0].numpy(), np.eye(4), atol=1e-12)
    (entry,) = ws.last_ui["worldstereo_trajectory"]
    assert len(entry["c2w"]) == 21 and len(entry["points"]) > 0
    text = json.dumps(presets.preset_moves("orbit_left"))
    (same,) = ws.run("WorldStereoTrajectoryFromJSON", json_text=text, frames=21, scale=1.0, point_cloud=scene)
    np.testing.assert_allclose(same.w2c.numpy(), traj.w2c.numpy(), atol=1e-12)
    (bigger,) = ws.run("WorldStereoTrajectoryFromJSON", json_text=json.dumps({"moves": [{"type": "normal",
                       "backward-forward": 0.5}]}), frames=5, scale=2.0, point_cloud=scene)
    centers = -np.einsum("fij,fi->fj", bigger.w2c[:, :3, :3].numpy(), bigger.w2c[:, :3, 3].numpy())
    assert np.linalg.norm(centers[-1] - centers[0]) == pytest.approx(0.5 * 2.0 * scene.median_depth, rel=1e-6)
    cls = ws.mappings["WorldStereoTrajectoryFromJSON"]
    for bad in ("", "[1, 2", "{\"foo\": 1}", "[]"):
        message = cls.validate_inputs(json_text=bad)
        assert isinstance(message, str) and "json_text" in message


def _random_rigid(n, seed):
    rng = np.random.default_rng(seed)
    out = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        q[:, 0] *= np.sign(np.linalg.det(q))
        out[i, :3, :3], out[i, :3, 3] = q, rng.normal(size=3)
    return out


def test_camera_json_anchor_subsample_and_rescale(ws):
    _, scene = _plane_scene(ws)
    w2c = _random_rigid(81, 3)
    K = np.array([[300.0, 0, 200.0], [0, 310.0, 150.0], [0, 0, 1]])
    data = {"extrinsic": w2c.tolist(), "intrinsic": [K.tolist()] * 81, "motion_list": ["a", "b"]}
    inp = ws.stub.folder_paths.get_input_directory()
    with open(os.path.join(inp, "camera.json"), "w") as fh:
        json.dump(data, fh)
    cls = ws.mappings["WorldStereoCameraJSONLoad"]
    assert "camera.json" in comfy_stub_module.v1_input_types(cls)["required"]["camera_json"][0]
    (traj,) = ws.run("WorldStereoCameraJSONLoad", camera_json="camera.json", frames=21, anchor=True, scale=1.0,
                     file_width=400, file_height=300, point_cloud=scene)
    keep = np.floor(np.linspace(0, 80, 21)).astype(int)
    chosen = w2c[keep]
    rel_file = chosen @ np.linalg.inv(chosen[0])
    rel_node = traj.w2c.numpy() @ np.linalg.inv(traj.w2c[0].numpy())
    np.testing.assert_allclose(traj.w2c[0].numpy(), scene.w2c.numpy(), atol=1e-9)
    np.testing.assert_allclose(rel_node, rel_file, atol=1e-9)
    np.testing.assert_allclose(traj.K[0].numpy(), [[300 * 48 / 400, 0, 200 * 48 / 400], [0, 310 * 32 / 300, 150 * 32 / 300],
                                                   [0, 0, 1]], rtol=1e-12)
    (raw,) = ws.run("WorldStereoTrajectoryFromJSON", json_text=json.dumps(data), frames=21, scale=1.0)
    assert len(raw) == 21  # a camera.json object in the JSON widget, anchored on the stand-in camera
    assert cls.validate_inputs(camera_json="missing.json") != True  # noqa: E712
    with open(os.path.join(inp, "bad.json"), "w") as fh:
        fh.write("{\"extrinsic\": [[1]]}")
    assert "bad.json" in cls.validate_inputs(camera_json="bad.json")


def test_reconstruction_trajectories_node(ws):
    _, scene = _plane_scene(ws)
    out = ws.run("WorldStereoReconstructionTrajectories", frames=21, up_distance=0.0, point_cloud=scene)
    assert [len(t) for t in out] == [21] * 4
    assert len(ws.last_ui["worldstereo_trajectory"]) == 4
    eloop = out[0].w2c.numpy()
    np.testing.assert_allclose(eloop[-1], eloop[0], atol=1e-6)  # the ellipse loop closes
    for t in out:
        np.testing.assert_allclose(t.w2c[0].numpy(), np.eye(4), atol=1e-9)


def test_live_preview_route_for_every_trajectory_node(ws):
    tp = ws.nodes("trajectory_preview")
    inp = ws.stub.folder_paths.get_input_directory()
    with open(os.path.join(inp, "cam.json"), "w") as fh:
        json.dump({"extrinsic": _random_rigid(9, 4).tolist(), "intrinsic": [[[50, 0, 24], [0, 50, 16], [0, 0, 1]]] * 9,
                   "width": 48, "height": 32}, fh)
    serving = [n for n, c in ws.mappings.items() if hasattr(c, "preview_trajectory")]
    assert len(serving) == 4
    for node_type in serving:
        spec = comfy_stub_module.v1_input_types(ws.mappings[node_type])["required"]
        widgets = {k: (v[1]["default"] if len(v) > 1 and "default" in v[1] else v[0][0])
                   for k, v in spec.items() if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")}
        if node_type == "WorldStereoCameraJSONLoad":
            widgets["camera_json"] = "cam.json"
        status, body = tp.handle_preview_request({"node_type": node_type, "inputs": widgets})
        assert status == 200, body
        entries = body[tp.PAYLOAD_KEY]
        assert len(entries) == (4 if node_type == "WorldStereoReconstructionTrajectories" else 1)
        expected = 9 if node_type == "WorldStereoCameraJSONLoad" else widgets["frames"]
        assert all(len(e["c2w"]) == expected and e["width"] == 768 for e in entries), node_type


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def test_render_warps_node(ws):
    image, scene = _plane_scene(ws)
    (traj,) = ws.run("WorldStereoTrajectoryPreset", preset="dolly_in", frames=6, scale=1.0, point_cloud=scene)
    before = image.clone()
    ws.stub.utils.updates.clear()
    render, holes = ws.run("WorldStereoRenderWarps", point_cloud=scene, trajectory=traj, image=image, backend="torch")
    assert render.shape == (6, 32, 48, 3) and holes.shape == (6, 32, 48) and render.dtype == holes.dtype == torch.float32
    np.testing.assert_allclose(render[0].numpy(), image[0].numpy(), atol=1e-6)
    assert float(holes[0].max()) == 0.0 and set(torch.unique(holes).tolist()) <= {0.0, 1.0}
    assert torch.equal(image, before)
    assert ws.stub.utils.updates[-1][:2] == (5, 5)  # frames 1..5 rendered, then done
    assert ws.last_ui["animated"] == (True,) and ws.last_ui["images"][0]["filename"].endswith(".mp4")


def test_load_render_folder_node(ws):
    render_folder = importlib.import_module(f"{ws.stub.pack.__name__}.worldstereo_core.io.render_folder")
    cameras = importlib.import_module(f"{ws.stub.pack.__name__}.worldstereo_core.cameras")
    inp = ws.stub.folder_paths.get_input_directory()
    traj = cameras.CameraTrajectory(w2c=torch.tensor(_random_rigid(9, 5)), K=torch.tensor([[40.0, 0, 24], [0, 40, 16],
                                    [0, 0, 1]]), width=48, height=32)
    rgb = torch.rand(9, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mask = torch.zeros(9, 1, 32, 48)
    mask[:, :, :16] = 1.0
    render_folder.save_render_folder(os.path.join(inp, "scene", "traj_a"), rgb, mask, traj)
    cls = ws.mappings["WorldStereoLoadRenderFolder"]
    assert "scene/traj_a" in comfy_stub_module.v1_input_types(cls)["required"]["render_folder"][0]
    image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(7))
    render, holes, loaded = ws.run("WorldStereoLoadRenderFolder", render_folder="scene/traj_a", image=image, frames=5)
    keep = np.floor(np.linspace(0, 8, 5)).astype(int)
    assert render.shape == (5, 32, 48, 3) and len(loaded) == 5
    np.testing.assert_allclose(loaded.w2c.numpy(), traj.w2c.numpy()[keep], atol=1e-9)
    np.testing.assert_allclose(render[0].numpy(), np.round(image[0].numpy() * 255) / 255, atol=1 / 255 + 1e-6)
    # the file's mask, frame 0 included (the release clears frame 0 for iterative trajectories only)
    assert float(holes[:, :16].min()) == 1.0 and float(holes[:, 16:].max()) == 0.0
    assert "lacks render.mp4" in cls.validate_inputs(render_folder="scene")
    render_folder.save_render_folder(os.path.join(inp, "scene", "reconstruct-1", "traj1"), rgb, mask, traj)
    _, holes, _ = ws.run("WorldStereoLoadRenderFolder", render_folder="scene/reconstruct-1/traj1", image=image,
                         frames=5)
    assert float(holes[0].max()) == 0.0 and float(holes[1:, :16].min()) == 1.0


# --------------------------------------------------------------------------------------------
# Memory and exports
# --------------------------------------------------------------------------------------------

def test_memory_nodes_never_mutate_and_persist(ws):
    image, scene = _plane_scene(ws)
    (bank,) = ws.run("WorldStereoMemoryBankCreate", source="start image", folder="", max_reference=8, align_nframe=8,
                     point_cloud=scene)
    assert len(bank) == 1 and (bank.width, bank.height) == (48, 32)
    trajs = ws.run("WorldStereoReconstructionTrajectories", frames=21, up_distance=0.0, point_cloud=scene)
    clip = torch.rand(21, 32, 48, 3, generator=torch.Generator().manual_seed(8))
    (bank2,) = ws.run("WorldStereoMemoryBankAddClip", memory_bank=bank, frames=clip, trajectory=trajs[0],
                      view_id="comfy", traj_id="", save_folder="ws/bank")
    assert len(bank) == 1 and len(bank2) == 9 and bank2.fnames[-1] == "comfy/traj0/0020"
    with pytest.raises(ws.errors.InputError, match="traj0"):
        ws.run("WorldStereoMemoryBankAddClip", memory_bank=bank2, frames=clip, trajectory=trajs[0], view_id="comfy",
               traj_id="traj0", save_folder="")
    memory, refs, index, cams = ws.run("WorldStereoMemoryRetrieve", memory_bank=bank2, trajectory=trajs[2],
                                       view_id="comfy", traj_id="traj2")
    parsed = json.loads(index)
    assert refs.shape[1:] == (32, 48, 3) and refs.shape[0] == len(parsed["ref_index"]) == len(memory.ref_index)
    assert len(cams) == refs.shape[0] and memory.frames.dtype == np.uint8
    assert all(e in bank2.fnames for e in parsed["entries"])
    (loaded,) = ws.run("WorldStereoMemoryBankCreate", source="saved bank (output/)", folder="ws/bank", max_reference=8,
                       align_nframe=8)
    assert loaded == bank2
    cls = ws.mappings["WorldStereoMemoryBankCreate"]
    assert "memory_bank.json" in cls.validate_inputs(source="saved bank (output/)", folder="ws/none")
    write_panorama_scene(ws.stub.folder_paths.get_input_directory(), frames=5)
    (pano,) = ws.run("WorldStereoMemoryBankCreate", source="panorama scene folder (input/)", folder=PANORAMA_SCENE,
                     max_reference=8, align_nframe=4)
    assert len(pano) == 27


def test_export_nodes(ws):
    import av

    pcf = importlib.import_module(f"{ws.stub.pack.__name__}.worldstereo_core.io.pointcloud_files")
    image, scene = _plane_scene(ws)
    out_dir = ws.stub.folder_paths.get_output_directory()
    frames = torch.rand(7, 32, 48, 3, generator=torch.Generator().manual_seed(9))
    (video,) = ws.run("WorldStereoSaveVideo", images=frames, filename_prefix="ws/clip", fps=16)
    with av.open(os.path.join(out_dir, video)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert len(decoded) == 7 and (decoded[0].width, decoded[0].height) == (48, 32) and stream.average_rate == 16
    (ply,) = ws.run("WorldStereoSavePointCloud", point_cloud=scene, filename_prefix="ws/cloud", format="ply",
                    world_up="-y")
    back = pcf.read_ply(os.path.join(out_dir, ply))
    np.testing.assert_allclose(back.xyz.numpy(), scene.cloud.xyz.numpy(), atol=1e-6)
    (glb,) = ws.run("WorldStereoSavePointCloud", point_cloud=scene, filename_prefix="ws/cloud", format="glb",
                    world_up="-y")
    assert ws.last_ui["result"] == [glb, None] and ws.last_ui["3d"][0]["filename"] == os.path.basename(glb)
    np.testing.assert_allclose(pcf.read_glb(os.path.join(out_dir, glb)).xyz.numpy(), scene.cloud.xyz.numpy(), atol=1e-5)
    (bank,) = ws.run("WorldStereoMemoryBankCreate", source="start image", folder="", max_reference=8, align_nframe=8,
                     point_cloud=scene)
    (folder,) = ws.run("WorldStereoExportWorldMirror", memory_bank=bank, folder_prefix="ws/wm", scene="s")
    (again,) = ws.run("WorldStereoExportWorldMirror", memory_bank=bank, folder_prefix="ws/wm", scene="s")
    assert folder != again  # every export gets a fresh folder
    cams = json.load(open(os.path.join(out_dir, folder, "cameras.json")))
    assert cams["num_cameras"] == 1 and len(os.listdir(os.path.join(out_dir, folder, "images"))) == 1


def test_exports_refuse_a_symlinked_subfolder_before_writing(ws, tmp_path):
    """Issue 10 item 4: with output/<link> pointing outside, Save Video, Save Point Cloud and Export
    WorldMirror wrote there first and failed afterwards; now nothing is written outside."""
    image, scene = _plane_scene(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(ws.stub.folder_paths.get_output_directory(), exist_ok=True)
    os.symlink(outside, os.path.join(ws.stub.folder_paths.get_output_directory(), "link"), target_is_directory=True)
    (bank,) = ws.run("WorldStereoMemoryBankCreate", source="start image", folder="", max_reference=8, align_nframe=8,
                     point_cloud=scene)
    frames = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(9))
    for node, inputs in (("WorldStereoSaveVideo", dict(images=frames, filename_prefix="link/clip", fps=16)),
                         ("WorldStereoSavePointCloud", dict(point_cloud=scene, filename_prefix="link/sub/cloud",
                                                            format="ply", world_up="-y")),
                         ("WorldStereoExportWorldMirror", dict(memory_bank=bank, folder_prefix="link/wm", scene="s"))):
        with pytest.raises(ws.errors.InputError, match="escape the output folder"):
            ws.run(node, **inputs)
        assert list(outside.iterdir()) == [], node


def test_bank_save_keeps_a_users_folder(ws):
    """Issue 10 item 1: Add Clip's save_folder deleted the files of an existing folder and reported success."""
    image, scene = _plane_scene(ws)
    (bank,) = ws.run("WorldStereoMemoryBankCreate", source="start image", folder="", max_reference=8, align_nframe=2,
                     point_cloud=scene)
    trajs = ws.run("WorldStereoReconstructionTrajectories", frames=5, up_distance=0.0, point_cloud=scene)
    mine = os.path.join(ws.stub.folder_paths.get_output_directory(), "mine")
    os.makedirs(os.path.join(mine, "frames"))
    with open(os.path.join(mine, "frames", "holiday.png"), "wb") as fh:
        fh.write(b"user data")
    clip = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ws.errors.InputError, match="holds no memory bank"):
        ws.run("WorldStereoMemoryBankAddClip", memory_bank=bank, frames=clip, trajectory=trajs[0], view_id="comfy",
               traj_id="", save_folder="mine")
    assert os.listdir(mine) == ["frames"] and os.listdir(os.path.join(mine, "frames")) == ["holiday.png"]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def test_loop_node_validation(ws):
    """The loop's scene folder is checked at queue time, before any weights load (its runs on the
    native MODEL: test_native_loop)."""
    write_panorama_scene(ws.stub.folder_paths.get_input_directory())
    validate = ws.mappings["WorldStereoMultiTrajectoryLoop"].validate_inputs
    # the image input with task panorama passes the queue (a panorama_scene may be linked)
    assert validate(scene="(the image input)", task="panorama", cache_mode="release", output_folder="x") is True
    # a panorama in global mode is refused
    message = validate(scene=PANORAMA_SCENE, task="auto", cache_mode="global", output_folder="x")
    assert isinstance(message, str) and "release" in message
    assert validate(scene=PANORAMA_SCENE, task="auto", cache_mode="release", output_folder="x") is True
    assert isinstance(validate(scene=PANORAMA_SCENE, task="auto", cache_mode="release", output_folder="../x"), str)


def test_panorama_scene_from_image(ws):
    """One equirectangular image (+ its depth) -> the scene folder in output/ for the loop's panorama task."""
    from synthetic_scene import panorama_room

    equirect = ws.core("geometry.equirect")
    pano, distance = panorama_room().equirect(64, 128)
    image = torch.from_numpy(pano).float()[None] / 255.0
    node = ws.mappings["WorldStereoPanoramaSceneFromImage"]
    args = dict(image=image, prompt="An empty room.", name="room", output_folder="ws/pano", views=1, explorations=0,
                reconstructs=0, frames=21, bank_width=48, bank_height=32)
    with pytest.raises(ws.errors.InputError, match="connect a depth map"):
        ws.run("WorldStereoPanoramaSceneFromImage", **args)
    assert isinstance(node.validate_inputs(name="../up", output_folder="x", bank_width=48, bank_height=32), str)
    assert isinstance(node.validate_inputs(name="room", output_folder="../x", bank_width=48, bank_height=32), str)
    assert isinstance(node.validate_inputs(name="room", output_folder="x", bank_width=47, bank_height=32), str)
    assert node.validate_inputs(name="room", output_folder="x", bank_width=48, bank_height=32) is True

    ws.stub.utils.updates.clear()
    depth = ws.core("geometry.start_view").ViewDepth(distance.float())
    scene, views = ws.run("WorldStereoPanoramaSceneFromImage", depth=depth, **args)
    out_dir = os.path.join(ws.stub.folder_paths.get_output_directory(), "ws", "pano")
    assert str(scene.folder) == os.path.join(out_dir, "panorama_scenes", "room") and not scene.reused
    _keys, _cams, crops = equirect.panorama_bank_crops(pano, 48, 32)
    assert views.shape == (27, 32, 48, 3) and torch.equal(views, torch.from_numpy(np.stack(crops)).float() / 255.0)
    ticks = [u[:2] for u in ws.stub.utils.updates]
    assert ticks and ticks[-1][0] == ticks[-1][1] and len({t for _v, t in ticks}) == 1
    assert ws.last_ui["text"][0].startswith("output/ws/pano/panorama_scenes/room: ")
    # the planned wander trajectories in the trajectory preview, over a sample of the 360-degree cloud
    preview = ws.last_ui["worldstereo_trajectory"]
    assert [e["label"] for e in preview] == ["view0/traj0", "view0/traj1", "view0/traj2"]
    for entry in preview:
        planned = ws.core("io.camera_json").load_camera_json(scene.folder / entry["label"] / "camera.json")
        assert torch.allclose(torch.tensor(entry["c2w"], dtype=torch.float64), planned.c2w.double(), atol=1e-5)
        assert (entry["width"], entry["height"]) == (48, 32)
    assert 0 < len(preview[0]["points"]) <= min(4000, len(scene.cloud)) and "points" not in preview[1]
    again, _ = ws.run("WorldStereoPanoramaSceneFromImage", depth=depth, **args)
    assert again.reused and again.folder == scene.folder  # a finished scene is reused as it is
    assert ws.last_ui["worldstereo_trajectory"] == preview
    with pytest.raises(ws.errors.InputError):  # ... and one made from another image is refused, not overwritten
        ws.run("WorldStereoPanoramaSceneFromImage", depth=depth, **dict(args, image=image.flip(2)))
