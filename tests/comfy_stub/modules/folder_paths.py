"""Stand-in for ComfyUI's ``folder_paths`` (v0.3.64 signatures), for unit tests only.

State lives in module globals like the real module. :func:`reset` (stub only) points every
folder at a new base directory so each test can use its own temporary tree.
"""
from __future__ import annotations

import os
import tempfile
import time

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path: str = ""
models_dir: str = ""
output_directory: str = ""
temp_directory: str = ""
input_directory: str = ""
user_directory: str = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}

_CORE_FOLDERS = {
    "checkpoints": ["checkpoints"], "loras": ["loras"], "vae": ["vae"],
    "text_encoders": ["text_encoders", "clip"], "diffusion_models": ["unet", "diffusion_models"],
    "clip_vision": ["clip_vision"], "controlnet": ["controlnet", "t2i_adapter"],
    "upscale_models": ["upscale_models"],
}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def reset(base: str) -> None:
    """Stub only: forget all registrations and root every folder under ``base``."""
    global base_path, models_dir, output_directory, temp_directory, input_directory, user_directory
    base_path = os.path.abspath(base)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    user_directory = os.path.join(base_path, "user")
    folder_names_and_paths.clear()
    for name, subdirs in _CORE_FOLDERS.items():
        folder_names_and_paths[name] = ([os.path.join(models_dir, d) for d in subdirs], set(supported_pt_extensions))
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], {"folder"})
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())


def map_legacy(folder_name: str) -> str:
    return _LEGACY.get(folder_name, folder_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def get_filename_list(folder_name: str) -> list[str]:
    """Every file under the folder's roots (relative paths, sub-folders included), filtered by
    extension when the folder declares extensions. No caching (the real one caches by mtime)."""
    paths, exts = folder_names_and_paths[map_legacy(folder_name)]
    found: set[str] = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, subdirs, files in os.walk(root, followlinks=True):
            subdirs[:] = [d for d in subdirs if d != ".git"]
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if not exts or os.path.splitext(rel)[1].lower() in exts:
                    found.add(rel)
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root in folder_names_and_paths[folder_name][0]:
        candidate = os.path.join(root, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def set_output_directory(path: str) -> None:
    global output_directory
    output_directory = path


def set_temp_directory(path: str) -> None:
    global temp_directory
    temp_directory = path


def set_input_directory(path: str) -> None:
    global input_directory
    input_directory = path


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": output_directory, "temp": temp_directory, "input": input_directory}.get(type_name)


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    """``name`` may end in `` [output]``, `` [input]`` or `` [temp]`` to pick the base folder."""
    for tag in ("output", "input", "temp"):
        suffix = f" [{tag}]"
        if name.endswith(suffix):
            return os.path.join(get_directory_by_type(tag), name[: -len(suffix)])
    return os.path.join(default_dir or input_directory, name)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0
                        ) -> tuple[str, str, int, str, str]:
    """(full_output_folder, filename, counter, subfolder, filename_prefix), as in ComfyUI:
    ``counter`` is one more than the highest ``<filename>_<NNNNN>_`` already in the folder."""
    filename_prefix = (filename_prefix.replace("%width%", str(image_width))
                       .replace("%height%", str(image_height))
                       .replace("%year%", str(time.localtime().tm_year)))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
    counter = 1
    if os.path.isdir(full_output_folder):
        for entry in os.listdir(full_output_folder):
            stem = entry[len(filename) + 1:]
            if entry.startswith(filename + "_") and stem.split("_")[0].isdigit():
                counter = max(counter, int(stem.split("_")[0]) + 1)
    else:
        os.makedirs(full_output_folder, exist_ok=True)
    return full_output_folder, filename, counter, subfolder, filename_prefix


reset(os.path.join(tempfile.gettempdir(), f"comfy_stub_{os.getpid()}"))
