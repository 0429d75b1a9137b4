"""The ComfyUI interfaces the pack relies on, checked against the real ComfyUI it is tested with
(``../shared/comfyui/ComfyUI`` or ``$COMFYUI_DIR``, v0.3.64), so that a ComfyUI that renames or
drops one fails here, by name, before anything else runs into it (README, "ComfyUI versions").

Also a change newer ComfyUI versions make that the pack must survive, mimicked on v0.3.64:
``comfy.ops`` layers that get their weights only from ``load_state_dict`` (dynamic VRAM). (The
other, an ``InterruptProcessingException`` derived from ``BaseException``, is tested with the
node plumbing.)
"""
from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_native_env import COMFYUI_DIR, real_comfy
from conftest import fixtures_root, import_test_module, integration_unavailable
from tiny_checkpoints import CAMERA
from worldstereo_core.models.ops import check_ops

#: Callables the pack (nodes/, and tests that drive ComfyUI as it runs) calls, with the leading
#: parameters it passes (by position or name), as ``module: qualname``.
SIGNATURES = {
    # the Wan model the WorldStereo forward runs on (nodes/native/host.py, model.py)
    "comfy.ldm.wan.model:WanModel.forward": ("x", "timestep", "context", "clip_fea", "time_dim_concat",
                                             "transformer_options"),
    "comfy.ldm.wan.model:WanModel.unpatchify": ("x", "grid_sizes"),
    "comfy.ldm.wan.model:WanAttentionBlock.forward": ("x", "e", "freqs", "context", "context_img_len",
                                                      "transformer_options"),
    "comfy.ldm.wan.model:WanI2VCrossAttention.forward": ("x", "context", "context_img_len", "transformer_options"),
    "comfy.ldm.wan.model:Head.forward": ("x", "e"),
    "comfy.ldm.wan.model:sinusoidal_embedding_1d": ("dim", "position"),
    "comfy.ldm.flux.layers:EmbedND.forward": ("ids",),
    "comfy.ldm.flux.math:apply_rope1": ("x", "freqs_cis"),
    # the native MODEL (nodes/native/model.py)
    "comfy.model_patcher:ModelPatcher.__init__": ("model", "load_device", "offload_device"),
    "comfy.model_patcher:ModelPatcher.clone": (),
    "comfy.model_patcher:ModelPatcher.add_patches": ("patches", "strength_patch", "strength_model"),
    "comfy.model_patcher:ModelPatcher.add_object_patch": ("name", "obj"),
    "comfy.model_patcher:ModelPatcher.set_additional_models": ("key", "models"),
    "comfy.model_patcher:ModelPatcher.get_additional_models_with_key": ("key",),
    "comfy.model_patcher:ModelPatcher.get_nested_additional_models": (),
    "comfy.model_patcher:ModelPatcher.add_wrapper_with_key": ("wrapper_type", "key", "wrapper"),
    "comfy.model_patcher:ModelPatcher.get_model_object": ("name",),
    "comfy.model_patcher:ModelPatcher.model_dtype": (),
    "comfy.model_patcher:ModelPatcher.patch_model": ("device_to", "lowvram_model_memory"),
    "comfy.model_patcher:ModelPatcher.unpatch_model": ("device_to",),
    "comfy.patcher_extension:WrapperExecutor.__init__": ("original", "class_obj", "wrappers", "idx"),
    "comfy.sd:load_diffusion_model": ("unet_path", "model_options"),
    "comfy.sd:load_diffusion_model_state_dict": ("sd", "model_options"),
    "comfy.sd:load_lora_for_models": ("model", "clip", "lora", "strength_model", "strength_clip"),
    "comfy.utils:load_torch_file": ("ckpt", "safe_load"),
    "comfy.utils:get_attr": ("obj", "attr"),
    # conditioning and sampling (nodes/native/conds.py, sampling.py)
    "comfy.conds:CONDRegular.__init__": ("cond",),
    "comfy.conds:CONDRegular.process_cond": ("batch_size",),
    "comfy.conds:CONDConstant.__init__": ("cond",),
    "comfy.conds:CONDConstant.process_cond": ("batch_size",),
    "comfy.samplers:KSAMPLER.__init__": ("sampler_function", "extra_options", "inpaint_options"),
    "comfy.samplers:sampler_object": ("name",),
    "comfy.samplers:CFGGuider.__init__": ("model_patcher",),
    "comfy.sample:sample_custom": ("model", "noise", "cfg", "sampler", "sigmas", "positive", "negative",
                                   "latent_image"),
    "comfy.model_detection:detect_unet_config": ("state_dict", "key_prefix", "metadata"),
    # progress, interrupts, memory (nodes/_comfy.py)
    "comfy.utils:ProgressBar.__init__": ("total", "node_id"),
    "comfy.utils:ProgressBar.update_absolute": ("value", "total"),
    "comfy.model_management:cast_to": ("weight", "dtype", "device"),
    "comfy.model_management:load_models_gpu": ("models",),
    "comfy.model_management:unload_all_models": (),
    "comfy.model_management:free_memory": ("memory_required", "device"),
    "comfy.model_management:soft_empty_cache": (),
    "comfy.model_management:get_torch_device": (),
    "comfy.model_management:unet_offload_device": (),
    "comfy.model_management:should_use_bf16": ("device",),
    "comfy.model_management:should_use_fp16": ("device",),
    "comfy.model_management:throw_exception_if_processing_interrupted": (),
}

#: Source facts the pack relies on that no signature shows: ``module: qualname`` -> text in its source.
SOURCE_FACTS = {
    # WorldStereo inputs travel as model_conds and reach the diffusion model as keyword arguments
    "comfy.model_base:BaseModel._apply_model": ("extra_conds[o] = extra", "**extra_conds"),
    "comfy.model_base:BaseModel.__init__": ("self.manual_cast_dtype", "self.latent_format"),
    # the core Wan I2V conditioning our conditioning node fills in
    "comfy.model_base:WAN21.extra_conds": ('"clip_vision_output"', "penultimate_hidden_states"),
    "comfy.model_base:WAN21.concat_cond": ('"concat_latent_image"', '"concat_mask"'),
    "comfy.sampler_helpers:convert_cond": ('"model_conds"',),
    # the variant's backbone tensors are "set" weight patches (nodes/native/model.py:apply_variant)
    "comfy.lora:calculate_weight": ('patch_type == "set"',),
    # ComfyUI loads weight patches only into modules whose parameters are all their own
    # (nodes/native/model.py:_patched_on_load)
    "comfy.model_patcher:ModelPatcher._load_list": ("named_parameters(recurse=False)",
                                                    "named_parameters(recurse=True)"),
    # the OUTER_SAMPLE wrapper reads executor.class_obj.model_options
    "comfy.samplers:CFGGuider.sample": ("WrappersMP.OUTER_SAMPLE",),
    "comfy.samplers:CFGGuider.__init__": ("self.model_options = model_patcher.model_options",),
}

#: Outside ``comfy``: read in a ComfyUI process of their own (they are top-level modules the test
#: stub also provides). Names -> leading parameters, or None for "exists".
TOP_LEVEL = {
    "folder_paths": {"add_model_folder_path": ("folder_name", "full_folder_path"),
                     "get_folder_paths": ("folder_name",), "get_filename_list": ("folder_name",),
                     "get_full_path": ("folder_name", "filename"), "get_input_directory": (),
                     "get_output_directory": (), "get_temp_directory": (),
                     "get_save_image_path": ("filename_prefix", "output_dir", "image_width", "image_height"),
                     "models_dir": None},
    "comfy_api.latest": {"ComfyExtension": None, "io.ComfyNode": None, "io.Schema": None, "io.NodeOutput": None,
                         "io.Custom": ("io_type",), "io.Hidden": None},
}
#: Text that must stay in ComfyUI files that cannot be imported outside a server.
FILE_FACTS = {
    "server.py": ("class PromptServer", "PromptServer.instance = self"),
    "nodes.py": ('"NODE_CLASS_MAPPINGS"', '"NODE_DISPLAY_NAME_MAPPINGS"', '"WEB_DIRECTORY"'),
}


@pytest.fixture(scope="module")
def comfy_env():
    with real_comfy() as env:
        yield env
        env.comfy.model_management.unload_all_models()


def _resolve(spec: str):
    module, _, qualname = spec.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _leading_parameters(func) -> list[str]:
    names = [p.name for p in inspect.signature(func).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[1:] if names[:1] == ["self"] else names


@pytest.mark.parametrize("spec", sorted(SIGNATURES))
def test_signature_we_call(comfy_env, spec):
    expected = list(SIGNATURES[spec])
    assert _leading_parameters(_resolve(spec))[:len(expected)] == expected, \
        f"{spec} no longer takes {expected}: this ComfyUI changed an interface the pack calls"


@pytest.mark.parametrize("spec", sorted(SOURCE_FACTS))
def test_source_fact_we_rely_on(comfy_env, spec):
    source = inspect.getsource(_resolve(spec))
    missing = [text for text in SOURCE_FACTS[spec] if text not in source]
    assert not missing, f"{spec} no longer contains {missing}: see README, 'ComfyUI versions'"


def test_attention_takes_heads_mask_and_transformer_options(comfy_env):
    """``optimized_attention(q, k, v, heads=, mask=, transformer_options=)`` (the first three are
    named differently by the different backends, so only their number is fixed)."""
    params = inspect.signature(comfy_env.comfy.ldm.modules.attention.optimized_attention).parameters
    kinds = [p.kind for p in params.values()]
    assert kinds[:3] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
    assert {"heads", "mask"} <= params.keys() and inspect.Parameter.VAR_KEYWORD in kinds


def test_wrapper_keys_and_ops(comfy_env):
    comfy = comfy_env.comfy
    assert comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL == "diffusion_model"
    assert comfy.patcher_extension.WrappersMP.OUTER_SAMPLE == "outer_sample"
    check_ops(comfy.ops.disable_weight_init)
    assert callable(comfy.clip_vision.Output)


def _tiny_wan(comfy, num_layers: int = 2):
    return comfy.ldm.wan.model.WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=24, ffn_dim=32,
                                        freq_dim=16, text_dim=8, out_dim=16, num_heads=2, num_layers=num_layers,
                                        operations=comfy.ops.disable_weight_init)


def test_wan_model_has_the_parts_the_host_uses(comfy_env):
    """Every attribute :class:`nodes.native.host.ComfyWanHost` and ``backbone_spec`` read."""
    wan = _tiny_wan(comfy_env.comfy)
    for name in ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "img_emb", "blocks",
                 "head", "rope_embedder", "patch_size", "in_dim", "out_dim", "dim", "freq_dim", "text_dim"):
        assert hasattr(wan, name), f"WanModel.{name}"
    assert isinstance(wan.img_emb.proj[0], torch.nn.LayerNorm)
    block = wan.blocks[0]
    for name in ("norm1", "norm2", "norm3", "self_attn", "cross_attn", "ffn", "modulation"):
        assert hasattr(block, name), f"WanAttentionBlock.{name}"
    for name in ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads"):
        assert hasattr(block.self_attn, name), f"WanSelfAttention.{name}"
    assert isinstance(block.modulation, torch.nn.Parameter) and block.modulation.shape == (1, 6, wan.dim)


def test_diffusion_model_wrapper_replaces_the_forward(comfy_env):
    """A DIFFUSION_MODEL wrapper gets the WanModel as ``executor.class_obj`` and the forward's
    arguments, extra model_conds included, in a form the WorldStereo wrapper's signature binds."""
    comfy, native = comfy_env.comfy, comfy_env.native
    wan = _tiny_wan(comfy, num_layers=1)
    seen = {}

    def wrapper(executor, *args, **kwargs):
        seen.update(class_obj=executor.class_obj, args=args, kwargs=kwargs)
        return torch.zeros(1)

    x, timestep, context = torch.zeros(1, 36, 1, 2, 2), torch.zeros(1), torch.zeros(1, 3, 8)
    options = {"wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"k": [wrapper]}}}
    marker = object()
    out = wan(x, timestep, context, clip_fea=None, transformer_options=options, worldstereo_marker=marker)
    assert out.shape == (1,) and seen["class_obj"] is wan
    bound = inspect.signature(native.model.WorldStereoForward.__call__).bind(
        None, None, *seen["args"], **seen["kwargs"])
    assert bound.arguments["x"] is x and bound.arguments["context"] is context
    assert bound.arguments["transformer_options"]["wrappers"] == options["wrappers"]
    assert bound.arguments["kwargs"] == {"worldstereo_marker": marker}


def test_top_level_modules_in_a_comfyui_process():
    """``folder_paths`` and the V3 node API (``comfy_api.latest``), imported in a process of their own
    the way a ComfyUI process has them; ``server.py`` and ``nodes.py`` (not importable outside a
    server) keep the names the pack's entry point and routes use."""
    if not (COMFYUI_DIR / "folder_paths.py").is_file():
        integration_unavailable(f"ComfyUI not found at {COMFYUI_DIR} (set COMFYUI_DIR to a ComfyUI checkout)")
    script = (
        "import importlib, inspect, json, sys\n"
        f"sys.path.insert(0, {str(COMFYUI_DIR)!r})\n"
        "import comfy.options; comfy.options.enable_args_parsing(False)\n"
        "out = {}\n"
        f"for module, names in {TOP_LEVEL!r}.items():\n"
        "    mod = importlib.import_module(module)\n"
        "    for name in names:\n"
        "        obj = mod\n"
        "        try:\n"
        "            for part in name.split('.'): obj = getattr(obj, part)\n"
        "        except AttributeError:\n"
        "            out[module + ':' + name] = None; continue\n"
        "        out[module + ':' + name] = [p for p in inspect.signature(obj).parameters] if callable(obj) \\\n"
        "            and not isinstance(obj, type) else []\n"
        "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for module, names in TOP_LEVEL.items():
        for name, params in names.items():
            got = found[f"{module}:{name}"]
            assert got is not None, f"{module}.{name} is gone"
            if params is not None:
                assert got[:len(params)] == list(params), f"{module}.{name} takes {got}, not {list(params)}"
    for file, texts in FILE_FACTS.items():
        source = (COMFYUI_DIR / file).read_text(encoding="utf-8")
        missing = [text for text in texts if text not in source]
        assert not missing, f"ComfyUI's {file} no longer contains {missing}"


# ----- newer ComfyUI behaviour, mimicked on the tested version -----------------------------------

def _lazy_linear(base: type) -> type:
    """``comfy.ops.disable_weight_init.Linear`` as newer ComfyUI builds it under dynamic VRAM: no
    weight or bias until ``load_state_dict`` hands them over."""

    class LazyLinear(base):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight, self.bias = None, None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            for key, value in state_dict.items():
                name = key[len(prefix):]
                if name in ("weight", "bias"):
                    setattr(self, name, torch.nn.Parameter(value.clone(), requires_grad=False))
                else:
                    unexpected_keys.append(key)
            if self.weight is None:
                missing_keys.append(prefix + "weight")

    return LazyLinear


def _memory_fixture() -> Path:
    root = fixtures_root() / "reference_tiny"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("fixture_kind") == "transformer_forward" and config["model_type"] != CAMERA:
            return folder
    pytest.skip(f"no memory transformer_forward fixture under {root}")


def test_branches_load_when_comfy_ops_create_weights_lazily(comfy_env, tmp_path, monkeypatch):
    """Newer ComfyUI (dynamic VRAM) builds ``comfy.ops`` Linear layers without weights and fills them
    in ``load_state_dict``: the native MODEL still loads its branches (shapes checked, no tensor
    missing) and reproduces the fixture."""
    hosts = import_test_module("models/test_hosts")
    ComfyHost, comfy_forward = hosts.ComfyHost, hosts.comfy_forward

    folder = _memory_fixture()
    ops = comfy_env.comfy.ops.disable_weight_init
    monkeypatch.setattr(ops, "Linear", _lazy_linear(ops.Linear))
    host = ComfyHost(comfy_env, tmp_path)
    native = host.load(folder)
    branches = native.get_additional_models_with_key("worldstereo")[0].model
    linears = [m for m in branches.modules() if isinstance(m, ops.Linear)]
    assert linears and all(isinstance(m.weight, torch.nn.Parameter) for m in linears)
    out = comfy_forward(comfy_env, native, load_file(str(folder / "inputs.safetensors")))
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), f"max |diff| {(out - ref).abs().max().item():.3g}"

    broken = host.comfy_variant(folder, {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
                                         if not k.endswith("proj_out.0.weight")})
    with pytest.raises(comfy_env.native.model.CheckpointError, match=r"missing tensors: .*proj_out\.0\.weight"):
        host.load(broken)

