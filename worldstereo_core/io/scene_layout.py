"""File and folder names of a WorldStereo scene and of a run's outputs (the release's layout).

Scene folders (inputs)::

    image.png, prompt.json {"prompt": ...}               start image and caption
    camera.json                                          the single-view trajectory
    renders/<traj>/                                      reconstruction trajectories (RECONSTRUCTION_ORDER)
    pano_bank/cameras.json, pano_bank/images/<key>.png   the panorama memory bank
    <group>/start_frame.png, <group>/valid_analysis.json panorama groups
    <group>/<traj>/traj_caption.json                     a panorama trajectory's caption

A trajectory folder holds ``camera.json`` and, when pre-rendered, ``render.mp4`` and
``render_mask.mp4`` (:mod:`.render_folder`). A panorama scene made from one image
(:mod:`..tasks.panorama_scene`) adds ``panorama.png``, ``panorama_distance.npy``,
``panorama_cloud.ply`` and ``panorama_scene.json``.

Outputs, per trajectory ``<model>_result.mp4`` and the retrieved memory (``<model>.mp4``,
``<model>_ref_index.json``, ``<model>_ref_w2cs.json``); per scene ``<model>_cloud.ply`` / ``.glb``; a
WorldMirror input folder is ``images/`` + ``cameras.json`` + ``name_map.json``.
"""
from __future__ import annotations

START_IMAGE = "image.png"
PROMPT_FILE = "prompt.json"
CAMERA_FILE = "camera.json"
RENDER_VIDEO = "render.mp4"
MASK_VIDEO = "render_mask.mp4"

#: The reconstruction scene's trajectory group and its trajectories, in generation order; the
#: ellipse loop's frame 0 is the scene's camera.
RECONSTRUCTION_VIEW = "renders"
ELOOP_TRAJ, UP_TRAJ, RIGHT_TRAJ, LEFT_TRAJ = "traj_eloop", "traj_up", "traj_right", "traj_left"
RECONSTRUCTION_ORDER = (ELOOP_TRAJ, UP_TRAJ, RIGHT_TRAJ, LEFT_TRAJ)

#: The panorama bank folder; like a WorldMirror input folder it holds ``images/`` and ``cameras.json``.
PANO_BANK = "pano_bank"
IMAGES_DIR = "images"
CAMERAS_FILE = "cameras.json"
NAME_MAP_FILE = "name_map.json"

#: Panorama groups: start image, the release's keep/skip verdict, and each trajectory's caption.
GROUP_START_IMAGE = "start_frame.png"
VALID_ANALYSIS = "valid_analysis.json"
TRAJ_CAPTION = "traj_caption.json"

#: A panorama scene made from one image, and the folder (under an output folder) of such scenes.
PANORAMA_SCENES = "panorama_scenes"
PANORAMA_MANIFEST = "panorama_scene.json"
PANORAMA_FILE = "panorama.png"
DISTANCE_FILE = "panorama_distance.npy"
PANORAMA_CLOUD = "panorama_cloud.ply"

#: Bank entry name of a reconstruction's start image (the reference's spelling).
RECONSTRUCTION_INPUT_FNAME = f"{RECONSTRUCTION_VIEW}/{PANO_BANK}/{START_IMAGE}"


def bank_image(key: str) -> str:
    """File name of a bank view's image inside ``images/``."""
    return f"{key}.png"


def result_video(model: str) -> str:
    """A trajectory's generated clip."""
    return f"{model}_result.mp4"


def scene_cloud(model: str, suffix: str = ".ply") -> str:
    """A scene's final point cloud (``.ply`` or ``.glb``)."""
    return f"{model}_cloud{suffix}"


def memory_inputs(model: str) -> tuple[str, str, str]:
    """The retrieved memory of one trajectory: frames as a clip, their bank indices, their w2c."""
    return f"{model}.mp4", f"{model}_ref_index.json", f"{model}_ref_w2cs.json"
