"""What an image of the shapes world shows: a small deterministic judge made of geometric measures (numpy only).

- foreground: the saturated pixels (every world colour is saturated, every background white/black/gray or striped
  gray-on-white), largest 4-connected component; too small or too large a component means "nothing drawn";
- colour: the component's median RGB, nearest world colour; a component whose more saturated half is mostly other
  colours (noise, a rainbow) is "nothing drawn";
- shape: the component's soft coverage (how much of each pixel the shape's colour covers, read from the chroma:
  a world colour blended with a neutral background has chroma in proportion to its share) against each shape drawn
  at the size its covered area implies and softened by a few blur widths; the best cosine similarity wins (holes
  count: a ring is not a circle). Comparing soft with soft is what keeps a slightly blurry small star a star: the
  hard mask of such a star loses its points' tips and looks round;
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
COHERENCE = 0.6  # share of the component's more saturated half that must be nearest to its judged colour


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
    # the more saturated half: a small soft shape's edge pixels are blends with the background, no world colour
    core = chroma[mask] >= np.median(chroma[mask])
    if _share_nearest(arr[mask][core], colour) < COHERENCE:
        return Verdict(None, None, None, None, background, area)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scores = _shape_scores(_coverage(arr, chroma, mask, colour))
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


GROW = 3  # pixels around the foreground component whose soft coverage counts (edges and tips below CHROMA)
BLURS = (0.0, 0.6, 1.0, 1.5, 2.1)  # Gaussian blur widths (pixels) the templates are compared at
SCALES = (0.88, 0.94, 1.0, 1.06, 1.12)  # sizes tried around the one the covered area implies
MARGIN = 8  # pixels of the window around the component that the templates are drawn in


def _coverage(arr: np.ndarray, chroma: np.ndarray, mask: np.ndarray, colour: str) -> np.ndarray:
    """Per pixel, the share of `colour` (0..1) from the chroma, inside the component grown by GROW pixels."""
    c = world.COLOURS[colour]
    alpha = np.clip(chroma / float(max(c) - min(c)), 0.0, 1.0)
    grown = mask.copy()
    for _ in range(GROW):
        g = grown.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        grown = g
    return alpha * grown


@functools.cache
def _shape_moments(shape: str) -> tuple[float, float, float]:
    """Area / r^2 and the centroid's offset from the drawing centre / r of `shape` drawn at radius r (measured on a
    large exact drawing)."""
    from PIL import Image, ImageDraw

    r, c = 400.0, 512
    img = Image.new("L", (2 * c, 2 * c), 0)
    world.draw_shape(ImageDraw.Draw(img), shape, c, c, r, 255, 0)
    a = np.asarray(img, np.float64) / 255
    area = a.sum()
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    return area / r**2, ((xs * a).sum() / area - c) / r, ((ys * a).sum() / area - c) / r


def _draw(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Coverage (0..1) of `shape` drawn as the world draws it (4x supersampled, box-reduced) in an h x w window."""
    from PIL import Image, ImageDraw

    s = world.SUPERSAMPLE
    img = Image.new("L", (w * s, h * s), 0)
    world.draw_shape(ImageDraw.Draw(img), shape, cx * s, cy * s, r * s, 255, 0)
    return np.asarray(img.reduce(s), np.float64) / 255


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix of a 1-D Gaussian blur (cut at 3 sigma, rows normalised so that pixels near the window's edge
    keep their mass), so that B @ a @ B.T blurs an image a."""
    x = np.arange(n)
    k = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))
    k[np.abs(x[:, None] - x[None, :]) > 3 * sigma + 1] = 0
    return k / k.sum(axis=1, keepdims=True).clip(min=1e-12)


def _shape_scores(alpha: np.ndarray) -> dict[str, float]:
    """Best cosine similarity of the coverage `alpha` with each shape, drawn at the size its covered area implies
    (times SCALES) at the centre its centroid implies, blurred by each of BLURS."""
    ys, xs = np.nonzero(alpha > 0)
    y0, x0 = max(0, ys.min() - MARGIN), max(0, xs.min() - MARGIN)
    window = alpha[y0 : ys.max() + 1 + MARGIN, x0 : xs.max() + 1 + MARGIN]
    h, w = window.shape
    mass = window.sum()
    gy, gx = np.mgrid[:h, :w]
    mx, my = (gx * window).sum() / mass + 0.5, (gy * window).sum() / mass + 0.5  # pixel centres
    norm = np.sqrt((window**2).sum())
    blurs = [(_blur_matrix(h, b), _blur_matrix(w, b)) if b else None for b in BLURS]
    scores = {}
    for shape in world.ALL_SHAPES:
        k, dx, dy = _shape_moments(shape)
        best = 0.0
        for f in SCALES:
            r = np.sqrt(mass / k) * f
            t = _draw(shape, mx - dx * r, my - dy * r, r, h, w)
            for b in blurs:
                tb = t if b is None else b[0] @ t @ b[1].T
                best = max(best, float((window * tb).sum() / (norm * np.sqrt((tb**2).sum()) + 1e-12)))
        scores[shape] = best
    return scores


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
