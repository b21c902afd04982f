"""Aspect-ratio buckets, with the same bucket set and choice rule as kohya sd-scripts.

Bucket set (`make_buckets`): the square of side resolution (rounded down to `step`) plus, for every width w from
`min_reso` to `max_reso` in `step`s, the tallest height h (a multiple of `step`, at most `max_reso`) with
w * h <= resolution^2 and h >= min_reso, and its transpose.

Choice (`assign_bucket`), sizes (width, height) in pixels:
  * buckets disabled: one bucket (resolution, resolution); the image is scaled (up or down) to cover it.
  * upscaling allowed: the bucket whose aspect ratio w/h is closest to the image's (ties: the first in sorted order,
    as sd-scripts' argmin); an image whose size is itself a bucket keeps it.
  * no upscaling (`no_upscale`): the same bucket when the image covers it at scale <= 1; otherwise the image gets
    its own smaller bucket: its size scaled down (never up) to fit resolution^2 and `max_reso`, each side rounded
    down to `step`. Own buckets can be smaller than `min_reso` (the image is small); nothing is upscaled, except an
    image whose aspect ratio is so extreme that its own bucket would have a side of 0 (`upscaled=True`).
In every case the image is then resized to just cover its bucket (`resized`) and cropped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class BucketParams:
    """Bucketing settings in pixels. `min_reso`/`max_reso` bound bucket sides; `step` divides every side."""

    resolution: int
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = True
    enabled: bool = True

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: `bucket` (W, H) it is cropped to, `resized` (W, H) it is scaled to first (covers the
    bucket), `ar_error` = bucket W/H - image W/H, `own` when it is an image-specific no-upscale bucket, `upscaled`
    when the image is enlarged."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float
    own: bool = False
    upscaled: bool = False


@lru_cache(maxsize=64)
def _bucket_table(resolution: int, min_reso: int, max_reso: int, step: int) -> tuple[tuple[int, int], ...]:
    area = resolution * resolution
    found = {((resolution // step) * step,) * 2}
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            found.add((w, h))
            found.add((h, w))
    return tuple(sorted(found))


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """The predefined bucket sizes (W, H), sorted; see the module docstring."""
    return list(_bucket_table(resolution, min_reso, max_reso, step))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size (W, H) of the image scaled by max(bw/w, bh/h): the smallest scaling that covers the bucket."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    return max(bw, round(width * s)), max(bh, round(height * s))


def _closest(width: int, height: int, table: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    ar = width / height
    best = table[0]
    best_err = abs(best[0] / best[1] - ar)
    for b in table[1:]:
        err = abs(b[0] / b[1] - ar)
        if err < best_err:
            best, best_err = b, err
    return best


def _choice(width: int, height: int, bucket: tuple[int, int], own: bool = False) -> BucketChoice:
    resized = cover_size(width, height, bucket)
    return BucketChoice(
        bucket=bucket,
        resized=resized,
        ar_error=bucket[0] / bucket[1] - width / height,
        own=own,
        upscaled=resized[0] > width or resized[1] > height,
    )


def assign_bucket(width: int, height: int, params: BucketParams) -> BucketChoice:
    """Bucket of an image of `width` x `height` pixels (after EXIF orientation); see the module docstring."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not params.enabled:
        return _choice(width, height, (params.resolution, params.resolution))
    table = _bucket_table(params.resolution, params.min_reso, params.max_reso, params.step)
    if not params.no_upscale and (width, height) in table:
        return _choice(width, height, (width, height))
    best = _closest(width, height, table)
    if not params.no_upscale or (best[0] <= width and best[1] <= height):
        return _choice(width, height, best)
    # The image is too small for the nearest predefined bucket: give it its own, without enlarging it.
    f = min(1.0, math.sqrt(params.max_area / (width * height)), params.max_reso / width, params.max_reso / height)
    step = params.step
    own = (int(width * f) // step * step, int(height * f) // step * step)
    if own[0] == 0 or own[1] == 0:
        return _choice(width, height, best)
    return _choice(width, height, own, own=True)
