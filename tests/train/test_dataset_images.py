"""Image hygiene of the training dataset: odd modes, transparency, EXIF orientation and broken files.

References are independent of our code: hand formulas (alpha compositing, 16-bit scaling), the EXIF 2.3 definition
of orientation 6 and Pillow's own `ImageOps.exif_transpose`.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lora_ext.errors import DatasetError
from lora_ext.train.dataset import (
    DatasetSpec,
    TrainDataset,
    load_image,
    parse_background,
    probe_image,
    scan_dataset,
    summarize,
    to_rgb,
)

BIG = 10**9


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (RGB 8-bit) with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_parse_background() -> None:
    assert parse_background("white") == (255, 255, 255)
    assert parse_background("Black") == (0, 0, 0)
    assert parse_background("gray") == (128, 128, 128)
    assert parse_background("#1a2B3c") == (0x1A, 0x2B, 0x3C)
    for bad in ("#12345", "transparent", "#gg0000", ""):
        with pytest.raises(DatasetError, match="background"):
            parse_background(bad)
    with pytest.raises(DatasetError, match="background"):
        DatasetSpec(train_data_dir="x", background="pink")


def test_rgba_composited_on_background(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)  # fully transparent: background only
    rgba[0, 1] = (200, 100, 50, 255)  # opaque: foreground only
    rgba[0, 2] = (200, 100, 50, 128)  # half
    rgba[1, :] = (10, 20, 30, 64)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    bg = (0, 255, 0)
    out = np.asarray(load_image(tmp_path / "a.png", bg, BIG)).astype(int)
    assert out.shape == (2, 3, 3)

    def blend(fg: tuple[int, int, int], a: int) -> np.ndarray:
        return np.array([f * a / 255 + b * (1 - a / 255) for f, b in zip(fg, bg)])

    assert tuple(out[0, 0]) == bg
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert np.abs(out[0, 2] - blend((200, 100, 50), 128)).max() <= 1
    assert np.abs(out[1, 0] - blend((10, 20, 30), 64)).max() <= 1
    # another background gives another result for the transparent pixel only
    white = np.asarray(load_image(tmp_path / "a.png", parse_background("#ffffff"), BIG))
    assert tuple(white[0, 0]) == (255, 255, 255) and tuple(white[0, 1]) == (200, 100, 50)


def test_la_and_palette_with_transparency(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), "LA")
    la.save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png", (255, 0, 0), BIG))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (90, 90, 90)

    pal = Image.new("P", (2, 1))
    pal.putpalette([9, 9, 9, 0, 0, 200] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = np.asarray(load_image(tmp_path / "p.png", (1, 2, 3), BIG))
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[0, 1]) == (0, 0, 200)

    # a palette image without transparency is just its colours
    pal.save(tmp_path / "p2.png")
    out = np.asarray(load_image(tmp_path / "p2.png", (1, 2, 3), BIG))
    assert tuple(out[0, 0]) == (9, 9, 9)


def test_grayscale_16bit_and_32bit_to_rgb8(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768], [40000, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png", (0, 0, 0), BIG))
    expected = np.rint(values / 65535 * 255).astype(np.uint8)  # full-scale 16-bit -> full-scale 8-bit
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 1], expected)

    Image.fromarray(np.array([[5, 200]], dtype=np.uint8), "L").save(tmp_path / "g8.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g8.png", (0, 0, 0), BIG))[0, :, 2], [5, 200])

    # 32-bit "I" (Pillow cannot write it as PNG; decoders of TIFF/PGM produce it): 16-bit range when above 255
    got = np.asarray(to_rgb(Image.fromarray(np.array([[1000, 65535]], dtype=np.int32), "I"), (0, 0, 0)))
    np.testing.assert_array_equal(got[0, :, 0], np.rint(np.array([1000, 65535]) / 65535 * 255))
    got = np.asarray(to_rgb(Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32), "F"), (0, 0, 0)))
    np.testing.assert_array_equal(got[0, :, 1], [128, 255])


def test_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)  # pure cyan
    Image.new("CMYK", (32, 32), (0, 0, 0, 255)).save(tmp_path / "k.jpg", quality=95)  # pure black
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    cyan = np.asarray(load_image(tmp_path / "c.jpg", (9, 9, 9), BIG)).astype(int)
    black = np.asarray(load_image(tmp_path / "k.jpg", (9, 9, 9), BIG)).astype(int)
    assert np.abs(cyan[16, 16] - [0, 255, 255]).max() <= 6
    assert np.abs(black[16, 16]).max() <= 6


def test_exif_orientation_pixels_right_way_up(tmp_path: Path) -> None:
    # Displayed image: 40 wide, 20 high, red left half, blue right half, a white pixel at the top-left corner.
    shown = np.zeros((20, 40, 3), dtype=np.uint8)
    shown[:, :20] = (255, 0, 0)
    shown[:, 20:] = (0, 0, 255)
    shown[0:4, 0:4] = (255, 255, 255)
    displayed = Image.fromarray(shown)
    # EXIF 2.3 orientation 6: the stored image must be rotated 90 degrees clockwise to be shown, so it is stored
    # rotated 90 degrees counter-clockwise (Pillow's ROTATE_90 is counter-clockwise).
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=98)
    stored.save(tmp_path / "r.png", exif=exif.tobytes())

    for name in ("r.jpg", "r.png"):
        probe = probe_image(tmp_path / name, max_pixels=BIG)
        assert probe.ok and probe.size == (40, 20), name  # displayed size, from the header only
        img = load_image(tmp_path / name, (0, 0, 0), BIG)
        assert img.size == (40, 20)
        arr = np.asarray(img).astype(int)
        assert arr[10, 10, 0] > 200 and arr[10, 10, 2] < 60, name  # red on the left
        assert arr[10, 30, 2] > 200 and arr[10, 30, 0] < 60, name  # blue on the right
        assert arr[1, 1].min() > 200, name  # white corner at the top-left
        reference = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / name)).convert("RGB")).astype(int)
        np.testing.assert_array_equal(arr, reference)


def test_all_eight_orientations_match_pillow(tmp_path: Path) -> None:
    base = _noise(6, 4, seed=3)
    for value in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = value
        path = tmp_path / f"o{value}.png"
        base.save(path, exif=exif.tobytes())
        ours = np.asarray(load_image(path, (0, 0, 0), BIG))
        ref = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        np.testing.assert_array_equal(ours, ref, err_msg=f"orientation {value}")
        assert probe_image(path, max_pixels=BIG).size == (ref.shape[1], ref.shape[0])


def test_broken_files_are_reported_not_raised(tmp_path: Path) -> None:
    good = io.BytesIO()
    _noise(64, 64).save(good, "PNG")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("these are my captions, not an image\n")
    (tmp_path / "huge.png").write_bytes(_fake_png_header(20000, 20000))  # 400 MP: decompression bomb
    jpg = io.BytesIO()
    _noise(128, 128).save(jpg, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    _noise(64, 64).save(tmp_path / "ok.PNG")  # upper-case extension counts
    _noise(64, 48).save(tmp_path / "ok2.webp")
    _noise(48, 64).save(tmp_path / "ok3.bmp")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    spec = DatasetSpec(train_data_dir=tmp_path, resolution=64, min_bucket_reso=64, bucket_reso_steps=8)

    records, report = scan_dataset(spec)  # header-level checks
    reasons = dict(report.skipped)
    assert "empty file" in reasons[str(tmp_path / "empty.png")]
    assert "truncated" in reasons[str(tmp_path / "truncated.png")]
    assert "text file" in reasons[str(tmp_path / "notes.jpg")]
    assert "too large" in reasons[str(tmp_path / "huge.png")]
    assert str(tmp_path / "cut.jpg") not in reasons  # a cut JPEG needs decoding to be found...
    assert any(".gif" in p for p in report.problems)
    names = sorted(r.path.name for r in records)
    assert names == ["cut.jpg", "ok.PNG", "ok2.webp", "ok3.bmp"]

    records, report = scan_dataset(spec, decode=True)  # ...which decode=True does
    assert "truncated" in dict(report.skipped)[str(tmp_path / "cut.jpg")]
    assert sorted(r.path.name for r in records) == ["ok.PNG", "ok2.webp", "ok3.bmp"]
    full = summarize(records, spec, batch_size=1, epochs=1, scan=report)
    assert full.trainable and full.total_steps == 3
    text = "\n".join(full.lines())
    assert "empty.png" in text and "skipped files (5)" in text


def test_size_limits(tmp_path: Path) -> None:
    _noise(64, 64).save(tmp_path / "a.png")
    _noise(40, 90).save(tmp_path / "thin.png")
    assert "too large" in probe_image(tmp_path / "a.png", max_pixels=1000).reason
    spec = DatasetSpec(
        train_data_dir=tmp_path, resolution=256, max_image_pixels=4000, bucket_reso_steps=64, min_bucket_reso=64
    )
    records, report = scan_dataset(spec)
    reasons = dict(report.skipped)
    assert "too large" in reasons[str(tmp_path / "a.png")]
    # 40 px is below one bucket step (64) and cannot be bucketed without upscaling
    assert "too small" in reasons[str(tmp_path / "thin.png")]
    assert records == [] and "no usable training images" in report.problems[0]
    summary = summarize(records, spec, batch_size=2, epochs=3, scan=report)
    assert summary.total_steps == 0 and not summary.trainable


def test_dataset_item_uses_hygiene_and_names_vanished_file(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    spec = DatasetSpec(
        train_data_dir=tmp_path, resolution=64, min_bucket_reso=64, bucket_reso_steps=64, background="#00ff00"
    )
    records, _ = scan_dataset(spec)
    ds = TrainDataset(records, spec)
    px = ds[0]["pixel_values"]
    assert px.shape == (3, 64, 64)
    assert float(px[0].max()) == -1.0 and float(px[1].min()) == 1.0  # green background, red ignored
    (tmp_path / "t.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match="t.png"):
        ds[0]
