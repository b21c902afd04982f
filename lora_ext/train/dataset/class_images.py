"""DreamBooth class images: count what `num_class_images` still lacks and have the base model fill the gap."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from lora_ext.errors import DatasetError
from lora_ext.formats.safetensors_io import write_bytes_atomic
from lora_ext.train.dataset.images import is_image_name, probe_image
from lora_ext.train.dataset.spec import DatasetSpec

logger = logging.getLogger(__name__)

# generate(count, prompt, out_dir) -> the images (yielded one by one, so each is saved as soon as it exists), or None
# when the callback saved `count` image files into out_dir itself.
GenerateClassImages = Callable[[int, str, Path], Iterable[Image.Image] | None]


def _usable_class_images(spec: DatasetSpec) -> list[Path]:
    folder = spec.class_dir
    if folder is None or not folder.is_dir():
        return []
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and is_image_name(p) and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    return [p for p in files if probe_image(p, max_pixels=spec.max_image_pixels).ok]


def missing_class_images(spec: DatasetSpec) -> int:
    """How many class images `num_class_images` asks for beyond the readable ones already in class_dir."""
    if spec.num_class_images <= 0:
        return 0
    return max(0, spec.num_class_images - len(_usable_class_images(spec)))


def _free_name(folder: Path, start: int) -> tuple[Path, int]:
    n = start
    while (folder / f"class_{n:05d}.png").exists():
        n += 1
    return folder / f"class_{n:05d}.png", n + 1


def ensure_class_images(spec: DatasetSpec, generate: GenerateClassImages) -> list[Path]:
    """Make class_dir hold `num_class_images` readable images, generating the missing ones with `generate`.

    `generate(count, class_prompt, class_dir)` returns an iterable of PIL images (each is written at once, atomically,
    as `class_NNNNN.png` with a free number; extra images are ignored) or None when it wrote the files itself.
    Returns the paths written here ([] when nothing was missing). Raises `DatasetError` when class_prompt is missing or
    the generator delivers fewer images than asked.
    """
    missing = missing_class_images(spec)
    if missing == 0:
        return []
    folder = spec.class_dir
    if folder is None:
        raise DatasetError("num_class_images is set but class_dir is not: set class_dir")
    if not spec.class_prompt:
        raise DatasetError(
            f"{missing} class images must be generated but class_prompt is empty: set class_prompt (e.g. 'a photo "
            "of a dog') or put class images into class_dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("generating %d class images into %s with prompt %r", missing, folder, spec.class_prompt)
    result = generate(missing, spec.class_prompt, folder)
    written: list[Path] = []
    if result is not None:
        counter = 0
        for image in result:
            if len(written) >= missing:
                break
            if not isinstance(image, Image.Image):
                raise DatasetError(
                    f"the class image generator returned {type(image).__name__}, not a PIL image: fix the callback"
                )
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            path, counter = _free_name(folder, counter)
            write_bytes_atomic(path, buf.getvalue(), overwrite=False)
            written.append(path)
    still = missing_class_images(spec)
    if still:
        raise DatasetError(
            f"class_dir {folder} still lacks {still} of num_class_images={spec.num_class_images} class images after "
            f"generation ({len(written)} written): the generator delivered too few images"
        )
    return written
