"""Image input validation and conversion (worldstereo_core.io.images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import example_dirs
from worldstereo_core.errors import InputError
from worldstereo_core.io.images import from_tensor_m11, load_image, resize_bicubic, to_tensor_m11

H, W = 20, 24


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _check_rgb(arr: np.ndarray, shape=(H, W)) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (*shape, 3) and arr.flags.c_contiguous


def test_rgb_png_round_trip(tmp_path):
    img = _rgb()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out)
    np.testing.assert_array_equal(out, img)


def test_grayscale_expanded(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _check_rgb(out)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    np.testing.assert_array_equal(load_image(g), out)  # (H, W) array


def test_16bit_png_scaled(tmp_path):
    g16 = np.random.default_rng(3).integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    _check_rgb(out)
    expected = np.round(g16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 1], expected)
    np.testing.assert_array_equal(load_image(g16), out)  # uint16 array path


def test_rgba_alpha_dropped_or_composited(tmp_path):
    rgb = _rgb()
    a = np.zeros((H, W, 1), np.uint8)
    a[:, : W // 2] = 255
    Image.fromarray(np.concatenate([rgb, a], -1), mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)  # default: drop alpha
    white = load_image(tmp_path / "a.png", alpha="white")
    np.testing.assert_array_equal(white[:, : W // 2], rgb[:, : W // 2])
    assert (white[:, W // 2:] == 255).all()
    assert (load_image(tmp_path / "a.png", alpha="black")[:, W // 2:] == 0).all()
    with pytest.raises(InputError, match="alpha"):
        load_image(tmp_path / "a.png", alpha="pink")


def test_la_and_palette_and_bilevel(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(np.stack([g, np.full_like(g, 255)], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png")[..., 2], g)
    rgb = _rgb()
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    Image.fromarray(g > 127).save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    assert set(np.unique(out)) <= {0, 255}
    np.testing.assert_array_equal(out[..., 0] == 255, g > 127)


def test_arrays_and_tensors():
    img = _rgb()
    f = img.astype(np.float32) / 255.0
    np.testing.assert_array_equal(load_image(f), img)  # HWC float [0, 1]
    np.testing.assert_array_equal(load_image(torch.from_numpy(f)[None]), img)  # ComfyUI (1, H, W, 3)
    np.testing.assert_array_equal(load_image(torch.from_numpy(img).permute(2, 0, 1)), img)  # CHW uint8
    np.testing.assert_array_equal(load_image(Image.fromarray(img)), img)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 64, 3), np.uint8), "height"),
    (np.zeros((64, 16385), np.uint8), "width"),
    (np.zeros((2, 32, 32, 3), np.uint8), "batch"),
    (np.zeros((32, 32, 5), np.uint8), "shape"),
    (np.full((32, 32, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.full((32, 32, 3), 300, np.int32), "integer"),
    (np.zeros((32, 32, 3), np.complex64), "dtype"),
    (12, "unsupported type"),
])
def test_bad_arrays_rejected(bad, match):
    with pytest.raises(InputError, match=match):
        load_image(bad)


def test_bad_files_rejected(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((10, 300, 3), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(InputError, match=r"thin\.png.*height 10"):
        load_image(tmp_path / "thin.png")


def test_tensor_m11_round_trip():
    img = _rgb(5)
    t = to_tensor_m11(img)
    assert t.shape == (3, H, W) and t.dtype == torch.float32
    assert float(t.min()) >= -1 and float(t.max()) <= 1
    torch.testing.assert_close(t, torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(from_tensor_m11(t), img)
    np.testing.assert_array_equal(from_tensor_m11(t[None] * 1000), np.where(img > 127, 255, 0))  # clamped
    with pytest.raises(InputError):
        from_tensor_m11(torch.zeros(4, H, W))


def test_resize_bicubic_is_pil_bicubic():
    img = _rgb(6)
    out = resize_bicubic(img, (32, 40))
    _check_rgb(out, (32, 40))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((40, 32), Image.BICUBIC)))
    with pytest.raises(InputError, match="resize target"):
        resize_bicubic(img, (4, 40))


@pytest.mark.parametrize("family", ["images", "reconstruction"])
def test_example_images_load(family):
    scenes = example_dirs(family)
    if not scenes:
        pytest.skip(f"no example scenes under examples/{family}")
    for scene in scenes:
        img = load_image(scene / "image.png")
        with Image.open(scene / "image.png") as ref:
            assert img.shape == (ref.height, ref.width, 3)
            np.testing.assert_array_equal(img, np.asarray(ref.convert("RGB")))


def _header_only_png(path, width: int, height: int) -> None:
    """A PNG with only its header (IHDR) and end chunk: the size is known, no pixel is stored."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [16384, 20000, 12000])
def test_huge_images_are_refused_from_their_header(tmp_path, side):
    """Issue 10 item 5: a 16384x16384 PNG (within the old per-side limit) and a 20000x20000 one (PIL's
    DecompressionBombError) gave raw tracebacks; now the stated limits (README: 16-16384 px per side,
    at most 2**27 pixels) are checked from the header, before any decoding."""
    from worldstereo_core.sizes import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

    path = tmp_path / f"big{side}.png"
    _header_only_png(path, side, side)
    with pytest.raises(InputError, match=r"megapixels.*16384x8192.*downscale") as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert side * side > MAX_IMAGE_PIXELS == 16384 * 8192 and MAX_IMAGE_SIDE == 16384


def test_largest_allowed_image_loads(tmp_path):
    Image.fromarray(np.zeros((16, 16384, 3), np.uint8)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png").shape == (16, 16384, 3)
    _header_only_png(tmp_path / "ok.png", 16384, 8192)  # within the limits: it is decoded (and is empty)
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "ok.png")
