"""Working sizes: assign_scale / adjust_image_size vs fixtures/geometry/utilities.json."""
from __future__ import annotations

import json
import random

import pytest

from conftest import fixtures_root
from worldstereo_core.constants import DEFAULT_SCALE_MAP
from worldstereo_core.errors import InputError
from worldstereo_core.sizes import adjust_image_size, assign_scale, check_image_size


def _cases(key: str) -> list:
    path = fixtures_root() / "geometry" / "utilities.json"
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"fixture {path} not found"))]
    return json.loads(path.read_text()).get(key, [])


@pytest.mark.parametrize("case", _cases("assign_scale_default_map"))
def test_assign_scale_fixture(case):
    assert list(assign_scale(case["h"], case["w"])) == case["expected_hw"]


@pytest.mark.parametrize("case", _cases("adjust_image_size"))
def test_adjust_image_size_fixture(case):
    assert list(adjust_image_size(case["h"], case["w"])) == case["expected"]


def test_assign_scale_picks_closest_ratio_first_on_ties():
    rng = random.Random(0)
    for _ in range(200):
        h, w = rng.randint(16, 4000), rng.randint(16, 4000)
        H, W = assign_scale(h, w)
        errs = [abs(bh / bw - h / w) for bh, bw in DEFAULT_SCALE_MAP]
        assert (H, W) == DEFAULT_SCALE_MAP[errs.index(min(errs))]
    # ratio 1.0 is 0.5 away from both 32:64 and 48:32 -> first bucket wins
    assert assign_scale(64, 64, [(32, 64), (48, 32)]) == (32, 64)
    assert assign_scale(64, 64, [(48, 32), (32, 64)]) == (48, 32)


def test_adjust_image_size_properties():
    rng = random.Random(1)
    for _ in range(300):
        h, w = rng.randint(1, 2000), rng.randint(1, 2000)
        H, W = adjust_image_size(h, w)
        assert H % 16 == 0 and W % 16 == 0 and H >= h and W >= w and H - h < 16
        assert ((H // 16) * (W // 16)) % 8 == 0
        # W is the smallest such width
        assert all(((H // 16) * (w2 // 16)) % 8 for w2 in range(-(-w // 16) * 16, W, 16))


@pytest.mark.parametrize("hw", [(8, 100), (100, 15), (20000, 64), (64, 16385), (0, 32), (32.5, 64)])
def test_absurd_sizes_rejected(hw):
    with pytest.raises(InputError, match="height|width"):
        check_image_size(*hw)
    with pytest.raises(InputError):
        assign_scale(*hw)


@pytest.mark.parametrize("bad", [[], [(480, 770)], [(0, 16)], [(480,)]])
def test_bad_scale_map_rejected(bad):
    with pytest.raises(InputError, match="scale_map"):
        assign_scale(480, 832, bad)
