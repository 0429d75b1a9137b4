"""MP4 (H.264) video read/write through PyAV.

* :func:`write_video` encodes RGB frames with libx264 (``yuv420p``) at 16 fps by default, writing
  atomically. Float frames in [0, 1] are clipped and converted like diffusers' ``export_to_video``
  (the reference's writer): ``uint8(frame * 255)``, truncating. yuv420p needs even sizes, so an odd
  width/height is padded by repeating the last column/row; the original size is stored in the
  container's ``comment`` tag and :func:`read_video` crops the padding away again.
* :func:`read_video` decodes every frame to uint8 RGB ``(T, H, W, 3)`` numpy arrays.
* :func:`read_mask_video` reads a hole-mask video the way the reference does: channel 0, scaled to
  [0, 1], thresholded at 0.5 -> float32 ``(T, H, W)`` in {0, 1}.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch

from ..constants import FPS
from ..errors import InputError
from .atomic import atomic_path

#: libx264 constant rate factor used by default (lower = better; the reference's imageio writer
#: corresponds to about 25). 18 keeps renders visually lossless and masks exact after threshold.
DEFAULT_CRF = 18
_SIZE_TAG = "worldstereo:size="


def _as_uint8_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:  # greyscale (T, H, W)
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"video frames must have shape (T, H, W, 3) (or (T, H, W) greyscale), "
                         f"got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InputError(f"video frames must be non-empty, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError("video frames contain NaN/inf; clean them before writing")
        return (np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    raise InputError(f"video frames must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def write_video(path: str | os.PathLike, frames, fps: float = FPS, *, crf: int = DEFAULT_CRF,
                pix_fmt: str = "yuv420p") -> Path:
    """Write RGB ``frames`` (T, H, W, 3) uint8 or float in [0, 1] as an H.264 MP4 at ``path``."""
    arr = _as_uint8_frames(frames)
    if not (isinstance(fps, (int, float, Fraction)) and 0 < fps <= 1000):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise InputError(f"crf must be an int in 0..51, got {crf!r}")
    _, height, width, _ = arr.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            if pad_h or pad_w:
                container.metadata["comment"] = f"{_SIZE_TAG}{width}x{height}"
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = pix_fmt
            # mbtree off: with it, this libx264 build's output varies from run to run (it depends
            # on heap contents), which would break reproducible / resumable runs
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            for frame in arr:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise InputError(f"cannot open video {path}: {exc}; is it a valid MP4/H.264 file?") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{path} has no video stream")
    return path, container


def _stored_size(container) -> tuple[int, int] | None:
    match = re.search(rf"{_SIZE_TAG}(\d+)x(\d+)", container.metadata.get("comment", ""))
    return (int(match.group(2)), int(match.group(1))) if match else None


def _decode(path: str | os.PathLike, wanted: set[int] | None) -> dict[int, np.ndarray]:
    path, container = _open(path)
    out: dict[int, np.ndarray] = {}
    try:
        size = _stored_size(container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                img = frame.to_ndarray(format="rgb24")
                out[i] = img[: size[0], : size[1]] if size else img
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode video {path}: {exc}; the file may be corrupt or "
                         "truncated, re-create it") from exc
    finally:
        container.close()
    if not out and wanted is None:
        raise InputError(f"video {path} contains no decodable frames; re-create it")
    return out


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video (counted from its packets, without decoding)."""
    path, container = _open(path)
    try:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    except av.FFmpegError as exc:
        raise InputError(f"cannot read video {path}: {exc}; the file may be corrupt") from exc
    finally:
        container.close()


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames as uint8 RGB (T, H, W, 3)."""
    frames = _decode(path, None)
    return np.stack([frames[i] for i in sorted(frames)])


def read_video_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """Selected frames (negative indices count from the end) as uint8 RGB (len(indices), H, W, 3)."""
    indices = [int(i) for i in indices]
    if not indices:
        raise InputError("read_video_frames needs at least one frame index")
    total = count_frames(path) if any(i < 0 for i in indices) else None
    resolved = [i + total if i < 0 else i for i in indices] if total is not None else indices
    frames = _decode(path, set(resolved))
    missing = [i for i, r in zip(indices, resolved) if r not in frames]
    if missing:
        raise InputError(f"video {path} has no frame(s) {missing} "
                         f"(it has {total if total is not None else count_frames(path)} frames)")
    return np.stack([frames[r] for r in resolved])


def read_mask_video(path: str | os.PathLike) -> np.ndarray:
    """Hole mask (T, H, W) float32 in {0, 1}: channel 0 / 255 > 0.5 (white = 1 = hole)."""
    return (read_video(path)[..., 0].astype(np.float32) / 255.0 > 0.5).astype(np.float32)
