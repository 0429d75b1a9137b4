"""MP4 read/write (PyAV, H.264)."""
from __future__ import annotations

import av
import numpy as np
import pytest

from worldstereo_core.constants import FPS
from worldstereo_core.errors import InputError
from worldstereo_core.io.video import (count_frames, read_mask_video, read_video, read_video_frames,
                                       write_video)


def _smooth_frames(t: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [np.stack([128 + 100 * np.sin(xx / 15 + 0.3 * k), 128 + 100 * np.cos(yy / 15),
                        np.full_like(xx, 40 + 10 * k)], -1) for k in range(t)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def _blob_masks(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((t, h, w), np.float32)
    for k in range(t):
        for _ in range(4):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
            masks[k][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1.0
    return masks


@pytest.mark.parametrize("h,w", [(48, 64), (33, 47)])
def test_round_trip_uint8(tmp_path, h, w):
    frames = _smooth_frames(6, h, w)
    path = write_video(tmp_path / "clip.mp4", frames)
    back = read_video(path)
    assert back.dtype == np.uint8 and back.shape == frames.shape  # odd sizes come back unpadded
    err = np.abs(back.astype(int) - frames)  # yuv420p chroma subsampling + H.264 at crf 18
    assert err.mean() < 3.0 and err.max() < 24
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == FPS
        assert stream.width % 2 == 0 and stream.height % 2 == 0
    assert count_frames(path) == 6
    assert not [p for p in tmp_path.iterdir() if p.name != "clip.mp4"]  # no temporary left behind


def test_float_frames_are_scaled_and_truncated(tmp_path):
    frames = _smooth_frames(3, 32, 32)
    as_float = frames.astype(np.float32) / 255.0 + 0.3 / 255.0  # truncation must drop the 0.3
    a = read_video(write_video(tmp_path / "a.mp4", frames))
    b = read_video(write_video(tmp_path / "b.mp4", as_float))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("h,w", [(40, 56), (37, 51)])
def test_mask_round_trip_exact_after_threshold(tmp_path, h, w):
    masks = _blob_masks(5, h, w)
    assert 0.05 < masks.mean() < 0.95
    path = write_video(tmp_path / "mask.mp4", masks)
    back = read_mask_video(path)
    assert back.dtype == np.float32 and back.shape == masks.shape
    assert np.array_equal(back, masks)


def test_read_selected_frames(tmp_path):
    frames = _smooth_frames(7, 24, 32)
    path = write_video(tmp_path / "clip.mp4", frames)
    full = read_video(path)
    assert np.array_equal(read_video_frames(path, [0, -1, 3]), full[[0, 6, 3]])
    with pytest.raises(InputError, match="no frame"):
        read_video_frames(path, [9])


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "nothing_here.mp4"
    with pytest.raises(InputError, match="nothing_here.mp4"):
        read_video(missing)
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    with pytest.raises(InputError, match="broken.mp4"):
        read_video(corrupt)
    truncated = tmp_path / "cut.mp4"
    data = write_video(tmp_path / "ok.mp4", _smooth_frames(4, 32, 32)).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.mp4"):
        read_video(truncated)


@pytest.mark.parametrize("frames,match", [
    (np.zeros((2, 8, 8, 4), np.uint8), "shape"),
    (np.zeros((0, 8, 8, 3), np.uint8), "non-empty"),
    (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 8, 8, 3), np.int64), "dtype"),
])
def test_bad_frames_rejected_without_writing(tmp_path, frames, match):
    with pytest.raises(InputError, match=match):
        write_video(tmp_path / "x.mp4", frames)
    assert not list(tmp_path.iterdir())
