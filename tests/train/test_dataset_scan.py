"""Dataset scanning: layouts (plain folder, kohya N_name, metadata.jsonl, DreamBooth), the problems report, class
image generation, and the steps formula computed by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from lora_ext.errors import DatasetError
from lora_ext.train.dataset import (
    DatasetSpec,
    ImageRecord,
    ensure_class_images,
    missing_class_images,
    scan_dataset,
    summarize,
)


def _img(path: Path, w: int = 64, h: int = 64, colour: tuple[int, int, int] = (120, 30, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)
    return path


def _spec(**kw: object) -> DatasetSpec:
    base: dict[str, object] = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 64}
    base.update(kw)
    return DatasetSpec(**base)  # type: ignore[arg-type]


def test_plain_folder_with_captions(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("\ufeffred dress, smile\nsecond line ignored\n", encoding="utf-8")
    _img(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("blue hat", encoding="utf-8")  # the other standard extension
    _img(tmp_path / "c.JPEG")  # no caption
    records, report = scan_dataset(_spec(train_data_dir=tmp_path))
    assert [(r.path.name, r.caption, r.repeats, r.is_class) for r in records] == [
        ("a.png", "red dress, smile", 1, False),
        ("b.jpg", "blue hat", 1, False),
        ("c.JPEG", "", 1, False),
    ]
    assert all(r.size == (64, 64) for r in records)
    assert report.images == 3 and report.repeats_total == 3 and report.class_images == 0
    assert any("only the first is used" in p for p in report.problems)
    assert any("1 of 3 images" in p and "c.JPEG" in p for p in report.problems)
    assert report.tag_frequency[tmp_path.name] == {"red dress": 1, "smile": 1, "blue hat": 1}


def test_kohya_repeat_folders_and_naming_problems(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / "10_sks dog" / f"{i}.png")
    (tmp_path / "10_sks dog" / "0.txt").write_text("sks dog, running", encoding="utf-8")
    _img(tmp_path / "2_style" / "x.png")
    _img(tmp_path / "photos" / "p.png")  # no N_ prefix: used once, reported with the rename
    _img(tmp_path / "5photos" / "q.png")  # digits without underscore
    _img(tmp_path / "0_unused" / "u.png")  # zero repeats: reported, not used
    _img(tmp_path / ".cache" / "h.png")  # hidden: ignored
    _img(tmp_path / "10_sks dog" / "nested" / "n.png")  # deeper: reported
    (tmp_path / "empty_dir").mkdir()
    records, report = scan_dataset(_spec(train_data_dir=tmp_path))
    by_name = {r.path.name: r for r in records}
    assert sorted(by_name) == ["0.png", "1.png", "2.png", "p.png", "q.png", "x.png"]
    assert by_name["0.png"].repeats == 10 and by_name["0.png"].caption == "sks dog, running"
    assert by_name["1.png"].caption == "sks dog"  # folder class tokens, as sd-scripts
    assert by_name["x.png"].repeats == 2 and by_name["x.png"].caption == "style"
    assert by_name["p.png"].repeats == 1 and by_name["q.png"].repeats == 1
    assert report.repeats_total == 3 * 10 + 2 + 1 + 1
    text = "\n".join(report.problems)
    assert "'photos'" in text and "'10_photos'" in text and "sd-scripts would ignore" in text
    assert "'5_photos'" in text
    assert "'0_unused'" in text and "'1_unused'" in text
    assert "nested" in text
    assert "empty_dir" in text
    assert report.dataset_dirs()["10_sks dog"] == {"n_repeats": 10, "img_count": 3}


def test_metadata_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _img(data / "a.png")
    _img(data / "sub" / "b.png")
    _img(data / "c.png")
    _img(data / "d.png")
    _img(data / "unlisted.png")
    lines = [
        json.dumps({"file_name": "a.png", "text": "a cat"}),
        json.dumps({"file_name": "sub/b.png", "caption": "a dog"}),
        json.dumps({"file_name": "c.png", "text": ["first", "second"]}),
        json.dumps({"file_name": "d.png"}),
        json.dumps({"file_name": "gone.png", "text": "missing"}),
        "{not json",
        "",
        json.dumps({"text": "no file"}),
    ]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # found automatically at the top of train_data_dir
    records, report = scan_dataset(_spec(train_data_dir=data))
    got = {r.path.name: (r.caption, r.alt_captions) for r in records}
    assert got == {"a.png": ("a cat", ()), "b.png": ("a dog", ()), "c.png": ("first", ("second",)), "d.png": ("", ())}
    assert str(data / "gone.png") in dict(report.skipped)
    text = "\n".join(report.problems)
    assert "line 6 is not JSON" in text and 'line 8 has no "file_name"' in text
    assert "unlisted.png" in text and "not listed" in text
    assert "d.png" in text  # no caption
    # 'sub' has no N_ prefix but its image is owned by the metadata: no naming complaint
    assert "'sub'" not in text
    # the same through metadata_file
    records2, _ = scan_dataset(_spec(metadata_file=data / "metadata.jsonl"))
    assert [r.path for r in records2] == [r.path for r in records]


def test_missing_folders_raise_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no training images configured"):
        scan_dataset(_spec())
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        scan_dataset(_spec(train_data_dir=tmp_path / "nope"))
    with pytest.raises(DatasetError, match="metadata_file"):
        scan_dataset(_spec(metadata_file=tmp_path / "metadata.jsonl"))
    _img(tmp_path / "i" / "a.png")
    with pytest.raises(DatasetError, match="class_dir"):
        scan_dataset(_spec(instance_dir=tmp_path / "i", class_dir=tmp_path / "nope"))
    with pytest.raises(DatasetError, match="instance_dir"):
        DatasetSpec(instance_prompt="a sks dog")


def test_empty_and_captionless_datasets_are_reported(tmp_path: Path) -> None:
    spec = _spec(train_data_dir=tmp_path)
    records, scan = scan_dataset(spec)
    report = summarize(records, spec, batch_size=2, epochs=5, scan=scan)
    assert records == [] and report.total_steps == 0 and not report.trainable
    assert report.problems[0].startswith("no usable training images")
    assert any("has no usable images" in p for p in report.problems)
    assert json.loads(json.dumps(report.to_dict()))["trainable"] is False

    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    records, scan = scan_dataset(_spec(train_data_dir=tmp_path, trigger_word="zxc"))
    assert any(p.startswith("none of the 2 training images has a caption") for p in scan.problems)
    assert any("plus the trigger word 'zxc'" in p for p in scan.problems)


def test_dreambooth_balancing_like_sd_scripts(tmp_path: Path) -> None:
    # sd-scripts registers regularisation images round-robin until they match the training samples (repeats incl.)
    for i in range(3):
        _img(tmp_path / "train" / "10_sks dog" / f"{i}.png")
    for i in range(4):
        _img(tmp_path / "class" / f"c{i}.png")
    (tmp_path / "class" / "c0.txt").write_text("a dog, grass", encoding="utf-8")
    spec = _spec(train_data_dir=tmp_path / "train", class_dir=tmp_path / "class", class_prompt="a dog")
    records, report = scan_dataset(spec)
    cls = [r for r in records if r.is_class]
    # T = 3 images x 10 repeats = 30 samples; 4 class images -> 30 // 4 = 7 each, the first 30 % 4 = 2 get 8
    assert [r.repeats for r in cls] == [8, 8, 7, 7]
    assert [r.caption for r in cls] == ["a dog, grass", "a dog", "a dog", "a dog"]
    assert report.class_images == 4 and report.images == 3
    assert report.repeats_total == 60 and report.class_samples == 30 and report.train_samples == 30

    # more class images than training samples: the first T are used once
    for i in range(4, 40):
        _img(tmp_path / "class" / f"c{i:02d}.png")
    records, report = scan_dataset(spec)
    cls = [r for r in records if r.is_class]
    assert len(cls) == 30 and all(r.repeats == 1 for r in cls)
    assert any("only 30 training samples" in p for p in report.problems)


def test_dreambooth_instance_dir_and_class_generation(tmp_path: Path) -> None:
    for i in range(5):
        _img(tmp_path / "inst" / f"{i}.png")
    (tmp_path / "inst" / "0.txt").write_text("sks dog on a sofa", encoding="utf-8")
    spec = _spec(
        instance_dir=tmp_path / "inst",
        instance_prompt="a photo of sks dog",
        class_dir=tmp_path / "cls",  # does not exist yet: created for the generated images
        class_prompt="a photo of a dog",
        num_class_images=3,
    )
    records, report = scan_dataset(spec)
    assert [r.caption for r in records] == ["sks dog on a sofa"] + ["a photo of sks dog"] * 4
    assert report.class_images_missing == 3 and report.class_images == 0
    assert any("3 will be generated" in p for p in report.problems)
    assert missing_class_images(spec) == 3

    calls: list[tuple[int, str, Path]] = []

    def fake_generate(count: int, prompt: str, out_dir: Path) -> Iterator[Image.Image]:
        calls.append((count, prompt, out_dir))
        for i in range(count + 2):  # more than asked: the extra ones are ignored
            yield Image.new("RGB", (64, 64), (i * 40, 0, 0))

    written = ensure_class_images(spec, fake_generate)
    assert calls == [(3, "a photo of a dog", tmp_path / "cls")]
    assert [p.name for p in written] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == [p.name for p in written]  # no temp files left
    assert all(Image.open(p).format == "PNG" for p in written)
    assert Image.open(written[2]).getpixel((0, 0)) == (80, 0, 0)
    assert ensure_class_images(spec, fake_generate) == [] and len(calls) == 1  # nothing missing any more

    records, report = scan_dataset(spec)
    cls = [r for r in records if r.is_class]
    # T = 5 samples, C = 3 class images: 5 // 3 = 1 each, the first 5 % 3 = 2 get one more
    assert [r.repeats for r in cls] == [2, 2, 1] and all(r.caption == "a photo of a dog" for r in cls)
    assert report.class_images_missing == 0

    # one more wanted: new name does not collide; a generator that writes files itself and returns None is accepted
    more = _spec(**{**_spec_fields(spec), "num_class_images": 4})

    def writes_itself(count: int, prompt: str, out_dir: Path) -> None:
        for i in range(count):
            _img(out_dir / f"own_{i}.png")

    assert ensure_class_images(more, writes_itself) == []
    assert missing_class_images(more) == 0

    short = _spec(**{**_spec_fields(spec), "num_class_images": 9})
    with pytest.raises(DatasetError, match="too few"):
        ensure_class_images(short, lambda n, p, d: iter([Image.new("RGB", (64, 64))]))
    no_prompt = _spec(**{**_spec_fields(spec), "num_class_images": 20, "class_prompt": None})
    with pytest.raises(DatasetError, match="class_prompt"):
        ensure_class_images(no_prompt, fake_generate)


def _spec_fields(spec: DatasetSpec) -> dict[str, object]:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}


def test_steps_formula_by_hand(tmp_path: Path) -> None:
    # 3 square images x 5 repeats = 15 samples, 2 landscape 2:1 images x 3 repeats = 6 samples
    for i in range(3):
        _img(tmp_path / "5_sq" / f"{i}.png", 64, 64)
    for i in range(2):
        _img(tmp_path / "3_wide" / f"{i}.png", 256, 128)
    spec = _spec(train_data_dir=tmp_path, resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    records, scan = scan_dataset(spec)
    # buckets for 64^2 = 4096 px, steps 32, sides 32..128: (32,96), (32,128), (64,64), (96,32), (128,32).
    # 2:1 images: W/H errors 1.67, 1.75, 1, 1, 2 -> tie between 64x64 and 96x32, the first in sorted order wins
    report = summarize(records, spec, batch_size=4, epochs=7, grad_accum=2, scan=scan)
    assert report.buckets == {(64, 64): 21}
    # one bucket: batches = ceil(21 / 4) = 6; steps/epoch = ceil(6 / (1 x 2)) = 3; total = 3 x 7 = 21
    assert (report.batches_per_epoch, report.steps_per_epoch, report.total_steps) == (6, 3, 21)

    spec2 = _spec(
        train_data_dir=tmp_path,
        resolution=64,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        bucket_no_upscale=False,
    )
    wide = [r for r in records if r.size == (256, 128)]
    square = [r for r in records if r.size == (64, 64)]
    # records of 4:1 images (sizes given, as records built by hand may be) land in bucket 128x32
    wide = [ImageRecord(r.path, r.caption, r.repeats, False, r.source, (512, 128)) for r in wide]
    report = summarize(square + wide, spec2, batch_size=4, epochs=None, max_steps=10, grad_accum=1, num_processes=2)
    assert report.buckets == {(64, 64): 15, (128, 32): 6}
    # batches = ceil(15/4) + ceil(6/4) = 4 + 2 = 6; steps/epoch = ceil(6 / (2 processes x 1)) = 3
    # max_train_steps 10 -> total 10, epochs = ceil(10 / 3) = 4
    assert (report.batches_per_epoch, report.steps_per_epoch, report.total_steps, report.epochs) == (6, 3, 10, 4)
    assert "ceil(15/4) + ceil(6/4)" in report.formula and "max_train_steps = 10" in report.formula
    # default 10 epochs; batches = ceil(15/8) + ceil(6/8) = 2 + 1 = 3; the 6-sample bucket is smaller than the batch
    report = summarize(square + wide, spec2, batch_size=8)
    assert (report.batches_per_epoch, report.steps_per_epoch, report.total_steps) == (3, 3, 30)
    assert any("fewer samples than the batch size 8" in p for p in report.problems)
    # drop_last: floor(15/8) + floor(6/8) = 1 batch per epoch
    report = summarize(square + wide, spec2, batch_size=8, drop_last=True)
    assert (report.batches_per_epoch, report.total_steps) == (1, 10)
    # buckets can need more batches than one pool would: ceil(15/7) + ceil(6/7) = 3 + 1 = 4 > ceil(21/7) = 3
    report = summarize(square + wide, spec2, batch_size=7, epochs=1)
    assert report.batches_per_epoch == 4 and math.ceil(21 / 7) == 3


def test_dry_run_lines_and_dict(tmp_path: Path) -> None:
    for i in range(2):
        _img(tmp_path / "train" / "4_x" / f"{i}.png")
    _img(tmp_path / "class" / "c.png")
    spec = _spec(train_data_dir=tmp_path / "train", class_dir=tmp_path / "class", class_prompt="a person")
    records, scan = scan_dataset(spec)
    report = summarize(records, spec, batch_size=2, epochs=3, scan=scan)
    # 8 training samples + 8 class samples (1 class image x 8) = 16 in one bucket: 8 batches/epoch, 24 steps
    assert (report.repeats_total, report.steps_per_epoch, report.total_steps) == (16, 8, 24)
    text = "\n".join(report.lines())
    for needle in (
        "images: 2 + 1 class images",
        "4_x [repeat_folder]: 2 images x 4 repeats = 8",
        "8 + 8 class = 16",
        "buckets (WxH: samples): 64x64: 16",
        "steps per epoch: 8",
        "total steps: 24 (3 epochs)",
        "formula:",
    ):
        assert needle in text, needle
    d = json.loads(json.dumps(report.to_dict()))
    assert d["buckets"] == [{"resolution": [64, 64], "count": 16}] and d["total_steps"] == 24
    assert report.bucket_info()["buckets"]["0"] == {"resolution": [64, 64], "count": 16}


def test_spec_fields_are_train_config_fields() -> None:
    """The loop builds the spec from TrainConfig fields of the same names: every spec field must exist there."""
    config = pytest.importorskip("lora_ext.train.config")
    import dataclasses

    config_names = {f.name for f in dataclasses.fields(config.TrainConfig)}
    spec_names = {f.name for f in dataclasses.fields(DatasetSpec)} - {"max_image_pixels"}  # ours only, defaulted
    assert spec_names <= config_names, sorted(spec_names - config_names)
    spec = DatasetSpec.from_config({"train_data_dir": "d", "resolution": 512, "learning_rate": 1.0, "seed": 3})
    assert spec.train_data_dir == Path("d") and spec.seed == 3 and spec.resolution == 512
