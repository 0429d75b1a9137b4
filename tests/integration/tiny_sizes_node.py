"""Test-only ComfyUI custom node (no nodes): ComfyUI's core loaders with the sizes of the tiny test
checkpoints. Installed by tests/integration/test_native_server.py into the test server's own
custom_nodes/ (as ``<folder>/__init__.py`` with ``sizes.json`` beside it); never part of the pack.

ComfyUI reads most of a Wan2.1 model's sizes from its tensors but assumes the real ones for the
rest, which the tiny checkpoints do not have: the Wan model's attention heads, timestep-embedding
and text widths and its 1280-wide CLIP projection; the Wan VAE's width and residual blocks; the
UMT5-XXL and CLIP ViT-H configs (detected by layer counts). ``sizes.json`` gives the tiny values.
"""
import json
import os
import tempfile

import comfy.clip_vision
import comfy.ldm.wan.model
import comfy.ldm.wan.vae
import comfy.model_detection
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
import comfy.text_encoders.wan

with open(os.path.join(os.path.dirname(os.path.realpath(__file__)), "sizes.json"), encoding="utf-8") as f:
    SIZES = json.load(f)
_SCRATCH = tempfile.mkdtemp(prefix="worldstereo_tiny_sizes_")


def _json_file(name: str, data: dict) -> str:
    path = os.path.join(_SCRATCH, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


_detect_unet_config = comfy.model_detection.detect_unet_config


def detect_unet_config(state_dict, key_prefix, metadata=None):
    config = _detect_unet_config(state_dict, key_prefix, metadata=metadata)
    if config is not None and config.get("image_model") == "wan2.1" and config.get("dim") == SIZES["wan"]["dim"]:
        config.update({k: SIZES["wan"][k] for k in ("num_heads", "freq_dim", "text_dim")})
    return config


_MLPProj = comfy.ldm.wan.model.MLPProj


def MLPProj(in_dim, out_dim, **kwargs):
    if out_dim == SIZES["wan"]["dim"]:
        in_dim = SIZES["wan"]["image_dim"]
    return _MLPProj(in_dim, out_dim, **kwargs)


_WanVAE = comfy.ldm.wan.vae.WanVAE


def WanVAE(**config):
    """The Wan2.1 VAE at the tiny width (every Wan VAE of the test server is tiny)."""
    return _WanVAE(**{**config, **SIZES["vae"]})


_detect_te_model = comfy.sd.detect_te_model


def detect_te_model(sd):
    weight = sd.get("shared.weight")
    if weight is not None and tuple(weight.shape) == (SIZES["umt5"]["vocab_size"], SIZES["umt5"]["d_model"]):
        return comfy.sd.TEModel.T5_XXL
    return _detect_te_model(sd)


_UMT5_CONFIG = _json_file("umt5.json", SIZES["umt5"])


def _umt5_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
    """UMT5XXlModel.__init__ with the tiny config (every UMT5 of the test server is tiny)."""
    comfy.sd1_clip.SDClipModel.__init__(
        self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=_UMT5_CONFIG, dtype=dtype,
        special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5, enable_attention_masks=True,
        zero_out_masked=True, model_options=model_options)


_CLIP_CONFIG = _json_file("clip_vision.json", SIZES["clip_vision"])
_load_clipvision_from_sd = comfy.clip_vision.load_clipvision_from_sd


def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
    clip = _load_clipvision_from_sd(sd, prefix=prefix, convert_keys=convert_keys)
    norm = sd.get("vision_model.encoder.layers.0.layer_norm1.weight")
    if clip is None and norm is not None and norm.shape[0] == SIZES["clip_vision"]["hidden_size"]:
        clip = comfy.clip_vision.ClipVisionModel(_CLIP_CONFIG)
        clip.load_sd(sd)
    return clip


comfy.model_detection.detect_unet_config = detect_unet_config
comfy.ldm.wan.model.MLPProj = MLPProj
comfy.ldm.wan.vae.WanVAE = WanVAE
comfy.sd.detect_te_model = detect_te_model
comfy.text_encoders.wan.UMT5XXlModel.__init__ = _umt5_init
comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd

NODE_CLASS_MAPPINGS = {}
