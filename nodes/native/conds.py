"""The per-clip WorldStereo inputs, carried in a conditioning's ``model_conds``.

ComfyUI's samplers batch ``model_conds`` for the conditional and unconditional passes and hand
them to the diffusion model as keyword arguments, where the WorldStereo wrapper reads them:

* ``worldstereo_render_latent`` [B, 16, F, h, w] and ``worldstereo_reference_latent``
  [B, 36, F_ref, h, w]: keyframe latents in the model's (normalised) latent space;
* ``worldstereo_condition``: a :class:`ClipCondition` (mask + Plücker rays at pixel resolution),
  one object for the whole clip, so the ControlNet embeds it once per sampling run;
* ``worldstereo_ref_index``: the reference frames' target indices (a tuple of ints);
* ``worldstereo_camera_qt`` [B, F, 7] and ``worldstereo_camera_qt_ref`` [B, F_ref, 7]: poses.
"""
from __future__ import annotations

import torch

import comfy.conds

from ...worldstereo_core.models.inputs import MemoryInputs

RENDER_LATENT = "worldstereo_render_latent"
CONDITION = "worldstereo_condition"
REFERENCE_LATENT = "worldstereo_reference_latent"
REF_INDEX = "worldstereo_ref_index"
CAMERA_QT = "worldstereo_camera_qt"
CAMERA_QT_REF = "worldstereo_camera_qt_ref"


class ClipCondition:
    """The ControlNet's pixel-resolution condition of one clip, kept on the CPU in float32.

    Compared by identity: positive and negative conditioning share one object, so ComfyUI batches
    them into one call and the embedding is computed once per run."""

    def __init__(self, render_mask: torch.Tensor, camera_embedding: torch.Tensor | None) -> None:
        self.render_mask = render_mask.detach().to("cpu", torch.float32)
        self.camera_embedding = None if camera_embedding is None else camera_embedding.detach().to("cpu",
                                                                                                    torch.float32)


def worldstereo_model_conds(render_latent: torch.Tensor, render_mask: torch.Tensor,
                            camera_embedding: torch.Tensor | None, memory: MemoryInputs | None = None) -> dict:
    """The ``model_conds`` entries of one clip (the memory inputs only when given)."""
    conds = {RENDER_LATENT: comfy.conds.CONDRegular(render_latent),
             CONDITION: comfy.conds.CONDConstant(ClipCondition(render_mask, camera_embedding))}
    if memory is None:
        return conds
    conds[REFERENCE_LATENT] = comfy.conds.CONDRegular(memory.reference_latent)
    conds[REF_INDEX] = comfy.conds.CONDConstant(tuple(int(i) for i in torch.as_tensor(memory.ref_index).tolist()))
    if memory.camera_qt is not None:
        conds[CAMERA_QT] = comfy.conds.CONDRegular(memory.camera_qt)
    if memory.camera_qt_ref is not None:
        conds[CAMERA_QT_REF] = comfy.conds.CONDRegular(memory.camera_qt_ref)
    return conds


def with_model_conds(conditioning: list, conds: dict) -> list:
    """A copy of a CONDITIONING list whose entries also carry ``conds`` in their ``model_conds``."""
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        options["model_conds"] = {**options.get("model_conds", {}), **conds}
        out.append([tensor, options])
    return out
