"""Memory-bank nodes: create a bank (start image, panorama scene folder or a saved bank), add a
generated clip, and retrieve the reference frames a memory model is conditioned on.

A ``MEMORY_BANK`` is a core :class:`MemoryBank`. Nodes never change the bank they receive: adding
a clip returns a new bank (a deep copy), so ComfyUI's cached outputs stay valid. Banks can be
saved into (and loaded back from) a folder under ``output/``.
"""
from __future__ import annotations

import copy
import json

from comfy_api.latest import io

from ..worldstereo_core.cameras import CameraTrajectory
from ..worldstereo_core.constants import ALIGN_NFRAME, MAX_REFERENCE, NFRAME
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.scene_layout import CAMERAS_FILE, IMAGES_DIR, PANO_BANK
from ..worldstereo_core.memory.bank import INDEX_NAME, MemoryBank
from ..worldstereo_core.memory.retrieval import retrieve
from ..worldstereo_core.memory.selector import CameraSelector
from . import files, types
from ._comfy import comfy_progress, node_errors
from .geometry import uint8_to_image
from .images import image_to_uint8

CATEGORY = "WorldStereo/memory"
SOURCES = ("start image", "panorama scene folder (input/)", "saved bank (output/)")
DEFAULT_VIEW = "comfy"


def _folder(source: str, folder: str):
    if source == SOURCES[1]:
        path = files.input_path(folder, "folder", folder=True)
        cameras = f"{PANO_BANK}/{CAMERAS_FILE}"
        if not (path / cameras).is_file():
            raise InputError(f"folder {folder!r} has no {cameras} (a panorama scene folder needs {cameras} and "
                             f"{PANO_BANK}/{IMAGES_DIR}/<key>.png)")
        return path
    if source == SOURCES[2]:
        path = files.output_folder(folder, "folder")
        if not MemoryBank.exists(path):
            raise InputError(f"no saved memory bank in output/{folder} ({INDEX_NAME} missing); save one with "
                             "WorldStereo Memory Bank Add Clip's save_folder")
        return path
    return None


class MemoryBankCreate(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Memory Bank Create"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMemoryBankCreate", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Start a memory bank: from the start image (reconstruction), from a panorama scene's "
                         "27-view bank in input/, or load one saved earlier under output/."),
            inputs=[
                io.Combo.Input("source", options=list(SOURCES), default=SOURCES[0], tooltip=
                               "start image: the connected point_cloud's image and camera; or a panorama scene "
                               "folder in input/; or a bank saved under output/."),
                io.String.Input("folder", default="", tooltip=
                                "Panorama scene folder (in input/) or saved bank folder (in output/); unused for "
                                "'start image'."),
                io.Int.Input("max_reference", default=MAX_REFERENCE, min=1, max=64, tooltip=
                             "Most reference frames a clip is conditioned on."),
                io.Int.Input("align_nframe", default=ALIGN_NFRAME, min=1, max=256, tooltip=
                             "Frames kept from every generated clip."),
                types.Socket.POINT_CLOUD.Input("point_cloud", optional=True, tooltip=
                                               "Start image and camera ('start image')."),
            ],
            outputs=[types.Socket.MEMORY_BANK.Output(display_name="memory_bank", tooltip="The new bank.")],
        )

    @classmethod
    def validate_inputs(cls, source, folder):
        if source not in SOURCES:
            return f"source must be one of {list(SOURCES)}"
        return files.validation_message(_folder, source, folder)

    @classmethod
    def fingerprint_inputs(cls, source, folder, **_):
        return files.fingerprint_of(_folder, source, folder)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, source, folder, max_reference, align_nframe, point_cloud=None) -> io.NodeOutput:
        options = dict(max_reference=max_reference, align_nframe=align_nframe, nframe=max(NFRAME, align_nframe + 1))
        if source == SOURCES[0]:
            if point_cloud is None or point_cloud.image is None:
                raise InputError("'start image' needs a point_cloud (it carries the start image and camera)")
            bank = MemoryBank.reconstruction(point_cloud.image, point_cloud.K, point_cloud.width, point_cloud.height,
                                             **options)
        elif source == SOURCES[1]:
            bank = MemoryBank.from_panorama_folder(_folder(source, folder), **options)
        else:
            bank = MemoryBank.load(_folder(source, folder))
        return io.NodeOutput(bank, ui={"text": [bank.summary()]})


class MemoryBankAddClip(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Memory Bank Add Clip"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMemoryBankAddClip", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Fold a generated clip into the memory (the release's keep rule: align_nframe frames, never "
                         "frame 0, always the last). Returns a new bank; optionally saves it under output/."),
            inputs=[
                types.Socket.MEMORY_BANK.Input("memory_bank", tooltip="The bank to add to (it is not changed)."),
                io.Image.Input("frames", tooltip="The generated clip, one frame per camera."),
                types.Socket.TRAJECTORY.Input("trajectory", tooltip="The cameras the clip was generated for."),
                io.String.Input("view_id", default=DEFAULT_VIEW, tooltip="Group name of this clip in the bank."),
                io.String.Input("traj_id", default="", tooltip=
                                "Name of this clip in the bank (empty: traj0, traj1 ...)."),
                io.String.Input("save_folder", default="", tooltip=
                                "Also save the bank to output/<save_folder> (empty: do not save)."),
            ],
            outputs=[types.Socket.MEMORY_BANK.Output(display_name="memory_bank", tooltip="A new bank with the clip.")],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, memory_bank, frames, trajectory, view_id, traj_id, save_folder) -> io.NodeOutput:
        clip = image_to_uint8(frames, "frames").numpy()
        if len(clip) != len(trajectory):
            raise InputError(f"frames has {len(clip)} images but the trajectory has {len(trajectory)} cameras")
        view_id = view_id.strip() or DEFAULT_VIEW
        bank = copy.deepcopy(memory_bank)
        traj_id = traj_id.strip() or bank.next_traj_id(view_id)
        if bank.has_trajectory(view_id, traj_id):
            raise InputError(f"the bank already holds {view_id}/{traj_id}; give this clip another traj_id")
        kept = bank.update_memory(list(clip), trajectory.w2c, trajectory.K, view_id, traj_id,
                                  k_size=(trajectory.height, trajectory.width))
        if save_folder.strip():
            target = files.output_folder(save_folder, "save_folder")
            bank.save(target, progress=comfy_progress(len(bank)))
        return io.NodeOutput(bank, ui={"text": [f"{bank.summary()}; kept frames {kept} of {view_id}/{traj_id}"]})


class MemoryRetrieve(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Memory Retrieve"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMemoryRetrieve", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Retrieve the reference frames for a target trajectory (frustum overlap x view angle, at "
                         "most max_reference distinct frames; DINOv2 features refine the choice when connected)."),
            inputs=[
                types.Socket.MEMORY_BANK.Input("memory_bank", tooltip="The bank to retrieve from."),
                types.Socket.TRAJECTORY.Input("trajectory", tooltip="Target cameras (at the generation size)."),
                io.String.Input("view_id", default=DEFAULT_VIEW, tooltip="The target's group name."),
                io.String.Input("traj_id", default="", tooltip="The target's name (panorama shortcuts use it)."),
                types.Socket.DINOV2.Input("dinov2", optional=True, tooltip=
                                          "Image features for diverse references; without it, camera poses alone "
                                          "choose them."),
            ],
            outputs=[
                types.Socket.MEMORY.Output(display_name="memory", tooltip="The references, for the Sampler."),
                io.Image.Output(display_name="references", tooltip="The reference frames at the generation size."),
                io.String.Output(display_name="ref_index", tooltip=
                                 "JSON: the target frame each reference attaches to, and the bank entries."),
                types.Socket.TRAJECTORY.Output(display_name="reference_cameras", tooltip="The references' cameras."),
            ],
        )

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, memory_bank, trajectory, view_id, traj_id, dinov2=None) -> io.NodeOutput:
        height, width = trajectory.height, trajectory.width
        selector = CameraSelector(feature_fn=dinov2) if dinov2 is not None else None
        found = retrieve(memory_bank, trajectory.w2c, trajectory.K, view_id.strip() or DEFAULT_VIEW,
                         traj_id.strip() or "traj", k_size=(height, width), selector=selector,
                         progress=comfy_progress(3))
        positions = found.ref_index.tolist()
        refs = found.reference_frames(height, width)
        memory = types.Memory(frames=refs, ref_index=found.ref_index.clone(), w2c=found.ref_w2cs.clone(),
                              retrieved=list(found.ref_global_indices))
        ref_cams = CameraTrajectory(w2c=found.ref_w2cs.clone(), K=memory_bank.K[memory.retrieved].clone(),
                                    width=memory_bank.width, height=memory_bank.height)
        index_text = json.dumps({"ref_index": positions,
                                 "entries": [memory_bank.fnames[g] for g in memory.retrieved]})
        return io.NodeOutput(memory, uint8_to_image(refs), index_text, ref_cams, ui={"text": [index_text]})


NODE_CLASS_MAPPINGS = {
    "WorldStereoMemoryBankCreate": MemoryBankCreate,
    "WorldStereoMemoryBankAddClip": MemoryBankAddClip,
    "WorldStereoMemoryRetrieve": MemoryRetrieve,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
