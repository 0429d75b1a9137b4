"""Model folders in ComfyUI's ``models/`` tree and the loader nodes.

Our own folders, registered with ``folder_paths`` when the pack loads::

    models/worldstereo/<model-type>/{config.json, model.safetensors}   one folder per variant
    models/moge/<repo-name>/model.pt                                    MoGe-2 depth model (official .pt)
    models/dinov2/<name>/{config.json, model.safetensors, ...}          DINOv2 (HF folder layout)

The Wan2.1 base parts are read from the folders ComfyUI users already have (``CORE_FOLDERS``),
so nothing is stored twice. A user's ``extra_model_paths.yaml`` may add more roots for any of
these names; every lookup below searches all roots.

Loader combos list single files by their name in the folder and diffusers repos (folders under
``models/diffusers``) as ``diffusers/<repo>``. Loaded models live on ComfyUI's offload device
(the CPU unless ``--highvram``); the sampler moves each part to the GPU while it runs.
"""
from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Iterable

import torch
from comfy_api.latest import io

from ..worldstereo_core import hub
from ..worldstereo_core.constants import HF_REPO_ID, MODEL_TYPES
from ..worldstereo_core.errors import InputError, MissingWeightsError
from ..worldstereo_core.io.fingerprint import file_stamps
from . import files, types
from ._comfy import big_load, comfy_progress, compute_dtype, node_errors, offload_device, torch_device

WORLDSTEREO_FOLDER = "worldstereo"
MOGE_FOLDER = "moge"
DINOV2_FOLDER = "dinov2"
OWN_FOLDERS = (WORLDSTEREO_FOLDER, MOGE_FOLDER, DINOV2_FOLDER)
#: ComfyUI's own folders we read from: transformer, umT5, CLIP-vision, VAE, diffusers repos.
CORE_FOLDERS = ("diffusion_models", "text_encoders", "clip_vision", "vae", "diffusers")
#: Files that make a ``models/worldstereo/<model-type>`` folder a usable variant.
VARIANT_FILES = ("config.json", "model.safetensors")
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")


def register_model_folders() -> None:
    """Add ``models/worldstereo``, ``models/moge`` and ``models/dinov2`` (idempotent)."""
    import folder_paths

    for name in OWN_FOLDERS:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def folder_roots(folder: str) -> list[Path]:
    """Every root directory registered for ``folder`` (default first, then user extras)."""
    import folder_paths

    try:
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]
    except KeyError:
        raise InputError(f"ComfyUI has no model folder named {folder!r}") from None


def model_dirs(folder: str, required_files: Iterable[str] = ("config.json",)) -> dict[str, Path]:
    """Sub-directories (any depth, relative names with '/') holding all ``required_files``.

    The first root wins when two roots hold the same name, as in ``folder_paths``.
    """
    required = tuple(required_files)
    found: dict[str, Path] = {}
    for root in folder_roots(folder):
        if not root.is_dir():
            continue
        for dirpath, subdirs, _files in os.walk(root, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            path = Path(dirpath)
            if path != root and all((path / f).is_file() for f in required):
                found.setdefault(path.relative_to(root).as_posix(), path)
    return dict(sorted(found.items()))


def model_files(folder: str, extensions: Iterable[str] = WEIGHT_EXTENSIONS) -> list[str]:
    """Weight files of ``folder`` as ComfyUI lists them (relative names), filtered by extension."""
    import folder_paths

    exts = tuple(e.lower() for e in extensions)
    return [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(exts)]


def resolve_model_file(folder: str, name: str) -> Path:
    """Full path of a file chosen from :func:`model_files`, or a MissingWeightsError naming the
    folders that were searched."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        roots = ", ".join(str(r) for r in folder_roots(folder))
        source = hub.comfy_file_source(folder, name)
        raise MissingWeightsError(
            f"model file {name!r} was not found in the {folder!r} model folder ({roots}); "
            + (f"{source} and put it there" if source else "put it there")
            + " (or add a path in extra_model_paths.yaml) and refresh the node list"
        )
    return Path(path)


def worldstereo_variants() -> dict[str, Path]:
    """Installed WorldStereo variants: ``{model_type: folder}`` for the released model types."""
    dirs = model_dirs(WORLDSTEREO_FOLDER, VARIANT_FILES)
    return {t: dirs[t] for t in MODEL_TYPES if t in dirs}


def resolve_worldstereo_variant(model_type: str) -> Path:
    """Folder of one installed variant, or a clear error saying where its files belong."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    found = worldstereo_variants().get(model_type)
    if found is None:
        target = folder_roots(WORLDSTEREO_FOLDER)[0] / model_type
        size = hub.download_size(HF_REPO_ID, [f"{model_type}/model.safetensors"])
        raise MissingWeightsError(
            f"WorldStereo variant {model_type!r} is not installed: put {' and '.join(VARIANT_FILES)}{size} "
            f"from https://huggingface.co/{HF_REPO_ID}/tree/main/{model_type} into {target}, or set the "
            "loader's download to true to fetch them"
        )
    return found


# --------------------------------------------------------------------------------------------
# Choices: single files and diffusers repos
# --------------------------------------------------------------------------------------------

CATEGORY = "WorldStereo/loaders"
DIFFUSERS_PREFIX = "diffusers/"
AUTO_BASE = "auto (the variant's base_model)"
NO_BASE = "none (variant file is complete)"
AUTO_TOKENIZER = "auto"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: File names of the Wan2.1-I2V parts as ComfyUI distributes them (listed even before they exist, so
#: shared workflows validate and the error names the file to download).
DEFAULT_FILES = {
    "diffusion_models": "wan2.1_i2v_480p_14B_bf16.safetensors",
    "text_encoders": "umt5_xxl_fp16.safetensors",
    "clip_vision": "clip_vision_h.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}
#: Sub-folder of a diffusers repo per component.
DIFFUSERS_PARTS = {"diffusion_models": "transformer", "text_encoders": "text_encoder",
                   "clip_vision": "image_encoder", "vae": "vae"}
MOGE_DEFAULT = "moge-2-vitl-normal/model.pt"
DINOV2_DEFAULT = hub.repo_name(hub.DINOV2_REPO)


def diffusers_repos(part: str) -> list[str]:
    """``diffusers/<repo>`` for every repo under ``models/diffusers`` holding ``<part>/`` with files."""
    found = model_dirs("diffusers", (f"{part}/config.json",)) if part != "tokenizer" else \
        {**model_dirs("diffusers", ("tokenizer/tokenizer.json",)), **model_dirs("diffusers", ("tokenizer/spiece.model",))}
    return [DIFFUSERS_PREFIX + name for name in sorted(found)]


def component_choices(folder: str) -> list[str]:
    """Single files of a ComfyUI folder, then diffusers repos holding that component."""
    names = model_files(folder, (".safetensors", ".sft"))
    if DEFAULT_FILES[folder] not in names:
        names = names + [DEFAULT_FILES[folder]]
    return names + diffusers_repos(DIFFUSERS_PARTS[folder])


def hub_repo_for(name: str) -> str:
    """The Hugging Face repo a ``models/diffusers/<name>`` folder is downloaded from: Wan-AI's own
    Wan2.1-I2V-14B repos by name, otherwise the default base repo."""
    return f"Wan-AI/{name}" if re.fullmatch(r"Wan2\.1-I2V-14B-(480|720)P-Diffusers", name) else hub.WAN_BASE_REPO


def resolve_diffusers_repo(choice: str, part: str, *, download: bool = False) -> Path:
    """Folder of ``diffusers/<repo>`` that holds ``part`` (fetched from the hub with ``download``)."""
    name = choice[len(DIFFUSERS_PREFIX):].strip("/")
    if not name or ".." in Path(name).parts:
        raise InputError(f"{choice!r} does not name a diffusers repo folder")
    for root in folder_roots("diffusers"):
        if (root / name / part).is_dir():
            return root / name
    target = folder_roots("diffusers")[0]
    if download:
        return hub.ensure_wan_base(target.parent, name, parts=[part], download=True, repo_id=hub_repo_for(name))
    raise MissingWeightsError(
        f"{part}/ of {choice!r} not found in {', '.join(str(r) for r in folder_roots('diffusers'))}; download it "
        f"with `{hub.download_command(hub_repo_for(name), target / name, include=[part + '/*'])}`")


def _stamp(path: Path) -> tuple:
    """What identifies the loaded bytes: the path and the files' names, sizes and mtimes."""
    return (str(path),) + tuple(tuple(entry) for entry in file_stamps(path))


class ModelCache:
    """Loaded models by (kind, files, options), held *weakly*: an entry lives only while ComfyUI
    (or another node) still holds the model, so a second loader with the same inputs, or a re-run
    under ``--cache-none`` while the model is still referenced, reuses it instead of loading
    14B weights twice, and ``POST /free`` releases memory as usual."""

    def __init__(self) -> None:
        self._items: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()

    def get_or_load(self, key: tuple, load):
        model = self._items.get(key)
        if model is None:
            model = load()
            self._items[key] = model
        return model

    def __len__(self) -> int:
        return len(self._items)


MODEL_CACHE = ModelCache()


def _dtype(name: str, default: torch.dtype) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name] or default


# --------------------------------------------------------------------------------------------
# WorldStereo transformer
# --------------------------------------------------------------------------------------------

def base_choices() -> list[str]:
    return [AUTO_BASE, NO_BASE] + model_files("diffusion_models", (".safetensors", ".sft")) + diffusers_repos("transformer")


def resolve_variant(model_type: str, download: bool) -> Path:
    """An installed variant folder; with ``download`` fetched into ``models/worldstereo``."""
    import folder_paths

    found = worldstereo_variants().get(model_type)
    if found is not None:
        return found
    if download:
        return hub.ensure_worldstereo(folder_paths.models_dir, model_type, download=True, progress=comfy_progress(2))
    return resolve_worldstereo_variant(model_type)


def resolve_base(base: str, variant: Path, download: bool) -> Path | None:
    """The transformer base: a single file, a diffusers repo folder or None (complete variant)."""
    import folder_paths

    from ..worldstereo_core.models import load_worldstereo_config

    if base == NO_BASE:
        return None
    if base == AUTO_BASE:
        config = load_worldstereo_config(variant)
        repo = config.base_model or hub.WAN_BASE_REPO
        name = Path(repo.rstrip("/\\")).name
        for root in folder_roots("diffusers"):
            if (root / name / "transformer" / "config.json").is_file():
                return root / name
        if not download:
            single = DEFAULT_FILES["diffusion_models"]
            raise MissingWeightsError(
                f"the variant's base model {repo!r} is not in models/diffusers/{name}; choose a Wan2.1-I2V-14B "
                f"file from diffusion_models as base (e.g. {single}: "
                f"{hub.comfy_file_source('diffusion_models', single)}), or set download to true to fetch "
                f"{repo} into models/diffusers/{name}")
        return hub.ensure_wan_base(folder_paths.models_dir, repo, parts=list(hub.WAN_BASE_PARTS), download=True,
                                   progress=comfy_progress(1))
    if base.startswith(DIFFUSERS_PREFIX):
        return resolve_diffusers_repo(base, "transformer", download=download)
    return resolve_model_file("diffusion_models", base)


class WorldStereoModelLoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Model Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..worldstereo_core.runtime.attention import BACKENDS
        from ..worldstereo_core.runtime.fp8 import FP8_MODES

        return io.Schema(
            node_id="WorldStereoModelLoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("Load a WorldStereo variant (camera / memory / memory-dmd) from "
                         "models/worldstereo/<model-type> on top of a Wan2.1-I2V-14B base transformer (a "
                         "diffusion_models file or a diffusers repo)."),
            inputs=[
                io.Combo.Input("model_type", options=list(MODEL_TYPES), default=MODEL_TYPES[0], tooltip=
                               "camera: camera control; memory: multi-trajectory with memory; memory-dmd: its "
                               "4-step distilled form."),
                io.Combo.Input("base", options=base_choices(), default=AUTO_BASE, tooltip=
                               "Wan2.1-I2V-14B transformer the variant builds on. auto: models/diffusers/<base_model "
                               "of the variant config>."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip=
                               "auto: bf16 on GPUs that have it, else fp16 / fp32."),
                io.Boolean.Input("download", default=False, tooltip=
                                 f"Fetch missing files from {HF_REPO_ID} (and the Wan base for 'auto') into "
                                 "ComfyUI's models folder."),
                io.Int.Input("block_swap", default=0, min=0, max=1000, optional=True, tooltip=
                             "Keep at most this many transformer blocks on the GPU and stream the others from CPU "
                             "memory (0 = all on the GPU). 24 GB cards: 20 with fp8."),
                io.Combo.Input("fp8", options=["off", *FP8_MODES], default="off", optional=True, tooltip=
                               "Store the blocks' linear weights as float8 (about half the memory of bf16)."),
                io.Combo.Input("attention", options=["auto", *BACKENDS], default="auto", optional=True, tooltip=
                               "Attention kernel: auto = SageAttention / flash-attn when installed, else PyTorch "
                               "SDPA."),
            ],
            outputs=[types.Socket.MODEL.Output(display_name="model", tooltip="The WorldStereo transformer.")],
        )

    @classmethod
    def validate_inputs(cls, model_type, base, download):
        if model_type not in MODEL_TYPES:
            return f"model_type must be one of {list(MODEL_TYPES)}"
        if download:
            return True

        def check():  # a missing variant and a missing base file are reported together, not one by one
            missing = []
            try:
                variant = resolve_variant(model_type, False)
            except MissingWeightsError as err:
                missing, variant = [str(err)], None
            if variant is not None or base != AUTO_BASE:  # 'auto' reads the base's name from the variant
                try:
                    resolve_base(base, variant, False)
                except MissingWeightsError as err:
                    missing.append(str(err))
            if missing:
                raise MissingWeightsError("\n".join(missing))
        return files.validation_message(check)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model_type, base, dtype, download, block_swap=0, fp8="off", attention="auto") -> io.NodeOutput:
        from ..worldstereo_core.models import load_worldstereo_config, load_worldstereo_transformer
        from ..worldstereo_core.pipelines.components import load_scheduler_config
        from ..worldstereo_core.runtime.options import RuntimeOptions, apply_runtime

        options = RuntimeOptions(block_swap=block_swap or None, fp8=None if fp8 == "off" else fp8, attention=attention)
        variant = resolve_variant(model_type, download)
        base_path = resolve_base(base, variant, download)
        compute = _dtype(dtype, compute_dtype())
        key = ("worldstereo", _stamp(variant), _stamp(base_path) if base_path else None, str(compute), options)

        def load():
            config = load_worldstereo_config(variant)
            with big_load():
                transformer = load_worldstereo_transformer(variant, base=base_path, dtype=compute, fp8=options.fp8,
                                                           device=offload_device(), progress=comfy_progress(1))
                apply_runtime(transformer, options, torch_device())
            scheduler = None
            if base_path is not None and (base_path / "scheduler" / "scheduler_config.json").is_file():
                scheduler = load_scheduler_config(base_path)
            return types.ModelBundle(transformer, config, str(variant), str(base_path or ""), scheduler)

        return io.NodeOutput(MODEL_CACHE.get_or_load(key, load))


# --------------------------------------------------------------------------------------------
# Wan2.1 base components: VAE, UMT5, CLIP vision
# --------------------------------------------------------------------------------------------

def resolve_component(folder: str, choice: str, download: bool = False) -> Path:
    """A single file in ``folder`` or a diffusers repo folder (``diffusers/<repo>``)."""
    if not isinstance(choice, str) or not choice:
        raise InputError(f"choose a {folder} file or diffusers repo")
    if choice.startswith(DIFFUSERS_PREFIX):
        return resolve_diffusers_repo(choice, DIFFUSERS_PARTS[folder], download=download)
    return resolve_model_file(folder, choice)


class VAELoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo VAE Loader (Wan2.1)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoVAELoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("The Wan2.1 VAE: models/vae/wan_2.1_vae.safetensors (ComfyUI's file) or a diffusers "
                         "repo's vae/."),
            inputs=[
                io.Combo.Input("vae", options=component_choices("vae"), tooltip=
                               "A models/vae file or diffusers/<repo> (its vae/)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip=
                               "auto: the GPU's half precision (the reference), fp32 on CPU."),
                io.Boolean.Input("download", default=False, tooltip="For diffusers/<repo>: fetch a missing vae/."),
                io.Boolean.Input("tiling", default=False, optional=True, tooltip=
                                 "Encode/decode in overlapping 256 px tiles: less memory at large sizes, tiny seams "
                                 "possible."),
            ],
            outputs=[types.Socket.VAE.Output(display_name="vae", tooltip="The Wan2.1 VAE.")],
        )

    @classmethod
    def validate_inputs(cls, vae, download):
        if download and vae.startswith(DIFFUSERS_PREFIX):
            return True
        return files.validation_message(resolve_component, "vae", vae)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, vae, dtype, download, tiling=False) -> io.NodeOutput:
        from ..worldstereo_core.pipelines.components import load_vae
        from ..worldstereo_core.pipelines.single_file import load_vae_file
        from ..worldstereo_core.runtime.offload import enable_vae_tiling

        path = resolve_component("vae", vae, download)
        compute = _dtype(dtype, compute_dtype())

        def load():
            model = (load_vae(path, device=offload_device(), dtype=compute) if path.is_dir()
                     else load_vae_file(path, dtype=compute, device=offload_device()))
            if tiling:
                enable_vae_tiling(model)
            return types.VaeModel(model, str(path))

        return io.NodeOutput(MODEL_CACHE.get_or_load(("vae", _stamp(path), str(compute), bool(tiling)), load))


def tokenizer_choices() -> list[str]:
    return [AUTO_TOKENIZER] + diffusers_repos("tokenizer")


class TextEncoderLoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo Text Encoder Loader (UMT5)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoTextEncoderLoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("The UMT5-XXL text encoder: a models/text_encoders file (umt5_xxl_fp16 / fp8_e4m3fn_scaled; "
                         "its embedded tokenizer is used) or a diffusers repo's text_encoder/ + tokenizer/."),
            inputs=[
                io.Combo.Input("text_encoder", options=component_choices("text_encoders"), tooltip=
                               "A models/text_encoders file or diffusers/<repo> (its text_encoder/)."),
                io.Combo.Input("tokenizer", options=tokenizer_choices(), default=AUTO_TOKENIZER, tooltip=
                               "auto: the repo's tokenizer/, or the SentencePiece model inside a single file."),
                io.Combo.Input("dtype", options=["fp32", "bf16", "fp16"], default="fp32", tooltip=
                               "The reference runs UMT5 in fp32."),
                io.Boolean.Input("download", default=False, tooltip=
                                 "For diffusers/<repo>: fetch a missing text_encoder/ or tokenizer/."),
            ],
            outputs=[types.Socket.TEXT_ENCODER.Output(display_name="text_encoder", tooltip=
                                                      "UMT5 with its tokenizer.")],
        )

    @classmethod
    def validate_inputs(cls, text_encoder, tokenizer, download):
        if download and text_encoder.startswith(DIFFUSERS_PREFIX):
            return True

        def check():
            resolve_component("text_encoders", text_encoder)
            if tokenizer != AUTO_TOKENIZER:
                resolve_diffusers_repo(tokenizer, "tokenizer")
        return files.validation_message(check)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, text_encoder, tokenizer, dtype, download) -> io.NodeOutput:
        from ..worldstereo_core.pipelines.components import load_text_encoder, load_tokenizer
        from ..worldstereo_core.pipelines.single_file import load_umt5_file, umt5_tokenizer_from_file

        path = resolve_component("text_encoders", text_encoder, download)
        if path.is_dir() and not (path / "tokenizer").is_dir():
            path = resolve_diffusers_repo(text_encoder, "tokenizer", download=download)
        tok_path = path if tokenizer == AUTO_TOKENIZER else resolve_diffusers_repo(tokenizer, "tokenizer")
        compute = _dtype(dtype, torch.float32)

        def load():
            with big_load():
                model = load_text_encoder(path, device="cpu") if path.is_dir() else load_umt5_file(path)
                model = model.to(device=offload_device(), dtype=compute)
            tok = load_tokenizer(tok_path) if tok_path.is_dir() else umt5_tokenizer_from_file(tok_path)
            return types.TextEncoder(model, tok, str(path))

        return io.NodeOutput(MODEL_CACHE.get_or_load(("umt5", _stamp(path), str(tok_path), str(compute)), load))


class CLIPVisionLoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo CLIP Vision Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoCLIPVisionLoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("The CLIP ViT-H/14 image encoder: models/clip_vision/clip_vision_h.safetensors or a "
                         "diffusers repo's image_encoder/ + image_processor/."),
            inputs=[
                io.Combo.Input("clip_vision", options=component_choices("clip_vision"), tooltip=
                               "A models/clip_vision file or diffusers/<repo> (its image_encoder/)."),
                io.Boolean.Input("download", default=False, tooltip=
                                 "For diffusers/<repo>: fetch a missing image_encoder/ or image_processor/."),
            ],
            outputs=[types.Socket.CLIP_VISION.Output(display_name="clip_vision", tooltip=
                                                     "CLIP vision with its image processor.")],
        )

    @classmethod
    def validate_inputs(cls, clip_vision, download):
        if download and clip_vision.startswith(DIFFUSERS_PREFIX):
            return True
        return files.validation_message(resolve_component, "clip_vision", clip_vision)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, clip_vision, download) -> io.NodeOutput:
        from ..worldstereo_core.pipelines.components import load_image_encoder, load_image_processor
        from ..worldstereo_core.pipelines.single_file import load_clip_vision_file

        path = resolve_component("clip_vision", clip_vision, download)
        if path.is_dir() and not (path / "image_processor").is_dir():
            path = resolve_diffusers_repo(clip_vision, "image_processor", download=download)

        def load():
            if path.is_dir():
                model, processor = load_image_encoder(path, device=offload_device()), load_image_processor(path)
            else:
                model, processor = load_clip_vision_file(path, device=offload_device())
            return types.ClipVision(model, processor, str(path))

        return io.NodeOutput(MODEL_CACHE.get_or_load(("clip", _stamp(path)), load))


# --------------------------------------------------------------------------------------------
# MoGe and DINOv2
# --------------------------------------------------------------------------------------------

def moge_choices() -> list[str]:
    names = model_files(MOGE_FOLDER, (".pt", ".pth"))
    return names if MOGE_DEFAULT in names else names + [MOGE_DEFAULT]


def resolve_moge(name: str, download: bool) -> Path:
    import folder_paths

    from ..worldstereo_core.geometry.moge import DEFAULT_MOGE_REPO, ensure_moge_checkpoint

    path = folder_paths.get_full_path(MOGE_FOLDER, name)
    if path is not None:
        return Path(path)
    if name == MOGE_DEFAULT:
        return ensure_moge_checkpoint(folder_roots(MOGE_FOLDER)[0], DEFAULT_MOGE_REPO, download=download)
    return resolve_model_file(MOGE_FOLDER, name)


class MoGeLoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo MoGe Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMoGeLoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("MoGe-2 monocular geometry (Ruicheng/moge-2-vitl-normal) from models/moge, for depth "
                         "lifting."),
            inputs=[
                io.Combo.Input("checkpoint", options=moge_choices(), default=MOGE_DEFAULT, tooltip=
                               "A MoGe model.pt in models/moge."),
                io.Boolean.Input("download", default=False, tooltip="Fetch model.pt from Hugging Face when missing."),
            ],
            outputs=[types.Socket.MOGE.Output(display_name="moge", tooltip="The MoGe model.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint, download):
        if download and checkpoint == MOGE_DEFAULT:
            return True
        return files.validation_message(resolve_moge, checkpoint, False)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, checkpoint, download) -> io.NodeOutput:
        from ..worldstereo_core.geometry.moge import load_moge

        path = resolve_moge(checkpoint, download)

        return io.NodeOutput(MODEL_CACHE.get_or_load(("moge", _stamp(path)),
                                                     lambda: load_moge(path, device=offload_device())))


def dinov2_choices() -> list[str]:
    names = list(model_dirs(DINOV2_FOLDER, ("config.json",)))
    return names if DINOV2_DEFAULT in names else names + [DINOV2_DEFAULT]


def resolve_dinov2(name: str, download: bool) -> Path:
    for root in folder_roots(DINOV2_FOLDER):
        if (root / name / "config.json").is_file():
            return root / name
    if name == DINOV2_DEFAULT:
        return hub.ensure_dinov2(folder_roots(DINOV2_FOLDER)[0].parent, download=download)
    raise MissingWeightsError(f"DINOv2 folder {name!r} not found in the dinov2 model folder "
                              f"({', '.join(str(r) for r in folder_roots(DINOV2_FOLDER))})")


class DINOv2Loader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo DINOv2 Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoDINOv2Loader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=("DINOv2 image features (facebook/dinov2-base) for choosing diverse memory references when "
                         "more than max_reference frames qualify. Optional: without it, camera features alone are "
                         "used."),
            inputs=[
                io.Combo.Input("model", options=dinov2_choices(), default=DINOV2_DEFAULT, tooltip=
                               "A DINOv2 folder in models/dinov2."),
                io.Boolean.Input("download", default=False, tooltip=
                                 f"Fetch {hub.DINOV2_REPO} into models/dinov2 when missing."),
            ],
            outputs=[types.Socket.DINOV2.Output(display_name="dinov2", tooltip="DINOv2 image features.")],
        )

    @classmethod
    def validate_inputs(cls, model, download):
        return True if download and model == DINOV2_DEFAULT else files.validation_message(resolve_dinov2, model, False)

    @classmethod
    @node_errors(DISPLAY_NAME)
    def execute(cls, model, download) -> io.NodeOutput:
        from ..worldstereo_core.memory.selector import DinoV2Features

        path = resolve_dinov2(model, download)
        return io.NodeOutput(MODEL_CACHE.get_or_load(("dinov2", _stamp(path)),
                                                     lambda: DinoV2Features(path, torch_device())))


NODE_CLASS_MAPPINGS = {
    "WorldStereoModelLoader": WorldStereoModelLoader,
    "WorldStereoVAELoader": VAELoader,
    "WorldStereoTextEncoderLoader": TextEncoderLoader,
    "WorldStereoCLIPVisionLoader": CLIPVisionLoader,
    "WorldStereoMoGeLoader": MoGeLoader,
    "WorldStereoDINOv2Loader": DINOv2Loader,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
