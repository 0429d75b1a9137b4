"""Depth and point-cloud nodes: working size, MoGe depth, bring-your-own depth / point maps, lifting.

A ``WORLDSTEREO_DEPTH`` is a core :class:`ViewDepth`; a start image becomes a ``POINT_CLOUD``, a core
:class:`StartView`: the lifted cloud plus the start camera (identity pose, pixel K) and the scene
scale m (median depth) that trajectory moves are measured in. Everything is computed by
``worldstereo_core``; these nodes only convert ComfyUI tensors and report errors.
"""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..worldstereo_core.constants import (DEFAULT_SCALE_MAP, DEPTH_CONTRACT_FACTOR, FALLBACK_FOV_DEG,
                                           SOBEL_EDGE_THRESHOLD)
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.geometry.depth import (DEPTH_ENCODINGS, PNG_DEPTH_SCALE, depth_from_values, load_depth_map,
                                               load_point_map)
from ..worldstereo_core.geometry.start_view import (StartView, ViewDepth, lift_start_view,
                                                    start_view_from_point_map)
from ..worldstereo_core.io.images import load_image, resize_bicubic
from ..worldstereo_core.sizes import assign_scale
from . import files, types
from ._comfy import node_errors, on_compute_device
from .images import image_to_frames, image_to_uint8, mask_from_comfy
from .saving import file_entry, next_paths

CATEGORY = "WorldStereo/geometry"
DEPTH_FILE_EXTENSIONS = (".npy", ".npz", ".png")
POINT_MAP_EXTENSIONS = (".npy", ".npz")


def first_image_uint8(image: torch.Tensor, name: str) -> np.ndarray:
    """The first frame of an IMAGE batch as RGB uint8 (H, W, 3) (validated like core images)."""
    return load_image(image_to_uint8(image, name)[0].numpy(), name=name)


def uint8_to_image(frames: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) -> IMAGE [B, H, W, 3] float32 0..1."""
    arr = np.array(frames, dtype=np.uint8)  # a writable copy
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(arr).float().div(255.0)


def depth_preview(depth: torch.Tensor) -> torch.Tensor:
    """Grey IMAGE [1, H, W, 3] of a depth map: near = bright (normalised disparity), invalid = black."""
    d = depth.detach().float().cpu()
    valid = torch.isfinite(d) & (d > 0)
    out = torch.zeros_like(d)
    if bool(valid.any()):
        disp = 1.0 / d[valid]
        lo, hi = disp.min(), disp.max()
        out[valid] = (disp - lo) / (hi - lo) if float(hi - lo) > 0 else torch.ones_like(disp)
    return out[None, :, :, None].expand(1, *out.shape, 3).contiguous()


def save_preview_cloud(scene: StartView, prefix: str = "WorldStereo/cloud") -> dict:
    """Write the scene's cloud as a GLB into ComfyUI's temp folder; its ``ui`` entry."""
    from ..worldstereo_core.io.pointcloud_files import write_glb

    (path,) = next_paths(prefix, "temp", 1, "glb")
    write_glb(path, scene.cloud, frustum_segments=scene.camera_segments())
    return file_entry(path, "temp")


class ResizeToBucket(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Resize To Bucket"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoResizeToBucket", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Resize an image to the working size the model was trained on: the bucket of the "
                         "variant's scale_map (default 480x768 family) closest in aspect ratio."),
            inputs=[io.Image.Input("image", tooltip="Start image (the first frame of a batch is used)."),
                    io.Model.Input("model", optional=True, tooltip=
                                   "The MODEL of WorldStereo Apply Variant: use its variant's scale_map buckets.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The image at the working size."),
                     io.Int.Output(display_name="width", tooltip="Working width."),
                     io.Int.Output(display_name="height", tooltip="Working height.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, image, model=None) -> io.NodeOutput:
        rgb = first_image_uint8(image, "image")
        scale_map = DEFAULT_SCALE_MAP
        if model is not None:  # a MODEL exists only where ComfyUI's model code (and so nodes.native) does
            from .native.model import variant_config

            scale_map = variant_config(model).scale_map
        height, width = assign_scale(rgb.shape[0], rgb.shape[1], scale_map)
        return io.NodeOutput(uint8_to_image(resize_bicubic(rgb, (height, width))), width, height)


class MoGeDepth(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo MoGe Depth"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMoGeDepth", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="Metric depth, validity mask and camera intrinsics of one image with MoGe-2.",
            inputs=[
                types.Socket.MOGE.Input("moge", tooltip="The MoGe model (MoGe Loader)."),
                io.Image.Input("image", tooltip="Start image at the working size (first frame of a batch)."),
                io.Int.Input("resolution_level", default=9, min=0, max=9, tooltip=
                             "MoGe token budget: 9 = finest (reference setting)."),
            ],
            outputs=[types.Socket.DEPTH.Output(display_name="depth", tooltip="Depth with MoGe's intrinsics."),
                     io.Image.Output(display_name="depth_preview", tooltip="Near = bright, invalid = black."),
                     io.Mask.Output(display_name="valid_mask", tooltip="1 where MoGe gives a depth.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, moge, image, resolution_level) -> io.NodeOutput:
        from ..worldstereo_core.geometry.moge import estimate_depth

        rgb = first_image_uint8(image, "image")
        with on_compute_device(moge):
            out = estimate_depth(moge, rgb, resolution_level=resolution_level)
        depth = ViewDepth.of(out)
        return io.NodeOutput(depth, depth_preview(depth.depth), depth.mask.float()[None])


class DepthFromImage(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Depth From Image"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoDepthFromImage", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Bring your own depth: turn a depth IMAGE (e.g. from another depth model) or a MASK "
                         "holding depth values into a WorldStereo depth map."),
            inputs=[
                io.Combo.Input("encoding", options=list(DEPTH_ENCODINGS), default=DEPTH_ENCODINGS[0], tooltip=
                               "How pixel values (0..1) map to depth. 'value x scale' keeps 0 as invalid."),
                io.Float.Input("scale", default=1.0, min=1e-6, max=1e6, step=0.01, tooltip=
                               "Depth per unit value (encoding 'depth = value x scale')."),
                io.Float.Input("near", default=0.5, min=1e-6, max=1e6, step=0.01, tooltip=
                               "Depth of the nearest value (the near..far encodings)."),
                io.Float.Input("far", default=10.0, min=1e-6, max=1e6, step=0.01, tooltip=
                               "Depth of the farthest value (the near..far encodings)."),
                io.Image.Input("depth_image", optional=True, tooltip="Depth as an image (its first channel is used)."),
                io.Mask.Input("depth_mask", optional=True, tooltip="Depth values as a MASK (used when no depth_image)."),
                io.Mask.Input("valid_mask", optional=True, tooltip="1 = keep the pixel, 0 = no depth there."),
            ],
            outputs=[types.Socket.DEPTH.Output(display_name="depth", tooltip="The depth map."),
                     io.Image.Output(display_name="depth_preview", tooltip="Near = bright, invalid = black.")],
        )

    @classmethod
    def validate_inputs(cls, encoding, near, far):
        if encoding != DEPTH_ENCODINGS[0] and not near < far:
            return f"near ({near}) must be smaller than far ({far})"
        return True

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, encoding, scale, near, far, depth_image=None, depth_mask=None,
                valid_mask=None) -> io.NodeOutput:
        if depth_image is not None:
            values = image_to_frames(depth_image, "depth_image")[0, 0].add(1.0).mul(0.5)
        elif depth_mask is not None:
            values = mask_from_comfy(depth_mask, "depth_mask")[0, 0]
        else:
            raise InputError("connect depth_image or depth_mask (the depth to convert)")
        depth = depth_from_values(values, encoding, scale, near, far)
        mask = None
        if valid_mask is not None:
            mask = mask_from_comfy(valid_mask, "valid_mask")[0, 0] > 0.5
            if tuple(mask.shape) != tuple(depth.shape):
                raise InputError(f"valid_mask is {tuple(mask.shape)} but the depth is {tuple(depth.shape)}")
            depth = torch.where(mask, depth, torch.zeros_like(depth))
        return io.NodeOutput(ViewDepth(depth, mask), depth_preview(depth))


class LoadDepthFile(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Load Depth File"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoLoadDepthFile", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description="Load a depth map from input/: .npy / .npz (key 'depth') or a 16-bit PNG (millimetres).",
            inputs=[
                io.Combo.Input("depth_file", options=files.input_files(DEPTH_FILE_EXTENSIONS), tooltip=
                               "A file in ComfyUI's input folder."),
                io.Float.Input("png_scale", default=PNG_DEPTH_SCALE, min=1e-6, max=1e9, tooltip=
                               "PNG value / png_scale = depth (1000: millimetres)."),
                io.String.Input("npz_key", default="", tooltip="Array name in an .npz (empty: 'depth' or the only one)."),
            ],
            outputs=[types.Socket.DEPTH.Output(display_name="depth", tooltip="The depth map (0 = unknown)."),
                     io.Image.Output(display_name="depth_preview", tooltip="Near = bright, invalid = black.")],
        )

    @classmethod
    def fingerprint_inputs(cls, depth_file, **_):
        return files.fingerprint_of(files.input_path, depth_file, "depth_file")

    @classmethod
    def validate_inputs(cls, depth_file):
        return files.validation_message(files.input_path, depth_file, "depth_file")

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, depth_file, png_scale, npz_key) -> io.NodeOutput:
        path = files.input_path(depth_file, "depth_file")
        depth = load_depth_map(path, key=npz_key or None, png_scale=png_scale)
        depth = torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth))
        return io.NodeOutput(ViewDepth(depth), depth_preview(depth))


class LiftDepth(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Lift Depth To Point Cloud"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoLiftDepth", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Lift a depth map to a coloured point cloud seen from the start camera (identity pose): "
                         "far depths contracted, depth edges dropped, as the reference does."),
            inputs=[
                io.Image.Input("image", tooltip="Start image at the working size; gives the colours."),
                types.Socket.DEPTH.Input("depth", tooltip="The start image's depth (MoGe Depth, Load Depth File ...)."),
                io.Float.Input("fov_deg", default=FALLBACK_FOV_DEG, min=1.0, max=179.0, step=0.5, tooltip=
                               "Horizontal field of view, used only when the depth has no intrinsics (MoGe has)."),
                io.Float.Input("sobel_threshold", default=SOBEL_EDGE_THRESHOLD, min=0.0, max=10.0, step=0.01, tooltip=
                               "Depth-edge threshold on the disparity gradient."),
                io.Float.Input("contract", default=DEPTH_CONTRACT_FACTOR, min=0.0, max=1000.0, step=0.5, tooltip=
                               "Contract depths beyond this multiple of the median (0 = off)."),
            ],
            outputs=[types.Socket.POINT_CLOUD.Output(display_name="point_cloud", tooltip=
                                                     "The cloud with the start camera and the scene scale.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, image, depth, fov_deg, sobel_threshold, contract) -> io.NodeOutput:
        rgb = first_image_uint8(image, "image")
        scene = lift_start_view(rgb, depth, fov_deg=fov_deg, sobel_threshold=sobel_threshold, contract=contract)
        ui = {"3d": [save_preview_cloud(scene)],
              "text": [f"{len(scene.cloud)} points, scene scale m = {scene.median_depth:.3f}"]}
        return io.NodeOutput(scene, ui=ui)


class LoadPointMap(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Load Point Map"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoLoadPointMap", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Bring your own geometry: a per-pixel point map (H, W, 3) from input/ (.npy / .npz) in "
                         "the start camera's frame (OpenCV axes) or in world coordinates."),
            inputs=[
                io.Image.Input("image", tooltip="Start image; gives the colours (resized to the map when needed)."),
                io.Combo.Input("point_map_file", options=files.input_files(POINT_MAP_EXTENSIONS), tooltip=
                               "An (H, W, 3) .npy / .npz file in ComfyUI's input folder."),
                io.Float.Input("fov_deg", default=FALLBACK_FOV_DEG, min=1.0, max=179.0, step=0.5, tooltip=
                               "Horizontal field of view of the start camera."),
                io.String.Input("npz_key", default="", tooltip="Array name in an .npz (empty: the only one)."),
            ],
            outputs=[types.Socket.POINT_CLOUD.Output(display_name="point_cloud", tooltip=
                                                     "The cloud with the start camera and the scene scale.")],
        )

    @classmethod
    def fingerprint_inputs(cls, point_map_file, **_):
        return files.fingerprint_of(files.input_path, point_map_file, "point_map_file")

    @classmethod
    def validate_inputs(cls, point_map_file):
        return files.validation_message(files.input_path, point_map_file, "point_map_file")

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, image, point_map_file, fov_deg, npz_key) -> io.NodeOutput:
        points = load_point_map(files.input_path(point_map_file, "point_map_file"), key=npz_key or None)
        return io.NodeOutput(start_view_from_point_map(first_image_uint8(image, "image"), points, fov_deg))


NODE_CLASS_MAPPINGS = {
    "WorldStereoResizeToBucket": ResizeToBucket,
    "WorldStereoMoGeDepth": MoGeDepth,
    "WorldStereoDepthFromImage": DepthFromImage,
    "WorldStereoLoadDepthFile": LoadDepthFile,
    "WorldStereoLiftDepth": LiftDepth,
    "WorldStereoLoadPointMap": LoadPointMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
