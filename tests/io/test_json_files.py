"""The shared JSON reader (io/json_files.py) and the caption reader built on it."""
from __future__ import annotations

import pytest

from worldstereo_core.errors import InputError, MissingWeightsError
from worldstereo_core.io.json_files import read_json, read_json_object
from worldstereo_core.tasks.ordering import read_prompt


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": ,\n}')
    with pytest.raises(InputError, match=r"config\.json: invalid JSON at line 3"):
        read_json(path, "model config")


def test_missing_file_error_type_is_chosen_by_caller(tmp_path):
    with pytest.raises(InputError, match="camera file not found"):
        read_json(tmp_path / "nope.json", "camera file")
    with pytest.raises(MissingWeightsError, match="WorldStereo config not found"):
        read_json_object(tmp_path / "nope.json", "WorldStereo config", missing=MissingWeightsError)


def test_object_required(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert read_json(path) == [1, 2]
    with pytest.raises(InputError, match="must hold a JSON object, got list"):
        read_json_object(path, "index")


def test_read_prompt_field_checks(tmp_path):
    path = tmp_path / "prompt.json"
    path.write_text('{"prompt": "a bicycle", "long caption": 3}')
    assert read_prompt(path, "scene") == "a bicycle"
    with pytest.raises(InputError, match=r"string field 'long caption', got int"):
        read_prompt(path, "scene", "long caption")
    with pytest.raises(InputError, match=r"string field 'medium caption', got NoneType"):
        read_prompt(path, "scene", "medium caption")
    with pytest.raises(InputError, match="not found; every scene needs it"):
        read_prompt(tmp_path / "missing.json", "scene")
