"""The real ComfyUI (``../shared/comfyui/ComfyUI`` or ``$COMFYUI_DIR``) in this test process, and tiny
Wan2.1-I2V checkpoints it can load.

:func:`real_comfy` imports ComfyUI's ``comfy`` package (CPU mode) and the pack's ``nodes/native``
for the duration of a block, then removes them again, so test modules that use the ComfyUI stub
(``comfy_stub``) are unaffected; it skips the calling test when ComfyUI is absent.

ComfyUI reads a Wan2.1 checkpoint's sizes from its tensors but assumes some: 128-channel heads,
a 256-channel timestep embedding, 4096-channel text features and 1280-channel CLIP features.
The tiny fixture models are narrower, so :func:`tiny_detection` corrects the first three in
ComfyUI's detection (a real checkpoint needs nothing), and :func:`widen_image_embedder` rewrites a
tiny model's CLIP projection to take 1280 channels exactly: the CLIP features are tiled
(``tile_image_features``), which leaves a LayerNorm's statistics unchanged, and the first copy
alone feeds the projection.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from conftest import REPO, comfyui_checkout, integration_unavailable

COMFYUI_DIR = comfyui_checkout()
#: ComfyUI's Wan2.1 CLIP-feature width (ViT-H/14).
COMFY_IMAGE_DIM = 1280
PACK_PACKAGE = "worldstereo_pack_under_test"
#: ComfyUI's top-level modules a block may import (removed again afterwards).
COMFY_TOP_LEVEL = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "comfy_config", "node_helpers",
                   "folder_paths", "nodes", "server", "latent_preview", "execution", "app", "utils", "protocol",
                   "comfyui_version", "api_server", "middleware")
_IMAGE_EMBEDDER = "condition_embedder.image_embedder."


def _comfy_module(name: str) -> bool:
    return name.split(".")[0] in COMFY_TOP_LEVEL or name.split(".")[0] == PACK_PACKAGE


class _CoreAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``<PACK_PACKAGE>.worldstereo_core[.x]`` is the process's ``worldstereo_core[.x]``."""

    prefix = PACK_PACKAGE + ".worldstereo_core"

    def find_spec(self, name, path=None, target=None):
        if name == self.prefix or name.startswith(self.prefix + "."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return importlib.import_module(spec.name[len(PACK_PACKAGE) + 1:])

    def exec_module(self, module) -> None:
        pass


def _bare_package(name: str, folder: Path) -> None:
    """A package ``name`` over ``folder`` whose ``__init__`` is not run (the pack's would register nodes)."""
    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    module.__path__ = [str(folder)]
    sys.modules[name] = module


@contextlib.contextmanager
def real_comfy() -> Iterator[SimpleNamespace]:
    """``comfy`` (CPU mode, float32 text encoders) and the pack's ``nodes.native``, imported for the block."""
    if not (COMFYUI_DIR / "comfy" / "model_patcher.py").is_file():
        integration_unavailable(f"ComfyUI not found at {COMFYUI_DIR} (set COMFYUI_DIR to a ComfyUI checkout)")
    stashed = {name: sys.modules.pop(name) for name in list(sys.modules) if _comfy_module(name)}
    for name in stashed:  # inspect's file cache still knows the stub's files under these names
        inspect._filesbymodname.pop(name, None)
    saved_path = list(sys.path)
    # ComfyUI's comfy is a namespace package: a regular ``comfy`` package (the stub) anywhere on the
    # path would win over it, so such entries leave the path for the block.
    sys.path[:] = [str(COMFYUI_DIR)] + [p for p in saved_path if not (Path(p) / "comfy" / "__init__.py").is_file()]
    alias = _CoreAlias()
    sys.meta_path.insert(0, alias)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.cpu = True
        args.fp32_text_enc = True  # CPU float32 throughout (ComfyUI's CPU default for CLIP vision is fp16)
        import comfy.clip_vision
        import comfy.lora
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.sd

        _bare_package(PACK_PACKAGE, REPO)
        _bare_package(f"{PACK_PACKAGE}.nodes", REPO / "nodes")
        native = SimpleNamespace(**{name: importlib.import_module(f"{PACK_PACKAGE}.nodes.native.{name}")
                                    for name in ("conds", "host", "model", "sampling")})
        yield SimpleNamespace(comfy=comfy, native=native, package=PACK_PACKAGE)
    finally:
        sys.meta_path.remove(alias)
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if _comfy_module(n)]:
            del sys.modules[name]
        sys.modules.update(stashed)


@contextlib.contextmanager
def tiny_detection(comfy, transformer_config: dict) -> Iterator[None]:
    """ComfyUI's model detection with the sizes it cannot read from a tiny Wan checkpoint's tensors."""
    detection = comfy.model_detection
    original = detection.detect_unet_config
    sizes = {"num_heads": transformer_config["num_attention_heads"], "freq_dim": transformer_config["freq_dim"],
             "text_dim": transformer_config["text_dim"]}

    def detect(state_dict, key_prefix, metadata=None):
        config = original(state_dict, key_prefix, metadata=metadata)
        if config is not None and config.get("image_model") == "wan2.1":
            config.update(sizes)
        return config

    detection.detect_unet_config = detect
    try:
        yield
    finally:
        detection.detect_unet_config = original


def widen_image_embedder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a diffusers-named WorldStereo/Wan state dict whose CLIP projection takes 1280 channels
    and computes exactly what the original computes on :func:`tile_image_features` of its input."""
    out = dict(state_dict)
    if _IMAGE_EMBEDDER + "norm1.weight" not in state_dict:  # no backbone (a branches-only variant)
        return out
    width = state_dict[_IMAGE_EMBEDDER + "norm1.weight"].shape[0]
    copies = COMFY_IMAGE_DIM // width
    if copies * width != COMFY_IMAGE_DIM:
        raise ValueError(f"CLIP width {width} does not divide {COMFY_IMAGE_DIM}")
    for name in ("norm1.weight", "norm1.bias"):
        out[_IMAGE_EMBEDDER + name] = state_dict[_IMAGE_EMBEDDER + name].repeat(copies)
    first = _IMAGE_EMBEDDER + "ff.net.0.proj."
    weight = torch.zeros(COMFY_IMAGE_DIM, COMFY_IMAGE_DIM)
    weight[:width, :width] = state_dict[first + "weight"]
    out[first + "weight"] = weight
    out[first + "bias"] = torch.cat([state_dict[first + "bias"], torch.zeros(COMFY_IMAGE_DIM - width)])
    second = _IMAGE_EMBEDDER + "ff.net.2.weight"
    out[second] = torch.cat([state_dict[second], state_dict[second].new_zeros(state_dict[second].shape[0],
                                                                              COMFY_IMAGE_DIM - width)], dim=1)
    return out


def tile_image_features(features: torch.Tensor) -> torch.Tensor:
    """CLIP features [B, T, w] -> [B, T, 1280] (w copies side by side)."""
    return features.repeat(1, 1, COMFY_IMAGE_DIM // features.shape[-1])


# ----- the tiny VAE and CLIP vision of the pipeline fixtures, as ComfyUI's core objects ------------

_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}
_VAE_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2", "conv_in": "conv1", "norm_out.gamma": "head.0.gamma",
            "conv_out": "head.2"}


def _residual_name(rest: str) -> str:
    for ours, theirs in _RESIDUAL.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def wan_vae_to_original(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLWan`` (Wan2.1 layout, any ``num_res_blocks``) state dict in the
    original Wan key names ComfyUI's ``WanVAE`` loads."""
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[_VAE_TOP[part] + "." + rest] = value
            continue
        block, _, rest = rest.partition(".")
        if block in ("conv_in", "conv_out") or (block, rest) == ("norm_out", "gamma"):
            name = _VAE_TOP[block if block != "norm_out" else "norm_out.gamma"]
            out[f"{part}.{name}" + ("" if block == "norm_out" else "." + rest)] = value
        elif block == "mid_block":
            kind, index, rest = rest.split(".", 2)
            slot = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[kind][index]
            out[f"{part}.middle.{slot}." + (_residual_name(rest) if kind == "resnets" else rest)] = value
        elif block == "down_blocks":
            index, rest = rest.split(".", 1)
            out[f"{part}.downsamples.{index}." + (rest if rest.startswith(("resample.", "time_conv."))
                                                  else _residual_name(rest))] = value
        elif block == "up_blocks":
            level, kind, rest = rest.split(".", 2)
            per_level = num_res_blocks + 2  # residual blocks + the upsampler
            if kind == "resnets":
                index, rest = rest.split(".", 1)
                out[f"{part}.upsamples.{int(level) * per_level + int(index)}.{_residual_name(rest)}"] = value
            else:  # upsamplers.0.<resample.1 | time_conv>
                out[f"{part}.upsamples.{int(level) * per_level + num_res_blocks + 1}.{rest.split('.', 1)[1]}"] = value
        else:
            raise KeyError(key)
    return out


@contextlib.contextmanager
def tiny_vae(comfy, vae_config: dict) -> Iterator[None]:
    """ComfyUI's Wan2.1 VAE with a tiny VAE's width and residual blocks (it assumes the real 96 and 2)."""
    module = comfy.ldm.wan.vae
    original = module.WanVAE

    def build(**config):
        return original(**{**config, "dim": vae_config["base_dim"], "num_res_blocks": vae_config["num_res_blocks"]})

    module.WanVAE = build
    try:
        yield
    finally:
        module.WanVAE = original


class TiledClipVision:
    """A tiny core CLIP vision model whose hidden states are tiled to ComfyUI's Wan CLIP width
    (what :func:`widen_image_embedder`'s models take)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        last, penultimate, embeds, projected = self.model(*args, **kwargs)
        return last, tile_image_features(penultimate), embeds, projected


def core_clip_vision(comfy, config: dict, state: dict[str, torch.Tensor], folder: Path):
    """A core ``ClipVisionModel`` (as Load CLIP Vision gives it) of a tiny transformers CLIP vision
    model: ``config`` its config.json, ``state`` its ``vision_model.*`` tensors."""
    path = folder / "clip_vision_config.json"
    path.write_text(json.dumps(config))
    clip = comfy.clip_vision.ClipVisionModel(str(path))
    missing, unexpected = clip.load_sd(state)
    if unexpected or [k for k in missing if not k.startswith("visual_projection.")]:
        raise ValueError(f"tiny CLIP vision does not load: missing {missing}, unexpected {unexpected}")
    clip.model = TiledClipVision(clip.model)
    return clip
