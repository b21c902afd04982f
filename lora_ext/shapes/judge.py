"""What an image of the shapes world shows: a small deterministic judge made of geometric measures (numpy only).

- foreground: the saturated pixels (every world colour is saturated, every background white/black/gray or striped
  gray-on-white), largest 4-connected component; too small or too large a component means "nothing drawn";
- colour: the component's median RGB, nearest world colour; a component whose pixels are mostly other colours
  (noise, a rainbow) is "nothing drawn";
- shape: the component's mask against each shape's template scaled to the component's bounding box, best
  intersection-over-union (holes count: a ring is not a circle);
- position: the centroid in thirds of the image; size: the bounding box against the two world sizes;
- background: the non-foreground pixels' level, "striped" when rows alternate.

`judge_accuracy` measures the judge on images drawn by `world.render` (its own accuracy, reported in RESULTS).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lora_ext.shapes import world

CHROMA = 60  # max - min channel above which a pixel is foreground
MIN_AREA = 0.004  # of the image: smaller components are noise
MAX_AREA = 0.5  # of the image: a world shape covers at most ~0.25; more is a colour field or noise, not a shape
COHERENCE = 0.6  # share of the component's pixels that must be nearest to its judged colour


@dataclass(frozen=True)
class Verdict:
    shape: str | None
    colour: str | None
    position: str | None
    size: str | None
    background: str | None
    area: float = 0.0  # of the image
    shape_scores: dict[str, float] = field(default_factory=dict, compare=False)

    def matches(self, scene: world.Scene, attributes: Sequence[str] = ("shape", "colour")) -> bool:
        return all(getattr(self, a) == getattr(scene, a) for a in attributes)


def judge(image) -> Verdict:
    """Judge a PIL image or an H x W x 3 uint8 array."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.int16)
    side = arr.shape[0]
    chroma = arr.max(axis=2) - arr.min(axis=2)
    mask = _largest_component(chroma > CHROMA)
    background = _background(arr, chroma <= CHROMA)
    area = float(mask.sum()) / mask.size
    if not MIN_AREA <= area <= MAX_AREA:
        return Verdict(None, None, None, None, background, area)
    colour = _nearest_colour(np.median(arr[mask], axis=0))
    if _share_nearest(arr[mask], colour) < COHERENCE:
        return Verdict(None, None, None, None, background, area)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    scores = {s: _iou(crop, _template(s, crop.shape[0], crop.shape[1])) for s in world.ALL_SHAPES}
    shape = max(scores, key=scores.get)
    position = _position(xs.mean() / side, ys.mean() / side)
    extent = max(y1 - y0, x1 - x0) / side
    size = "small" if extent < (world.SIZES["small"] + world.SIZES["large"]) / 2 else "large"
    return Verdict(shape, colour, position, size, background, area, scores)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill over the labelled runs)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _background(arr: np.ndarray, neutral: np.ndarray) -> str | None:
    if neutral.mean() < 0.2:
        return None
    level = arr.mean(axis=2)
    rows = np.array([level[y][neutral[y]].mean() if neutral[y].any() else np.nan for y in range(len(level))])
    rows = rows[~np.isnan(rows)]
    if len(rows) > 8 and np.mean(rows < 160) > 0.1 and np.mean(rows > 200) > 0.4:
        return "striped"
    value = float(np.median(level[neutral]))
    return min(world.BACKGROUNDS, key=lambda b: abs(np.mean(world.BACKGROUNDS[b]) - value))


def _share_nearest(pixels: np.ndarray, colour: str) -> float:
    names = list(world.COLOURS)
    palette = np.asarray([world.COLOURS[c] for c in names], np.float32)
    nearest = np.argmin(((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == names.index(colour)))


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(world.COLOURS, key=lambda c: float(np.sum((np.asarray(world.COLOURS[c]) - rgb) ** 2)))


@functools.cache
def _template_full(shape: str) -> np.ndarray:
    """The shape drawn large (256 px canvas), cropped to its bounding box, as a float mask."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (256, 256), 0)
    draw = ImageDraw.Draw(img)
    for kind, points, fill in world.shape_parts(shape, 128, 128, 110):
        (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=255 if fill else 0)
    a = np.asarray(img)
    ys, xs = np.nonzero(a > 127)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@functools.lru_cache(maxsize=4096)
def _template(shape: str, h: int, w: int) -> np.ndarray:
    from PIL import Image

    full = Image.fromarray(_template_full(shape))
    return np.asarray(full.resize((w, h), Image.BILINEAR)) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _position(x: float, y: float) -> str:
    col = 0 if x < 0.385 else 2 if x > 0.615 else 1
    row = 0 if y < 0.385 else 2 if y > 0.615 else 1
    names = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    return names[row][col]


def judge_accuracy(n: int = 600, seed: int = 12345, side: int = world.SIDE,
                   shapes: tuple[str, ...] = world.ALL_SHAPES) -> dict[str, float]:
    """The judge's accuracy per attribute on `n` world images (drawn exactly, with the training jitter)."""
    rng = random.Random(seed)
    hits = {a: 0 for a in ("shape", "colour", "position", "size", "background")}
    for _ in range(n):
        scene = world.Scene(rng.choice(shapes), rng.choice(list(world.COLOURS)), rng.choice(list(world.SIZES)),
                            rng.choice(list(world.POSITIONS)), rng.choice(world.BACKGROUND_KINDS))
        jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        verdict = judge(world.render(scene, side, jitter=jitter))
        for a in hits:
            hits[a] += getattr(verdict, a) == getattr(scene, a)
    return {a: v / n for a, v in hits.items()}


def score(images: Iterable, scenes: Iterable[world.Scene],
          attributes: Sequence[str] = ("shape", "colour", "position")) -> dict[str, float]:
    """Fraction of images whose judged attributes match the scene each was asked for, per attribute and 'all'."""
    pairs = [(judge(img), scene) for img, scene in zip(images, scenes)]
    out = {a: sum(getattr(v, a) == getattr(s, a) for v, s in pairs) / max(1, len(pairs)) for a in attributes}
    out["shape+colour"] = sum(v.matches(s) for v, s in pairs) / max(1, len(pairs))
    return out
