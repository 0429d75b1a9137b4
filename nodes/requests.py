"""One clip's :class:`~worldstereo_core.tasks.generate.GenerationRequest` from ComfyUI inputs (the
start image, the warp render + hole mask, the trajectory and the retrieved memory), for the native
Conditioning node; camera inputs (Plücker rays, pose tokens) are derived by the core."""
from __future__ import annotations

import numpy as np
import torch

from ..worldstereo_core.errors import InputError
from ..worldstereo_core.io.images import resize_bicubic
from . import types
from .geometry import first_image_uint8
from .images import image_to_frames, mask_from_comfy

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def generation_request(image, render, hole_mask, trajectory, prompt: str, seed: int, memory=None):
    """A :class:`GenerationRequest` from ComfyUI inputs (all at the render's size)."""
    from ..worldstereo_core.tasks.generate import GenerationRequest

    frames = image_to_frames(render, "render")
    holes = (mask_from_comfy(hole_mask, "hole_mask") > 0.5).float()
    n, _, height, width = frames.shape
    if holes.shape != (n, 1, height, width):
        raise InputError(f"hole_mask has shape {list(holes.shape[:1]) + list(holes.shape[2:])} but the render is "
                         f"{n} frames of {height}x{width}; connect the mask of the same render")
    if len(trajectory) != n:
        raise InputError(f"the trajectory has {len(trajectory)} cameras but the render {n} frames; render the same "
                         "trajectory")
    traj = trajectory.resized(height, width)
    start = first_image_uint8(image, "image")
    if start.shape[:2] != (height, width):
        start = resize_bicubic(start, (height, width))
    extra = {}
    if memory is not None:
        extra = dict(references=memory.frames, ref_index=memory.ref_index, ref_w2cs=memory.w2c)
    return GenerationRequest(image=start, prompt=prompt, render=frames, render_mask=holes, trajectory=traj,
                             seed=int(seed), name="comfyui", **extra), traj


def single_view_memory(request) -> types.Memory:
    """For a memory variant without retrieved references: the start image as the one reference,
    attached to target frame 1 (ref_index 0) with the first camera's pose."""
    return types.Memory(frames=np.asarray(request.image)[None], ref_index=torch.zeros(1, dtype=torch.long),
                        w2c=request.trajectory.w2c[:1].clone())
