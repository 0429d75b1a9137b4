"""Model folders in ComfyUI's ``models/`` tree and the MoGe / DINOv2 loader nodes.

Our own folders, registered with ``folder_paths`` when the pack loads::

    models/worldstereo/<model-type>/{config.json, model.safetensors}   one folder per variant
    models/moge/<repo-name>/model.pt                                    MoGe-2 depth model (official .pt)
    models/dinov2/<name>/{config.json, model.safetensors, ...}          DINOv2 (HF folder layout)

The Wan2.1 base parts are loaded by ComfyUI's core loaders from the core folders
(``diffusion_models``, ``text_encoders``, ``vae``, ``clip_vision``), so nothing is stored twice. A user's ``extra_model_paths.yaml`` may add
more roots for any of these names; every lookup below searches all roots. Loaded models live on
ComfyUI's offload device (the CPU unless ``--highvram``).
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Iterable

from comfy_api.latest import io

from ..worldstereo_core import hub
from ..worldstereo_core.constants import HF_REPO_ID, MODEL_TYPES
from ..worldstereo_core.errors import InputError, MissingWeightsError
from ..worldstereo_core.hub import DINOV2_FOLDER, MOGE_FOLDER, VARIANT_FILES, WORLDSTEREO_FOLDER
from ..worldstereo_core.io.fingerprint import file_stamps
from . import files, types
from ._comfy import node_errors, offload_device, torch_device

OWN_FOLDERS = (WORLDSTEREO_FOLDER, MOGE_FOLDER, DINOV2_FOLDER)
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
            f"from https://huggingface.co/{HF_REPO_ID}/tree/main/{model_type} into {target} "
            f"(`{hub.download_command(HF_REPO_ID, target.parent, include=[model_type + '/*'])}`)"
        )
    return found


CATEGORY = "WorldStereo/loaders"
MOGE_DEFAULT = f"{hub.repo_name(hub.MOGE_REPO)}/{hub.MOGE_CHECKPOINT}"
DINOV2_DEFAULT = hub.repo_name(hub.DINOV2_REPO)


def _stamp(path: Path) -> tuple:
    """What identifies the loaded bytes: the path and the files' names, sizes and mtimes."""
    return (str(path),) + tuple(tuple(entry) for entry in file_stamps(path))


class ModelCache:
    """Loaded models by (kind, files), held *weakly*: an entry lives only while ComfyUI (or another
    node) still holds the model, so a second loader with the same inputs, or a re-run under
    ``--cache-none`` while the model is still referenced, reuses it instead of loading it twice,
    and ``POST /free`` releases memory as usual."""

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


# --------------------------------------------------------------------------------------------
# MoGe and DINOv2
# --------------------------------------------------------------------------------------------

def moge_choices() -> list[str]:
    names = model_files(MOGE_FOLDER, (".pt", ".pth"))
    return names if MOGE_DEFAULT in names else names + [MOGE_DEFAULT]


def resolve_moge(name: str, download: bool) -> Path:
    import folder_paths

    from ..worldstereo_core.geometry.moge import ensure_moge_checkpoint

    path = folder_paths.get_full_path(MOGE_FOLDER, name)
    if path is not None:
        return Path(path)
    if name == MOGE_DEFAULT:
        return ensure_moge_checkpoint(folder_roots(MOGE_FOLDER)[0], hub.MOGE_REPO, download=download)
    return resolve_model_file(MOGE_FOLDER, name)


class MoGeLoader(io.ComfyNode):
    DISPLAY_NAME = "WorldStereo MoGe Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WorldStereoMoGeLoader", display_name=cls.DISPLAY_NAME, category=CATEGORY,
            description=f"MoGe-2 monocular geometry ({hub.MOGE_REPO}) from models/moge, for depth lifting.",
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
    "WorldStereoMoGeLoader": MoGeLoader,
    "WorldStereoDINOv2Loader": DINOv2Loader,
}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.DISPLAY_NAME for node_id, cls in NODE_CLASS_MAPPINGS.items()}
