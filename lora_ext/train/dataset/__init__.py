"""Training datasets: from folders of images and captions to deterministic, bucketed training batches.

    spec = DatasetSpec(train_data_dir="data", resolution=512, ...)      # spec.py: settings, named as in TrainConfig
    records, scan = scan_dataset(spec, decode=True)                     # scan.py: images, captions, repeats, problems
    report = summarize(records, spec, batch_size=2, epochs=10, scan=scan)  # summary.py: buckets + steps formula
    print("\\n".join(report.lines()))                                     # the --dry-run summary
    ds = TrainDataset(records, spec, tokenize)                          # torch_dataset.py
    sampler = BucketBatchSampler(ds, batch_size=2, seed=spec.seed)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch)

Other modules: images.py (decoding rules), captions.py, buckets.py, augment.py, class_images.py (DreamBooth).
"""

from lora_ext.train.dataset.augment import AugmentParams, CropPlan, color_jitter, draw_augment, plan_crop, sample_rng
from lora_ext.train.dataset.buckets import BucketChoice, BucketParams, assign_bucket, cover_size, make_buckets
from lora_ext.train.dataset.captions import apply_trigger, build_caption, read_caption_file, split_tags, tag_counts
from lora_ext.train.dataset.class_images import GenerateClassImages, ensure_class_images, missing_class_images
from lora_ext.train.dataset.images import IMAGE_EXTENSIONS, ImageProbe, load_image, probe_image, to_rgb
from lora_ext.train.dataset.records import DatasetReport, ImageRecord, SourceSummary
from lora_ext.train.dataset.scan import scan_dataset
from lora_ext.train.dataset.spec import (
    DatasetSpec,
    augmentation_is_random,
    caption_is_random,
    default_resolution,
    latent_cache_blockers,
    parse_background,
)
from lora_ext.train.dataset.summary import DEFAULT_EPOCHS, batch_count, summarize
from lora_ext.train.dataset.torch_dataset import BucketBatchSampler, TrainDataset, collate_batch

__all__ = [
    "DEFAULT_EPOCHS",
    "IMAGE_EXTENSIONS",
    "AugmentParams",
    "BucketBatchSampler",
    "BucketChoice",
    "BucketParams",
    "CropPlan",
    "DatasetReport",
    "DatasetSpec",
    "GenerateClassImages",
    "ImageProbe",
    "ImageRecord",
    "SourceSummary",
    "TrainDataset",
    "apply_trigger",
    "assign_bucket",
    "augmentation_is_random",
    "batch_count",
    "build_caption",
    "caption_is_random",
    "collate_batch",
    "color_jitter",
    "cover_size",
    "default_resolution",
    "draw_augment",
    "ensure_class_images",
    "latent_cache_blockers",
    "load_image",
    "make_buckets",
    "missing_class_images",
    "parse_background",
    "plan_crop",
    "probe_image",
    "read_caption_file",
    "sample_rng",
    "scan_dataset",
    "split_tags",
    "summarize",
    "tag_counts",
    "to_rgb",
]
