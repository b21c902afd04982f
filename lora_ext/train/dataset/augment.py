"""Deterministic per-sample randomness and the image augmentations.

Every random choice of a sample is drawn from a generator seeded by (seed, epoch, index, stream): the same sample in
the same epoch is identical across runs, processes, DataLoader workers and resumes, whatever order samples are loaded
in. Separate streams keep captions, images and batch order independent (turning on colour jitter does not change which
samples are flipped). A fixed number of draws is made whatever options are on, for the same reason.

Augmentations, applied to the image scaled to cover its bucket:
  * crop_zoom z: the crop window's sides are the bucket's divided by a zoom factor in [1, 1/(1-z)) (so z=0.3 crops
    down to 70% of the side), then scaled to the bucket. With bucket_no_upscale the zoom stops where source pixels
    would be enlarged.
  * random_crop: the window's position is uniform over the free space; otherwise centred.
  * flip_aug: horizontal flip with probability 0.5.
  * color_jitter j: brightness, contrast and saturation factors each uniform in [1-j, 1+j], applied in that order
    with clamping to [0, 1] after each (torchvision's ColorJitter formulas: contrast blends with the mean luma,
    saturation with the per-pixel luma, luma = 0.299 R + 0.587 G + 0.114 B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STREAM_CAPTION = 1
STREAM_IMAGE = 2
STREAM_SAMPLER = 3

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """Generator for one (seed, epoch, index, stream); seed may be any int (taken modulo 2^64)."""
    if epoch < 0 or index < 0:
        raise ValueError(f"epoch and index must be >= 0, got {epoch}, {index}")
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), epoch, index, stream]))


@dataclass(frozen=True)
class AugmentParams:
    """The random choices for one sample. `crop_fx`/`crop_fy` in [0, 1]: the window's position across the free
    space (0.5 = centred). Factors of 1.0 mean "unchanged"."""

    flip: bool = False
    zoom: float = 1.0
    crop_fx: float = 0.5
    crop_fy: float = 0.5
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @property
    def jitters(self) -> bool:
        return (self.brightness, self.contrast, self.saturation) != (1.0, 1.0, 1.0)


def draw_augment(
    rng: np.random.Generator,
    *,
    flip_aug: bool,
    random_crop: bool,
    crop_zoom: float,
    color_jitter: float,
) -> AugmentParams:
    """Draw the augmentation of one sample (always 7 uniforms, whatever is enabled)."""
    u = rng.random(7)
    zoom = 1.0 / (1.0 - crop_zoom * float(u[1])) if crop_zoom > 0 else 1.0
    j = color_jitter
    return AugmentParams(
        flip=bool(flip_aug and u[0] < 0.5),
        zoom=zoom,
        crop_fx=float(u[2]) if random_crop else 0.5,
        crop_fy=float(u[3]) if random_crop else 0.5,
        brightness=float(1.0 - j + 2.0 * j * u[4]) if j > 0 else 1.0,
        contrast=float(1.0 - j + 2.0 * j * u[5]) if j > 0 else 1.0,
        saturation=float(1.0 - j + 2.0 * j * u[6]) if j > 0 else 1.0,
    )


@dataclass(frozen=True)
class CropPlan:
    """Which source region becomes the bucket image. `box` = (left, top, right, bottom) in source pixels (floats);
    `scale` = output px per source px; `top_left` = (top, left) of the window in the scaled image (SDXL's
    crops_coords_top_left, before any flip)."""

    box: tuple[float, float, float, float]
    scale: float
    top_left: tuple[int, int]


def plan_crop(
    src_size: tuple[int, int],
    bucket: tuple[int, int],
    *,
    zoom: float = 1.0,
    fx: float = 0.5,
    fy: float = 0.5,
    no_upscale: bool = False,
) -> CropPlan:
    """Window of the source that, scaled by `scale`, fills the bucket exactly (see the module docstring)."""
    w, h = src_size
    bw, bh = bucket
    cover = max(bw / w, bh / h)
    if no_upscale and cover * zoom > 1.0:
        zoom = max(1.0, 1.0 / cover)
    scale = cover * zoom
    win_w, win_h = bw / scale, bh / scale
    left = (w - win_w) * fx
    top = (h - win_h) * fy
    return CropPlan(
        box=(left, top, left + win_w, top + win_h),
        scale=scale,
        top_left=(int(round(top * scale)), int(round(left * scale))),
    )


def color_jitter(rgb: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """rgb: float32 [H, W, 3] in [0, 1] -> same shape, factors applied as in the module docstring."""
    x = np.clip(rgb * np.float32(brightness), 0.0, 1.0)
    mean = np.float32((x @ _LUMA).mean())
    x = np.clip((x - mean) * np.float32(contrast) + mean, 0.0, 1.0)
    gray = (x @ _LUMA)[..., None]
    x = np.clip((x - gray) * np.float32(saturation) + gray, 0.0, 1.0)
    return x.astype(np.float32, copy=False)
