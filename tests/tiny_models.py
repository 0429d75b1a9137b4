"""Models folders of TINY random checkpoints in the real layouts, plus the inputs the example
workflows expect, so the CLI, the loop and the example prompts run unchanged on a CPU.

``write_models_root(root)`` writes the folder the CLI and the loop read: ``worldstereo/<model-type>/``
overlays (WorldStereo-only keys, as released variants may be), the tiny Wan2.1-I2V diffusers base they
name (``diffusers/Wan2.1-I2V-tiny-Diffusers/``: transformer, VAE, UMT5, CLIP, scheduler) and, with
``moge=True``, ``moge/moge-2-vitl-normal/model.pt``.

``write_tiny_models(models_dir)`` writes a ComfyUI ``models/`` tree with the real file names::

    worldstereo/worldstereo-{camera,memory,memory-dmd}/{config.json, model.safetensors}
    diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors   (original Wan keys, model.diffusion_model.)
    vae/wan_2.1_vae.safetensors                              (original Wan keys when ComfyUI is at hand)
    text_encoders/umt5_xxl_fp16.safetensors                  (T5 keys; embedded spiece_model when possible)
    clip_vision/clip_vision_h.safetensors (+ clip_vision_h.json: the tiny size needs its config)
    moge/moge-2-vitl-normal/model.pt                         (tiny MoGe-2, weights_only loadable)
    dinov2/dinov2-base/{config.json, preprocessor_config.json, model.safetensors}

Its variants' ``scale_map`` is tiny ([[32, 48], [48, 32], [32, 32]]) so a workflow that resizes the
start image to the variant's bucket runs at a few dozen pixels. All variants condition on the start
frame alone (``latent_cond_mode="first_frame_only"``) so the tiny VAE does not encode an 81-frame video
(the full-VAE path is covered by the pipeline fixtures). ``write_example_inputs(input_dir)`` adds
``example.png`` and a small synthetic panorama scene ``worldstereo_panorama_scene/``.

Two parts need tools that may live in another Python: the original-layout VAE is made by ComfyUI's
own ``WanVAE`` and the tokenizer is a trained SentencePiece model. Pass ``comfy_dir`` / ``python``
(a ComfyUI checkout and an interpreter with sentencepiece); without them a diffusers-named VAE file
is written and the UMT5 file has no embedded tokenizer.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

TESTS = Path(__file__).resolve().parent
for _path in (TESTS, TESTS.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tiny_checkpoints import MODEL_TYPES, _save  # noqa: E402

BASE_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
FILES = {
    "diffusion_models": "wan2.1_i2v_480p_14B_bf16.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "text_encoders": "umt5_xxl_fp16.safetensors",
    "clip_vision": "clip_vision_h.safetensors",
    "moge": "moge-2-vitl-normal/model.pt",
    "dinov2": "dinov2-base",
}
TINY_SCALE_MAP = [[32, 48], [48, 32], [32, 32]]
PANORAMA_SCENE = "worldstereo_panorama_scene"
EXAMPLE_IMAGE = "example.png"
#: Example inputs shipped with the workflows (users copy them into ComfyUI's input/).
SHIPPED_INPUTS = TESTS.parent / "example_workflows" / "input"
VAE_BASE_DIM = 4
#: The tiny UMT5's sizes besides its width (the text_dim).
UMT5_SIZES = dict(vocab_size=128, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
SPM_CORPUS = ("a photo of a quiet street with old houses and trees", "the quick brown fox jumps over the lazy dog",
              "a stone bridge over a river in the mountains", "sunlight on a wooden table in a small room")

def _run(python: str, code: str, *args: str) -> None:
    subprocess.run([python, "-c", textwrap.dedent(code), *args], check=True, capture_output=True, timeout=600)


# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------

def write_worldstereo(models: Path, model_types: Sequence[str] = MODEL_TYPES, *, embed_config: bool = False,
                      **config_fields) -> dict:
    """``worldstereo/<model-type>/`` variants (WorldStereo-only keys, start-frame conditioning, the
    ``config_fields`` given; ``embed_config`` embeds the transformer config) and the backbone they
    share (every variant's has the same keys); returns ``{"config", "backbone"}``."""
    from tiny_checkpoints import random_state_dict, split_backbone, tiny_transformer_config, write_variant

    tcfg = tiny_transformer_config()
    backbone = None
    for seed, model_type in enumerate(model_types):
        own_backbone, extra = split_backbone(random_state_dict(model_type, tcfg, seed=seed))
        backbone = backbone or own_backbone
        write_variant(models / "worldstereo", model_type, extra, transformer_config=tcfg if embed_config else None,
                      latent_cond_mode="first_frame_only", **config_fields)
    return {"config": tcfg, "backbone": backbone}


def write_single_transformer(models: Path, backbone: dict) -> Path:
    from tiny_checkpoints import write_single_file_base

    return write_single_file_base(models / "diffusion_models" / FILES["diffusion_models"], backbone)


ORIGINAL_VAE_CODE = """
import sys
comfy_dir, target, dim = sys.argv[1:4]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
import comfy.ldm.wan.vae as wan_vae
model = wan_vae.WanVAE(dim=int(dim), z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True])
gen = torch.Generator().manual_seed(0)
state = {k: torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if k.endswith("gamma") else 0.0)
         for k, v in model.state_dict().items()}
save_file(state, target)
"""


def write_vae_file(models: Path, comfy_dir: Optional[Path], python: Optional[str]) -> Path:
    """The single-file VAE: original Wan keys written by ComfyUI's own WanVAE when a checkout is
    given, else a diffusers-named AutoencoderKLWan file of the same size."""
    path = models / "vae" / FILES["vae"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if comfy_dir is not None:
        _run(python or sys.executable, ORIGINAL_VAE_CODE, str(comfy_dir), str(path), str(VAE_BASE_DIM))
        return path
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=VAE_BASE_DIM, z_dim=16, num_res_blocks=2)
    return _save(vae.state_dict(), path)


SPM_CODE = """
import sys, tempfile, os
import sentencepiece as spm
corpus = sys.argv[2].split("|")
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "c.txt"), "w") as f:
        f.write("\\n".join(corpus * 20))
    spm.SentencePieceTrainer.train(input=os.path.join(d, "c.txt"), model_prefix=os.path.join(d, "sp"),
                                   vocab_size=int(sys.argv[3]), hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2)
    with open(os.path.join(d, "sp.model"), "rb") as f, open(sys.argv[1], "wb") as out:
        out.write(f.read())
"""


def write_text_encoder_file(models: Path, text_dim: int, python: Optional[str]) -> Path:
    """A tiny UMT5 encoder in ComfyUI's text-encoder file layout (T5 key names, no tied copy), with a
    trained SentencePiece model embedded as ``spiece_model`` when ``python`` has sentencepiece."""
    from transformers import UMT5Config, UMT5EncoderModel

    path = models / "text_encoders" / FILES["text_encoders"]
    cfg = UMT5Config(d_model=text_dim, **UMT5_SIZES, relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = UMT5EncoderModel(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if python is not None:
        spm_path = path.with_suffix(".spm")
        path.parent.mkdir(parents=True, exist_ok=True)
        _run(python, SPM_CODE, str(spm_path), "|".join(SPM_CORPUS), "48")
        state["spiece_model"] = torch.from_numpy(np.frombuffer(spm_path.read_bytes(), dtype=np.uint8).copy())
        spm_path.unlink()
    return _save(state, path)


def write_clip_vision_file(models: Path, image_dim: int) -> Path:
    """A tiny CLIP vision tower as a transformers-layout single file, with its config beside it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = models / "clip_vision" / FILES["clip_vision"]
    cfg = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, projection_dim=8,
                           num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = CLIPVisionModel(cfg)
    state = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in model.state_dict().items()}
    state["visual_projection.weight"] = torch.zeros(8, image_dim)  # present in ComfyUI's file, unused
    _save(state, path)
    path.with_suffix(".json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return path


def write_moge(models: Path) -> Path:
    """A tiny MoGe-2 ``model.pt`` whose mask head calls every pixel valid (so lifting has points)."""
    from tiny_moge import write_tiny_moge

    return write_tiny_moge(models / "moge" / FILES["moge"], seed=3)


def write_dinov2(models: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = models / "dinov2" / FILES["dinov2"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=28, patch_size=14)).save_pretrained(str(folder))
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(folder))
    return folder


def write_models_root(root: str | Path, model_types: Sequence[str] = MODEL_TYPES, *, moge: bool = False) -> Path:
    """Fill ``root`` with the CLI's models folder (see the module docstring); returns it."""
    from tiny_checkpoints import TINY_BASE_MODEL, write_diffusers_base
    from tiny_components import write_tiny_base

    root = Path(root)
    parts = write_worldstereo(root, model_types)
    base = root / "diffusers" / TINY_BASE_MODEL.split("/")[1]
    write_tiny_base(base)
    write_diffusers_base(base, parts["config"], parts["backbone"])
    if moge:
        write_moge(root)
    return root


def write_tiny_models(models_dir: str | Path, *, comfy_dir: Optional[str | Path] = None,
                      python: Optional[str] = None, moge: bool = True) -> Path:
    """Fill ``models_dir`` with the ComfyUI tree (see the module docstring); returns it."""
    from tiny_components import IMAGE_DIM, TEXT_DIM

    models = Path(models_dir)
    parts = write_worldstereo(models, base_model=BASE_REPO, embed_config=True, scale_map=TINY_SCALE_MAP,
                              negative_prompt="blurry, low quality")
    write_single_transformer(models, parts["backbone"])
    write_vae_file(models, Path(comfy_dir) if comfy_dir else None, python)
    write_text_encoder_file(models, TEXT_DIM, python)
    write_clip_vision_file(models, IMAGE_DIM)
    if moge:
        write_moge(models)
    write_dinov2(models)
    return models


# --------------------------------------------------------------------------------------------
# Inputs of the example workflows
# --------------------------------------------------------------------------------------------

def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colourful test image (uint8)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * math.pi, 3)
    img = np.stack([0.5 + 0.5 * np.sin(x / width * 6.0 + y / height * 3.0 + p) for p in phases], axis=-1)
    return (img * 255).round().astype(np.uint8)


def write_example_image(input_dir: str | Path, comfy_dir: Optional[str | Path] = None) -> Path:
    """``input/example.png``: ComfyUI's own example image when a checkout is given, else a test image."""
    from PIL import Image

    target = Path(input_dir) / EXAMPLE_IMAGE
    target.parent.mkdir(parents=True, exist_ok=True)
    source = Path(comfy_dir) / "input" / EXAMPLE_IMAGE if comfy_dir else None
    if source is not None and source.is_file():
        shutil.copyfile(source, target)
    else:
        Image.fromarray(_image(96, 144, 0)).save(target)
    return target


def write_panorama_scene(input_dir: str | Path, *, bank_size: tuple[int, int] = (64, 96), frames: int = 21) -> Path:
    """A small panorama scene in the release's layout: the 27-view bank (pano_bank/cameras.json +
    images) and ``view0/traj{0,1,2}`` (camera.json, render.mp4, render_mask.mp4, traj_caption.json)."""
    from PIL import Image

    from worldstereo_core.geometry.trajectories import panorama_bank_cameras, trajectory_from_moves
    from worldstereo_core.io.camera_json import save_bank_cameras
    from worldstereo_core.io.render_folder import save_render_folder

    height, width = bank_size
    scene = Path(input_dir) / PANORAMA_SCENE
    keys, cams = panorama_bank_cameras(width, height)
    save_bank_cameras(keys, cams, scene / "pano_bank" / "cameras.json")
    for i, key in enumerate(keys):
        path = scene / "pano_bank" / "images" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(height, width, i)).save(path)
    view = scene / "view0"
    view.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(height, width, 0)).save(view / "start_frame.png")
    gen = torch.Generator().manual_seed(0)
    moves = {"traj0": [{"type": "normal", "rotation": [-40.0, 0.0]}], "traj1": [{"type": "normal", "rotation": [40.0, 0.0]}],
             "traj2": [{"type": "normal", "rotation": [0.0, -20.0]}]}
    for name, mv in moves.items():
        traj = trajectory_from_moves(cams.w2c[0], cams.K[0], mv, 2.0, width=width, height=height, nframe=frames,
                                     up=(0.0, 0.0, 1.0))
        rgb = torch.rand(frames, 3, height, width, generator=gen) * 2 - 1
        mask = (torch.rand(frames, 1, height, width, generator=gen) > 0.7).float()
        save_render_folder(view / name, rgb, mask, traj)
        (view / name / "traj_caption.json").write_text(json.dumps({"prompt": f"a panorama view, {name}"}))
    return scene


def write_example_inputs(input_dir: str | Path, comfy_dir: Optional[str | Path] = None) -> Path:
    """What the example workflows load from input/: example.png, the shipped 360-degree example
    (``example_workflows/input/``) and a small panorama scene folder."""
    write_example_image(input_dir, comfy_dir)
    for shipped in sorted(SHIPPED_INPUTS.iterdir()):
        shutil.copyfile(shipped, Path(input_dir) / shipped.name)
    write_panorama_scene(input_dir)
    return Path(input_dir)
