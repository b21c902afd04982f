"""`DatasetSpec`: every dataset setting of a training run, named exactly as in the loop's `TrainConfig`.

The loop builds it with `DatasetSpec(**subset_of_config)`. Values are checked here, once, so the rest of the dataset
package can trust them; a bad value raises `DatasetError` naming the setting and what to use instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lora_ext import families
from lora_ext.errors import DatasetError
from lora_ext.train.dataset.buckets import BucketParams
from lora_ext.train.dataset.records import ImageRecord

# Pillow refuses images above 2x its MAX_IMAGE_PIXELS (89.5 MP) as decompression bombs; we use the same limit but check
# it ourselves from the header, so a huge file is a skipped entry in the report rather than an exception or a warning.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

NAMED_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}

_HEX_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")


def parse_background(value: str) -> tuple[int, int, int]:
    """'white' | 'black' | 'gray' | '#rrggbb' -> (r, g, b) in 0..255. Raises `DatasetError` for anything else."""
    if not isinstance(value, str):
        raise DatasetError(f"background must be a string such as 'white' or '#rrggbb', not {value!r}")
    key = value.strip().lower()
    if key in NAMED_BACKGROUNDS:
        return NAMED_BACKGROUNDS[key]
    m = _HEX_COLOUR.match(key)
    if m:
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    raise DatasetError(f"background {value!r} is not understood: use 'white', 'black', 'gray' or a colour '#rrggbb'")


def default_resolution(arch: str, v_prediction: bool = False) -> int:
    """Training resolution of a model family: 512 for SD1 and SD2-base, 768 for SD2 v-prediction, 1024 for SDXL."""
    try:
        return families.default_resolution(arch, "v_prediction" if v_prediction else "epsilon")
    except families.UnknownFamilyError as e:
        raise DatasetError(str(e)) from None


def _as_path(value: str | Path | None) -> Path | None:
    if value is None or value == "":
        return None
    return Path(value).expanduser()


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images are and how each becomes a training sample.

    Sources (any combination; at least one of `train_data_dir`, `metadata_file`, `instance_dir`):
      train_data_dir: images with same-name caption files, directly inside and/or in kohya `N_name` repeat folders.
      metadata_file: a diffusers/`datasets` imagefolder `metadata.jsonl` (`file_name` + `text`).
      instance_dir + instance_prompt: DreamBooth instance images (the prompt is the caption of uncaptioned images).
      class_dir + class_prompt: DreamBooth class (regularisation) images, balanced to the training sample count.
    Sizes are pixels. `resolution=None` means "per model family": call `resolved(arch)` before bucketing.
    """

    train_data_dir: str | Path | None = None
    metadata_file: str | Path | None = None
    instance_dir: str | Path | None = None
    instance_prompt: str | None = None
    class_dir: str | Path | None = None
    class_prompt: str | None = None
    num_class_images: int = 0
    caption_extension: str = ".txt"
    trigger_word: str = ""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    resolution: int | None = None
    enable_bucket: bool = True
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = True
    flip_aug: bool = False
    random_crop: bool = False
    crop_zoom: float = 0.0
    color_jitter: float = 0.0
    background: str = "white"
    seed: int = 42
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("train_data_dir", "metadata_file", "instance_dir", "class_dir"):
            object.__setattr__(self, name, _as_path(getattr(self, name)))
        object.__setattr__(self, "trigger_word", (self.trigger_word or "").strip())
        self._validate()

    def _validate(self) -> None:
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise DatasetError(
                f"caption_extension {self.caption_extension!r} must start with a dot, e.g. '.txt' or '.caption'"
            )
        if self.keep_tokens < 0:
            raise DatasetError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise DatasetError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")
        if not 0.0 <= self.crop_zoom < 1.0:
            raise DatasetError(
                f"crop_zoom must be in [0, 1) (0.3 = crops down to 70% of the side), got {self.crop_zoom}"
            )
        if not 0.0 <= self.color_jitter < 1.0:
            raise DatasetError(
                f"color_jitter must be in [0, 1) (0.1 = +-10% brightness/contrast/saturation), got {self.color_jitter}"
            )
        if self.num_class_images < 0:
            raise DatasetError(f"num_class_images must be >= 0, got {self.num_class_images}")
        if self.max_image_pixels <= 0:
            raise DatasetError(f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        parse_background(self.background)
        step = self.bucket_reso_steps
        if step <= 0 or step % 8:
            raise DatasetError(f"bucket_reso_steps must be a positive multiple of 8 (the VAE's factor), got {step}")
        if self.min_bucket_reso is not None and (self.min_bucket_reso <= 0 or self.min_bucket_reso % step):
            raise DatasetError(
                f"min_bucket_reso {self.min_bucket_reso} must be a positive multiple of bucket_reso_steps {step} "
                "(--min_bucket_reso, --bucket_reso_steps)"
            )
        if self.max_bucket_reso is not None and self.max_bucket_reso % step:
            raise DatasetError(
                f"max_bucket_reso {self.max_bucket_reso} must be a multiple of bucket_reso_steps {step} "
                "(--max_bucket_reso, --bucket_reso_steps)"
            )
        if self.resolution is not None:
            res = self.resolution
            if res <= 0 or res % 8:
                raise DatasetError(f"resolution must be a positive multiple of 8, got {res} (--resolution)")
            if self.enable_bucket:
                lo, hi = self.effective_min_bucket_reso, self.effective_max_bucket_reso
                if lo > res:
                    raise DatasetError(
                        f"min_bucket_reso {lo} is above resolution {res}: lower --min_bucket_reso to at most {res} "
                        "or leave it unset (it then follows --resolution)"
                        if self.min_bucket_reso is not None else
                        f"resolution {res} is below --bucket_reso_steps {step}: raise --resolution or lower "
                        "--bucket_reso_steps"
                    )
                if hi < res:
                    raise DatasetError(
                        f"max_bucket_reso {hi} is below resolution {res}: raise --max_bucket_reso to at least {res} "
                        "or leave it unset (2 x --resolution)"
                    )
        if self.instance_prompt and self.instance_dir is None:
            raise DatasetError(
                "instance_prompt is set but instance_dir is not: set instance_dir to the instance images"
            )
        if self.class_prompt and self.class_dir is None:
            raise DatasetError("class_prompt is set but class_dir is not: set class_dir (it is created if missing)")
        if self.num_class_images and self.class_dir is None:
            raise DatasetError("num_class_images is set but class_dir is not: set class_dir (it is created if missing)")

    @classmethod
    def from_config(cls, config: Any) -> DatasetSpec:
        """Build from a mapping or an object (e.g. the loop's `TrainConfig`) by taking the fields named as ours;
        other keys/attributes are ignored."""
        names = [f.name for f in fields(cls)]
        if isinstance(config, Mapping):
            values = {n: config[n] for n in names if n in config}
        else:
            values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        return cls(**values)

    @property
    def effective_min_bucket_reso(self) -> int:
        """min_bucket_reso, or when unset half the resolution (at most 256, kohya's default for 512 px), rounded down
        to a multiple of bucket_reso_steps and at least one step (resolution must be set then)."""
        if self.min_bucket_reso is not None:
            return self.min_bucket_reso
        if self.resolution is None:
            raise DatasetError("resolution is not set: call DatasetSpec.resolved(arch) or set resolution")
        step = self.bucket_reso_steps
        return max(step, min(256, self.resolution // 2) // step * step)

    @property
    def effective_max_bucket_reso(self) -> int:
        """max_bucket_reso, or 2 x resolution when unset (resolution must be set then)."""
        if self.max_bucket_reso is not None:
            return self.max_bucket_reso
        if self.resolution is None:
            raise DatasetError("resolution is not set: call DatasetSpec.resolved(arch) or set resolution")
        return 2 * self.resolution

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return parse_background(self.background)

    def resolved(self, arch: str | None = None, v_prediction: bool = False) -> DatasetSpec:
        """This spec with `resolution` filled in from the model family when unset (see `default_resolution`)."""
        if self.resolution is not None:
            return self
        if arch is None:
            raise DatasetError("resolution is not set and no model family was given to pick a default")
        return replace(self, resolution=default_resolution(arch, v_prediction))

    def bucket_params(self) -> BucketParams:
        """The bucketing settings; raises `DatasetError` when resolution is still unset."""
        if self.resolution is None:
            raise DatasetError("resolution is not set: call DatasetSpec.resolved(arch) or set resolution")
        return BucketParams(
            resolution=self.resolution,
            min_reso=self.effective_min_bucket_reso,
            max_reso=self.effective_max_bucket_reso,
            step=self.bucket_reso_steps,
            no_upscale=self.bucket_no_upscale,
            enabled=self.enable_bucket,
        )


def latent_cache_blockers(spec: DatasetSpec) -> list[str]:
    """Names of the settings that make the pixels of a sample change from epoch to epoch (empty: latents cacheable)."""
    out = []
    if spec.flip_aug:
        out.append("flip_aug")
    if spec.random_crop:
        out.append("random_crop")
    if spec.crop_zoom > 0:
        out.append("crop_zoom")
    if spec.color_jitter > 0:
        out.append("color_jitter")
    return out


def augmentation_is_random(spec: DatasetSpec) -> bool:
    """True when image augmentation varies per epoch, so `cache_latents` cannot be used."""
    return bool(latent_cache_blockers(spec))


def caption_is_random(spec: DatasetSpec, records: Iterable[ImageRecord] = ()) -> bool:
    """True when captions vary per epoch (shuffle, dropout, or a record with alternative captions), so text-encoder
    outputs cannot be cached."""
    return spec.shuffle_caption or spec.caption_dropout > 0 or any(r.alt_captions for r in records)
