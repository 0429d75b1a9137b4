"""Warp rendering: the scene's point cloud seen along a trajectory (the model's geometry condition),
and pre-rendered render folders (``render.mp4`` + ``render_mask.mp4`` + ``camera.json``).

Outputs follow ComfyUI's conventions: the render is an IMAGE batch (one frame per camera, frame 0
the start image), the hole mask a MASK batch (1 = no point covers the pixel).
"""
from __future__ import annotations

import torch

from ..worldstereo_core.cameras import subsample_indices
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.geometry.renderer import BACKENDS, render_warps
from ..worldstereo_core.io.render_folder import CAMERA_JSON, MASK_VIDEO, RENDER_VIDEO, load_render_folder
from ..worldstereo_core.tasks.ordering import group_id, is_iterative
from . import files, types
from ._comfy import comfy_progress, node_errors, torch_device
from .images import frames_to_image, image_to_frames, mask_to_comfy
from .saving import video_ui

CATEGORY = "WorldStereo/render"


def render_inputs(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """The start image (first frame of an IMAGE batch) as (3, H, W) in [-1, 1]."""
    return image_to_frames(image, name)[0]


class RenderWarps:
    DESCRIPTION = ("Render the scene's point cloud into every camera of the trajectory: the warp video "
                   "and hole mask the model is conditioned on (frame 0 = the start image).")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("render", "hole_mask")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "point_cloud": (types.POINT_CLOUD,),
            "trajectory": (types.TRAJECTORY,),
            "image": ("IMAGE", {"tooltip": "Start image at the generation size; fills frame 0 and sets the size."}),
            "backend": (list(BACKENDS[:3]), {"default": "auto", "tooltip":
                        "auto: torch on a GPU, the numba kernel on CPU when installed (identical results)."}),
        }}

    @node_errors("WorldStereo Render Warps")
    def render(self, point_cloud, trajectory, image, backend):
        start = render_inputs(image)
        _, height, width = start.shape
        device = torch_device()
        cloud = point_cloud.cloud
        if len(cloud) == 0:
            raise InputError("point_cloud is empty; lift a depth map first")
        progress = comfy_progress(len(trajectory))
        rgb, mask = render_warps(cloud.xyz.to(device), cloud.rgb_signed.to(device), trajectory, start.to(device),
                                 height, width, backend=backend, progress=progress)
        frames, holes = frames_to_image(rgb), mask_to_comfy(mask)
        return {"ui": video_ui(frames, "WorldStereo/render"), "result": (frames, holes)}


class LoadRenderFolder:
    DESCRIPTION = ("Load a pre-rendered render folder from input/ (render.mp4, render_mask.mp4, camera.json), "
                   "prepared as the reference does: resized to the start image, frame 0 replaced by it (and, for "
                   "an iterative reconstruct_*/traj1 folder, its hole mask cleared).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK", types.TRAJECTORY)
    RETURN_NAMES = ("render", "hole_mask", "trajectory")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "render_folder": (files.input_folders(RENDER_VIDEO, MASK_VIDEO, CAMERA_JSON),
                              {"tooltip": "A folder in ComfyUI's input folder holding render.mp4, "
                                          "render_mask.mp4 and camera.json."}),
            "image": ("IMAGE", {"tooltip": "Start image at the generation size."}),
            "frames": ("INT", {"default": 21, "min": 0, "max": 1024,
                               "tooltip": "Keep this many frames, evenly spaced (0 = all)."}),
        }}

    @classmethod
    def _folder(cls, render_folder):
        return files.input_path(render_folder, "render_folder", folder=True)

    @classmethod
    def IS_CHANGED(cls, render_folder, **_):
        try:
            return files.fingerprint(cls._folder(render_folder))
        except InputError:
            return ""

    @classmethod
    def VALIDATE_INPUTS(cls, render_folder):
        def check():
            folder = cls._folder(render_folder)
            missing = [n for n in (RENDER_VIDEO, MASK_VIDEO, CAMERA_JSON) if not (folder / n).is_file()]
            if missing:
                raise InputError(f"render_folder {render_folder!r} lacks {', '.join(missing)}")
        return files.validation_message(check)

    @node_errors("WorldStereo Load Render Folder")
    def load(self, render_folder, image, frames):
        start = render_inputs(image)
        _, height, width = start.shape
        folder = self._folder(render_folder)
        render, mask, traj = load_render_folder(folder, height, width, start, clear_first_mask=is_iterative(
            group_id(folder.parent.name), folder.name))
        if frames and len(render) > frames:
            keep = subsample_indices(len(render), frames)
            render, mask, traj = render[keep], mask[keep], traj.select(keep)
        if traj.width is not None and traj.height is not None and (traj.height, traj.width) != (height, width):
            traj = traj.resized(height, width)
        return (frames_to_image(render), mask_to_comfy(mask), traj)


NODE_CLASS_MAPPINGS = {
    "WorldStereoRenderWarps": RenderWarps,
    "WorldStereoLoadRenderFolder": LoadRenderFolder,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorldStereoRenderWarps": "WorldStereo Render Warps",
    "WorldStereoLoadRenderFolder": "WorldStereo Load Render Folder",
}
