"""TrainDataset items, caption processing, augmentations, determinism and the resumable bucket sampler."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ext.errors import DatasetError
from lora_ext.train.dataset import (
    BucketBatchSampler,
    DatasetSpec,
    TrainDataset,
    apply_trigger,
    augmentation_is_random,
    caption_is_random,
    collate_batch,
    color_jitter,
    latent_cache_blockers,
    plan_crop,
    scan_dataset,
)

REPO = Path(__file__).resolve().parents[2]


def _halves(path: Path, w: int, h: int) -> None:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (128, 64), (64, 128), (96, 64), (64, 64), (128, 96)]
    for i, (w, h) in enumerate(sizes):
        folder = root / ("3_subject" if i % 2 else "1_style")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"tag{i}, red, blue, green, yellow", encoding="utf-8")


def _spec(root: Path, **kw: object) -> DatasetSpec:
    base: dict[str, object] = {
        "train_data_dir": root,
        "resolution": 64,
        "min_bucket_reso": 32,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 32,
        "seed": 7,
    }
    base.update(kw)
    return DatasetSpec(**base)  # type: ignore[arg-type]


ALL_AUG = {
    "flip_aug": True,
    "random_crop": True,
    "crop_zoom": 0.4,
    "color_jitter": 0.2,
    "shuffle_caption": True,
    "keep_tokens": 1,
    "caption_dropout": 0.2,
    "trigger_word": "zkw",
}


def _digest(ds: TrainDataset, epochs: tuple[int, ...] = (0, 1)) -> str:
    h = hashlib.sha256()
    for epoch in epochs:
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            h.update(item["pixel_values"].numpy().tobytes())
            h.update(item["caption"].encode())
            h.update(repr((item["bucket"], item["flipped"], item["crop_top_left"])).encode())
    return h.hexdigest()


def test_items_shape_range_and_collate(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    spec = _spec(tmp_path, **ALL_AUG)
    records, _ = scan_dataset(spec)
    ds = TrainDataset(records, spec, tokenize=lambda s: torch.tensor([len(s)]))
    assert len(ds) == sum(r.repeats for r in records) == 3 * 1 + 3 * 3
    for i in range(len(ds)):
        item = ds[i]
        w, h = item["bucket"]
        assert item["pixel_values"].shape == (3, h, w) and item["pixel_values"].dtype == torch.float32
        assert float(item["pixel_values"].min()) >= -1.0 and float(item["pixel_values"].max()) <= 1.0
        assert item["target_size"] == (h, w) and item["index"] == i
        assert item["original_size"] == records[item["record_index"]].size[::-1]
    sampler = BucketBatchSampler(ds, batch_size=2, seed=spec.seed)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch)
    seen = []
    for batch in loader:
        b, _, h, w = batch["pixel_values"].shape
        assert (w, h) == batch["bucket"] and batch["input_ids"].shape == (b, 1) and len(batch["caption"]) == b
        assert batch["original_size"].shape == (b, 2)
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    with pytest.raises(DatasetError, match="mixes buckets"):
        collate_batch([ds[0], next(ds[i] for i in range(len(ds)) if ds.bucket_of(i) != ds.bucket_of(0))])


def test_exact_determinism_across_runs_and_processes(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    spec = _spec(tmp_path, **ALL_AUG)
    first = _digest(TrainDataset(scan_dataset(spec)[0], spec))
    second = _digest(TrainDataset(scan_dataset(spec)[0], spec))
    assert first == second
    # reading the items in another order gives the same items
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    ds.set_epoch(1)
    backwards = {i: ds[i]["pixel_values"] for i in reversed(range(len(ds)))}
    assert all(torch.equal(backwards[i], ds[i]["pixel_values"]) for i in range(len(ds)))
    # another seed or epoch changes the augmentations (the test can fail)
    assert _digest(TrainDataset(scan_dataset(spec)[0], _spec(tmp_path, **{**ALL_AUG, "seed": 8}))) != first
    assert _digest(TrainDataset(scan_dataset(spec)[0], spec), epochs=(2, 3)) != first
    # a fresh interpreter with another hash seed gives the same bytes
    code = textwrap.dedent(f"""
        import hashlib, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from tests.train.test_dataset_torch import ALL_AUG, _digest, _spec
        from lora_ext.train.dataset import TrainDataset, scan_dataset
        spec = _spec(Path({str(tmp_path)!r}), **ALL_AUG)
        print(_digest(TrainDataset(scan_dataset(spec)[0], spec)))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == first


def test_sampler_batches_and_resume(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    spec = _spec(tmp_path)
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    full = list(sampler)
    assert len(full) == len(sampler) == sum(-(-len(v) // 2) for v in ds.buckets.values())
    assert sorted(i for b in full for i in b) == list(range(len(ds)))
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in full)
    assert full == list(BucketBatchSampler(ds, batch_size=2, seed=3))  # deterministic
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != full and sorted(i for b in epoch1 for i in b) == list(range(len(ds)))

    # consume 3 batches of epoch 1, save, resume in a fresh sampler: the remaining batches are identical
    run = BucketBatchSampler(ds, batch_size=2, seed=3)
    run.set_epoch(1)
    it = iter(run)
    consumed = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 3
    resumed = BucketBatchSampler(ds, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert consumed + rest == epoch1
    assert list(resumed) == epoch1  # a second pass over the epoch is whole again
    resumed.set_epoch(2)
    assert list(resumed) == BucketBatchSampler(ds, 2, 3).batches(2)

    # a changed dataset layout refuses an exact resume
    other = BucketBatchSampler(ds, batch_size=3, seed=3)
    with pytest.raises(DatasetError, match="changed since the checkpoint"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    # drop_last keeps only full batches
    dl = BucketBatchSampler(ds, batch_size=4, seed=3, drop_last=True)
    assert all(len(b) == 4 for b in dl) and len(list(dl)) == len(dl)


def test_sampler_resume_through_dataloader(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    spec = _spec(tmp_path, flip_aug=True)
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=1)
    reference = [
        b["index"].tolist() for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch)
    ]
    sampler2 = BucketBatchSampler(ds, batch_size=2, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler2, collate_fn=collate_batch)
    got = []
    for k, batch in enumerate(loader):
        got.append(batch["index"].tolist())
        if k == 1:
            break
    state = sampler2.state_dict()
    assert state["batches_consumed"] == 2  # num_workers=0: the sampler is pulled one batch at a time
    sampler3 = BucketBatchSampler(ds, batch_size=2, seed=1)
    sampler3.load_state_dict(state)
    got += [
        b["index"].tolist() for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler3, collate_fn=collate_batch)
    ]
    assert got == reference


def test_caption_rules(tmp_path: Path) -> None:
    _make_dataset(tmp_path)
    spec = _spec(tmp_path, shuffle_caption=True, keep_tokens=2, trigger_word="zkw")
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    orders = set()
    for epoch in range(6):
        for i in range(len(ds)):
            cap = ds.caption_for(i, epoch)
            tags = cap.split(", ")
            base = ds.records[ds.record_index(i)].caption.split(", ")
            assert tags[0] == "zkw" and tags[1:3] == base[:2]  # trigger, then the kept tokens
            assert sorted(tags[3:]) == sorted(base[2:])
            orders.add(tuple(tags[3:]))
    assert len(orders) == 6  # all 3! orders of the 3 flexible tags occur: they really are shuffled

    drop = _spec(tmp_path, caption_dropout=0.3, trigger_word="zkw")
    ds = TrainDataset(scan_dataset(drop)[0], drop)
    caps = [ds.caption_for(i, e) for e in range(200) for i in range(len(ds))]
    rate = sum(c == "" for c in caps) / len(caps)
    assert abs(rate - 0.3) < 0.04  # 2400 draws: sd ~ 0.009
    assert all(c == "" or c.startswith("zkw, tag") for c in caps)  # the whole caption, trigger included, drops
    everything = _spec(tmp_path, caption_dropout=1.0)
    assert {TrainDataset(scan_dataset(everything)[0], everything).caption_for(0, e) for e in range(5)} == {""}
    plain = _spec(tmp_path)
    ds = TrainDataset(scan_dataset(plain)[0], plain)
    assert ds.caption_for(0) == ds.records[0].caption  # untouched text without options


def test_apply_trigger() -> None:
    assert apply_trigger("red, blue", "zkw") == "zkw, red, blue"
    assert apply_trigger("red, ZKW, blue", "zkw") == "zkw, red, blue"  # moved first, not duplicated
    assert apply_trigger("a photo of zkw dog", "zkw") == "a photo of zkw dog"  # already in a sentence
    assert apply_trigger("a photo of zkwx", "zkw") == "zkw, a photo of zkwx"  # only whole words count
    assert apply_trigger("", "zkw") == "zkw" and apply_trigger("red", "") == "red"


def test_class_images_get_no_trigger(tmp_path: Path) -> None:
    _halves(tmp_path / "inst" / "a.png", 64, 64)
    _halves(tmp_path / "cls" / "c.png", 64, 64)
    spec = _spec(
        tmp_path / "x",
        train_data_dir=None,
        instance_dir=tmp_path / "inst",
        instance_prompt="photo of zkw",
        class_dir=tmp_path / "cls",
        class_prompt="photo of a dog",
        trigger_word="zkw",
    )
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    caps = {ds[i]["is_class"]: ds[i]["caption"] for i in range(len(ds))}
    assert caps == {False: "photo of zkw", True: "photo of a dog"}


def test_flip_and_centre_crop_pixels(tmp_path: Path) -> None:
    _halves(tmp_path / "a.png", 128, 64)  # exactly the 128x64 bucket below: no resampling
    spec = _spec(tmp_path, resolution=96, max_bucket_reso=192, flip_aug=True, bucket_no_upscale=True)
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    assert ds.choices[0].bucket == (128, 64)
    flips = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        px = item["pixel_values"]
        left_red = float(px[0, :, :64].mean()) == 1.0 and float(px[2, :, :64].mean()) == -1.0
        right_red = float(px[0, :, 64:].mean()) == 1.0 and float(px[2, :, 64:].mean()) == -1.0
        assert left_red != right_red
        assert right_red == item["flipped"]
        flips.append(item["flipped"])
    assert 8 < sum(flips) < 32  # about half


def test_crop_zoom_magnifies_the_centre(tmp_path: Path) -> None:
    # 256x256 image: a 64x64 white square in the middle of black; bucket 64x64 (resolution 64)
    arr = np.zeros((256, 256, 3), dtype=np.uint8)
    arr[96:160, 96:160] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    spec = _spec(tmp_path, crop_zoom=0.5, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    ds = TrainDataset(scan_dataset(spec)[0], spec)
    seen = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        white = float((ds[0]["pixel_values"][0] > 0).float().mean())
        seen.append(white)
    # without zoom the square covers (64 * 64/256)^2 / 64^2 = 1/16 of the crop; zoom z in [1, 2) gives z^2 / 16
    assert min(seen) >= 1 / 16 - 0.02 and max(seen) <= 4 / 16 + 0.02
    assert max(seen) - min(seen) > 0.03  # the zoom varies per epoch
    no_zoom = _spec(tmp_path, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    px = TrainDataset(scan_dataset(no_zoom)[0], no_zoom)[0]["pixel_values"]
    assert abs(float((px[0] > 0).float().mean()) - 1 / 16) < 0.01


def test_plan_crop_by_hand() -> None:
    # 1000x500 into 512x256: cover scale 0.512; zoom 2 -> window 500x250, centred at (250, 125)
    plan = plan_crop((1000, 500), (512, 256), zoom=2.0)
    assert plan.box == pytest.approx((250.0, 125.0, 750.0, 375.0)) and plan.scale == pytest.approx(1.024)
    # with no upscaling the zoom stops at scale 1: window 512x256
    plan = plan_crop((1000, 500), (512, 256), zoom=2.0, no_upscale=True)
    assert plan.scale == pytest.approx(1.0) and plan.box == pytest.approx((244.0, 122.0, 756.0, 378.0))
    # random position fx=0, fy=1 of a 1000x600 image in a 512x256 bucket: cover 0.512 -> window 1000x500
    plan = plan_crop((1000, 600), (512, 256), fx=0.0, fy=1.0)
    assert plan.box == pytest.approx((0.0, 100.0, 1000.0, 600.0)) and plan.top_left == (51, 0)


def test_color_jitter_matches_hand_formula() -> None:
    rgb = np.array([[[0.2, 0.4, 0.6], [0.9, 0.1, 0.5]]], dtype=np.float32)
    b, c, s = 1.1, 0.8, 1.3

    def luma(p: list[float]) -> float:
        return 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]

    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    px = [[clip(v * b) for v in p] for p in rgb[0].tolist()]
    mean = sum(luma(p) for p in px) / len(px)
    px = [[clip((v - mean) * c + mean) for v in p] for p in px]
    px = [[clip((v - luma(p)) * s + luma(p)) for v in p] for p in px]
    np.testing.assert_allclose(color_jitter(rgb, b, c, s)[0], np.array(px), atol=1e-6)
    np.testing.assert_allclose(color_jitter(rgb, 1.0, 1.0, 1.0), rgb, atol=1e-7)


def test_cacheability_flags(tmp_path: Path) -> None:
    base = _spec(tmp_path)
    assert not augmentation_is_random(base) and latent_cache_blockers(base) == []
    assert not caption_is_random(base)
    spec = _spec(tmp_path, flip_aug=True, color_jitter=0.1, caption_dropout=0.1)
    assert augmentation_is_random(spec) and latent_cache_blockers(spec) == ["flip_aug", "color_jitter"]
    assert caption_is_random(spec)
    # without random augmentation, items equal the un-augmented pixels used for latent caching
    _halves(tmp_path / "a.png", 100, 60)
    ds = TrainDataset(scan_dataset(base)[0], base)
    assert torch.equal(ds[0]["pixel_values"], ds.load_pixels(0))
    assert torch.equal(ds.load_pixels(0, flip=True), ds.load_pixels(0).flip(-1))
