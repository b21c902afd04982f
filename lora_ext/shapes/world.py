"""The shapes world: coloured shapes on plain or striped backgrounds, drawn by code from a seed, with captions.

One image shows one shape. A scene is (shape, colour, size, position, background); the caption says it in plain
words, "a small red circle at the top left on a white background", with parts left out at random in training so
that short prompts ("a red circle") work too. The base model is trained on every colour x shape pair except
`HELD_OUT` (they test composition); `CONCEPT_SHAPES` are never shown to it (a LoRA teaches them).

Drawing is exact and deterministic: shapes are polygons/ellipses rendered at 4x and reduced with a box filter, so
edges are anti-aliased the same way on every machine (Pillow's rasteriser and box reduce are integer code).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

SIDE = 64  # the model's image size (pixels); the world can be drawn at any multiple of 16
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
CONCEPT_SHAPES = ("heart",)  # not in the base model's training: the sample LoRA's concept
ALL_SHAPES = SHAPES + CONCEPT_SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 55, 195),
    "pink": (240, 115, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 242),
    "black": (22, 22, 26),
    "gray": (128, 128, 128),
}
STRIPES = (90, 90, 90)  # stripe colour on a "striped" background (always on white)
BACKGROUND_KINDS = ("white", "black", "gray", "striped")
SIZES: dict[str, float] = {"small": 0.30, "large": 0.50}  # shape extent as a fraction of the image side
# position name -> (x, y) centre as fractions of the side; names read as in "at the top left", "in the center"
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
# colour x shape pairs the base model never sees: generating them tests composition
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("green", "star"), ("purple", "triangle"), ("orange", "ring"), ("blue", "cross"), ("pink", "square"),
    ("yellow", "circle"),
})


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    background: str = "white"

    def caption(self, *, size: bool = True, position: bool = True, background: bool = True,
                shape_word: str | None = None) -> str:
        """"a small red circle at the top left on a white background", parts left out when asked."""
        words = ["a"]
        if size:
            words.append(self.size)
        words += [self.colour, shape_word or self.shape]
        if position:
            words.append(position_phrase(self.position))
        if background:
            words.append("on a striped background" if self.background == "striped"
                         else f"on a {self.background} background")
        return " ".join(words)


def position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def sample_scene(rng: random.Random, *, shapes: tuple[str, ...] = SHAPES, held_out: bool = False) -> Scene:
    """A random scene; with `held_out=False` never a `HELD_OUT` pair, with True only those."""
    while True:
        shape = rng.choice(shapes)
        colour = rng.choice(list(COLOURS))
        if ((colour, shape) in HELD_OUT) == held_out or shape not in SHAPES:
            break
    return Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng.choice(BACKGROUND_KINDS))


def training_caption(scene: Scene, rng: random.Random, shape_word: str | None = None) -> str:
    """The caption the model learns from: each optional part is kept with probability 0.7."""
    return scene.caption(size=rng.random() < 0.7, position=rng.random() < 0.7, background=rng.random() < 0.7,
                         shape_word=shape_word)


def render(scene: Scene, side: int = SIDE, *, jitter: tuple[float, float] = (0.0, 0.0)):
    """The scene as an RGB PIL image of `side` x `side` pixels; `jitter` moves the shape by fractions of the side."""
    from PIL import Image, ImageDraw

    if side % 16:
        raise ValueError(f"side must be a multiple of 16, got {side}")
    big = side * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS["white" if scene.background == "striped" else scene.background])
    draw = ImageDraw.Draw(img)
    if scene.background == "striped":
        period = big // 8
        for y in range(0, big, period):
            draw.rectangle((0, y, big, y + period // 4 - 1), fill=STRIPES)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + jitter[0]) * big, (fy + jitter[1]) * big
    r = SIZES[scene.size] * big / 2
    draw_shape(draw, scene.shape, cx, cy, r, COLOURS[scene.colour], _background_at(scene))
    return img.reduce(SUPERSAMPLE)


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, hole) -> None:
    """Draw `shape` (radius `r`, centre (cx, cy)) on a PIL ImageDraw: its filled parts in `fill`, its holes in
    `hole`. The renderer and the judge's templates draw through this one function."""
    for kind, points, filled in shape_parts(shape, cx, cy, r):
        (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=fill if filled else hole)


def _background_at(scene: Scene) -> tuple[int, int, int]:
    return BACKGROUNDS["white" if scene.background == "striped" else scene.background]


def shape_parts(shape: str, cx: float, cy: float, r: float) -> list[tuple[str, list, bool]]:
    """Drawing commands (kind, points, filled) of a shape of radius `r` (half its extent) centred at (cx, cy).

    The second element of a "ring" is its hole, drawn in the background colour (a striped background shows plain
    white there: the judge reads a hole as a hole either way).
    """
    if shape == "circle":
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r], True)]
    if shape == "ring":
        h = r * 0.55
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r], True),
                ("ellipse", [cx - h, cy - h, cx + h, cy + h], False)]
    if shape == "square":
        s = r * 0.9
        return [("polygon", [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)], True)]
    if shape == "triangle":
        return [("polygon", [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], True)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return [("polygon", pts, True)]
    if shape == "cross":
        w = r * 0.34
        return [("polygon", [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                             (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                             (cx - r, cy - w), (cx - w, cy - w)], True)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
        return [("polygon", pts, True)]
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(ALL_SHAPES)}")


def scene_stream(seed: int, n: int, *, side: int = SIDE, shapes: tuple[str, ...] = SHAPES,
                 held_out: bool = False, shape_word: str | None = None):
    """`n` (image, caption, scene) triples from `seed`: the same seed gives the same images and captions."""
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng, shapes=shapes, held_out=held_out)
        jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        yield render(scene, side, jitter=jitter), training_caption(scene, rng, shape_word), scene


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt asks for (shape and colour required; size/position/background default), else None."""
    text = " " + prompt.lower().replace(",", " ") + " "
    shape = next((s for s in ALL_SHAPES if f" {s} " in text), None)
    colour = next((c for c in COLOURS if f" {c} " in text), None)
    if shape is None or colour is None:
        return None
    size = next((s for s in SIZES if f" {s} " in text), "large")
    position = "center"
    for name in sorted(POSITIONS, key=len, reverse=True):
        if position_phrase(name) in text:
            position = name
            break
    background = next((b for b in BACKGROUND_KINDS if f" {b} background" in text), "white")
    return replace(Scene(shape, colour), size=size, position=position, background=background)
