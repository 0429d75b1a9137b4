"""worldstereo-memory sampling (the reference's KFPCDControllerRefPipeline).

As the camera pipeline (UniPC, 40 steps, text CFG 5.0), plus retrieved reference frames:
``reference_video`` is keyframe-encoded into the 36-channel layout (r | ones4 | r) and passed with
``ref_index``, ``camera_qt`` and ``camera_qt_ref`` unchanged to the transformer. The render video
must have one frame per latent frame.
"""
from __future__ import annotations

from .camera import CameraPipeline


class MemoryPipeline(CameraPipeline):
    """Memory-conditioned (GGM + SSM) keyframe generation with UniPC + text CFG."""

    uses_references = True
    allows_causal_render = False
