"""Hub downloads into a models folder, with huggingface_hub replaced by a local fake (no network)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from worldstereo_core import hub
from worldstereo_core.errors import InputError, MissingWeightsError

FAKE_REPOS = {
    "hanshanxue/WorldStereo": ["worldstereo-camera/config.json", "worldstereo-camera/model.safetensors",
                               "worldstereo-memory/config.json", "worldstereo-memory/model.safetensors", "README.md"],
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": [
        "model_index.json", "README.md", "examples/i2v_input.JPG",
        "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
        "image_encoder/config.json", "image_encoder/model.safetensors",
        "image_processor/preprocessor_config.json", "scheduler/scheduler_config.json"],
    "facebook/dinov2-base": ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"],
    "Ruicheng/moge-2-vitl-normal": ["model.pt", "README.md"],
}


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the two huggingface_hub calls hub.py makes; record every download."""
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, *, local_dir, **kwargs):
        assert filename in FAKE_REPOS[repo_id], f"{repo_id} has no {filename}"
        calls.append((repo_id, filename, local_dir))
        target = local_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"{repo_id}:{filename}".encode())
        return str(target)

    def list_repo_files(repo_id, revision=None):
        return list(FAKE_REPOS[repo_id])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return calls


def test_worldstereo_variant_lands_in_models_folder(tmp_path, fake_hub, caplog):
    ticks = []
    with caplog.at_level(logging.INFO, logger="worldstereo_core.hub"):
        folder = hub.ensure_worldstereo(tmp_path, "worldstereo-memory", download=True,
                                        progress=lambda d, t: ticks.append((d, t)))
    assert folder == tmp_path / "worldstereo" / "worldstereo-memory"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "config.json").read_bytes() == b"hanshanxue/WorldStereo:worldstereo-memory/config.json"
    assert [c[1] for c in fake_hub] == ["worldstereo-memory/config.json", "worldstereo-memory/model.safetensors"]
    assert all(c[2] == tmp_path / "worldstereo" for c in fake_hub)
    assert ticks == [(1, 2), (2, 2)]
    assert str(folder / "model.safetensors") in caplog.text and "MB" in caplog.text
    # present files are used as they are: no second download
    assert hub.ensure_worldstereo(tmp_path, "worldstereo-memory", download=True) == folder
    assert len(fake_hub) == 2


def test_wan_base_downloads_only_selected_subfolders(tmp_path, fake_hub):
    folder = hub.ensure_wan_base(tmp_path, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", download=True,
                                 parts=("vae", "scheduler", "transformer"))
    assert folder == tmp_path / "diffusers" / "Wan2.1-I2V-14B-480P-Diffusers"
    fetched = sorted(c[1] for c in fake_hub)
    assert fetched == sorted(f for f in FAKE_REPOS["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"]
                             if f.startswith(("vae/", "scheduler/", "transformer/")) or f == "model_index.json")
    assert not (folder / "examples").exists() and not (folder / "text_encoder").exists()
    n = len(fake_hub)
    # a second call finds the parts present; a missing part names the command that fetches it
    hub.ensure_wan_base(tmp_path, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", parts=("vae", "scheduler"))
    assert len(fake_hub) == n
    with pytest.raises(MissingWeightsError) as err:
        hub.ensure_wan_base(tmp_path, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", parts=("vae", "text_encoder"))
    msg = str(err.value)
    assert "text_encoder/" in msg and str(folder) in msg and "--include 'text_encoder/*'" in msg
    # a local folder is used directly; a base_model path from another machine maps to its name
    assert hub.ensure_wan_base(tmp_path, str(folder), parts=("vae",)) == folder
    assert hub.base_dir(tmp_path, "/mnt/train/Wan2.1-I2V-14B-480P-Diffusers/") == folder


def test_dinov2_and_moge_go_through_the_same_routine(tmp_path, fake_hub):
    from worldstereo_core.geometry.moge import ensure_moge_checkpoint

    folder = hub.ensure_dinov2(tmp_path, download=True)
    assert folder == tmp_path / "dinov2" / "dinov2-base"
    assert sorted(p.name for p in folder.iterdir()) == sorted(hub.DINOV2_FILES)  # no pytorch_model.bin
    path = ensure_moge_checkpoint(tmp_path / "moge", download=True)
    assert path == (tmp_path / "moge" / "moge-2-vitl-normal" / "model.pt").resolve()
    assert fake_hub[-1][:2] == ("Ruicheng/moge-2-vitl-normal", "model.pt")


def test_missing_without_download_names_file_folder_and_command(tmp_path, fake_hub):
    with pytest.raises(MissingWeightsError) as err:
        hub.ensure_worldstereo(tmp_path, "worldstereo-camera")
    msg = str(err.value)
    assert "worldstereo-camera/config.json" in msg and str(tmp_path / "worldstereo") in msg
    assert "automatic download is off" in msg
    assert f"hf download hanshanxue/WorldStereo --include 'worldstereo-camera/*' --local-dir {tmp_path / 'worldstereo'}" in msg
    assert "--download / download=True" in msg
    assert f"({hub.FILE_SIZES[hub.HF_REPO_ID, 'worldstereo-camera/model.safetensors']})" in msg
    assert fake_hub == []
    with pytest.raises(MissingWeightsError) as err:  # a file whose size is not known states none
        hub.ensure_wan_base(tmp_path, parts=("vae",))
    assert "GB)" not in str(err.value) and "MB)" not in str(err.value)


def test_comfy_single_files_name_repository_path_and_size():
    assert hub.COMFY_FILES and all(path == f"split_files/{folder}/{name}"
                                   for (folder, name), path in hub.COMFY_FILES.items())
    for (folder, name), path in hub.COMFY_FILES.items():
        source = hub.comfy_file_source(folder, name)
        size = hub.FILE_SIZES[hub.COMFY_WAN_REPO, path]  # every file a user fetches has a size
        assert f"https://huggingface.co/{hub.COMFY_WAN_REPO}/resolve/main/{path}" in source and f"({size})" in source
    assert hub.comfy_file_source("vae", "some_other_vae.safetensors") is None
    assert hub.comfy_file_source("text_encoders", "wan_2.1_vae.safetensors") is None


def test_readme_model_table_states_every_source_and_size():
    """README's model table and FILE_SIZES are the same facts: every file, repository and size."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `models/"))
    assert table, "README has no model-folder table"
    for (repo, path), size in hub.FILE_SIZES.items():
        assert repo in table, f"README's model table does not name {repo}"
        assert Path(path).name in table, f"README's model table does not name {path}"
        assert size.lstrip("~") in table, f"README's model table does not state {size} for {path}"
    for folder, _name in hub.COMFY_FILES:
        assert f"`split_files/{folder}/`" in table and f"`models/{folder}/`" in table


def test_offline_never_calls_the_hub(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline()
    for call in (lambda: hub.ensure_worldstereo(tmp_path, "worldstereo-camera", download=True),
                 lambda: hub.ensure_wan_base(tmp_path, download=True),
                 lambda: hub.ensure_dinov2(tmp_path, download=True)):
        with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
            call()
    assert fake_hub == []


def test_failed_download_is_a_missing_weights_error(tmp_path, monkeypatch):
    import huggingface_hub

    def broken(repo_id, filename, *, local_dir, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(MissingWeightsError, match="download failed: ConnectionError: no route to host") as err:
        hub.fetch_files("facebook/dinov2-base", ["config.json"], tmp_path, download=True)
    assert isinstance(err.value.__cause__, ConnectionError)


def test_names_and_paths_are_checked(tmp_path):
    for bad in ("no-slash", "a/b/c", "../x", "a/..", ""):
        with pytest.raises(InputError):
            hub.check_repo_id(bad)
    with pytest.raises(InputError, match="escape"):
        hub.fetch_files("facebook/dinov2-base", ["../../outside.json"], tmp_path)
    with pytest.raises(InputError, match="model type"):
        hub.worldstereo_dir(tmp_path, "worldstereo-huge")
    with pytest.raises(InputError, match="unknown Wan base part"):
        hub.ensure_wan_base(tmp_path, parts=("unet",))
    assert hub.download_command("a/b", "/x y", ["f.json"]) == "hf download a/b f.json --local-dir '/x y'"


def test_models_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLDSTEREO_MODELS", raising=False)
    assert str(hub.resolve_models_root()) == "models"
    monkeypatch.setenv("WORLDSTEREO_MODELS", str(tmp_path))
    assert hub.resolve_models_root() == tmp_path
    assert hub.resolve_models_root(tmp_path / "x") == tmp_path / "x"
