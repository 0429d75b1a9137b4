"""Warp rendering: the scene's point cloud seen along a trajectory (the model's geometry condition),
and pre-rendered render folders (``render.mp4`` + ``render_mask.mp4`` + ``camera.json``).

Outputs follow ComfyUI's conventions: the render is an IMAGE batch (one frame per camera, frame 0
the start image), the hole mask a MASK batch (1 = no point covers the pixel).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..worldstereo_core.constants import NFRAME
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.geometry.renderer import BACKENDS, render_warps
from ..worldstereo_core.io.render_folder import load_render_folder
from ..worldstereo_core.io.scene_layout import CAMERA_FILE, MASK_VIDEO, RENDER_VIDEO
from ..worldstereo_core.tasks.ordering import group_id, is_iterative
from . import files, types
from ._comfy import comfy_progress, node_errors, torch_device
from .images import frames_to_image, image_to_frames, mask_to_comfy
from .saving import video_ui

CATEGORY = "WorldStereo/render"


def render_inputs(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """The start image (first frame of an IMAGE batch) as (3, H, W) in [-1, 1]."""
    return image_to_frames(image, name)[0]


class RenderWarps(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Render Warps"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoRenderWarps", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Render the scene's point cloud into every camera of the trajectory: the warp video "
                         "and hole mask the model is conditioned on (frame 0 = the start image)."),
            inputs=[
                types.Socket.POINT_CLOUD.Input("point_cloud", tooltip="The scene's point cloud (Lift Depth)."),
                types.Socket.TRAJECTORY.Input("trajectory", tooltip="The cameras to render from."),
                io.Image.Input("image", tooltip="Start image at the generation size; fills frame 0 and sets the size."),
                io.Combo.Input("backend", options=list(BACKENDS[:3]), default="auto", tooltip=
                               "auto: torch on a GPU, the numba kernel on CPU when installed (identical results)."),
            ],
            outputs=[io.Image.Output(display_name="render", tooltip="One warp per camera, frame 0 = the start image."),
                     io.Mask.Output(display_name="hole_mask", tooltip="1 where no point covers the pixel.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, point_cloud, trajectory, image, backend) -> io.NodeOutput:
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
        return io.NodeOutput(frames, holes, ui=video_ui(frames, "WorldStereo/render"))


class LoadRenderFolder(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Load Render Folder"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoLoadRenderFolder", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=(f"Load a pre-rendered render folder from input/ ({RENDER_VIDEO}, {MASK_VIDEO}, "
                         f"{CAMERA_FILE}), "
                         "prepared as the reference does: resized to the start image, frame 0 replaced by it (and, "
                         "for an iterative reconstruct_*/traj1 folder, its hole mask cleared)."),
            inputs=[
                io.Combo.Input("render_folder", options=files.input_folders(RENDER_VIDEO, MASK_VIDEO, CAMERA_FILE),
                               tooltip=f"A folder in ComfyUI's input folder holding {RENDER_VIDEO}, {MASK_VIDEO} "
                                       f"and {CAMERA_FILE}."),
                io.Image.Input("image", tooltip="Start image at the generation size."),
                io.Int.Input("frames", default=NFRAME, min=0, max=1024, tooltip=
                             "Keep this many frames, evenly spaced (0 = all)."),
            ],
            outputs=[io.Image.Output(display_name="render", tooltip="The warps, frame 0 = the start image."),
                     io.Mask.Output(display_name="hole_mask", tooltip="1 where the warp has no content."),
                     types.Socket.TRAJECTORY.Output(display_name="trajectory", tooltip=
                                                    "The folder's cameras, at the start image's size.")],
        )

    @classmethod
    def _folder(cls, render_folder):
        return files.input_path(render_folder, "render_folder", folder=True)

    @classmethod
    def fingerprint_inputs(cls, render_folder, **_):
        return files.fingerprint_of(cls._folder, render_folder)

    @classmethod
    def validate_inputs(cls, render_folder):
        def check():
            folder = cls._folder(render_folder)
            missing = [n for n in (RENDER_VIDEO, MASK_VIDEO, CAMERA_FILE) if not (folder / n).is_file()]
            if missing:
                raise InputError(f"render_folder {render_folder!r} lacks {', '.join(missing)}")
        return files.validation_message(check)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, render_folder, image, frames) -> io.NodeOutput:
        start = render_inputs(image)
        _, height, width = start.shape
        folder = cls._folder(render_folder)
        render, mask, traj = load_render_folder(folder, height, width, start, clear_first_mask=is_iterative(
            group_id(folder.parent.name), folder.name), nframe=frames)
        traj = traj.resized(height, width)
        return io.NodeOutput(frames_to_image(render), mask_to_comfy(mask), traj)


NODE_CLASS_MAPPINGS = {
    "WorldStereoRenderWarps": RenderWarps,
    "WorldStereoLoadRenderFolder": LoadRenderFolder,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
