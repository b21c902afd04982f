"""The sample concept: hearts, a shape the `shapes` base model has never seen, and how to measure a LoRA for it.

`write_dataset` draws the bundled sample dataset (16 hearts in world colours, sizes, positions and backgrounds, one
caption file each, kohya layout); `concept_report` generates through the same activation path as `generate`
(`lora_ext.app.runner.Session`: real `<lora:name:w>` tags) and lets the judge say how often a heart is drawn
with the LoRA, at weight 0 and without it, and how often unrelated prompts are still drawn right (leak).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_ext.shapes import judge, world
from lora_ext.shapes.evaluate import EVAL_SEED, GUIDANCE, STEPS, eval_scenes

CONCEPT = "heart"
DATASET_IMAGES = 16
DATASET_SEED = 77
# How the sample LoRA is trained: the tab's "shapes sample (CPU)" preset, the demo and the benchmarks all use these
# (measured in bench/RESULTS.md: hearts 88%, unrelated prompts still right 86%, means of three training seeds). The
# UNet's attention and MLP layers, not its 3x3 convs (LoCon): with the convs the heart is learned as well, but small
# rings fill and small crosses round in unrelated prompts (the leak).
SAMPLE_TRAINING: dict[str, Any] = {
    "resolution": 64, "min_bucket_reso": 64, "network_dim": 4, "network_alpha": 4.0, "network_targets": "attn_mlp",
    "train_text_encoder": True, "train_batch_size": 4, "learning_rate": 1e-3, "max_train_steps": 1200,
}


def concept_scenes(n: int, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.Scene(CONCEPT, rng.choice(list(world.COLOURS)), rng.choice(list(world.SIZES)),
                        rng.choice(list(world.POSITIONS)), rng.choice(world.BACKGROUND_KINDS)) for _ in range(n)]


def write_dataset(folder: str | Path, n: int = DATASET_IMAGES, seed: int = DATASET_SEED) -> Path:
    """`n` heart images (PNG) with caption files in `folder`; the same arguments give the same bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, scene in enumerate(concept_scenes(n, seed)):
        jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        world.render(scene, jitter=jitter).save(folder / f"heart_{i:02d}.png", optimize=False)
        (folder / f"heart_{i:02d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder


def _generate(session, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
              lora_dirs: Sequence[Path]) -> list:
    return [session.generate(p, seed=seed + i, steps=steps, width=world.SIDE, height=world.SIDE, cfg=guidance,
                             lora_dirs=list(lora_dirs)).image for i, p in enumerate(prompts)]


def concept_report(session, lora_name: str, lora_dirs: Sequence[Path], *, n: int = 24, steps: int = STEPS,
                   guidance: float = GUIDANCE, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Judge-measured rates for a concept LoRA: heart drawn with `<lora:NAME:1>`, at weight 0, without the tag;
    unrelated (seen) prompts drawn right with the LoRA and without it."""
    hearts = concept_scenes(n, seed + 11)
    prompts = [s.caption() for s in hearts]
    kw = dict(seed=seed, steps=steps, guidance=guidance, lora_dirs=lora_dirs)

    def heart_rate(suffix: str) -> tuple[float, list]:
        images = _generate(session, [p + suffix for p in prompts], **kw)
        return sum(judge.judge(img).shape == CONCEPT for img in images) / n, images

    with_lora, images = heart_rate(f" <lora:{lora_name}:1>")
    at_zero, _ = heart_rate(f" <lora:{lora_name}:0>")
    without, plain = heart_rate("")
    others = eval_scenes(n)
    right_with = [judge.judge(img).matches(s) for img, s in
                  zip(_generate(session, [s.caption() + f" <lora:{lora_name}:1>" for s in others], **kw), others)]
    right_without = [judge.judge(img).matches(s) for img, s in
                     zip(_generate(session, [s.caption() for s in others], **kw), others)]
    base_right = sum(right_without)
    # the leak relative to the base: of the unrelated prompts the base model draws right, the share still right
    kept = sum(a and b for a, b in zip(right_with, right_without)) / base_right if base_right else 0.0
    return {"concept_with_lora": with_lora, "concept_at_weight_0": at_zero, "concept_without_lora": without,
            "unrelated_right_with_lora": sum(right_with) / n,
            "unrelated_right_without_lora": base_right / n, "unrelated_kept": kept, "prompts": n, "steps": steps,
            "guidance": guidance, "images": {"with": images, "without": plain}}


PRIOR_SEED = 4242  # not EVAL_SEED: the prior's prompts and noise are not the ones the report measures


def write_prior_images(session, folder: str | Path, n: int = DATASET_IMAGES, seed: int = PRIOR_SEED) -> Path:
    """Prior-preservation images with captions: the base model's own images for `n` varied captioned prompts of the
    world (known shapes only), one caption file each, so a concept LoRA can be trained to leave them unchanged
    (kohya's regularisation images with captions). Images already there are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = world.sample_scene(rng)
        image_path, caption_path = folder / f"prior_{i:03d}.png", folder / f"prior_{i:03d}.txt"
        if image_path.exists() and caption_path.exists():
            continue
        image = session.generate(scene.caption(), seed=seed + i, steps=STEPS, width=world.SIDE, height=world.SIDE,
                                 cfg=GUIDANCE).image
        image.save(image_path)
        caption_path.write_text(scene.caption() + "\n", encoding="utf-8")
    return folder
