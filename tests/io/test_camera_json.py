"""camera.json read/write and validation (worldstereo_core.io.camera_json)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from worldstereo_core.cameras import CameraTrajectory, make_pose, rot_x, rot_y
from worldstereo_core.errors import InputError
from worldstereo_core.io.camera_json import (camera_json_dict, camera_trajectory_from_dict, load_bank_cameras,
                                             load_camera_json, save_bank_cameras, save_camera_json)


def _traj_dict(n: int = 5, **extra) -> dict:
    w2c = [make_pose(rot_y(0.1 * i) @ rot_x(-0.05 * i), [0.1 * i, -0.2, 0.3]).tolist() for i in range(n)]
    K = [[[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]] for _ in range(n)]
    return {"extrinsic": w2c, "intrinsic": K, **extra}


def _write(tmp_path, obj, name="camera.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.mark.parametrize("extra", [
    {"width": 640, "height": 480},                                            # reconstruction
    {"motion_list": ["pan_left-3.0", "left-phi10-theta0"]},                  # single view
    {"id": 3, "type": "surround", "width": 640, "height": 480, "eloop_rotation": 0.5},  # panorama
])
def test_round_trip_all_schemas(tmp_path, extra):
    d = _traj_dict(**extra)
    traj = load_camera_json(_write(tmp_path, d), default_size=(480, 640))  # single-view files state no size
    assert len(traj) == 5 and traj.w2c.dtype == torch.float64
    assert (traj.width, traj.height) == (640, 480)
    assert traj.meta == {k: v for k, v in extra.items() if k not in ("width", "height")}
    out = save_camera_json(traj, tmp_path / "out" / "camera.json")
    back = json.loads(out.read_text())
    assert json.dumps(back, sort_keys=True) == json.dumps({**d, "width": 640, "height": 480}, sort_keys=True)
    assert camera_json_dict(load_camera_json(out)) == camera_json_dict(traj)


def test_folder_path_and_size_arguments(tmp_path):
    _write(tmp_path, _traj_dict())
    traj = load_camera_json(tmp_path, width=640, height=480)  # single-view files state no size
    assert (traj.width, traj.height) == (640, 480)
    _write(tmp_path, _traj_dict(width=640, height=480))
    with pytest.raises(InputError, match="states width 640 but 800"):
        load_camera_json(tmp_path, width=800)
    # a stated size wins over default_size; no size at all is an error naming the fix
    assert load_camera_json(tmp_path, default_size=(10, 20)).width == 640
    _write(tmp_path, _traj_dict())
    with pytest.raises(InputError, match="state no image size.*give the size"):
        load_camera_json(tmp_path)


@pytest.mark.parametrize("field", ["width", "height"])
def test_size_range_errors_name_the_field(tmp_path, field):
    """Issue 10 item 8: a camera.json width out of range was called "height" in the error."""
    _write(tmp_path, _traj_dict(**{"width": 640, "height": 480, field: 20000}))
    with pytest.raises(InputError) as err:
        load_camera_json(tmp_path)
    other = "height" if field == "width" else "width"
    assert f"field '{field}' 20000 px is outside" in str(err.value) and other not in str(err.value)
    _write(tmp_path, _traj_dict())
    with pytest.raises(InputError, match=f"{field} argument 5 px is outside"):
        load_camera_json(tmp_path, **{"width": 640, "height": 480, field: 5})


def test_invalid_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, '{\n  "extrinsic": [],\n  "intrinsic": [,]\n}')
    with pytest.raises(InputError, match=r"camera\.json: invalid JSON at line 3"):
        load_camera_json(path)
    with pytest.raises(InputError, match="not found"):
        load_camera_json(tmp_path / "nope.json")


def _mutate(fn):
    d = _traj_dict()
    fn(d)
    return d


BAD_CASES = [
    ("missing extrinsic", lambda d: d.pop("extrinsic"), "missing field 'extrinsic'"),
    ("missing intrinsic", lambda d: d.pop("intrinsic"), "missing field 'intrinsic'"),
    ("empty", lambda d: d.update(extrinsic=[], intrinsic=[]), "'extrinsic' is empty"),
    ("count mismatch", lambda d: d["intrinsic"].pop(), "5 frames but 'intrinsic' has 4"),
    ("w2c shape", lambda d: d.update(extrinsic=[m[:3] for m in d["extrinsic"]]), r"'extrinsic' has shape \(5, 3, 4\)"),
    ("ragged", lambda d: d["extrinsic"][2].pop(), "'extrinsic' must be a list of 4x4"),
    ("text", lambda d: d["extrinsic"][1][0].__setitem__(0, "a"), "'extrinsic' must be a list of 4x4"),
    ("nan", lambda d: d["extrinsic"][3][0].__setitem__(3, math.nan), "frame 3 contains NaN"),
    ("inf K", lambda d: d["intrinsic"][1][0].__setitem__(2, math.inf), "'intrinsic' frame 1 contains NaN"),
    ("non-rigid scale", lambda d: d["extrinsic"][2][0].__setitem__(0, 1.5), "frame 2 is not a rigid"),
    ("reflection", lambda d: d["extrinsic"][0].__setitem__(0, [-1.0, 0.0, 0.0, 0.0]), "frame 0 is not a rigid"),
    ("bottom row", lambda d: d["extrinsic"][4][3].__setitem__(0, 0.5), "frame 4 is not a rigid"),
    ("zero focal", lambda d: d["intrinsic"][0][1].__setitem__(1, 0.0), "non-positive focal"),
    ("negative focal", lambda d: d["intrinsic"][2][0].__setitem__(0, -5.0), "frame 2 has non-positive focal"),
    ("skew", lambda d: d["intrinsic"][1][0].__setitem__(1, 3.0), "skew"),
    ("K bottom row", lambda d: d["intrinsic"][0][2].__setitem__(2, 2.0), r"not of the form"),
    ("width zero", lambda d: d.update(width=0, height=480), "'width'"),
    ("height huge", lambda d: d.update(width=640, height=100000), "'height'"),
    ("width fractional", lambda d: d.update(width=640.5, height=480), "whole number"),
    ("width bool", lambda d: d.update(width=True, height=480), "whole number"),
]


@pytest.mark.parametrize("name, fn, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_camera_json_rejected(tmp_path, name, fn, match):
    path = _write(tmp_path, _mutate(fn), "bad_camera.json")
    with pytest.raises(InputError, match=match) as info:
        load_camera_json(path)
    assert "bad_camera.json" in str(info.value)


def test_not_an_object_and_bank_hint(tmp_path):
    with pytest.raises(InputError, match="expected a JSON object"):
        load_camera_json(_write(tmp_path, [1, 2]))
    bank = {"0000": {"intrinsic": _traj_dict()["intrinsic"][0], "extrinsic": _traj_dict()["extrinsic"][0]}}
    with pytest.raises(InputError, match="load_bank_cameras"):
        load_camera_json(_write(tmp_path, bank))


def test_save_rejects_bad_trajectory(tmp_path):
    traj = camera_trajectory_from_dict(_traj_dict(), default_size=(480, 640))
    bad = CameraTrajectory(w2c=traj.w2c * 2, K=traj.K, width=640, height=480)
    with pytest.raises(InputError, match="not a rigid"):
        save_camera_json(bad, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(InputError, match="JSON cannot store"):
        save_camera_json(CameraTrajectory(w2c=traj.w2c, K=traj.K, width=640, height=480, meta={"f": object()}), tmp_path / "y.json")
    with pytest.raises(InputError, match="core field"):
        camera_json_dict(CameraTrajectory(w2c=traj.w2c, K=traj.K, width=640, height=480, meta={"extrinsic": 1}))


def test_bank_round_trip_and_errors(tmp_path):
    d = _traj_dict(3)
    bank = {k: {"intrinsic": d["intrinsic"][i], "extrinsic": d["extrinsic"][i]}
            for i, k in enumerate(["0002", "0000", "0001"])}
    path = _write(tmp_path, bank, "cameras.json")
    keys, traj = load_bank_cameras(tmp_path, width=640, height=480)
    assert keys == ["0000", "0001", "0002"]
    torch.testing.assert_close(traj.w2c[0], torch.tensor(bank["0000"]["extrinsic"], dtype=torch.float64))
    out = save_bank_cameras(keys, traj, tmp_path / "b" / "cameras.json")
    assert json.loads(out.read_text()) == {k: bank[k] for k in keys}
    assert load_bank_cameras(out, width=640, height=480)[1].width == 640
    with pytest.raises(InputError, match="one key per camera"):
        save_bank_cameras(keys[:2], traj, tmp_path / "c.json")
    broken = copy.deepcopy(bank)
    del broken["0001"]["intrinsic"]
    with pytest.raises(InputError, match=r"'0001'.*missing field 'intrinsic'"):
        load_bank_cameras(_write(tmp_path, broken, "cameras.json"), width=640, height=480)
    broken = copy.deepcopy(bank)
    broken["0002"]["extrinsic"][0][0] = 3.0
    with pytest.raises(InputError, match="not a rigid"):
        load_bank_cameras(_write(tmp_path, broken, "cameras.json"), width=640, height=480)
