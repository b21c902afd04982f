"""Records of a scanned dataset: one `ImageRecord` per usable image, and the `DatasetReport` shown by `--dry-run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MAX_LISTED = 20  # skipped files / examples listed by `lines()` before "... and N more"


@dataclass(frozen=True)
class ImageRecord:
    """One usable image.

    caption: the stored caption (from its caption file, metadata, or the fallback prompt); trigger word, shuffling and
      dropout are applied per sample later. alt_captions: other captions to pick from per sample (metadata lists).
    repeats: samples per epoch (kohya `N_` folder count; for class images the prior-preservation balance).
    source: the folder or metadata file it came from. size: displayed (W, H) after EXIF orientation, (0, 0) if unknown.
    """

    path: Path
    caption: str
    repeats: int
    is_class: bool
    source: str
    size: tuple[int, int] = (0, 0)
    alt_captions: tuple[str, ...] = ()


@dataclass
class SourceSummary:
    """One folder / metadata file of the dataset. `name` is the key of sd-scripts' ss_dataset_dirs."""

    name: str
    path: str
    kind: str  # "folder" | "repeat_folder" | "metadata" | "instance" | "class"
    images: int
    repeats: int
    samples: int
    missing_captions: int = 0


@dataclass
class DatasetReport:
    """Summary of a dataset. `scan_dataset` fills the counts, problems and skipped files; `summarize` adds buckets and
    steps. `buckets` maps (W, H) -> samples per epoch (repeats included). `skipped` = [(path, reason)]."""

    images: int = 0
    class_images: int = 0
    repeats_total: int = 0
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)
    steps_per_epoch: int = 0
    total_steps: int = 0
    formula: str = ""
    problems: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sources: list[SourceSummary] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    epochs: int = 0
    batches_per_epoch: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    resolution: int | None = None
    mean_ar_error: float = 0.0
    class_images_missing: int = 0

    @property
    def trainable(self) -> bool:
        """True when there is something to train: at least one training image and one step."""
        return self.images > 0 and self.total_steps > 0

    @property
    def train_samples(self) -> int:
        return sum(s.samples for s in self.sources if s.kind != "class")

    @property
    def class_samples(self) -> int:
        return sum(s.samples for s in self.sources if s.kind == "class")

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """sd-scripts' ss_dataset_dirs: {name: {"n_repeats": N, "img_count": K}}."""
        return {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in self.sources}

    def bucket_info(self) -> dict[str, Any]:
        """sd-scripts' ss_bucket_info: {"buckets": {i: {"resolution": [W, H], "count": n}}, "mean_img_ar_error": x}."""
        buckets = {
            str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(sorted(self.buckets.items()))
        }
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (buckets as a list of {"resolution": [W, H], "count": n}, skipped as {"path", "reason"})."""
        return {
            "images": self.images,
            "class_images": self.class_images,
            "repeats_total": self.repeats_total,
            "train_samples": self.train_samples,
            "class_samples": self.class_samples,
            "buckets": [{"resolution": [w, h], "count": n} for (w, h), n in sorted(self.buckets.items())],
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_processes": self.num_processes,
            "resolution": self.resolution,
            "mean_ar_error": self.mean_ar_error,
            "formula": self.formula,
            "problems": list(self.problems),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "sources": [vars(s).copy() for s in self.sources],
            "dataset_dirs": self.dataset_dirs(),
            "class_images_missing": self.class_images_missing,
            "trainable": self.trainable,
        }

    def lines(self) -> list[str]:
        """Human summary for `--dry-run`."""
        out = ["Dataset"]
        cls = f" + {self.class_images} class images" if self.class_images or self.class_samples else ""
        out.append(f"  images: {self.images}{cls}")
        for s in self.sources:
            if s.kind == "class":
                detail = f"{s.images} class images -> {s.samples} samples/epoch (balanced to the training samples)"
            else:
                detail = f"{s.images} images x {s.repeats} repeats = {s.samples} samples/epoch"
            out.append(f"    {s.name} [{s.kind}]: {detail}")
        samples = f"{self.train_samples}"
        if self.class_samples:
            samples += f" + {self.class_samples} class = {self.train_samples + self.class_samples}"
        out.append(f"  samples per epoch (repeats included): {samples}")
        if self.resolution is not None:
            out.append(f"  resolution: {self.resolution}")
        if self.buckets:
            listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
            out.append(f"  buckets (WxH: samples): {listed}")
        if self.formula:
            out.append(f"  batches per epoch: {self.batches_per_epoch} (batch size {self.batch_size})")
            out.append(f"  steps per epoch: {self.steps_per_epoch}")
            out.append(f"  total steps: {self.total_steps} ({self.epochs} epochs)")
            out.append(f"  formula: {self.formula}")
        if self.skipped:
            out.append(f"  skipped files ({len(self.skipped)}):")
            out.extend(f"    {p}: {r}" for p, r in self.skipped[:_MAX_LISTED])
            if len(self.skipped) > _MAX_LISTED:
                out.append(f"    ... and {len(self.skipped) - _MAX_LISTED} more")
        if self.problems:
            out.append(f"  problems ({len(self.problems)}):")
            out.extend(f"    - {p}" for p in self.problems)
        else:
            out.append("  problems: none")
        return out
