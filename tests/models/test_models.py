"""WorldStereo transformers (diffusers host): loading the reference fixtures, input checks and the
restricted (pairs) attention; the forward behaviour both hosts share is tested in test_hosts.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import fixtures_root
from tiny_checkpoints import (CAMERA, MEMORY, random_state_dict, tiny_controlnet_cfg, tiny_inputs,
                              tiny_transformer_config)
from worldstereo_core.errors import InputError
from worldstereo_core.loading import load_state_dict_strict, load_worldstereo_transformer
from worldstereo_core.models import build_transformer
from worldstereo_core.models.attention import sdpa_attention
from worldstereo_core.models.ssm import BlockParts, PairGroups, joint_attention

ATOL = RTOL = 1e-4


def _forward_fixtures() -> list:
    root = fixtures_root() / "reference_tiny"
    found = []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
            cfg = json.loads((folder / "config.json").read_text())
            if cfg.get("fixture_kind") == "transformer_forward":
                found.append(pytest.param(folder, id=folder.name))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"no transformer_forward fixtures in {root}"))]


def _fixture_call(folder):
    inputs = load_file(str(folder / "inputs.safetensors"))
    extra = json.loads((folder / "inputs.json").read_text()).get("non_tensor_args", {})
    return {**inputs, **extra}


@pytest.mark.parametrize("folder", _forward_fixtures())
def test_fixture_forward_via_loader(folder):
    """The variant loader (complete file, no base) loads every key and reproduces the reference."""
    model = load_worldstereo_transformer(folder, dtype=torch.float32, device="cpu")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert set(model.state_dict()) == file_keys  # zero missing, zero unexpected
    assert model.load_report.n_keys == len(file_keys)
    with torch.no_grad():
        out = model(**_fixture_call(folder))[0]
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL), f"max |diff| {err:.3g}"


@pytest.mark.parametrize("folder", _forward_fixtures())
def test_fixture_forward_via_build_and_strict_load(folder):
    """build_transformer(meta) + load_state_dict_strict: the path pipelines use for fixture weights."""
    cfg = json.loads((folder / "config.json").read_text())
    model = build_transformer(cfg["transformer"], cfg["controlnet_cfg"], memory=cfg["model_type"] != CAMERA,
                              device="meta", dtype=torch.float32)
    load_state_dict_strict(model, load_file(str(folder / "model.safetensors")), source=str(folder))
    with torch.no_grad():
        out = model(**_fixture_call(folder))[0]
    ref = load_file(str(folder / "outputs.safetensors"))["sample"]
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL)


# ----- tiny random models ----------------------------------------------------------------------

def _tiny_model(model_type, seed=0, **cn_overrides):
    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(model_type, tcfg, **cn_overrides)
    model = build_transformer(tcfg, ccfg, memory=model_type != CAMERA, device="meta", dtype=torch.float32)
    load_state_dict_strict(model, random_state_dict(model_type, tcfg, ccfg, seed=seed), source="tiny")
    return model, tcfg, ccfg


@pytest.fixture(scope="module")
def camera_model():
    return _tiny_model(CAMERA)


@pytest.fixture(scope="module")
def memory_model():
    return _tiny_model(MEMORY)


def _run(model, **inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_output_shape_and_return_dict(camera_model):
    model, tcfg, ccfg = camera_model
    inputs = tiny_inputs(CAMERA, tcfg, ccfg)
    out = _run(model, **inputs)
    assert out.shape == inputs["render_latent"].shape
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, out)


def test_extrinsics_intrinsics_do_not_change_output_but_must_be_finite(camera_model):
    model, tcfg, ccfg = camera_model
    inputs = tiny_inputs(CAMERA, tcfg, ccfg)
    base = _run(model, **inputs)
    cams = dict(extrinsics=torch.eye(4).repeat(3, 1, 1) * 3, intrinsics=torch.eye(3).repeat(3, 1, 1))
    assert torch.equal(_run(model, **inputs, **cams), base)
    cams["extrinsics"][1, 0, 3] = float("nan")
    with pytest.raises(InputError, match="extrinsics"):
        _run(model, **inputs, **cams)


def test_camera_model_refuses_reference_inputs(camera_model, memory_model):
    model, tcfg, ccfg = camera_model
    memory_inputs = tiny_inputs(MEMORY, *memory_model[1:])
    with pytest.raises(InputError, match="reference_latent.*memory models"):
        _run(model, **tiny_inputs(CAMERA, tcfg, ccfg), reference_latent=memory_inputs["reference_latent"])


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(render_latent=i["render_latent"][:, :, :2]), "render_latent"),
    (lambda i: i.update(render_mask=i["render_mask"][..., :16, :]), "render_mask"),
    (lambda i: i.pop("camera_embedding"), "camera_embedding"),
    (lambda i: i.update(encoder_hidden_states=i["encoder_hidden_states"][:, :77]), "512"),
    (lambda i: i.update(hidden_states=i["hidden_states"][:, :, :, :3]), "divisible"),
    (lambda i: i.update(ref_index=torch.tensor([2, 0])), "ref_index"),
    (lambda i: i.update(ref_index=torch.tensor([0])), "ref_index"),
    (lambda i: i.pop("camera_qt_ref"), "camera_qt"),
    (lambda i: i.update(reference_latent=i["reference_latent"][:, :16]), "reference_latent"),
    (lambda i: i.update(reference_latent=i["reference_latent"][:, :, :0], ref_index=torch.tensor([], dtype=torch.long)),
     "no reference frame"),
])
def test_bad_inputs_fail_with_their_name(memory_model, change, match):
    model, tcfg, ccfg = memory_model
    inputs = tiny_inputs(MEMORY, tcfg, ccfg)
    change(inputs)
    with pytest.raises(InputError, match=match):
        _run(model, **inputs)


# ----- restricted ("pairs") attention ------------------------------------------------------------

def _groups_by_definition(ref_index, frames, tpf):
    """Independent statement of the pairs rule: group f = target frame f + references with index f-1."""
    n_refs = len(ref_index)
    groups = []
    for f in range(frames):
        members = {n_refs * tpf + f * tpf + t for t in range(tpf)}
        for m, k in enumerate(ref_index):
            if k + 1 == f:
                members |= {m * tpf + t for t in range(tpf)}
        groups.append(members)
    return groups


@pytest.mark.parametrize("ref_index", [(1, 0), (1, 1, 0), (2,), (0, 1, 2)])
def test_pair_groups_partition_tokens_by_pair(ref_index):
    frames, tpf = 4, 5
    groups = PairGroups.build(torch.tensor(ref_index), frames, tpf, "cpu")
    expected = _groups_by_definition(ref_index, frames, tpf)
    mask = groups.key_mask if groups.key_mask is not None else torch.ones_like(groups.index, dtype=torch.bool)
    got = [set(groups.index[g][mask[g]].tolist()) for g in range(frames)]
    assert got == expected
    total = len(ref_index) * tpf + frames * tpf
    assert torch.equal(groups.index.flatten()[groups.inverse], torch.arange(total))  # inverse puts tokens back


class _TinyAttn(torch.nn.Module):
    """Minimal self-attention layers, seen by the joint attention as a block's parts (no rope)."""

    def __init__(self, dim=24, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim)])

    def parts(self):
        unused = None
        return BlockParts(modulation=(), norm1=unused, norm_ffn=unused, q=self.to_q, k=self.to_k, v=self.to_v,
                          out=self.to_out[0], norm_q=self.norm_q, norm_k=self.norm_k, heads=self.heads,
                          cross_attention=unused, ffn=unused, apply_rotary=lambda x, rotary: x,
                          attention=sdpa_attention)


def _dense_masked_reference(attn, x, r, groups):
    """Explicit softmax attention with a dense mask built from the pairs rule (no rope)."""
    joint = torch.cat([r, x], dim=1)
    heads = attn.heads
    q = attn.norm_q(attn.to_q(joint)).unflatten(2, (heads, -1)).transpose(1, 2)
    k = attn.norm_k(attn.to_k(joint)).unflatten(2, (heads, -1)).transpose(1, 2)
    v = attn.to_v(joint).unflatten(2, (heads, -1)).transpose(1, 2)
    allowed = torch.zeros(joint.shape[1], joint.shape[1], dtype=torch.bool)
    for members in groups:
        idx = torch.tensor(sorted(members))
        allowed[idx[:, None], idx[None, :]] = True
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    out = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
    out = attn.to_out[0](out)
    return out[:, r.shape[1]:], out[:, : r.shape[1]]


def test_pairs_attention_matches_dense_masked_attention_and_isolates_pairs():
    torch.manual_seed(0)
    ref_index, frames, tpf, dim = (1, 1, 0), 4, 6, 24
    attn = _TinyAttn(dim)
    x = torch.randn(2, frames * tpf, dim)
    r = torch.randn(2, len(ref_index) * tpf, dim)
    groups = PairGroups.build(torch.tensor(ref_index), frames, tpf, "cpu")
    definition = _groups_by_definition(ref_index, frames, tpf)

    def call(x_, r_):
        with torch.no_grad():
            return joint_attention(attn.parts(), x_, r_, None, groups)

    out_x, out_r = call(x, r)
    with torch.no_grad():
        ref_x, ref_r = _dense_masked_reference(attn, x, r, definition)
    assert torch.allclose(out_x, ref_x, atol=1e-5) and torch.allclose(out_r, ref_r, atol=1e-5)

    # perturb reference 2 (attached to target frame 1): only target frame 1 and reference 2 change
    r2 = r.clone()
    r2[:, 2 * tpf: 3 * tpf] += 1.0
    new_x, new_r = call(x, r2)
    changed_x = (new_x - out_x).abs().amax(dim=(0, 2)).view(frames, tpf).amax(1) > 1e-6
    changed_r = (new_r - out_r).abs().amax(dim=(0, 2)).view(len(ref_index), tpf).amax(1) > 1e-6
    assert changed_x.tolist() == [False, True, False, False]
    assert changed_r.tolist() == [False, False, True]

    # perturb target frame 3 (no reference): only frame 3 changes, no reference sees it
    x3 = x.clone()
    x3[:, 3 * tpf:] += 1.0
    new_x, new_r = call(x3, r)
    changed_x = (new_x - out_x).abs().amax(dim=(0, 2)).view(frames, tpf).amax(1) > 1e-6
    assert changed_x.tolist() == [False, False, False, True]
    assert torch.equal(new_r, out_r)


def test_unknown_attention_scope_is_rejected(memory_model):
    with pytest.raises(InputError, match="attention_scope"):
        memory_model[0].set_attention_scope("sparse")


def test_attention_backend_hook_reaches_every_processor():
    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(MEMORY, tcfg)
    state = random_state_dict(MEMORY, tcfg, ccfg, seed=5)
    models = []
    for backend in (None, "native"):
        model = build_transformer(tcfg, ccfg, memory=True, device="meta", dtype=torch.float32,
                                  attention_backend=backend)
        models.append(load_state_dict_strict(model, dict(state), source="tiny"))
    processors = [m.processor for m in models[1].modules() if hasattr(m, "processor")]
    assert {type(p).__name__ for p in processors} == {"DiffusersAttention", "WanAttnProcessor"}
    assert all(str(p._attention_backend.value) == "native" for p in processors)
    inputs = tiny_inputs(MEMORY, tcfg, ccfg)
    assert torch.equal(_run(models[0], **inputs), _run(models[1], **inputs))
