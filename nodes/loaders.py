"""Model folders in ComfyUI's ``models/`` tree, and (later) the loader nodes.

Our own folders, registered with ``folder_paths`` when the pack loads::

    models/worldstereo/<model-type>/{config.json, model.safetensors}   one folder per variant
    models/moge/<checkpoint>.(pt|safetensors)                           MoGe-2 depth model
    models/dinov2/<name>/{config.json, model.safetensors, ...}          DINOv2 (HF folder layout)

The Wan2.1 base parts are read from the folders ComfyUI users already have (``CORE_FOLDERS``),
so nothing is stored twice. A user's ``extra_model_paths.yaml`` may add more roots for any of
these names; every lookup below searches all roots.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..worldstereo_core.constants import HF_REPO_ID, MODEL_TYPES
from ..worldstereo_core.errors import InputError, MissingWeightsError

WORLDSTEREO_FOLDER = "worldstereo"
MOGE_FOLDER = "moge"
DINOV2_FOLDER = "dinov2"
OWN_FOLDERS = (WORLDSTEREO_FOLDER, MOGE_FOLDER, DINOV2_FOLDER)
#: ComfyUI's own folders we read from: transformer, umT5, CLIP-vision, VAE, diffusers repos.
CORE_FOLDERS = ("diffusion_models", "text_encoders", "clip_vision", "vae", "diffusers")
#: Files that make a ``models/worldstereo/<model-type>`` folder a usable variant.
VARIANT_FILES = ("config.json", "model.safetensors")
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


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
        raise MissingWeightsError(
            f"model file {name!r} was not found in the {folder!r} model folder ({roots}); "
            "put it there (or add a path in extra_model_paths.yaml) and refresh the node list"
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
        raise MissingWeightsError(
            f"WorldStereo variant {model_type!r} is not installed: put {' and '.join(VARIANT_FILES)} "
            f"from https://huggingface.co/{HF_REPO_ID}/tree/main/{model_type} into {target}"
        )
    return found
