"""CameraSelector: keep a diverse, sharp subset of retrieved references (as the reference's
CameraSelector, which retrieval runs when it finds more than ``max_reference`` entries).

Features per candidate: the camera block ``[centre, quaternion (x, y, z, w), w >= 0]`` of its w2c
and an image block (DINOv2 ``pooler_output`` or any injected feature function). Each block is
z-scored per dimension over the candidates (std + 1e-8) and weighted (0.3 camera, 0.7 image).
The subset is chosen by quality-aware farthest point sampling, where quality mixes sharpness
(log Laplacian variance), grey-level entropy and contrast.

Which candidate wins a near-tie, and the order of the picks (retrieval then prefers the earlier
of equally scored references), depends on rounding, so the precision of the reference is kept:
camera centres in float32 (the w2c as the reference holds them), quaternions by scipy from those
float32 matrices, the grey histogram in float32, DINOv2 features z-scored in float32. The
fixtures' features and quality scores are reproduced bit for bit.

DINOv2 is optional: give ``dinov2_path`` (a local folder with config, preprocessor config and
safetensors weights, e.g. a download of ``facebook/dinov2-base``) or a ``feature_fn``. Without
either the selector logs a warning (once per process), uses the camera block alone and says so in
:attr:`Selection.used_image_features` / :attr:`Selection.message`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from scipy.spatial.transform import Rotation

from ..cameras import as_tensor
from ..errors import CheckpointError, InputError
from ..image_processors import pixel_values
from ..io.fingerprint import file_stamps
from ..io.images import load_image

log = logging.getLogger(__name__)
_warned: set[str] = set()  # fallback messages already logged in this process

#: A function mapping N RGB uint8 frames to an (N, D) float feature array (z-scored in its own dtype).
FeatureFn = Callable[[Sequence[np.ndarray]], np.ndarray]

CAMERA_WEIGHT = 0.3
IMAGE_WEIGHT = 0.7
QUALITY_BIAS = 0.1


def camera_features(w2c) -> np.ndarray:
    """(N, 7) float64 = [camera centre -R^T t (3, computed in float32), quaternion of the w2c rotation
    as (x, y, z, w) with w >= 0 (4)]; the w2c are rounded to float32 first, as the reference keeps them."""
    w2c = as_tensor(w2c, dtype=torch.float32).reshape(-1, 4, 4).numpy()
    rot, t = w2c[:, :3, :3], w2c[:, :3, 3]
    centres = np.stack([-r.T @ v for r, v in zip(rot, t)])
    quat = Rotation.from_matrix(rot).as_quat()
    quat[quat[:, 3] < 0] *= -1
    return np.concatenate([centres, quat], axis=1)


def image_quality_scores(frames: Sequence[np.ndarray]) -> np.ndarray:
    """0.4 ln(1 + Var(Laplacian)) + 0.3 entropy + 0.3 (std / 128) per frame.

    The grey image is OpenCV's BGR->grey formula applied to the RGB array, as in the reference; the
    entropy is ``-sum(h log2 h)`` over the float32 256-bin histogram ``h = counts / total + 1e-10``.
    """
    scores = []
    for frame in frames:
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2GRAY)
        sharp = cv2.Laplacian(gray, cv2.CV_64F).var()
        hist = np.bincount(gray.ravel(), minlength=256).astype(np.float32)
        hist = hist / hist.sum() + 1e-10
        entropy = -np.sum(hist * np.log2(hist))
        scores.append(0.4 * np.log1p(sharp) + 0.3 * entropy + 0.3 * (gray.std() / 128.0))
    return np.asarray(scores, dtype=np.float64)


def standardize(x: np.ndarray) -> np.ndarray:
    """Z-score each column over the rows (population std + 1e-8), in the array's own float dtype."""
    x = np.asarray(x)
    x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


def quality_aware_fps(features: np.ndarray, quality: np.ndarray, k: int, bias: float = QUALITY_BIAS) -> list[int]:
    """Farthest point sampling with a quality bias; returns ``min(k, N)`` indices in pick order.

    q̂ = min-max-normalised quality; start = argmax(-|f - mean f| + bias q̂); then repeatedly the
    argmax of (distance to the selected set) x (1 + bias (q̂ - 0.5)) over unselected points.
    """
    f = np.asarray(features, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if f.ndim != 2 or q.shape != (f.shape[0],):
        raise InputError(f"quality_aware_fps: features (N, D) and quality (N,) expected, got {f.shape} and {q.shape}")
    n = f.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    qn = (q - q.min()) / (q.max() - q.min() + 1e-8)
    factor = 1.0 + bias * (qn - 0.5)
    first = int(np.argmax(-np.linalg.norm(f - f.mean(axis=0), axis=1) + bias * qn))
    chosen = [first]
    dist = np.linalg.norm(f - f[first], axis=1)
    while len(chosen) < k:
        score = dist * factor
        score[chosen] = -np.inf
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(f - f[nxt], axis=1))
    return chosen


class DinoV2Features:
    """DINOv2 ``pooler_output`` features (float32) from a local transformers folder (safetensors
    weights). ``batch_size`` 1 (default) embeds each frame alone, as the reference does."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 1) -> None:
        from transformers import AutoImageProcessor, AutoModel

        path = Path(path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"DINOv2 folder {path} could not be loaded ({exc}); it needs config.json, "
                "preprocessor_config.json and model.safetensors (e.g. a download of facebook/dinov2-base)"
            ) from exc
        self.model.eval().to(device)
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.path = path

    def resume_key(self) -> dict:
        """The weight files by name, size and mtime (they decide which references are picked)."""
        return {"dinov2": file_stamps(self.path)}

    @torch.no_grad()
    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(frames), self.batch_size):
            pixels = pixel_values(self.processor, frames[start:start + self.batch_size])
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            out.append(self.model(pixel_values=pixels).pooler_output.float().cpu())
        return torch.cat(out).numpy()


def _has_dinov2(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass
class Selection:
    """Result of :meth:`CameraSelector.select`."""

    indices: list[int]            # positions in the candidate list, in pick order
    quality: np.ndarray           # quality score per candidate
    used_image_features: bool     # False when no image features were available
    message: str | None = None    # why image features were not used


class CameraSelector:
    """Pick ``k`` diverse, good-quality candidates from (w2c, frame) pairs; see the module docstring."""

    def __init__(self, feature_fn: FeatureFn | None = None, *, dinov2_path: str | os.PathLike | None = None,
                 camera_weight: float = CAMERA_WEIGHT, image_weight: float = IMAGE_WEIGHT,
                 quality_bias: float = QUALITY_BIAS, device: str | torch.device = "cpu") -> None:
        self.camera_weight, self.image_weight, self.quality_bias = camera_weight, image_weight, quality_bias
        self._feature_fn = feature_fn
        self._dinov2_path = None if dinov2_path is None else Path(dinov2_path)
        self._device = device
        self._fallback_message: str | None = None

    def resume_key(self) -> dict | None:
        """What decides the picks besides the candidates: the weights and the image-feature source
        (None for the default selector, which is what a run without a selector uses)."""
        features = None
        if self._feature_fn is not None:
            key = getattr(self._feature_fn, "resume_key", None)
            features = key() if callable(key) else "custom"
        elif self._dinov2_path is not None and _has_dinov2(self._dinov2_path):
            features = {"dinov2": file_stamps(self._dinov2_path)}
        weights = (self.camera_weight, self.image_weight, self.quality_bias)
        if features is None and weights == (CAMERA_WEIGHT, IMAGE_WEIGHT, QUALITY_BIAS):
            return None
        return {"features": features, "weights": list(weights)}

    def _features(self) -> FeatureFn | None:
        if self._feature_fn is not None or self._fallback_message is not None:
            return self._feature_fn
        path = self._dinov2_path
        if path is not None and _has_dinov2(path):
            self._feature_fn = DinoV2Features(path, self._device)
            return self._feature_fn
        where = "no dinov2_path was given" if path is None else f"{path} holds no DINOv2 weights"
        self._fallback_message = (
            f"CameraSelector: {where}; selecting references from camera features only. Put a "
            "download of facebook/dinov2-base (config.json, preprocessor_config.json, "
            "model.safetensors) in a folder and pass it as dinov2_path for image-aware selection."
        )
        return None

    def select(self, w2c, frames: Sequence, k: int) -> Selection:
        """Choose ``k`` of the N candidates (w2c (N,4,4), N RGB frames); indices in pick order."""
        w2c = as_tensor(w2c, dtype=torch.float64).reshape(-1, 4, 4)
        if len(frames) != w2c.shape[0]:
            raise InputError(f"CameraSelector: {w2c.shape[0]} cameras but {len(frames)} frames; pass one frame per camera")
        frames = [load_image(f, name=f"selector frame {i}") for i, f in enumerate(frames)]
        quality = image_quality_scores(frames)
        blocks = [self.camera_weight * standardize(camera_features(w2c))]
        fn = self._features()
        if fn is not None:
            feats = np.asarray(fn(frames)).reshape(len(frames), -1)
            blocks.append(self.image_weight * standardize(feats))
        elif self._fallback_message not in _warned:
            log.warning(self._fallback_message)
            _warned.add(self._fallback_message)
        indices = quality_aware_fps(np.concatenate(blocks, axis=1), quality, k, self.quality_bias)
        return Selection(indices, quality, fn is not None, None if fn is not None else self._fallback_message)
