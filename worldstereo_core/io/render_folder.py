"""The reference's render folder: ``render.mp4``, ``render_mask.mp4`` and ``camera.json``.

One folder per trajectory (:mod:`.scene_layout`) holding

* ``render.mp4`` - the warp renders, 16 fps H.264 RGB; holes are mid-grey (0 in [-1, 1]);
* ``render_mask.mp4`` - the hole masks as RGB video, white (255) = hole, black = covered;
* ``camera.json`` - the trajectory (:mod:`worldstereo_core.io.camera_json`).

:func:`load_render_folder` prepares them for the model exactly as the reference does on loading:
renders bicubic-resized to the working size, frame 0 replaced by the input image, clipped to
[-1, 1]; masks from channel 0, nearest-resized, binarised at 0.5. The file's frame-0 mask is kept,
except for the release's iterative trajectories (``reconstruct_*/traj1``, which start from a
generated frame), where it is set to 0 (covered): the caller says which with ``clear_first_mask``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import CameraTrajectory, subsample_indices
from ..constants import FPS
from ..errors import InputError
from .atomic import safe_join
from .camera_json import load_camera_json, save_camera_json
from .scene_layout import CAMERA_FILE, MASK_VIDEO, RENDER_VIDEO
from .video import DEFAULT_CRF, read_mask_video, read_video, write_video



def save_render_folder(folder: str | os.PathLike, rgb: torch.Tensor, mask: torch.Tensor,
                       trajectory: CameraTrajectory, *, fps: float = FPS,
                       crf: int = DEFAULT_CRF) -> Path:
    """Write ``rgb`` (F, 3, H, W) in [-1, 1], ``mask`` (F, 1, H, W) (1 = hole) and ``trajectory``."""
    rgb, mask = torch.as_tensor(rgb), torch.as_tensor(mask)
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise InputError(f"render rgb must have shape (F, 3, H, W) in [-1, 1], got {tuple(rgb.shape)}")
    n, _, height, width = rgb.shape
    if mask.shape != (n, 1, height, width):
        raise InputError(f"render mask must have shape ({n}, 1, {height}, {width}) like the renders "
                         f"(1 = hole), got {tuple(mask.shape)}")
    if not isinstance(trajectory, CameraTrajectory) or len(trajectory) != n:
        got = len(trajectory) if isinstance(trajectory, CameraTrajectory) else type(trajectory).__name__
        raise InputError(f"trajectory must be a CameraTrajectory with {n} cameras (one per render "
                         f"frame), got {got}")
    folder = Path(folder)
    frames = ((rgb.detach().float().cpu() + 1.0) / 2.0).permute(0, 2, 3, 1)
    holes = (mask.detach().float().cpu() > 0.5).float().expand(n, 3, height, width).permute(0, 2, 3, 1)
    write_video(safe_join(folder, RENDER_VIDEO), frames, fps, crf=crf)
    write_video(safe_join(folder, MASK_VIDEO), holes, fps, crf=crf)
    save_camera_json(trajectory, safe_join(folder, CAMERA_FILE))
    return folder


def load_render_folder(folder: str | os.PathLike, height: int, width: int, image=None, *,
                       clear_first_mask: bool = False, nframe: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, CameraTrajectory]:
    """Load a render folder for the model.

    Returns ``render`` (F, 3, height, width) float32 in [-1, 1], ``mask`` (F, 1, height, width)
    float32 in {0, 1} (1 = hole) and the trajectory as stored (K not rescaled). ``image``
    (3, height, width) in [-1, 1], when given, replaces render frame 0; ``clear_first_mask`` sets
    mask frame 0 to 0 (the release does so for iterative trajectories only). ``nframe`` > 0: a
    longer folder is subsampled to ``nframe`` frames and cameras, as camera files are
    (:meth:`CameraTrajectory.subsample`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"render folder not found: {folder} (expected {RENDER_VIDEO}, "
                         f"{MASK_VIDEO} and {CAMERA_FILE} inside)")
    for name in (RENDER_VIDEO, MASK_VIDEO, CAMERA_FILE):
        if not (folder / name).is_file():
            raise InputError(f"render folder {folder} is missing {name}; re-create it with "
                             "save_render_folder or the render node")
    for name, val in (("height", height), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
            raise InputError(f"{name} must be a positive int, got {val!r}")
    height, width = int(height), int(width)
    trajectory = load_camera_json(folder / CAMERA_FILE, default_size=(height, width))
    video = torch.from_numpy(read_video(folder / RENDER_VIDEO)).permute(0, 3, 1, 2).float()
    holes = torch.from_numpy(read_mask_video(folder / MASK_VIDEO))[:, None]
    if not len(video) == len(holes) == len(trajectory):
        raise InputError(f"render folder {folder}: {RENDER_VIDEO} has {len(video)} frames, "
                         f"{MASK_VIDEO} {len(holes)} and {CAMERA_FILE} {len(trajectory)} cameras; "
                         "they must match")
    render = video / 255.0 * 2.0 - 1.0
    if render.shape[-2:] != (height, width):
        render = F.interpolate(render, size=(height, width), mode="bicubic", align_corners=False)
    if image is not None:
        image = torch.as_tensor(image)
        if image.shape != (3, height, width):
            raise InputError(f"image must be (3, {height}, {width}) in [-1, 1] to replace frame 0, "
                             f"got {tuple(image.shape)}")
        render[0] = image.to(render.dtype)
    render = render.clamp(-1.0, 1.0)
    if holes.shape[-2:] != (height, width):
        holes = F.interpolate(holes, size=(height, width), mode="nearest")
    mask = (holes > 0.5).float()
    if clear_first_mask:
        mask[0] = 0.0
    if nframe and len(render) > nframe:
        keep = subsample_indices(len(render), nframe)
        render, mask, trajectory = render[keep], mask[keep], trajectory.select(keep)
    return render, mask, trajectory
