"""Exports into ComfyUI's output folder: MP4 video (16 fps), point clouds (PLY / GLB for the
built-in Preview3D) and the WorldMirror input folder of a memory bank.

Each export returns its path relative to ``output/`` as a STRING (wire it into Preview3D's
``model_file``) and shows the result under the node.
"""
from __future__ import annotations

from ..worldstereo_core.cameras import invert_rigid
from ..worldstereo_core.constants import FPS
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.pointcloud_files import camera_frustum_segments, write_glb, write_ply
from ..worldstereo_core.io.worldmirror import export_worldmirror
from . import types
from ._comfy import comfy_progress, node_errors
from .saving import file_entry, next_folder, next_paths, relative_to_base, save_video

CATEGORY = "WorldStereo/export"
POINT_CLOUD_FORMATS = ("glb", "ply")
WORLD_UP = ("-y", "+z")


class SaveVideo:
    DESCRIPTION = "Save an IMAGE batch as an H.264 MP4 in the output folder and play it under the node."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("video_path",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "WorldStereo/video"}),
            "fps": ("INT", {"default": FPS, "min": 1, "max": 120, "tooltip": "WorldStereo clips play at 16 fps."}),
        }}

    @node_errors("WorldStereo Save Video")
    def save(self, images, filename_prefix, fps):
        entry = save_video(images, filename_prefix, kind="output", fps=fps)
        rel = f"{entry['subfolder']}/{entry['filename']}" if entry["subfolder"] else entry["filename"]
        return {"ui": {"images": [entry], "animated": (True,)}, "result": (rel,)}


class SavePointCloud:
    DESCRIPTION = ("Save the scene's point cloud as GLB (with the cameras as lines, viewable in Preview3D) or "
                   "PLY (binary, float xyz + uchar rgb) in the output folder.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("model_file",)
    OUTPUT_TOOLTIPS = ("Path relative to the output folder; connect it to Preview3D's model_file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "point_cloud": (types.POINT_CLOUD,),
                "filename_prefix": ("STRING", {"default": "WorldStereo/cloud"}),
                "format": (list(POINT_CLOUD_FORMATS), {"default": "glb"}),
                "world_up": (list(WORLD_UP), {"default": "-y", "tooltip":
                             "Which world axis is up (GLB only): -y for image-based scenes, +z for panoramas."}),
            },
            "optional": {"trajectory": (types.TRAJECTORY, {"tooltip": "Cameras drawn into the GLB as frustums."})},
        }

    @node_errors("WorldStereo Save Point Cloud")
    def save(self, point_cloud, filename_prefix, format, world_up, trajectory=None):
        if format not in POINT_CLOUD_FORMATS:
            raise InputError(f"format must be one of {POINT_CLOUD_FORMATS}, got {format!r}")
        cloud = point_cloud.cloud
        if len(cloud) == 0:
            raise InputError("point_cloud is empty; nothing to save")
        (path,) = next_paths(filename_prefix, "output", 1, format)
        if format == "ply":
            write_ply(path, cloud)
        else:
            w2c = point_cloud.w2c[None] if trajectory is None else trajectory.w2c
            K = point_cloud.K[None] if trajectory is None else trajectory.K
            width = point_cloud.width if trajectory is None else (trajectory.width or point_cloud.width)
            height = point_cloud.height if trajectory is None else (trajectory.height or point_cloud.height)
            segments = camera_frustum_segments(invert_rigid(w2c), K, width, height, 0.1 * point_cloud.median_depth)
            write_glb(path, cloud, frustum_segments=segments, world_up=world_up)
        rel = relative_to_base(path, "output")
        return {"ui": {"3d": [file_entry(path, "output")], "result": [rel, None]}, "result": (rel,)}


class ExportWorldMirror:
    DESCRIPTION = ("Write the memory bank as a WorldMirror (HY-World 2.0) input folder: images/, cameras.json "
                   "(c2w extrinsics, pixel intrinsics) and name_map.json, for 3D reconstruction.")
    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("folder",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "memory_bank": (types.MEMORY_BANK,),
            "folder_prefix": ("STRING", {"default": "WorldStereo/worldmirror"}),
            "scene": ("STRING", {"default": "scene", "tooltip": "Scene name used in name_map.json."}),
        }}

    @node_errors("WorldStereo Export WorldMirror")
    def export(self, memory_bank, folder_prefix, scene):
        if len(memory_bank) == 0:
            raise InputError("memory_bank is empty; add generated clips first")
        folder = next_folder(folder_prefix, "output")
        export_worldmirror(memory_bank, folder, scene.strip() or "scene", progress=comfy_progress(len(memory_bank)))
        rel = relative_to_base(folder, "output")
        return {"ui": {"text": [f"output/{rel}: {len(memory_bank)} cameras"]}, "result": (rel,)}


NODE_CLASS_MAPPINGS = {
    "WorldStereoSaveVideo": SaveVideo,
    "WorldStereoSavePointCloud": SavePointCloud,
    "WorldStereoExportWorldMirror": ExportWorldMirror,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorldStereoSaveVideo": "WorldStereo Save Video",
    "WorldStereoSavePointCloud": "WorldStereo Save Point Cloud (PLY/GLB)",
    "WorldStereoExportWorldMirror": "WorldStereo Export WorldMirror Folder",
}
