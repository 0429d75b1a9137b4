"""worldstereo_core: the WorldStereo library behind the ComfyUI nodes (no ComfyUI imports).

Subpackages: ``io`` (files), ``geometry`` (trajectories, depth lifting, rendering, alignment),
``memory`` (memory bank, retrieval, 3D cache), ``models`` (transformers and loading),
``pipelines`` (samplers and conditioning), ``tasks`` (multi-trajectory loops). Camera conventions
live in :mod:`worldstereo_core.cameras`, fixed numbers in :mod:`worldstereo_core.constants`.
Importing it checks the diffusers / transformers versions (:mod:`worldstereo_core.dependencies`).
"""
from .dependencies import check_versions

__version__ = "0.1.0"
check_versions()
