"""How well a model draws the shapes world, as the judge sees it: fixed prompts, fixed seeds, rates per attribute.

`base_model_report(pipe)` gives the numbers the issue's bars are about: over prompts for seen colour x shape pairs
the judged colour and shape match the prompt; over the held-out pairs (never in training) the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from lora_ext.shapes import judge, world

EVAL_SEED = 2024
STEPS = 20
GUIDANCE = 5.0


def eval_scenes(n: int, *, held_out: bool = False, seed: int = EVAL_SEED) -> list[world.Scene]:
    rng = random.Random(seed + (1 if held_out else 0))
    return [world.sample_scene(rng, held_out=held_out) for _ in range(n)]


def generate(pipe, prompts: Sequence[str], *, seed: int = EVAL_SEED, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 24, side: int = world.SIDE) -> list:
    """Images for `prompts` with `pipe` (a diffusers SD pipeline); image i uses the noise of seed `seed + i`."""
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        latents = torch.stack([
            torch.randn((4, side // 8, side // 8), generator=torch.Generator().manual_seed(seed + start + i))
            for i in range(len(chunk))])
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=side, width=side,
                   latents=latents.to(pipe.unet.dtype))
        images += out.images
    return images


def rates(pipe, scenes: Sequence[world.Scene], *, caption: Callable[[world.Scene], str] | None = None,
          **kw: Any) -> tuple[dict[str, float], list]:
    prompts = [(caption or (lambda s: s.caption()))(s) for s in scenes]
    images = generate(pipe, prompts, **kw)
    return judge.score(images, scenes), images


def base_model_report(pipe, n_seen: int = 96, n_held: int = 48, **kw: Any) -> dict[str, Any]:
    """Judge-measured rates of a base model on seen and held-out colour x shape pairs (full captions)."""
    seen, _ = rates(pipe, eval_scenes(n_seen), **kw)
    held, _ = rates(pipe, eval_scenes(n_held, held_out=True), **kw)
    return {"seen": seen, "held_out": held, "prompts": {"seen": n_seen, "held_out": n_held},
            "steps": kw.get("steps", STEPS), "guidance": kw.get("guidance", GUIDANCE), "seed": EVAL_SEED}


def grid(images: Sequence, columns: int = 12, scale: int = 2):
    """Images side by side (PIL), `columns` per row, each enlarged `scale` times without smoothing."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    out = Image.new("RGB", (w * columns, h * rows), (255, 255, 255))
    for i, img in enumerate(images):
        out.paste(img, (w * (i % columns), h * (i // columns)))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)
