"""`summarize`: buckets and the step count of a dataset, as sd-scripts counts them.

    samples per epoch  S = sum over images of repeats (class images: balanced to the training samples, see scan.py)
    batches per epoch  B = sum over buckets b of ceil(S_b / batch_size)   (floor with drop_last; a batch never mixes
                           buckets, so B >= ceil(S / batch_size) when there are several buckets)
    steps per epoch    N = ceil(B / (num_processes x gradient_accumulation_steps))   (sd-scripts' train_network.py)
    total steps        T = epochs x N, or max_train_steps when only that is given (then epochs = ceil(T / N)).
With neither epochs nor max_steps the default is 10 epochs; with both, epochs win (as in sd-scripts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lora_ext.errors import DatasetError
from lora_ext.train.dataset.buckets import assign_bucket
from lora_ext.train.dataset.images import probe_image
from lora_ext.train.dataset.records import DatasetReport, ImageRecord, SourceSummary
from lora_ext.train.dataset.spec import DatasetSpec

DEFAULT_EPOCHS = 10
_FALLBACK_RESOLUTION = 512
_MAX_FORMULA_BUCKETS = 8


def batch_count(samples_per_bucket: Sequence[int], batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch when each bucket is cut into batches of `batch_size` (last one partial unless drop_last)."""
    if drop_last:
        return sum(n // batch_size for n in samples_per_bucket)
    return sum(math.ceil(n / batch_size) for n in samples_per_bucket)


def record_size(record: ImageRecord, spec: DatasetSpec) -> tuple[int, int] | None:
    """Displayed size of a record: the scanned one, else read from the file header (None if unreadable)."""
    if record.size[0] > 0 and record.size[1] > 0:
        return record.size
    probe = probe_image(record.path, max_pixels=spec.max_image_pixels)
    return probe.size if probe.ok else None


def _sources_from_records(records: Sequence[ImageRecord]) -> list[SourceSummary]:
    out: dict[str, SourceSummary] = {}
    for r in records:
        s = out.get(r.source)
        if s is None:
            kind = "class" if r.is_class else "folder"
            s = out[r.source] = SourceSummary(Path(r.source).name, r.source, kind, 0, r.repeats, 0)
        s.images += 1
        s.samples += r.repeats
    return list(out.values())


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DatasetError(f"{name} must be a whole number >= 1, got {v!r}")


def summarize(
    records: Sequence[ImageRecord],
    spec: DatasetSpec,
    batch_size: int = 1,
    epochs: int | None = None,
    max_steps: int | None = None,
    grad_accum: int = 1,
    num_processes: int = 1,
    *,
    scan: DatasetReport | None = None,
    drop_last: bool = False,
) -> DatasetReport:
    """The full report: `scan`'s counts, problems and skipped files (when given) plus buckets and the steps formula.

    Never raises for the dataset's content (an empty dataset gives 0 steps and a problem line); raises
    `DatasetError` only for invalid numbers (batch_size, epochs, max_steps, grad_accum, num_processes < 1).
    """
    _check_positive(
        batch_size=batch_size, epochs=epochs, max_steps=max_steps, grad_accum=grad_accum, num_processes=num_processes
    )
    if scan is not None:
        report = replace(
            scan, problems=list(scan.problems), skipped=list(scan.skipped), sources=list(scan.sources), buckets={}
        )
    else:
        report = DatasetReport(
            images=sum(1 for r in records if not r.is_class),
            class_images=sum(1 for r in records if r.is_class),
            repeats_total=sum(r.repeats for r in records),
            sources=_sources_from_records(records),
        )
    problems = report.problems
    if spec.resolution is None:
        problems.append(f"resolution is not set: buckets below assume {_FALLBACK_RESOLUTION} (the SD1 default)")
        spec = replace(spec, resolution=_FALLBACK_RESOLUTION)
    params = spec.bucket_params()

    buckets: dict[tuple[int, int], int] = {}
    ar_errors: list[float] = []
    upscaled = own_small = 0
    for r in records:
        size = record_size(r, spec)
        if size is None:
            report.skipped.append((str(r.path), "unreadable when bucketing (changed since the scan?)"))
            continue
        choice = assign_bucket(size[0], size[1], params)
        buckets[choice.bucket] = buckets.get(choice.bucket, 0) + r.repeats
        ar_errors.append(abs(choice.ar_error))
        if choice.upscaled and params.enabled and params.no_upscale:
            upscaled += 1
        if choice.own and min(choice.bucket) < params.min_reso:
            own_small += 1
    report.buckets = dict(sorted(buckets.items()))
    report.mean_ar_error = sum(ar_errors) / len(ar_errors) if ar_errors else 0.0
    report.resolution = spec.resolution

    batches = batch_count(list(report.buckets.values()), batch_size, drop_last)
    per_update = num_processes * grad_accum
    steps_per_epoch = math.ceil(batches / per_update)
    if epochs is None and max_steps is None:
        epochs = DEFAULT_EPOCHS
    if epochs is not None:
        if max_steps is not None:
            problems.append(
                f"both epochs ({epochs}) and max_train_steps ({max_steps}) are set: epochs win, as in sd-scripts"
            )
        total = epochs * steps_per_epoch
    else:
        total = max_steps if steps_per_epoch else 0
        epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0

    report.batches_per_epoch = batches
    report.steps_per_epoch = steps_per_epoch
    report.total_steps = total
    report.epochs = epochs
    report.batch_size = batch_size
    report.gradient_accumulation_steps = grad_accum
    report.num_processes = num_processes
    report.formula = _formula(report, max_steps_given=max_steps is not None and total == max_steps, drop_last=drop_last)

    small = {b: n for b, n in report.buckets.items() if n < batch_size}
    if small:
        listed = ", ".join(f"{w}x{h} ({n})" for (w, h), n in small.items())
        problems.append(
            f"{len(small)} bucket(s) hold fewer samples than the batch size {batch_size}: {listed}; "
            + (
                "they are dropped (drop_last)"
                if drop_last
                else "their batches are smaller (a batch never mixes buckets)"
            )
        )
    if upscaled:
        problems.append(f"{upscaled} image(s) with an extreme aspect ratio are upscaled despite bucket_no_upscale")
    if own_small:
        problems.append(
            f"{own_small} image(s) are smaller than the buckets (min_bucket_reso {params.min_reso}): with "
            "bucket_no_upscale they train in their own smaller buckets"
        )
    if report.images and not total:
        problems.append("0 training steps: check the batch size, drop_last and the skipped files")
    return report


def _formula(report: DatasetReport, *, max_steps_given: bool, drop_last: bool) -> str:
    bs, parts = report.batch_size, []
    train, cls = report.train_samples, report.class_samples
    samples = train + cls
    parts.append(f"samples/epoch = {train} training" + (f" + {cls} class = {samples}" if cls else ""))
    rounding = "floor" if drop_last else "ceil"
    items = list(report.buckets.values())
    if len(items) <= 1:
        parts.append(f"batches/epoch = {rounding}({samples} / batch {bs}) = {report.batches_per_epoch}")
    else:
        terms = " + ".join(f"{rounding}({n}/{bs})" for n in items[:_MAX_FORMULA_BUCKETS])
        if len(items) > _MAX_FORMULA_BUCKETS:
            terms += f" + ... ({len(items) - _MAX_FORMULA_BUCKETS} more buckets)"
        parts.append(
            f"batches/epoch = sum over {len(items)} buckets of {rounding}(samples/batch {bs}) = {terms} = "
            f"{report.batches_per_epoch}"
        )
    parts.append(
        f"steps/epoch = ceil({report.batches_per_epoch} / ({report.num_processes} process(es) x "
        f"{report.gradient_accumulation_steps} grad accum)) = {report.steps_per_epoch}"
    )
    if max_steps_given:
        parts.append(
            f"total = max_train_steps = {report.total_steps} (= {report.epochs} epoch(s), the last may be partial)"
        )
    else:
        parts.append(f"total = {report.steps_per_epoch} x {report.epochs} epochs = {report.total_steps}")
    return "; ".join(parts)
