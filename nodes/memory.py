"""Memory-bank nodes: create a bank (start image, panorama scene folder or a saved bank), add a
generated clip, and retrieve the reference frames a memory model is conditioned on.

A ``MEMORY_BANK`` is a core :class:`MemoryBank`. Nodes never change the bank they receive: adding
a clip returns a new bank (a deep copy), so ComfyUI's cached outputs stay valid. Banks can be
saved into (and loaded back from) a folder under ``output/``.
"""
from __future__ import annotations

import copy
import json

import numpy as np

from ..worldstereo_core.cameras import CameraTrajectory
from ..worldstereo_core.constants import ALIGN_NFRAME, MAX_REFERENCE, NFRAME
from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.images import resize_bicubic
from ..worldstereo_core.memory.bank import MemoryBank
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
        if not (path / "pano_bank" / "cameras.json").is_file():
            raise InputError(f"folder {folder!r} has no pano_bank/cameras.json (a panorama scene folder needs "
                             "pano_bank/cameras.json and pano_bank/images/<key>.png)")
        return path
    if source == SOURCES[2]:
        path = files.output_folder(folder, "folder")
        if not MemoryBank.exists(path):
            raise InputError(f"no saved memory bank in output/{folder} (memory_bank.json missing); save one with "
                             "WorldStereo Memory Bank Add Clip's save_folder")
        return path
    return None


def auto_traj_id(bank: MemoryBank, view_id: str) -> str:
    """The first ``traj<k>`` name not yet used under ``view_id`` in the bank."""
    k = 0
    while bank.has_trajectory(view_id, f"traj{k}"):
        k += 1
    return f"traj{k}"


def bank_text(bank: MemoryBank) -> str:
    return f"{len(bank)} entries, {bank.width}x{bank.height}"


class MemoryBankCreate:
    DESCRIPTION = ("Start a memory bank: from the start image (reconstruction), from a panorama scene's "
                   "27-view bank in input/, or load one saved earlier under output/.")
    CATEGORY = CATEGORY
    FUNCTION = "create"
    RETURN_TYPES = (types.MEMORY_BANK,)
    RETURN_NAMES = ("memory_bank",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (list(SOURCES), {"default": SOURCES[0]}),
                "folder": ("STRING", {"default": "", "tooltip": "Panorama scene folder (in input/) or saved bank "
                                                                "folder (in output/); unused for 'start image'."}),
                "max_reference": ("INT", {"default": MAX_REFERENCE, "min": 1, "max": 64,
                                          "tooltip": "Most reference frames a clip is conditioned on."}),
                "align_nframe": ("INT", {"default": ALIGN_NFRAME, "min": 1, "max": 256,
                                         "tooltip": "Frames kept from every generated clip."}),
            },
            "optional": {"point_cloud": (types.POINT_CLOUD, {"tooltip": "Start image and camera ('start image')."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, source, folder):
        if source not in SOURCES:
            return f"source must be one of {list(SOURCES)}"
        return files.validation_message(_folder, source, folder)

    @classmethod
    def IS_CHANGED(cls, source, folder, **_):
        try:
            return files.fingerprint(_folder(source, folder))
        except InputError:
            return ""

    @node_errors("WorldStereo Memory Bank Create")
    def create(self, source, folder, max_reference, align_nframe, point_cloud=None):
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
        return {"ui": {"text": [bank_text(bank)]}, "result": (bank,)}


class MemoryBankAddClip:
    DESCRIPTION = ("Fold a generated clip into the memory (the release's keep rule: align_nframe frames, never "
                   "frame 0, always the last). Returns a new bank; optionally saves it under output/.")
    CATEGORY = CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = (types.MEMORY_BANK,)
    RETURN_NAMES = ("memory_bank",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "memory_bank": (types.MEMORY_BANK,),
                "frames": ("IMAGE", {"tooltip": "The generated clip, one frame per camera."}),
                "trajectory": (types.TRAJECTORY, {"tooltip": "The cameras the clip was generated for."}),
                "view_id": ("STRING", {"default": DEFAULT_VIEW}),
                "traj_id": ("STRING", {"default": "",
                                       "tooltip": "Name of this clip in the bank (empty: traj0, traj1 ...)."}),
                "save_folder": ("STRING", {"default": "", "tooltip": "Also save the bank to output/<save_folder> "
                                                                     "(empty: do not save)."}),
            },
        }

    @node_errors("WorldStereo Memory Bank Add Clip")
    def add(self, memory_bank, frames, trajectory, view_id, traj_id, save_folder):
        clip = image_to_uint8(frames, "frames").numpy()
        if len(clip) != len(trajectory):
            raise InputError(f"frames has {len(clip)} images but the trajectory has {len(trajectory)} cameras")
        if trajectory.height is None or trajectory.width is None:
            raise InputError("the trajectory states no image size; connect a scene to the trajectory node")
        view_id = view_id.strip() or DEFAULT_VIEW
        bank = copy.deepcopy(memory_bank)
        traj_id = traj_id.strip() or auto_traj_id(bank, view_id)
        if bank.has_trajectory(view_id, traj_id):
            raise InputError(f"the bank already holds {view_id}/{traj_id}; give this clip another traj_id")
        kept = bank.update_memory(list(clip), trajectory.w2c, trajectory.K, view_id, traj_id,
                                  k_size=(trajectory.height, trajectory.width))
        if save_folder.strip():
            target = files.output_folder(save_folder, "save_folder")
            bank.save(target, progress=comfy_progress(len(bank)))
        return {"ui": {"text": [f"{bank_text(bank)}; kept frames {kept} of {view_id}/{traj_id}"]}, "result": (bank,)}


class MemoryRetrieve:
    DESCRIPTION = ("Retrieve the reference frames for a target trajectory (frustum overlap x view angle, at most "
                   "max_reference distinct frames; DINOv2 features refine the choice when connected).")
    CATEGORY = CATEGORY
    FUNCTION = "retrieve"
    RETURN_TYPES = (types.MEMORY, "IMAGE", "STRING", types.TRAJECTORY)
    RETURN_NAMES = ("memory", "references", "ref_index", "reference_cameras")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "memory_bank": (types.MEMORY_BANK,),
                "trajectory": (types.TRAJECTORY, {"tooltip": "Target cameras (at the generation size)."}),
                "view_id": ("STRING", {"default": DEFAULT_VIEW}),
                "traj_id": ("STRING", {"default": "", "tooltip": "The target's name (panorama shortcuts use it)."}),
            },
            "optional": {"dinov2": (types.DINOV2,)},
        }

    @node_errors("WorldStereo Memory Retrieve")
    def retrieve(self, memory_bank, trajectory, view_id, traj_id, dinov2=None):
        if trajectory.height is None or trajectory.width is None:
            raise InputError("the trajectory states no image size; connect a scene to the trajectory node")
        height, width = trajectory.height, trajectory.width
        selector = CameraSelector(feature_fn=dinov2) if dinov2 is not None else None
        found = retrieve(memory_bank, trajectory.w2c, trajectory.K, view_id.strip() or DEFAULT_VIEW,
                         traj_id.strip() or "traj", k_size=(height, width), selector=selector,
                         progress=comfy_progress(3))
        positions = found.ref_index.tolist()
        refs = np.stack([resize_bicubic(found.frames[k], (height, width)) for k in positions])
        memory = types.Memory(frames=refs, ref_index=found.ref_index.clone(), w2c=found.ref_w2cs.clone(),
                              retrieved=list(found.ref_global_indices))
        ref_cams = CameraTrajectory(w2c=found.ref_w2cs.clone(), K=memory_bank.K[memory.retrieved].clone(),
                                    width=memory_bank.width, height=memory_bank.height)
        index_text = json.dumps({"ref_index": positions,
                                 "entries": [memory_bank.fnames[g] for g in memory.retrieved]})
        return {"ui": {"text": [index_text]}, "result": (memory, uint8_to_image(refs), index_text, ref_cams)}


NODE_CLASS_MAPPINGS = {
    "WorldStereoMemoryBankCreate": MemoryBankCreate,
    "WorldStereoMemoryBankAddClip": MemoryBankAddClip,
    "WorldStereoMemoryRetrieve": MemoryRetrieve,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorldStereoMemoryBankCreate": "WorldStereo Memory Bank Create",
    "WorldStereoMemoryBankAddClip": "WorldStereo Memory Bank Add Clip",
    "WorldStereoMemoryRetrieve": "WorldStereo Memory Retrieve",
}
