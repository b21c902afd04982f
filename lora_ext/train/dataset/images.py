"""Reading training images safely: header probes for the scan, and full decoding to 8-bit RGB for training.

Hygiene rules (every image goes through `load_image`):
  * EXIF orientation (tag 0x0112, values 1-8) is applied, so pixels are the right way up and sizes are as displayed.
    The orientation is read before decoding (for PNG only an eXIf chunk ahead of the pixel data counts), and the
    scan uses the same rule, so the scanned size always equals the loaded size.
  * Transparency (RGBA, LA, PA, P or L/RGB with a tRNS key) is composited over a solid background colour.
  * Grayscale, palette, CMYK, YCbCr, 1-bit, 16-bit ("I;16*", scaled by 255/65535) and 32-bit ("I", "F") images become
    8-bit RGB.
  * Animated files: the first frame.
  * Nothing here raises for a bad file during a scan: `probe_image` returns the reason instead (zero bytes, not an
    image, damaged or truncated, too large for the decompression-bomb limit, too small for one bucket step).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora_ext.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Extensions that are images but that we do not read; found files are reported with advice to convert them.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".psd", ".svg")

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> the transpose that shows the stored pixels the right way up (EXIF 2.3, tag 274).
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def is_image_name(path: Path) -> bool:
    """True when the file name has one of the supported image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageProbe:
    """Result of looking at one file. `ok` with `size` = displayed (W, H) after EXIF orientation; else `reason`."""

    path: Path
    ok: bool
    size: tuple[int, int] = (0, 0)
    mode: str = ""
    format: str = ""
    reason: str = ""


def _orientation(img: Image.Image) -> int:
    """EXIF orientation of an opened, not yet decoded image (1 when absent or unreadable)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")  # only an eXIf chunk before the pixel data; never decode for it
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(EXIF_ORIENTATION_TAG, 1))
    except Exception as err:  # a broken EXIF block must not make a good image unusable
        logger.debug("%s: unreadable EXIF (%s); orientation ignored", getattr(img, "filename", "?"), err)
        return 1
    return value if value in _ORIENTATION_FIX else 1


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _open(path: Path, max_pixels: int) -> tuple[Image.Image, int]:
    """Open (header only) and check the size limit. Raises DatasetError with a user-facing reason."""
    try:
        if os.path.getsize(path) == 0:
            raise DatasetError("empty file (0 bytes)")
    except OSError as err:
        raise DatasetError(f"cannot read the file ({err.strerror or err})") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except UnidentifiedImageError as err:
            what = "a text file" if _looks_like_text(path) else "not an image Pillow can read"
            raise DatasetError(f"not an image: the content is {what} despite the '{path.suffix}' extension") from err
        except Image.DecompressionBombError as err:
            raise DatasetError(f"too large to be safe to decode ({err}); downscale it first") from err
        except Exception as err:  # any decoder failure is a reported skip, never a crash
            raise DatasetError(f"cannot be read ({type(err).__name__}: {err})") from err
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise DatasetError(f"has an invalid size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise DatasetError(
            f"too large: {w}x{h} = {w * h / 1e6:.0f} MP is above the {max_pixels / 1e6:.0f} MP limit "
            "(decompression-bomb guard); downscale it first"
        )
    return img, _orientation(img)


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _high_bit_depth_to_rgba(img: Image.Image) -> Image.Image:
    """'I;16*', 'I' or 'F' (single channel) -> 'RGBA' 8-bit, keeping a tRNS transparent grey value."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray = _scale_to_uint8(arr, 65535.0)
    elif img.mode == "I":
        # 32-bit container: 16-bit PNG/TIFF data in practice; values <= 255 are taken as 8-bit.
        gray = (
            _scale_to_uint8(arr, 65535.0)
            if arr.size and int(arr.max()) > 255
            else np.clip(arr, 0, 255).astype(np.uint8)
        )
    else:  # "F": floats, [0, 1] when they fit there, else 0..255
        scale = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        gray = _scale_to_uint8(np.nan_to_num(arr), scale)
    alpha = np.full(gray.shape, 255, dtype=np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha[arr == key] = 0
    return Image.fromarray(np.dstack([gray, gray, gray, alpha]), mode="RGBA")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any decoded Pillow image -> 8-bit 'RGB', transparency composited over `background` (r, g, b)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        rgba = _high_bit_depth_to_rgba(img)
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's palette-transparency hint: we do convert to RGBA
            rgba = img.convert("RGBA")
    elif mode == "RGB":
        return img.copy()
    else:  # L, P, 1, CMYK, YCbCr, LAB, HSV
        return img.convert("RGB")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def load_image(path: str | Path, background: tuple[int, int, int], max_pixels: int) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image (see the module rules). Raises `DatasetError` naming the file."""
    p = Path(path)
    try:
        img, orientation = _open(p, max_pixels)
    except DatasetError as err:
        raise DatasetError(f"{p}: {err}") from err
    try:
        with img:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
            rgb = to_rgb(img, background)
    except DatasetError:
        raise
    except OSError as err:
        raise DatasetError(f"{p}: damaged or truncated image ({err}); re-export or remove it") from err
    except Exception as err:  # decoders raise many types for corrupt data; name the file instead
        raise DatasetError(f"{p}: cannot be decoded ({type(err).__name__}: {err}); re-export or remove it") from err
    if orientation != 1:
        rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
    return rgb


def probe_image(path: str | Path, *, max_pixels: int, min_side: int = 1, decode: bool = False) -> ImageProbe:
    """Check one file without raising. Reads the header; PNG files are also checked chunk by chunk (CRC, truncation)
    without decompressing; `decode=True` decodes fully as training will (catches truncated JPEG/WebP too)."""
    p = Path(path)
    try:
        img, orientation = _open(p, max_pixels)
    except DatasetError as err:
        return ImageProbe(p, False, reason=str(err))
    with img:
        w, h = img.size
        if orientation in _SWAPS_SIDES:
            w, h = h, w
        mode, fmt = img.mode, img.format or ""
        if min(w, h) < min_side:
            return ImageProbe(p, False, (w, h), mode, fmt, f"too small: {w}x{h}, each side needs {min_side} px or more")
        if fmt == "PNG" and not decode:
            try:
                img.verify()
            except Exception as err:  # verify raises SyntaxError/OSError/struct.error for bad files
                return ImageProbe(p, False, (w, h), mode, fmt, f"damaged or truncated PNG ({err}); re-export it")
    if decode:
        try:
            load_image(p, (0, 0, 0), max_pixels)
        except DatasetError as err:
            reason = str(err)
            prefix = f"{p}: "
            return ImageProbe(
                p, False, (w, h), mode, fmt, reason[len(prefix) :] if reason.startswith(prefix) else reason
            )
    return ImageProbe(p, True, (w, h), mode, fmt)
