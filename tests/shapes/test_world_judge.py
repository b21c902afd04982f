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


def test_judge_survives_blur_like_a_generated_image():
    from PIL import ImageFilter

    rng = random.Random(5)
    scenes = [world.sample_scene(rng) for _ in range(150)]
    images = [world.render(s).filter(ImageFilter.GaussianBlur(1.0)) for s in scenes]
    scores = judge.score(images, scenes)
    assert scores["colour"] >= 0.97 and scores["shape"] >= 0.9 and scores["position"] >= 0.97, scores


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
