"""Hugging Face downloads into a local models folder (never the shared HF cache), and its layout.

A models root has the ComfyUI-style layout the nodes use too::

    <models>/worldstereo/<model-type>/{config.json, model.safetensors}   hanshanxue/WorldStereo/<model-type>
    <models>/diffusers/<repo-name>/{transformer,vae,text_encoder,...}/  a Wan2.1-I2V diffusers repo
    <models>/moge/<repo-name>/model.pt                                  Ruicheng/moge-2-vitl-normal
    <models>/dinov2/<repo-name>/{config.json, ...}                      facebook/dinov2-base

ComfyUI users keep the Wan2.1 parts as single files in ComfyUI's own folders (``diffusion_models``,
``text_encoders``, ``clip_vision``, ``vae``), from :data:`COMFY_WAN_REPO`: :data:`COMFY_FILES`
says where each file is in that repository and :func:`comfy_file_source` how to get it.
:data:`FILE_SIZES` holds the download size of every weight file a user fetches (the public
repository pages; README's model table says the same, a test checks), so every missing-file
message can state it.

:func:`fetch_files` is the one download routine: files already present are used as they are; a
missing file is fetched with ``huggingface_hub.hf_hub_download(local_dir=...)`` only when
``download`` is set and ``HF_HUB_OFFLINE`` is not, logging target path and size and calling
``progress(files_done, files_total)``; otherwise :class:`MissingWeightsError` names the file, the
folder and the command that gets it.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path
from typing import Iterable, Sequence

from .constants import HF_REPO_ID, MODEL_TYPES
from .errors import InputError, MissingWeightsError
from .io.atomic import safe_join
from .progress import ProgressFn, report

log = logging.getLogger(__name__)

WORLDSTEREO_FOLDER = "worldstereo"
DIFFUSERS_FOLDER = "diffusers"
MOGE_FOLDER = "moge"
DINOV2_FOLDER = "dinov2"

#: Files that make a ``<models>/worldstereo/<model-type>`` folder a usable variant.
VARIANT_FILES = ("config.json", "model.safetensors")
#: The Wan2.1-I2V base WorldStereo names when its config does not say otherwise.
WAN_BASE_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: Sub-folders of a Wan diffusers repo a WorldStereo pipeline reads (transformer: the backbone).
WAN_BASE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
DINOV2_REPO = "facebook/dinov2-base"
DINOV2_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
MOGE_REPO = "Ruicheng/moge-2-vitl-normal"
#: The file of a MoGe repo (the official checkpoint, loaded weights-only).
MOGE_CHECKPOINT = "model.pt"
#: ComfyUI's repackaged Wan2.1 single files (the files ComfyUI's own Wan workflows load).
COMFY_WAN_REPO = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
#: (ComfyUI model folder, file name) of the files ComfyUI's Wan workflows load -> download size.
_COMFY_FILE_SIZES = {
    ("diffusion_models", "wan2.1_i2v_480p_14B_bf16.safetensors"): "32.8 GB",
    ("diffusion_models", "wan2.1_i2v_480p_14B_fp16.safetensors"): "32.8 GB",
    ("diffusion_models", "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors"): "16.4 GB",
    ("text_encoders", "umt5_xxl_fp16.safetensors"): "11.4 GB",
    ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"): "6.74 GB",
    ("clip_vision", "clip_vision_h.safetensors"): "1.26 GB",
    ("vae", "wan_2.1_vae.safetensors"): "254 MB",
}
#: (ComfyUI model folder, file name) -> path of the file in :data:`COMFY_WAN_REPO`.
COMFY_FILES = {(folder, name): f"split_files/{folder}/{name}" for folder, name in _COMFY_FILE_SIZES}
#: (repo, path in the repo) -> download size, as the repository pages state it.
FILE_SIZES = {
    (HF_REPO_ID, "worldstereo-camera/model.safetensors"): "10.9 GB",
    (HF_REPO_ID, "worldstereo-memory/model.safetensors"): "22.3 GB",
    (HF_REPO_ID, "worldstereo-memory-dmd/model.safetensors"): "34.9 GB",
    **{(COMFY_WAN_REPO, COMFY_FILES[key]): size for key, size in _COMFY_FILE_SIZES.items()},
    (MOGE_REPO, MOGE_CHECKPOINT): "~1.3 GB",
    (DINOV2_REPO, "model.safetensors"): "~350 MB",
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it has the form ``owner/name`` (no path tricks), else InputError."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InputError(f"Hugging Face repo id {repo_id!r} is not of the form 'owner/name'")
    return repo_id


def repo_name(repo_id: str) -> str:
    """The folder name a repo gets in a models root: the part after the slash."""
    return check_repo_id(repo_id).split("/")[1]


def download_command(repo_id: str, local_dir: str | os.PathLike, files: Sequence[str] = (),
                     include: Sequence[str] = ()) -> str:
    """The ``hf download`` command line that puts ``files`` (or ``include`` patterns) into ``local_dir``."""
    parts = ["hf", "download", repo_id, *files]
    for pattern in include:
        parts += ["--include", pattern]
    parts += ["--local-dir", str(local_dir)]
    return " ".join(shlex.quote(p) for p in parts)


def download_size(repo_id: str, paths: Iterable[str]) -> str:
    """``" (<size>)"`` of the weights among ``paths`` of ``repo_id`` when :data:`FILE_SIZES` knows it, else ``""``."""
    sizes = [FILE_SIZES[repo_id, p] for p in paths if (repo_id, p) in FILE_SIZES]
    return f" ({sizes[0]})" if sizes else ""


def comfy_file_source(folder: str, name: str) -> str | None:
    """How to get ComfyUI's single file ``name`` of model folder ``folder`` (URL and size), or None
    for a file :data:`COMFY_FILES` does not know."""
    path = COMFY_FILES.get((folder, name))
    if path is None:
        return None
    return (f"download it{download_size(COMFY_WAN_REPO, [path])} from "
            f"https://huggingface.co/{COMFY_WAN_REPO}/resolve/main/{path}")


def _missing(what: str, local_dir: Path, names: Sequence[str], reason: str, command: str,
             size: str = "") -> MissingWeightsError:
    listed = ", ".join(names[:6]) + (f" ... ({len(names)} files)" if len(names) > 6 else "")
    return MissingWeightsError(
        f"{what}{size}: {listed} not found in {local_dir} ({reason}). Download it with\n  {command}\n"
        "(older huggingface_hub: huggingface-cli download ...), or pass --download / download=True "
        "to fetch it automatically.")


def fetch_files(repo_id: str, filenames: Sequence[str], local_dir: str | os.PathLike, *, download: bool = False,
                what: str = "model files", revision: str | None = None, command: str | None = None,
                progress: ProgressFn | None = None) -> list[Path]:
    """Local paths of ``filenames`` (repo-relative, e.g. ``"vae/config.json"``) under ``local_dir``.

    Present files are returned as they are. Missing ones are downloaded from ``repo_id`` when
    ``download`` is set and the hub is not offline; otherwise a :class:`MissingWeightsError`
    names them, ``local_dir`` and the download command (``command`` overrides the default one).
    """
    check_repo_id(repo_id)
    local_dir = Path(local_dir)
    paths = [safe_join(local_dir, name) for name in filenames]
    missing = [(name, path) for name, path in zip(filenames, paths) if not path.is_file()]
    if not missing:
        return paths
    names = [name for name, _ in missing]
    command = command or download_command(repo_id, local_dir, names)
    size = download_size(repo_id, names)
    if not download:
        raise _missing(what, local_dir, names, "automatic download is off", command, size)
    if hub_offline():
        raise _missing(what, local_dir, names, "HF_HUB_OFFLINE is set, so nothing is downloaded", command, size)
    import huggingface_hub

    local_dir.mkdir(parents=True, exist_ok=True)
    extra = {"revision": revision} if revision else {}
    for done, (name, path) in enumerate(missing, 1):
        log.info("downloading %s/%s -> %s", repo_id, name, path)
        try:
            huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name, local_dir=local_dir, **extra)
        except Exception as exc:  # network, auth, missing file: all end the same way for the user
            raise _missing(what, local_dir, names, f"download failed: {type(exc).__name__}: {exc}", command,
                           size) from exc
        if not path.is_file():
            raise _missing(what, local_dir, names, f"the download did not produce {path}", command, size)
        log.info("downloaded %s (%.1f MB)", path, path.stat().st_size / 2**20)
        report(progress, done, len(missing))
    return paths


def repo_files_under(repo_id: str, folders: Iterable[str], *, revision: str | None = None) -> list[str]:
    """Files of ``repo_id`` inside ``folders`` (plus top-level ``model_index.json``), via the Hub API."""
    import huggingface_hub

    prefixes = tuple(f.rstrip("/") + "/" for f in folders)
    files = huggingface_hub.list_repo_files(check_repo_id(repo_id), revision=revision)
    return sorted(f for f in files if f.startswith(prefixes) or f == "model_index.json")


# --------------------------------------------------------------------------------------------
# The models-root layout
# --------------------------------------------------------------------------------------------

def resolve_models_root(models_root: str | os.PathLike | None = None) -> Path:
    """``models_root``, else ``$WORLDSTEREO_MODELS``, else ``./models``."""
    return Path(models_root or os.environ.get("WORLDSTEREO_MODELS") or "models")


def worldstereo_dir(models_root: str | os.PathLike, model_type: str) -> Path:
    """``<models>/worldstereo/<model-type>``."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    return safe_join(models_root, WORLDSTEREO_FOLDER, model_type)


def is_repo_id(text: str) -> bool:
    """Whether ``text`` looks like a Hugging Face repo id ``owner/name`` (not an existing path)."""
    return isinstance(text, str) and bool(_REPO_ID.match(text)) and ".." not in text and not Path(text).exists()


def base_dir(models_root: str | os.PathLike, base: str) -> Path:
    """Folder of a Wan2.1-I2V diffusers base: ``base`` itself when it is an existing folder, else
    ``<models>/diffusers/<name>`` with ``name`` its last path component (a repo id's name, or
    the folder name of a path from another machine, as config.json's ``base_model`` may hold)."""
    if Path(base).is_dir():
        return Path(base)
    name = Path(str(base).rstrip("/\\")).name
    if not name or name in (".", ".."):
        raise InputError(f"cannot derive a base model folder name from {base!r}; pass a folder or a repo id")
    return safe_join(models_root, DIFFUSERS_FOLDER, name)


def dinov2_dir(models_root: str | os.PathLike, repo_id: str = DINOV2_REPO) -> Path:
    """``<models>/dinov2/<repo-name>``."""
    return safe_join(models_root, DINOV2_FOLDER, repo_name(repo_id))


def ensure_worldstereo(models_root: str | os.PathLike, model_type: str, *, download: bool = False,
                       progress: ProgressFn | None = None, files: Sequence[str] = VARIANT_FILES) -> Path:
    """The variant folder ``<models>/worldstereo/<model-type>`` with ``files`` (default: config.json +
    model.safetensors)."""
    folder = worldstereo_dir(models_root, model_type)
    fetch_files(HF_REPO_ID, [f"{model_type}/{name}" for name in files], folder.parent,
                download=download, what=f"WorldStereo variant {model_type}",
                command=download_command(HF_REPO_ID, folder.parent, include=[f"{model_type}/*"]),
                progress=progress)
    return folder


def _part_present(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.iterdir())


def ensure_wan_base(models_root: str | os.PathLike, base: str = WAN_BASE_REPO, *, repo_id: str | None = None,
                    parts: Sequence[str] = WAN_BASE_PARTS, download: bool = False,
                    progress: ProgressFn | None = None) -> Path:
    """A Wan2.1-I2V diffusers folder holding ``parts`` (see :func:`base_dir`).

    With ``download`` the missing parts (only those sub-folders) are fetched from ``repo_id``,
    else from ``base`` when it is a repo id, else from :data:`WAN_BASE_REPO`.
    """
    unknown = [p for p in parts if p not in WAN_BASE_PARTS]
    if unknown:
        raise InputError(f"unknown Wan base part(s) {unknown}; choose from {WAN_BASE_PARTS}")
    folder = base_dir(models_root, base)
    absent = [p for p in parts if not _part_present(folder / p)]
    if not absent:
        return folder
    repo = check_repo_id(repo_id) if repo_id else (base if is_repo_id(base) else WAN_BASE_REPO)
    what = f"Wan2.1-I2V base {base}"
    wanted = [f"{p}/" for p in absent]
    command = download_command(repo, folder, include=[f"{p}/*" for p in absent])
    if not download:
        raise _missing(what, folder, wanted, "automatic download is off", command)
    if hub_offline():
        raise _missing(what, folder, wanted, "HF_HUB_OFFLINE is set, so nothing is downloaded", command)
    try:
        files = repo_files_under(repo, absent)
    except Exception as exc:  # network / auth / unknown repo
        raise _missing(what, folder, wanted, f"listing {repo} failed: {type(exc).__name__}: {exc}", command) from exc
    empty = [p for p in absent if not any(f.startswith(p + "/") for f in files)]
    if empty:
        raise MissingWeightsError(f"{repo} has no {', '.join(empty)} folder(s); is it a Wan2.1-I2V diffusers repo? "
                                  f"Pass the right repo id or put the parts into {folder} yourself")
    fetch_files(repo, files, folder, download=True, what=what, command=command, progress=progress)
    return folder


def ensure_dinov2(models_root: str | os.PathLike, repo_id: str = DINOV2_REPO, *, download: bool = False,
                  progress: ProgressFn | None = None) -> Path:
    """``<models>/dinov2/<repo-name>`` with config, preprocessor config and safetensors weights."""
    folder = dinov2_dir(models_root, repo_id)
    fetch_files(repo_id, list(DINOV2_FILES), folder, download=download, what="DINOv2 image features",
                progress=progress)
    return folder
