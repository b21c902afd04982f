"""The torch side: `TrainDataset` (one item per sample, repeats expanded) and `BucketBatchSampler`.

Sample indices: record i with `repeats` r owns r consecutive indices (records in order). Every random choice of a
sample (caption alternative, dropout, shuffle, flip, crop, zoom, jitter) depends only on (spec.seed, epoch, index),
so two runs, a resumed run and any number of DataLoader workers produce identical items. The epoch reaches the items
through `TrainDataset.set_epoch`: call it before creating the epoch's DataLoader iterator (with worker processes,
do not use `persistent_workers=True`, whose workers keep the epoch they were started with).

Batch order: each epoch the sampler shuffles every bucket's indices and cuts them into batches (a batch never mixes
buckets), then shuffles the list of batches, all from a generator seeded by (seed, epoch) (sd-scripts' scheme).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_ext.errors import DatasetError
from lora_ext.train.dataset.augment import (
    STREAM_CAPTION,
    STREAM_IMAGE,
    STREAM_SAMPLER,
    color_jitter,
    draw_augment,
    plan_crop,
    sample_rng,
)
from lora_ext.train.dataset.buckets import BucketChoice, assign_bucket
from lora_ext.train.dataset.captions import build_caption
from lora_ext.train.dataset.images import load_image
from lora_ext.train.dataset.records import ImageRecord
from lora_ext.train.dataset.spec import DatasetSpec
from lora_ext.train.dataset.summary import record_size

logger = logging.getLogger(__name__)


def _render(img: Image.Image, bucket: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """The `box` region of `img` scaled to `bucket` (W, H); an exact crop when no scaling is needed."""
    left, top, right, bottom = box
    ints = [round(v) for v in box]
    if (
        all(abs(v - i) < 1e-6 for v, i in zip(box, ints))
        and ints[2] - ints[0] == bucket[0]
        and ints[3] - ints[1] == bucket[1]
    ):
        return img.crop(tuple(ints))
    return img.resize(bucket, Image.Resampling.LANCZOS, box=(left, top, right, bottom))


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset of training samples.

    Item `i` is a dict:
      pixel_values: float32 tensor [3, H, W] in [-1, 1] (H, W = the bucket's), caption: str (processed),
      is_class: bool, bucket: (W, H), index: i, record_index: int, flipped: bool,
      original_size: (H, W) of the upright source image, crop_top_left: (top, left) of the crop in the scaled image
      (after the flip, sd-scripts' convention), target_size: (H, W) = the bucket (SDXL's size conditioning),
      input_ids: tokenize(caption) when a `tokenize` callable is given.
    `spec.resolution` must be set (`DatasetSpec.resolved(arch)`).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        spec: DatasetSpec,
        tokenize: Callable[[str], Any] | None = None,
    ) -> None:
        if spec.resolution is None:
            raise DatasetError("resolution is not set: build the dataset from DatasetSpec.resolved(arch)")
        self.records: list[ImageRecord] = list(records)
        self.spec = spec
        self.tokenize = tokenize
        self.epoch = 0
        self._background = spec.background_rgb
        params = spec.bucket_params()
        self.choices: list[BucketChoice] = []
        self._sizes: list[tuple[int, int]] = []
        for r in self.records:
            size = record_size(r, spec)
            if size is None:
                raise DatasetError(f"{r.path}: unreadable image; scan the dataset again (it changed since the scan)")
            self._sizes.append(size)
            self.choices.append(assign_bucket(size[0], size[1], params))
        self._slot_record: list[int] = [i for i, r in enumerate(self.records) for _ in range(r.repeats)]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, ri in enumerate(self._slot_record):
            by_bucket.setdefault(self.choices[ri].bucket, []).append(index)
        self.buckets: dict[tuple[int, int], list[int]] = dict(sorted(by_bucket.items()))

    def __len__(self) -> int:
        return len(self._slot_record)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random choices the items use (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def record_index(self, index: int) -> int:
        """The record a sample index belongs to."""
        return self._slot_record[index]

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.choices[self._slot_record[index]].bucket

    def caption_for(self, index: int, epoch: int | None = None) -> str:
        """The processed caption of sample `index` in `epoch` (default: the current epoch)."""
        record = self.records[self._slot_record[index]]
        spec = self.spec
        rng = sample_rng(spec.seed, self.epoch if epoch is None else epoch, index, STREAM_CAPTION)
        return build_caption(
            record.caption,
            record.alt_captions,
            rng,
            shuffle=spec.shuffle_caption,
            keep_tokens=spec.keep_tokens,
            dropout=spec.caption_dropout,
            trigger="" if record.is_class else spec.trigger_word,
        )

    def load_pixels(self, record_index: int, flip: bool = False) -> torch.Tensor:
        """Un-augmented pixels of a record (centre crop to its bucket), float32 [3, H, W] in [-1, 1]: for latent
        caching. `flip` gives the mirrored image."""
        img = load_image(self.records[record_index].path, self._background, self.spec.max_image_pixels)
        choice = self.choices[record_index]
        plan = plan_crop(img.size, choice.bucket)
        out = _render(img, choice.bucket, plan.box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(np.asarray(out, dtype=np.float32) / 255.0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._slot_record):
            raise IndexError(f"sample index {index} out of range 0..{len(self._slot_record) - 1}")
        ri = self._slot_record[index]
        record, choice = self.records[ri], self.choices[ri]
        spec = self.spec
        aug = draw_augment(
            sample_rng(spec.seed, self.epoch, index, STREAM_IMAGE),
            flip_aug=spec.flip_aug,
            random_crop=spec.random_crop,
            crop_zoom=spec.crop_zoom,
            color_jitter=spec.color_jitter,
        )
        img = load_image(record.path, self._background, spec.max_image_pixels)
        bw, bh = choice.bucket
        plan = plan_crop(
            img.size,
            choice.bucket,
            zoom=aug.zoom,
            fx=aug.crop_fx,
            fy=aug.crop_fy,
            no_upscale=spec.enable_bucket and spec.bucket_no_upscale,
        )
        out = _render(img, choice.bucket, plan.box)
        top, left = plan.top_left
        if aug.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scaled_w = round(img.size[0] * plan.scale)
            left = max(0, scaled_w - left - bw)
        arr = np.asarray(out, dtype=np.float32) / 255.0
        if aug.jitters:
            arr = color_jitter(arr, aug.brightness, aug.contrast, aug.saturation)
        caption = self.caption_for(index)
        item: dict[str, Any] = {
            "pixel_values": _to_tensor(arr),
            "caption": caption,
            "is_class": record.is_class,
            "bucket": (bw, bh),
            "index": index,
            "record_index": ri,
            "flipped": aug.flip,
            "original_size": (img.size[1], img.size[0]),
            "crop_top_left": (top, left),
            "target_size": (bh, bw),
        }
        if self.tokenize is not None:
            item["input_ids"] = self.tokenize(caption)
        return item


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """float32 [H, W, 3] in [0, 1] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) * 2.0 - 1.0


def collate_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Items of one bucket -> a batch: pixel_values [B, 3, H, W]; is_class, flipped: bool [B]; index, record_index:
    long [B]; original_size, crop_top_left, target_size: long [B, 2]; caption: list[str]; bucket: (W, H);
    input_ids: stacked when the items hold tensors, else a list."""
    if not items:
        raise ValueError("empty batch")
    buckets = {tuple(it["bucket"]) for it in items}
    if len(buckets) != 1:
        raise DatasetError(f"a batch mixes buckets {sorted(buckets)}: use BucketBatchSampler")
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "is_class": torch.tensor([bool(it["is_class"]) for it in items]),
        "flipped": torch.tensor([bool(it["flipped"]) for it in items]),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        "record_index": torch.tensor([int(it["record_index"]) for it in items], dtype=torch.long),
        "bucket": buckets.pop(),
    }
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([list(it[key]) for it in items], dtype=torch.long)
    if "input_ids" in items[0]:
        ids = [it["input_ids"] for it in items]
        batch["input_ids"] = torch.stack(ids) if all(isinstance(x, torch.Tensor) for x in ids) else ids
    return batch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of sample indices, each from one bucket, in an order fixed by (seed, epoch); resumable mid-epoch.

    `dataset` needs `.buckets`: {(W, H): [sample indices]} (a `TrainDataset`). `len()` is the full epoch's batch
    count. Resume: `state_dict()` records the epoch and how many of its batches were consumed; after
    `load_state_dict(state)` the next iteration of that epoch yields exactly the remaining batches.
    `batches_consumed` counts batches handed out by the iterator, which equals the batches trained on with
    `num_workers=0`; with worker prefetching pass the trained count to `state_dict(batches_consumed=...)`.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        buckets: Mapping[tuple[int, int], Sequence[int]] = dataset.buckets
        self._buckets = [(tuple(k), list(v)) for k, v in sorted(buckets.items())]
        self.batch_size = batch_size
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._skip = 0  # batches of `epoch` to skip on the next iteration (set by load_state_dict)
        self._consumed = 0

    @property
    def fingerprint(self) -> str:
        """Digest of the bucket layout and batching settings: a resumed run must see the same one."""
        layout = [[*k, len(v)] for k, v in self._buckets]
        raw = json.dumps([layout, self.batch_size, self.drop_last, self.seed], separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        n = self.batch_size
        if self.drop_last:
            return sum(len(v) // n for _, v in self._buckets)
        return sum(math.ceil(len(v) / n) for _, v in self._buckets)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (0-based). Changing it drops a pending resume position of another epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._skip = 0
            self._consumed = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order (pure function of the layout, seed and epoch)."""
        rng = sample_rng(self.seed, epoch, 0, STREAM_SAMPLER)
        out: list[list[int]] = []
        n = self.batch_size
        for _, indices in self._buckets:
            order = [indices[i] for i in rng.permutation(len(indices))]
            stop = len(order) - len(order) % n if self.drop_last else len(order)
            out.extend(order[i : i + n] for i in range(0, stop, n))
        perm = rng.permutation(len(out))
        return [out[i] for i in perm]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        start, self._skip = self._skip, 0
        self._consumed = start
        for batch in batches[start:]:
            self._consumed += 1
            yield list(batch)

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Resume position: {"epoch", "batches_consumed", "num_batches", "seed", "batch_size", "drop_last",
        "fingerprint"} (JSON-ready)."""
        consumed = self._consumed if batches_consumed is None else int(batches_consumed)
        return {
            "epoch": self.epoch,
            "batches_consumed": consumed,
            "num_batches": len(self),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Continue at `state`'s epoch after its consumed batches. With `strict`, a different dataset layout or
        batching raises `DatasetError` (the resume would not be exact); otherwise it is logged and the position is
        clamped to this epoch's length."""
        if state.get("fingerprint") != self.fingerprint:
            msg = (
                f"the dataset or batching changed since the checkpoint (layout {state.get('fingerprint')} vs "
                f"{self.fingerprint}, {state.get('num_batches')} vs {len(self)} batches per epoch): resuming would "
                "not continue the same epoch exactly"
            )
            if strict:
                raise DatasetError(msg + "; restore the dataset and settings, or resume non-strictly")
            logger.warning("%s", msg)
        self.epoch = int(state["epoch"])
        consumed = int(state["batches_consumed"])
        self._skip = self._consumed = max(0, min(consumed, len(self)))
