"""The released checkpoint files at their real size, without their data.

What is public about ``hanshanxue/WorldStereo`` (the Hugging Face tree and commit pages, and a
third-party port that read the safetensors headers over HTTP ranges): ``worldstereo-memory-dmd/
model.safetensors`` is 34,863,748,704 bytes, 1799 bf16 tensors, 17.43 B parameters, a complete
transformer lacking only the 40 all-zero ``norm_added_q`` tensors of the Wan repo; its config names
``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` as ``base_model``, with ``nframe`` 21, ``scale_map``
starting ``[480, 832]``, ``mask_downsample`` 1 and 4 DMD steps. The ControlNet widths are not
public: Uni3C's (dim 1024, 16 heads, FFN 4096, 20 layers) with ``mid_channels`` 256 and no
``ref_index_embedding`` are the values that give 1799 tensors, 17.43 B parameters and exactly the
public byte size, so the key list below is our model's at that config.

The file is written as its real header followed by a sparse hole of the data's length (a few KB
on disk) and loaded on the meta device, which reads no tensor data.
"""
from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import pytest
import torch

from worldstereo_core.errors import CheckpointError
from worldstereo_core.loading import load_worldstereo_transformer
from worldstereo_core.models import build_transformer, load_worldstereo_config, shipped_base_config

DMD = "worldstereo-memory-dmd"
BASE_MODEL = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
DMD_FILE_BYTES = 34_863_748_704
DMD_TENSORS = 1799
DMD_PARAMS_BILLIONS = 17.43
WAN_LAYERS = 40
CONTROLNET_CFG = {"dim": 1024, "num_heads": 16, "ffn_dim": 4096, "num_layers": 20, "conv_out_dim": 5120,
                  "time_embed_dim": 5120, "add_channels": 7, "mid_channels": 256, "mask_downsample": 1,
                  "interp": False, "update_ref": True, "ref_embedding": False, "main_camera_embedding": True,
                  "camera_embedding_dim": 7}
DMD_CONFIG = {"base_model": BASE_MODEL, "controlnet_cfg": CONTROLNET_CFG, "latent_cond_mode": "full_vae",
              "negative_prompt": "", "nframe": 21, "scale_map": [[480, 832], [832, 480]], "dmd_start_steps": 250,
              "dmd_end_steps": 1000, "gen_shift": 5.0, "dmd_steps": 4}


@pytest.fixture(scope="module")
def dmd_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of our model at the release's 14B DMD config."""
    model = build_transformer(shipped_base_config("wan2.1-i2v-14b-480p"), CONTROLNET_CFG, memory=True,
                              device="meta", dtype=torch.bfloat16)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A safetensors file as the safetensors writer lays it out (tensors sorted by name, compact JSON
    header padded to 8 bytes), its data left as a sparse hole: real size, almost no disk."""
    header, offset = {}, 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


def write_release_variant(root: Path, shapes: dict, config: dict | None = None) -> Path:
    folder = root / DMD
    write_header_only(folder / "model.safetensors", shapes)
    (folder / "config.json").write_text(json.dumps(config or DMD_CONFIG, indent=2))
    return folder


def test_derived_key_list_matches_the_public_facts(dmd_shapes):
    assert len(dmd_shapes) == DMD_TENSORS
    assert round(sum(math.prod(s) for s in dmd_shapes.values()) / 1e9, 2) == DMD_PARAMS_BILLIONS
    assert not any("norm_added_q" in k for k in dmd_shapes)  # Wan's 40 norm_added_q are the only absent keys
    assert sum(k.endswith("attn2.norm_added_k.weight") for k in dmd_shapes) == WAN_LAYERS


def test_dmd_file_loads_at_its_real_size(dmd_shapes, tmp_path, caplog):
    folder = write_release_variant(tmp_path, dmd_shapes)
    weights = folder / "model.safetensors"
    assert weights.stat().st_size == DMD_FILE_BYTES  # header and data length as the released file
    if weights.stat().st_blocks * 512 > 1 << 24:
        pytest.skip("this filesystem does not keep sparse files sparse")
    with caplog.at_level(logging.WARNING, logger="worldstereo_core.loading.transformer"):
        model = load_worldstereo_transformer(folder, dtype=torch.bfloat16, device="meta")
    report = model.load_report
    assert report.n_from_variant == report.n_keys == DMD_TENSORS and report.n_from_base == 0
    assert report.warnings == [] and not caplog.records
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dmd_shapes
    assert all(p.is_meta for p in model.parameters())


def test_dmd_file_with_the_harmless_differences_loads_with_named_warnings(dmd_shapes, tmp_path):
    """Extra tensors (an unused ref_index_embedding, Wan's norm_added_q), a model_type field naming
    another variant, no update_ref, a top-level transformer field the reference never reads."""
    extra = {"ref_index_embedding.weight": (21, 5120),
             **{f"blocks.{i}.attn2.norm_added_q.weight": (5120,) for i in range(WAN_LAYERS)}}
    cn = {k: v for k, v in CONTROLNET_CFG.items() if k != "update_ref"}
    config = {**DMD_CONFIG, "controlnet_cfg": cn, "model_type": "worldstereo-memory",
              "transformer": {"_class_name": "WorldStereoRefSModel"}}
    folder = write_release_variant(tmp_path, {**dmd_shapes, **extra}, config)
    model = load_worldstereo_transformer(folder, dtype=torch.bfloat16, device="meta")
    warnings = "\n".join(model.load_report.warnings)
    assert "ignoring tensors this model does not have: ref_index_embedding.weight (1)" in warnings
    assert "norm_added_q" not in warnings  # Wan's all-zero extras are dropped silently, as diffusers does
    assert "update_ref" in warnings and "'worldstereo-memory'" in warnings and "'transformer' field" in warnings
    assert load_worldstereo_config(folder).controlnet_cfg.update_ref is False
    assert set(model.state_dict()) == set(dmd_shapes)


def test_dmd_file_errors_stay_hard(dmd_shapes, tmp_path):
    """A missing tensor the forward uses, a wrong shape and integer weights are still refused, by name."""
    cases = {
        "missing": ({k: v for k, v in dmd_shapes.items() if k != "blocks.7.ffn.net.2.weight"},
                    r"missing tensors: blocks\.7\.ffn\.net\.2\.weight"),
        "shape": ({**dmd_shapes, "controlnet.proj_out.3.weight": (5120, 512)},
                  r"wrongly shaped tensors: controlnet\.proj_out\.3\.weight \[5120, 512\]"),
    }
    for name, (shapes, match) in cases.items():
        folder = write_release_variant(tmp_path / name, shapes)
        with pytest.raises(CheckpointError, match=match):
            load_worldstereo_transformer(folder, device="meta")
    folder = tmp_path / "int" / DMD
    write_header_only(folder / "model.safetensors", dmd_shapes, dtype="I16")
    (folder / "config.json").write_text(json.dumps(DMD_CONFIG))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights must be floating point.*\(I16\)"):
        load_worldstereo_transformer(folder, device="meta")
