"""Fixed facts of the WorldStereo release, in one place."""
from __future__ import annotations

#: Keyframes per clip (latent frames of the released models).
NFRAME = 21
#: Frames per second of every exported video.
FPS = 16
#: Seed used by the release's run scripts.
DEFAULT_SEED = 1024

#: Working-resolution buckets (H, W) used when the model config has no ``scale_map``.
DEFAULT_SCALE_MAP: tuple[tuple[int, int], ...] = (
    (480, 768), (512, 720), (576, 640), (608, 608), (640, 576), (720, 512), (768, 480),
)

#: Point-cloud warp rendering (reference settings).
RENDER_RADIUS_NDC = 0.008
RENDER_POINTS_PER_PIXEL = 20

#: Depth lifting.
DEPTH_CONTRACT_FACTOR = 8.0
SOBEL_EDGE_THRESHOLD = 0.35

#: Size (height, width) of a panorama scene's bank crops, start frames and warps (the release's).
PANO_BANK_SIZE = (480, 832)

#: Memory bank / retrieval.
MAX_REFERENCE = 8
ALIGN_NFRAME = 8
FRUSTUM_NEAR = 0.1
FRUSTUM_FAR = 10.0

#: Sampling defaults of the camera and memory variants (the release's run scripts).
DEFAULT_NUM_STEPS = 40
DEFAULT_GUIDANCE_SCALE = 5.0

#: The DMD generator schedule's defaults (release config keys dmd_start_steps, dmd_end_steps,
#: gen_shift, dmd_steps).
DMD_START_STEPS = 250
DMD_END_STEPS = 1000
DMD_SHIFT = 5.0
DMD_STEPS = 4

#: Horizontal field of view (degrees) assumed for an image whose intrinsics are unknown.
FALLBACK_FOV_DEG = 60.0

#: Camera normalisation scale used for Plücker maps and pose tokens.
CAMERA_SCALE = 2.0

#: Wan VAE latent normalisation (z_dim 16): normalised = (z - mean) / std.
WAN_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

#: Text context length the models assume.
TEXT_SEQ_LEN = 512

#: Released model variants (Hugging Face subfolders of ``HF_REPO_ID``).
HF_REPO_ID = "hanshanxue/WorldStereo"
MODEL_TYPES = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")
