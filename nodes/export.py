"""Exports into ComfyUI's output folder: MP4 video, point clouds (PLY / GLB for the
built-in Preview3D) and the WorldMirror input folder of a memory bank.

Each export returns its path relative to ``output/`` as a STRING (wire it into Preview3D's
``model_file``) and shows the result under the node.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..worldstereo_core.cameras import WORLD_UP
from ..worldstereo_core.constants import FPS
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.pointcloud_files import write_glb, write_ply
from ..worldstereo_core.io.scene_layout import CAMERAS_FILE, IMAGES_DIR, NAME_MAP_FILE
from ..worldstereo_core.io.worldmirror import export_worldmirror
from . import types
from ._comfy import comfy_progress, node_errors
from .saving import file_entry, next_folder, next_paths, relative_to_base, save_video

CATEGORY = "WorldStereo/export"
POINT_CLOUD_FORMATS = ("glb", "ply")
#: The world up options: one per kind of world, the single-view / reconstruction one first (the default).
WORLD_UP_OPTIONS = tuple(dict.fromkeys(WORLD_UP.values()))


class SaveVideo(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Save Video"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoSaveVideo", display_name=cls.DISPLAY_NAME, category=CATEGORY, is_output_node=True,
            description="Save an IMAGE batch as an H.264 MP4 in the output folder and play it under the node.",
            inputs=[
                io.Image.Input("images", tooltip="The frames, in order."),
                io.String.Input("filename_prefix", default="WorldStereo/video", tooltip=
                                "File name prefix inside the output folder (sub-folders allowed)."),
                io.Int.Input("fps", default=FPS, min=1, max=120, tooltip=f"WorldStereo clips play at {FPS} fps."),
            ],
            outputs=[io.String.Output(display_name="video_path", tooltip="The MP4, relative to the output folder.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, images, filename_prefix, fps) -> io.NodeOutput:
        entry = save_video(images, filename_prefix, kind="output", fps=fps)
        rel = f"{entry['subfolder']}/{entry['filename']}" if entry["subfolder"] else entry["filename"]
        return io.NodeOutput(rel, ui={"images": [entry], "animated": (True,)})


class SavePointCloud(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Save Point Cloud (PLY/GLB)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoSavePointCloud", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            is_output_node=True,
            description=("Save the scene's point cloud as GLB (with the cameras as lines, viewable in Preview3D) or "
                         "PLY (binary, float xyz + uchar rgb) in the output folder."),
            inputs=[
                types.Socket.POINT_CLOUD.Input("point_cloud", tooltip="The scene's point cloud (Lift Depth)."),
                io.String.Input("filename_prefix", default="WorldStereo/cloud", tooltip=
                                "File name prefix inside the output folder (sub-folders allowed)."),
                io.Combo.Input("format", options=list(POINT_CLOUD_FORMATS), default="glb", tooltip=
                               "glb: viewable in Preview3D, with the cameras; ply: the points only."),
                io.Combo.Input("world_up", options=list(WORLD_UP_OPTIONS), default=WORLD_UP["reconstruction"],
                               tooltip=f"Which world axis is up (GLB only): {WORLD_UP['reconstruction']} for "
                                       f"image-based scenes, {WORLD_UP['panorama']} for panoramas."),
                types.Socket.TRAJECTORY.Input("trajectory", optional=True, tooltip=
                                              "Cameras drawn into the GLB as frustums."),
            ],
            outputs=[io.String.Output(display_name="model_file", tooltip=
                                      "Path relative to the output folder; connect it to Preview3D's model_file.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, point_cloud, filename_prefix, format, world_up, trajectory=None) -> io.NodeOutput:
        if format not in POINT_CLOUD_FORMATS:
            raise InputError(f"format must be one of {POINT_CLOUD_FORMATS}, got {format!r}")
        cloud = point_cloud.cloud
        if len(cloud) == 0:
            raise InputError("point_cloud is empty; nothing to save")
        (path,) = next_paths(filename_prefix, "output", 1, format)
        if format == "ply":
            write_ply(path, cloud)
        else:
            write_glb(path, cloud, frustum_segments=point_cloud.camera_segments(trajectory), world_up=world_up)
        rel = relative_to_base(path, "output")
        return io.NodeOutput(rel, ui={"3d": [file_entry(path, "output")], "result": [rel, None]})


class ExportWorldMirror(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Export WorldMirror Folder"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoExportWorldMirror", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            is_output_node=True,
            description=(f"Write the memory bank as a WorldMirror (HY-World 2.0) input folder: {IMAGES_DIR}/, "
                         f"{CAMERAS_FILE} (c2w extrinsics, pixel intrinsics) and {NAME_MAP_FILE}, for 3D "
                         "reconstruction."),
            inputs=[
                types.Socket.MEMORY_BANK.Input("memory_bank", tooltip="The bank of generated frames and cameras."),
                io.String.Input("folder_prefix", default="WorldStereo/worldmirror", tooltip=
                                "Folder name prefix inside the output folder; a new numbered folder each run."),
                io.String.Input("scene", default="scene", tooltip=f"Scene name used in {NAME_MAP_FILE}."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The folder, relative to the output folder.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, memory_bank, folder_prefix, scene) -> io.NodeOutput:
        if len(memory_bank) == 0:
            raise InputError("memory_bank is empty; add generated clips first")
        folder = next_folder(folder_prefix, "output")
        export_worldmirror(memory_bank, folder, scene.strip() or "scene", progress=comfy_progress(len(memory_bank)))
        rel = relative_to_base(folder, "output")
        return io.NodeOutput(rel, ui={"text": [f"output/{rel}: {len(memory_bank)} cameras"]})


NODE_CLASS_MAPPINGS = {
    "WorldStereoSaveVideo": SaveVideo,
    "WorldStereoSavePointCloud": SavePointCloud,
    "WorldStereoExportWorldMirror": ExportWorldMirror,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
