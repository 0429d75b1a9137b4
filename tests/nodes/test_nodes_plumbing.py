"""Node-layer plumbing under the ComfyUI stub: progress, interrupts, memory, errors,
IMAGE/MASK conversions, model folders and saving."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfy_stub import comfy_stub  # noqa: F401  (pytest fixture)


def _nodes(stub) -> SimpleNamespace:
    """The pack's node-layer modules (imported under the pack's package name, like ComfyUI does)."""
    name = stub.pack.__name__
    return SimpleNamespace(**{m: importlib.import_module(f"{name}.nodes.{m}")
                              for m in ("_comfy", "images", "loaders", "saving")},
                           register_with_comfy=stub.pack.nodes.register_with_comfy)


def _core(stub, module: str):
    """A core module as the pack sees it (its exception classes are the ones the nodes raise)."""
    return importlib.import_module(f"{stub.pack.__name__}.worldstereo_core.{module}")


@pytest.fixture
def errors(comfy_stub):
    return _core(comfy_stub, "errors")


# --- progress and interruption -------------------------------------------------------------

def test_progress_drives_progress_bar(comfy_stub):
    progress = _nodes(comfy_stub)._comfy.comfy_progress(4, node_id="7")
    for i in range(1, 5):
        progress(i, 4)
    assert comfy_stub.utils.updates == [(1, 4, "7"), (2, 4, "7"), (3, 4, "7"), (4, 4, "7")]


def test_progress_raises_comfy_interrupt_and_clears_flag(comfy_stub):
    comfy = _nodes(comfy_stub)._comfy
    mm = comfy_stub.model_management
    progress = comfy.comfy_progress(10)
    cleaned = []

    def core_loop(progress):  # the shape of a core long loop: report per step, clean up in finally
        try:
            for step in range(10):
                progress(step + 1, 10)
                if step == 2:
                    comfy_stub.interrupt()
        finally:
            cleaned.append(True)

    with pytest.raises(mm.InterruptProcessingException):
        core_loop(progress)
    assert cleaned == [True]
    assert [u[0] for u in comfy_stub.utils.updates] == [1, 2, 3]
    assert not mm.processing_interrupted()


def test_progress_checks_interrupt_without_a_hook(comfy_stub):
    comfy_stub.utils.set_progress_bar_global_hook(None)
    progress = _nodes(comfy_stub)._comfy.comfy_progress(3)
    comfy_stub.interrupt()
    with pytest.raises(comfy_stub.model_management.InterruptProcessingException):
        progress(1, 3)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["InputError", "MissingWeightsError", "CheckpointError"])
def test_core_errors_become_named_node_errors(comfy_stub, errors, name):
    cls = getattr(errors, name)
    node_errors = _nodes(comfy_stub)._comfy.node_errors
    original = cls("camera_json: 'extrinsic' is missing; export it from ...")
    with pytest.raises(cls) as info:
        with node_errors("WorldStereo Trajectory"):
            raise original
    assert str(info.value) == f"WorldStereo Trajectory: {original}"
    assert info.value.__cause__ is original
    with pytest.raises(cls) as again:  # nested wrappers do not stack prefixes
        with node_errors("WorldStereo Trajectory"):
            with node_errors("WorldStereo Trajectory"):
                raise cls("bad")
    assert str(again.value) == "WorldStereo Trajectory: bad"


def test_interrupts_and_foreign_errors_pass_through(comfy_stub, errors):
    node_errors = _nodes(comfy_stub)._comfy.node_errors
    mm = comfy_stub.model_management
    comfy_interrupt = mm.InterruptProcessingException()
    for exc in (comfy_interrupt, RuntimeError("shape mismatch"), mm.OOM_EXCEPTION("out of memory")):
        with pytest.raises(type(exc)) as info:
            with node_errors("N"):
                raise exc
        assert info.value is exc

    with pytest.raises(mm.InterruptProcessingException):
        with node_errors("N"):
            raise errors.Interrupted("stopped by callback")


def test_interrupt_derived_from_base_exception_passes_through(comfy_stub, errors, monkeypatch):
    """Newer ComfyUI derives ``InterruptProcessingException`` from ``BaseException`` (v0.3.64: from
    ``Exception``): Cancel still reaches ComfyUI from the progress callback and from core interrupts."""
    mm = comfy_stub.model_management
    monkeypatch.setattr(mm, "InterruptProcessingException", type("InterruptProcessingException", (BaseException,), {}))
    comfy = _nodes(comfy_stub)._comfy
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        with comfy.node_errors("N"):
            comfy.comfy_progress(2)(1, 2)
    with pytest.raises(mm.InterruptProcessingException):
        with comfy.node_errors("N"):
            raise errors.Interrupted("stopped")


def test_node_errors_as_decorator(comfy_stub, errors):
    node_errors = _nodes(comfy_stub)._comfy.node_errors

    class Node:
        @node_errors("WorldStereo Demo")
        def run(self, value):
            if value < 0:
                raise errors.InputError("value: must be >= 0")
            return (value,)

    assert Node().run(2) == (2,)
    with pytest.raises(errors.InputError, match=r"^WorldStereo Demo: value: must be >= 0$"):
        Node().run(-1)


# --- memory --------------------------------------------------------------------------------

def test_free_memory(comfy_stub):
    comfy = _nodes(comfy_stub)._comfy
    calls = comfy_stub.model_management.calls
    comfy.free_memory(None)
    assert [c[0] for c in calls] == ["unload_all_models", "soft_empty_cache"]
    calls.clear()
    comfy.free_memory(123)
    assert calls[0] == ("free_memory", (123, torch.device("cpu")))


def test_devices_follow_model_management(comfy_stub):
    comfy = _nodes(comfy_stub)._comfy
    assert comfy.torch_device() == torch.device("cpu") and comfy.offload_device() == torch.device("cpu")


def test_model_cache_holds_loaded_models_weakly(comfy_stub):
    """A loader reuses a model while something still holds it, and keeps nothing alive itself."""
    import gc

    cache = _nodes(comfy_stub).loaders.ModelCache()
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Linear(1, 1)

    model = cache.get_or_load(("moge", "a"), load)
    assert cache.get_or_load(("moge", "a"), load) is model and len(loads) == 1
    assert cache.get_or_load(("moge", "b"), load) is not model and len(loads) == 2
    gc.collect()
    assert len(cache) == 1  # the "b" model was dropped at once
    del model
    gc.collect()
    assert len(cache) == 0


# --- IMAGE / MASK --------------------------------------------------------------------------

def test_image_frames_round_trip_without_mutation(comfy_stub):
    images = _nodes(comfy_stub).images
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 5, 7, 3, generator=gen)
    before = image.clone()
    frames = images.image_to_frames(image)
    assert frames.shape == (3, 3, 5, 7) and frames.dtype == torch.float32
    expected = image.numpy().transpose(0, 3, 1, 2) * 2.0 - 1.0
    np.testing.assert_allclose(frames.numpy(), expected, atol=1e-6)
    back = images.frames_to_image(frames)
    assert back.shape == image.shape and back.dtype == torch.float32 and back.device.type == "cpu"
    np.testing.assert_allclose(back.numpy(), image.numpy(), atol=1e-6)
    assert torch.equal(image, before)
    assert images.frames_to_image(torch.full((1, 3, 2, 2), 3.0)).max() == 1.0  # clamped


def test_image_channels_and_errors(comfy_stub, errors):
    images = _nodes(comfy_stub).images
    rgba = torch.rand(1, 4, 4, 4)
    np.testing.assert_allclose(images.image_to_frames(rgba)[0].numpy(), rgba[0, ..., :3].permute(2, 0, 1).numpy() * 2 - 1,
                               atol=1e-6)
    grey = torch.rand(2, 4, 4, 1)
    frames = images.image_to_frames(grey)
    assert frames.shape == (2, 3, 4, 4) and torch.equal(frames[:, 0], frames[:, 2])
    assert images.image_to_frames(torch.rand(4, 4, 3)).shape == (1, 3, 4, 4)
    for bad in (torch.rand(1, 4, 4, 2), torch.rand(4, 4), torch.rand(0, 4, 4, 3), np.zeros((1, 4, 4, 3))):
        with pytest.raises(errors.InputError, match="start_image"):
            images.image_to_frames(bad, name="start_image")


def test_image_to_uint8_rounds(comfy_stub):
    images = _nodes(comfy_stub).images
    image = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(1))
    out = images.image_to_uint8(image)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(out.numpy(), np.round(image.numpy().astype(np.float64) * 255).astype(np.uint8))


def test_mask_conversions(comfy_stub, errors):
    images = _nodes(comfy_stub).images
    mask = torch.rand(4, 6, 5)
    before = mask.clone()
    core = images.mask_from_comfy(mask)
    assert core.shape == (4, 1, 6, 5) and torch.equal(core[:, 0], mask)
    assert images.mask_from_comfy(torch.rand(6, 5)).shape == (1, 1, 6, 5)
    back = images.mask_to_comfy(core)
    assert back.shape == (4, 6, 5) and torch.equal(back, mask) and torch.equal(mask, before)
    hole = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    hole[1, 0, 1, 1] = True
    as_mask = images.mask_to_comfy(hole)
    assert as_mask.dtype == torch.float32 and as_mask.sum() == 1 and as_mask[1, 1, 1] == 1
    with pytest.raises(errors.InputError, match="hole_mask"):
        images.mask_from_comfy(torch.rand(1, 1, 3, 3), name="hole_mask")
    with pytest.raises(errors.InputError):
        images.mask_to_comfy(torch.rand(2, 3, 3, 3))


# --- model folders -------------------------------------------------------------------------

def _make_variant(root, name, files=("config.json", "model.safetensors")):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).write_bytes(b"{}")
    return folder


def test_model_folders_registered(comfy_stub):
    fp = comfy_stub.folder_paths
    loaders = _nodes(comfy_stub).loaders
    for name in loaders.OWN_FOLDERS:
        assert fp.get_folder_paths(name)[0] == str(fp.models_dir) + f"/{name}"
    _nodes(comfy_stub).register_with_comfy()  # idempotent
    assert len(fp.get_folder_paths("worldstereo")) == 1


def test_worldstereo_variants_found_in_every_root(comfy_stub, errors, tmp_path):
    MODEL_TYPES = _core(comfy_stub, "constants").MODEL_TYPES
    HF_REPO_ID = _core(comfy_stub, "constants").HF_REPO_ID
    fp = comfy_stub.folder_paths
    loaders = _nodes(comfy_stub).loaders
    root = tmp_path / "comfyui" / "models" / "worldstereo"
    extra = tmp_path / "shared_store" / "worldstereo"
    fp.add_model_folder_path("worldstereo", str(extra))
    first = _make_variant(root, MODEL_TYPES[0])
    second = _make_variant(extra, MODEL_TYPES[-1])
    _make_variant(root, MODEL_TYPES[1], files=("config.json",))  # incomplete: ignored
    _make_variant(root, "not-a-model-type")  # unknown name: ignored
    found = loaders.worldstereo_variants()
    assert found == {MODEL_TYPES[0]: first, MODEL_TYPES[-1]: second}
    assert loaders.resolve_worldstereo_variant(MODEL_TYPES[-1]) == second
    with pytest.raises(errors.MissingWeightsError) as info:
        loaders.resolve_worldstereo_variant(MODEL_TYPES[1])
    message = str(info.value)
    assert str(root / MODEL_TYPES[1]) in message and HF_REPO_ID in message and "model.safetensors" in message
    hub = _core(comfy_stub, "hub")
    assert f"({hub.FILE_SIZES[HF_REPO_ID, MODEL_TYPES[1] + '/model.safetensors']})" in message
    assert f"hf download {HF_REPO_ID}" in message
    with pytest.raises(errors.InputError, match="model_type"):
        loaders.resolve_worldstereo_variant("worldstereo-huge")
    assert "not-a-model-type" in loaders.model_dirs("worldstereo", loaders.VARIANT_FILES)


def test_model_files_and_resolution(comfy_stub, errors, tmp_path):
    loaders = _nodes(comfy_stub).loaders
    moge = tmp_path / "comfyui" / "models" / "moge"
    (moge / "sub").mkdir(parents=True)
    (moge / "moge-2-vitl-normal.pt").write_bytes(b"x")
    (moge / "sub" / "other.safetensors").write_bytes(b"x")
    (moge / "README.md").write_text("not weights")
    assert loaders.model_files("moge") == ["moge-2-vitl-normal.pt", "sub/other.safetensors"]
    assert loaders.resolve_model_file("moge", "sub/other.safetensors") == moge / "sub" / "other.safetensors"
    with pytest.raises(errors.MissingWeightsError, match="'moge' model folder") as info:
        loaders.resolve_model_file("moge", "missing.pt")
    assert "huggingface.co" not in str(info.value)  # no source invented for an unknown file


def test_missing_comfy_file_names_folder_repository_path_and_size(comfy_stub, errors, tmp_path):
    loaders = _nodes(comfy_stub).loaders
    hub = _core(comfy_stub, "hub")
    for folder, name in hub.COMFY_FILES:
        with pytest.raises(errors.MissingWeightsError) as info:
            loaders.resolve_model_file(folder, name)
        message = str(info.value)
        path = hub.COMFY_FILES[folder, name]
        assert repr(name) in message and str(tmp_path / "comfyui" / "models" / folder) in message
        assert f"{hub.COMFY_WAN_REPO}/resolve/main/{path}" in message
        assert f"({hub.FILE_SIZES[hub.COMFY_WAN_REPO, path]})" in message
    with pytest.raises(errors.InputError, match="no model folder"):
        loaders.folder_roots("not_a_folder")


# --- saving --------------------------------------------------------------------------------

def test_saving_refuses_paths_outside_folders(comfy_stub, errors):
    saving = _nodes(comfy_stub).saving
    with pytest.raises(errors.InputError, match="filename_prefix"):
        saving.next_paths("../../escape", "output", 1, "png")
    with pytest.raises(errors.InputError):
        saving.file_entry("/etc/hostname", "temp")
    with pytest.raises(errors.InputError):
        saving.base_dir("input")


def test_save_video_preview(comfy_stub):
    pytest.importorskip("worldstereo_core.io.video", reason="core video writer (io/video.py) not written yet")
    import av

    saving = _nodes(comfy_stub).saving
    image = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(4))
    ui = saving.video_ui(image, "clip", kind="temp", fps=16)
    assert ui["animated"] == (True,)
    entry = ui["images"][0]
    assert entry["filename"].endswith(".mp4") and entry["type"] == "temp"
    with av.open(str(saving.base_dir("temp") / entry["filename"])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].height, frames[0].width) == (32, 48)
