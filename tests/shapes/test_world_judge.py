"""The shapes world and its judge: deterministic drawing, captions that say what is drawn, a judge that reads world
images right (its own accuracy) and says "nothing" when nothing is drawn."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from lora_ext.shapes import judge, world


def test_same_seed_same_images_and_captions():
    a = [(np.asarray(img).tobytes(), cap) for img, cap, _ in world.scene_stream(3, 12)]
    b = [(np.asarray(img).tobytes(), cap) for img, cap, _ in world.scene_stream(3, 12)]
    c = [(np.asarray(img).tobytes(), cap) for img, cap, _ in world.scene_stream(4, 12)]
    assert a == b and a != c


def test_training_scenes_never_show_held_out_pairs_or_concept_shapes():
    rng = random.Random(0)
    scenes = [world.sample_scene(rng) for _ in range(3000)]
    pairs = {(s.colour, s.shape) for s in scenes}
    assert not pairs & world.HELD_OUT
    assert {s.shape for s in scenes} == set(world.SHAPES)
    assert pairs == {(c, s) for c in world.COLOURS for s in world.SHAPES} - world.HELD_OUT
    held = [world.sample_scene(rng, held_out=True) for _ in range(200)]
    assert {(s.colour, s.shape) for s in held} == set(world.HELD_OUT)


def test_caption_says_what_is_drawn():
    scene = world.Scene("star", "green", "small", "top left", "black")
    assert scene.caption() == "a small green star at the top left on a black background"
    assert world.Scene("ring", "red", position="center", background="striped").caption(size=False) == \
        "a red ring in the center on a striped background"
    assert scene.caption(size=False, position=False, background=False) == "a green star"
    assert world.parse_prompt(scene.caption()) == scene
    assert world.parse_prompt("a blue square, on the right") == world.Scene("square", "blue", position="right")
    assert world.parse_prompt("a photo of a cat") is None


def test_render_draws_the_colour_at_the_position():
    img = np.asarray(world.render(world.Scene("square", "blue", "large", "top left", "white")))
    cx, cy = (int(v * world.SIDE) for v in world.POSITIONS["top left"])
    assert tuple(img[cy, cx]) == world.COLOURS["blue"]
    assert tuple(img[world.SIDE - 2, world.SIDE - 2]) == world.BACKGROUNDS["white"]
    ring = np.asarray(world.render(world.Scene("ring", "red", "large", "center", "gray")))
    assert tuple(ring[world.SIDE // 2, world.SIDE // 2]) == world.BACKGROUNDS["gray"]  # the hole


@pytest.mark.parametrize("background", world.BACKGROUND_KINDS)
def test_judge_reads_every_shape_colour_and_position(background):
    for shape, colour in itertools.product(world.ALL_SHAPES, world.COLOURS):
        for size, position in (("large", "center"), ("small", "bottom right"), ("small", "top left")):
            scene = world.Scene(shape, colour, size, position, background)
            v = judge.judge(world.render(scene))
            assert (v.shape, v.colour, v.position, v.size, v.background) == \
                (shape, colour, position, size, background), scene


def test_judge_accuracy_on_world_images():
    acc = judge.judge_accuracy(400, seed=99)
    assert min(acc.values()) >= 0.99, acc


def _per_class(verdicts, scenes) -> dict[tuple[str, str], float]:
    hits: dict[tuple[str, str], list[bool]] = {}
    for v, s in zip(verdicts, scenes):
        hits.setdefault((s.shape, s.size), []).append(v.shape == s.shape)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def _scenes(n: int, seed: int) -> list[world.Scene]:
    """Every shape (the concept's too) in both sizes, random colour, position and background."""
    rng = random.Random(seed)
    return [world.Scene(shape, rng.choice(list(world.COLOURS)), size, rng.choice(list(world.POSITIONS)),
                        rng.choice(world.BACKGROUND_KINDS))
            for _ in range(n) for shape in world.ALL_SHAPES for size in world.SIZES]


def test_judge_survives_blur_like_a_generated_image():
    """A generated image is soft; a blurred world image is a soft image whose shape is known. Every shape at both
    sizes, each class on its own: a small star whose blurred points fade under the foreground threshold is still a
    star (a hard mask of it looks round: the first judge read half of them as circles)."""
    from PIL import ImageFilter

    rng = random.Random(5)
    scenes = _scenes(10, 5)
    images = [world.render(s, jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)))
              .filter(ImageFilter.GaussianBlur(1.0)) for s in scenes]
    verdicts = [judge.judge(img) for img in images]
    per_class = _per_class(verdicts, scenes)
    assert min(per_class.values()) >= 0.8, per_class
    assert sum(v.colour == s.colour for v, s in zip(verdicts, scenes)) / len(scenes) >= 0.97


def test_judge_reads_the_shipped_vaes_reconstructions():
    """The shapes model's VAE (encode, decode) keeps a shape a person recognises, so the judge must read the shape
    of the image that went in: its accuracy on the images a model really draws, against known labels."""
    import torch

    from lora_ext.models.loading import load_pipeline

    vae = load_pipeline("shapes", dtype=torch.float32).pipe.vae
    rng = random.Random(8)
    scenes = _scenes(6, 8)
    x = np.stack([np.asarray(world.render(s, jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))))
                  for s in scenes])
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(t).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    verdicts = [judge.judge(a) for a in rec]
    per_class = _per_class(verdicts, scenes)
    assert sum(v.shape == s.shape for v, s in zip(verdicts, scenes)) / len(scenes) >= 0.95, per_class
    assert min(per_class.values()) >= 0.5 and per_class[("star", "small")] >= 0.5, per_class


def test_nothing_drawn_is_no_shape():
    from PIL import Image

    for bg in ((245, 245, 242), (20, 20, 20), (128, 128, 128)):
        v = judge.judge(Image.new("RGB", (64, 64), bg))
        assert v.shape is None and v.colour is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert judge.judge(noise).shape is None or judge.judge(noise).area < 0.05


def test_two_shapes_the_larger_one_counts():
    img = world.render(world.Scene("circle", "red", "large", "left", "white"))
    small = world.render(world.Scene("cross", "blue", "small", "right", "white"))
    a = np.asarray(img).copy()
    b = np.asarray(small)
    a[:, 40:] = b[:, 40:]
    v = judge.judge(a)
    assert (v.shape, v.colour, v.position) == ("circle", "red", "left")


def test_bundled_sample_dataset_is_the_generators(tmp_path):
    """lora_ext/data/samples/hearts: the concept's 16 images and captions, as `concept.write_dataset` draws them
    (pixels and text compared: PNG bytes depend on the zlib build)."""
    from PIL import Image

    from lora_ext.models.assets import DATA_DIR
    from lora_ext.shapes import concept

    bundled = DATA_DIR / "samples" / "hearts"
    fresh = concept.write_dataset(tmp_path / "hearts")
    names = sorted(p.name for p in bundled.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir()) and len(names) == 2 * concept.DATASET_IMAGES
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(bundled / name)), np.asarray(Image.open(fresh / name)))
            assert judge.judge(Image.open(bundled / name)).shape == "heart"
        else:
            assert (bundled / name).read_text() == (fresh / name).read_text()
            assert "heart" in (bundled / name).read_text()
