"""The native nodes in a real ComfyUI server, wired to ComfyUI's core loaders and samplers.

The server's models/ holds the tiny checkpoints under the real file names (``tiny_models``); its
custom_nodes/ holds, besides the pack, a test-only folder (``tiny_sizes_node.py``) that gives
ComfyUI's core loaders the tiny sizes they cannot read from the tensors. Prompts: Load Diffusion
Model (default and fp8_e4m3fn weights) -> WorldStereo Apply Variant (-> Load LoRA model-only);
Load CLIP (wan) -> CLIP Text Encode; Load VAE, Load CLIP Vision; our scene and render nodes ->
WorldStereo Conditioning -> KSampler and SamplerCustomAdvanced (release sigmas / UniPC, DMD
sigmas / euler) -> WorldStereo VAE Decode Keyframes -> core Save Video, with latent previews.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.integration

from conftest import comfyui_dir

COMFYUI_DIR = comfyui_dir()

from tiny_models import FILES, UMT5_SIZES, VAE_BASE_DIM, write_example_image, write_tiny_models  # noqa: E402
from comfyui_harness import ComfyUIServer  # noqa: E402
from tiny_checkpoints import COMFY_PREFIX, tiny_transformer_config  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY_NODE = "worldstereo_test_tiny_sizes"
MERGED_BASE = "wan_tiny_lora_merged.safetensors"
LORA = "wan_tiny_lora.safetensors"
LORA_STRENGTH = 0.8
NATIVE_NODES = {"WorldStereoApplyVariant", "WorldStereoLoadCompleteVariant", "WorldStereoConditioning",
                "WorldStereoReleaseSigmas", "WorldStereoDMDSigmas", "WorldStereoReleaseUniPCSampler",
                "WorldStereoVAEDecodeKeyframes"}


def _sizes(models: Path) -> dict:
    """What tiny_sizes_node.py reads: the tiny models' sizes ComfyUI's loaders assume otherwise."""
    tcfg = tiny_transformer_config()
    wan = {"dim": tcfg["num_attention_heads"] * tcfg["attention_head_dim"], "num_heads": tcfg["num_attention_heads"],
           "freq_dim": tcfg["freq_dim"], "text_dim": tcfg["text_dim"], "image_dim": tcfg["image_dim"]}
    umt5 = {**UMT5_SIZES, "d_model": tcfg["text_dim"], "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
            "model_type": "umt5"}
    clip = json.loads((models / "clip_vision" / FILES["clip_vision"]).with_suffix(".json").read_text())
    return {"wan": wan, "vae": {"dim": VAE_BASE_DIM}, "umt5": umt5, "clip_vision": clip}


def install_tiny_sizes_node(server: ComfyUIServer, models: Path) -> None:
    """Copy ``tiny_sizes_node.py`` (with its sizes.json) into the server's custom_nodes/ (the server
    must name :data:`TINY_NODE` in its ``extra_nodes``)."""
    node = server.base_dir / "custom_nodes" / TINY_NODE
    node.mkdir()
    shutil.copyfile(HERE / "tiny_sizes_node.py", node / "__init__.py")
    (node / "sizes.json").write_text(json.dumps(_sizes(models)))


#: Layers the tiny LoRA adapts (ComfyUI Wan names).
LORA_TARGETS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.2.cross_attn.k_img")


def _write_lora(models: Path, rank: int = 4, alpha: float = 2.0) -> None:
    """A LoRA in ComfyUI's Wan key format, and the base with it merged at LORA_STRENGTH."""
    base = load_file(str(models / "diffusion_models" / FILES["diffusion_models"]))
    g = torch.Generator().manual_seed(7)
    lora, merged = {}, dict(base)
    for name in LORA_TARGETS:
        key = f"{COMFY_PREFIX}{name}.weight"
        weight = base[key]
        down = torch.randn(rank, weight.shape[1], generator=g) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=g) * 0.3
        lora.update({f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up,
                     f"diffusion_model.{name}.alpha": torch.tensor(alpha)})
        merged[key] = (weight.double() + LORA_STRENGTH * alpha / rank * (up.double() @ down.double())).to(weight.dtype)
    (models / "loras").mkdir(exist_ok=True)
    save_file(lora, str(models / "loras" / LORA))
    save_file(merged, str(models / "diffusion_models" / MERGED_BASE))


@contextmanager
def tiny_models_server(work_dir: Path, *, extra_args: tuple[str, ...] = (), inputs=write_example_image,
                       add_models: Callable[[Path], None] | None = None) -> Iterator[ComfyUIServer]:
    """A started headless ComfyUI whose models/ holds the tiny checkpoints under the real file names
    (plus what ``add_models(models)`` writes), with the test-only sizes node, and whose input/ holds
    what ``inputs(input_dir, comfy_dir=...)`` writes."""
    python = os.environ.get("COMFYUI_PYTHON")
    srv = ComfyUIServer(COMFYUI_DIR, work_dir, python=python, extra_args=extra_args, extra_nodes=(TINY_NODE,))
    srv.prepare()
    models = write_tiny_models(srv.base_dir / "models", comfy_dir=srv.comfy_dir, python=python or sys.executable)
    if add_models is not None:
        add_models(models)
    inputs(srv.base_dir / "input", comfy_dir=srv.comfy_dir)
    install_tiny_sizes_node(srv, models)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_models_server(tmp_path_factory.mktemp("comfyui_native"), extra_args=("--preview-method", "latent2rgb"),
                            add_models=_write_lora) as srv:
        yield srv


def _scene() -> dict:
    """Start image at the tiny size, its point cloud, a 5-camera trajectory and the warp render."""
    return {
        "img": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "start": {"class_type": "ImageScale", "inputs": {"image": ["img", 0], "upscale_method": "bicubic",
                                                         "width": 48, "height": 32, "crop": "center"}},
        "moge": {"class_type": "WorldStereoMoGeLoader", "inputs": {"checkpoint": FILES["moge"], "download": False}},
        "depth": {"class_type": "WorldStereoMoGeDepth", "inputs": {"resolution_level": 9, "moge": ["moge", 0],
                                                                   "image": ["start", 0]}},
        "cloud": {"class_type": "WorldStereoLiftDepth", "inputs": {"fov_deg": 60, "sobel_threshold": 0.35,
                                                                   "contract": 8, "image": ["start", 0],
                                                                   "depth": ["depth", 0]}},
        "traj": {"class_type": "WorldStereoTrajectoryPreset", "inputs": {"preset": "orbit_left", "frames": 5,
                                                                         "scale": 1, "point_cloud": ["cloud", 0]}},
        "render": {"class_type": "WorldStereoRenderWarps", "inputs": {
            "backend": "torch", "point_cloud": ["cloud", 0], "trajectory": ["traj", 0], "image": ["start", 0]}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": FILES["text_encoders"], "type": "wan"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a quiet street with old houses",
                                                           "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["clip", 0]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": FILES["vae"]}},
        "clipvision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": FILES["clip_vision"]}},
    }


def _model(prompt: dict, name: str, variant: str, *, unet: str = FILES["diffusion_models"],
           weight_dtype: str = "default", lora: bool = False) -> list:
    """Load Diffusion Model -> Apply Variant (-> LoRA) -> Conditioning; returns the MODEL link."""
    prompt[f"{name}_unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    prompt[name] = {"class_type": "WorldStereoApplyVariant", "inputs": {"model": [f"{name}_unet", 0],
                                                                        "variant": variant, "attention_scope": "full"}}
    model = [name, 0]
    if lora:
        prompt[f"{name}_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": LORA, "strength_model": LORA_STRENGTH}}
        model = [f"{name}_lora", 0]
    prompt[f"{name}_cond"] = {"class_type": "WorldStereoConditioning", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0],
        "clip_vision": ["clipvision", 0], "start_image": ["start", 0], "render": ["render", 0],
        "hole_mask": ["render", 1], "trajectory": ["traj", 0]}}
    return model


def _ksampler(prompt: dict, name: str, model: list, cond: str) -> list:
    prompt[name] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "uni_pc_bh2", "scheduler": "simple",
        "positive": [cond, 0], "negative": [cond, 1], "latent_image": [cond, 2], "denoise": 1.0}}
    return [name, 0]


def _custom(prompt: dict, name: str, model: list, cond: str, *, dmd: bool = False) -> list:
    """SamplerCustomAdvanced with the release's sampling (UniPC + CFG 5, or DMD: euler, CFG 1)."""
    if dmd:
        prompt[f"{name}_sigmas"] = {"class_type": "WorldStereoDMDSigmas", "inputs": {"model": model}}
        prompt[f"{name}_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    else:
        prompt[f"{name}_sigmas"] = {"class_type": "WorldStereoReleaseSigmas", "inputs": {"model": model, "steps": 2,
                                                                                          "shift": 0.0}}
        prompt[f"{name}_sampler"] = {"class_type": "WorldStereoReleaseUniPCSampler", "inputs": {"solver_order": 2}}
    prompt[f"{name}_noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    prompt[f"{name}_guider"] = {"class_type": "CFGGuider", "inputs": {
        "model": model, "positive": [cond, 0], "negative": [cond, 1], "cfg": 1.0 if dmd else 5.0}}
    prompt[name] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": [f"{name}_noise", 0], "guider": [f"{name}_guider", 0], "sampler": [f"{name}_sampler", 0],
        "sigmas": [f"{name}_sigmas", 0], "latent_image": [cond, 2]}}
    return [name, 0]


def _save_video(prompt: dict, name: str, latent: list) -> None:
    prompt[f"{name}_decode"] = {"class_type": "WorldStereoVAEDecodeKeyframes", "inputs": {
        "vae": ["vae", 0], "samples": latent, "fps": 16.0}}
    prompt[name] = {"class_type": "SaveVideo", "inputs": {"video": [f"{name}_decode", 1], "filename_prefix":
                                                          f"WorldStereo/{name}", "format": "auto", "codec": "auto"}}


def _saved_files(server, run, node: str, key: str) -> list[Path]:
    entries = run.outputs[node][key]
    return [server.output_dir / e.get("subfolder", "") / e["filename"] for e in entries]


def test_native_nodes_registered(server):
    info = server.object_info()
    assert NATIVE_NODES <= set(info) and server.import_failures() == []
    for node_id in NATIVE_NODES:
        assert info[node_id]["category"] == "WorldStereo/native"
        inputs = {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}
        assert all(options.get("tooltip") for _, options in inputs.values()), node_id
    assert info["WorldStereoConditioning"]["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]


def test_core_loaders_and_samplers_to_saved_videos(server):
    """worldstereo-memory through KSampler and through SamplerCustomAdvanced with the release's
    sigmas and UniPC, worldstereo-memory-dmd with its DMD sigmas and core euler: each decoded and
    saved by core Save Video; the samplers stream latent previews."""
    prompt = _scene()
    memory = _model(prompt, "memory", "worldstereo-memory")
    dmd = _model(prompt, "dmd", "worldstereo-memory-dmd")
    _save_video(prompt, "ksampler", _ksampler(prompt, "ks", memory, "memory_cond"))
    _save_video(prompt, "release", _custom(prompt, "custom", memory, "memory_cond"))
    _save_video(prompt, "dmdvideo", _custom(prompt, "dmdsample", dmd, "dmd_cond", dmd=True))
    run = server.run_prompt(prompt, timeout=600)
    assert run.status == "success", run.messages[-1:] or server.log_tail()
    for node in ("ksampler", "release", "dmdvideo"):
        (path,) = _saved_files(server, run, node, "images")
        assert path.is_file() and path.stat().st_size > 0
    assert run.binary_frames > 0, "no latent preview reached the client"


def test_fp8_weights_run(server):
    prompt = _scene()
    model = _model(prompt, "fp8", "worldstereo-camera", weight_dtype="fp8_e4m3fn")
    _save_video(prompt, "fp8video", _ksampler(prompt, "ks", model, "fp8_cond"))
    run = server.run_prompt(prompt, timeout=600)
    assert run.status == "success", run.messages[-1:] or server.log_tail()
    (path,) = _saved_files(server, run, "fp8video", "images")
    assert path.is_file() and path.stat().st_size > 0


def _sampled_latent(server, name: str, **model_options) -> torch.Tensor:
    prompt = _scene()
    model = _model(prompt, name, "worldstereo-memory", **model_options)
    latent = _custom(prompt, "custom", model, f"{name}_cond")
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": f"native/{name}"}}
    run = server.run_prompt(prompt, timeout=600)
    assert run.status == "success", run.messages[-1:] or server.log_tail()
    (path,) = _saved_files(server, run, "save", "latents")
    return load_file(str(path))["latent_tensor"]


def test_lora_changes_the_output_as_merging_it_would(server):
    """LoraLoaderModelOnly after WorldStereo Apply Variant samples what the base with the LoRA merged
    into its weights samples, and not what the plain base samples."""
    with_lora = _sampled_latent(server, "lora", lora=True)
    merged = _sampled_latent(server, "merged", unet=MERGED_BASE)
    plain = _sampled_latent(server, "plain")
    assert (with_lora - plain).abs().max() > 1e-3
    assert torch.allclose(with_lora, merged, atol=1e-4), f"max |diff| {(with_lora - merged).abs().max().item():.3g}"


def test_incomplete_variant_is_a_named_error(server):
    """The tiny variants hold the branches only: loading one without a base fails, naming the node."""
    prompt = {"load": {"class_type": "WorldStereoLoadCompleteVariant", "inputs": {
        "variant": "worldstereo-memory-dmd", "weight_dtype": "default", "attention_scope": "full"}},
        "sigmas": {"class_type": "WorldStereoDMDSigmas", "inputs": {"model": ["load", 0]}},
        "preview": {"class_type": "PreviewAny", "inputs": {"source": ["sigmas", 0]}}}
    run = server.run_prompt(prompt, timeout=120)
    assert run.status == "error"
    (error,) = [m["data"] for m in run.messages if m["type"] == "execution_error"]
    assert error["node_type"] == "WorldStereoLoadCompleteVariant"
    assert "WorldStereo Load Complete Variant" in error["exception_message"]
    assert "base" in error["exception_message"]
