"""`scan_dataset`: find the images of a `DatasetSpec`, their captions and repeats, and report every problem.

Layouts (see `DatasetSpec` for the fields):
  * train_data_dir/img.png + img.txt: images directly inside are used once per epoch.
  * train_data_dir/10_name/...: kohya repeat folders, images used N times per epoch; an image without a caption file
    gets the folder's class tokens ("name", as sd-scripts does). A subfolder without the `N_` prefix is used once
    per epoch and reported with the rename that sets its repeats (sd-scripts silently ignores such folders, the
    classic cause of "zero steps"); `0_name` folders are reported and not used. Hidden folders (".x") are ignored;
    deeper subfolders are reported, not scanned.
  * metadata.jsonl (`metadata_file`, or found at the top of train_data_dir): one JSON object per line with
    `file_name` (relative to the file's folder) and the caption in `text`; `caption` or `prompt` are accepted in its
    place (first present wins), and a list of strings means "pick one per sample" as diffusers does. Images of that
    folder not listed in it are reported and not used.
  * instance_dir (+ instance_prompt as the caption of uncaptioned images), class_dir (+ class_prompt): DreamBooth.
    Class images are balanced to the training samples per epoch as sd-scripts balances regularisation images: with
    T training samples (repeats included) and C class images, C <= T gives each class image T // C repeats and the
    first T % C one more; C > T uses only the first T. `num_class_images` > 0 caps C (as diffusers does) and reports
    how many are missing (`ensure_class_images` generates them).
Caption files: same stem + `caption_extension`, else the other of .txt/.caption; UTF-8; the first line (as sd-scripts).
Images: .png .jpg .jpeg .webp .bmp (any case), probed by `probe_image`; failures are listed in `skipped`, never raised.
Order is deterministic: sources in the order above, files sorted by name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_ext.errors import DatasetError
from lora_ext.train.dataset.captions import find_caption_file, read_caption_file, tag_counts
from lora_ext.train.dataset.images import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    is_image_name,
    probe_image,
)
from lora_ext.train.dataset.records import DatasetReport, ImageRecord, SourceSummary
from lora_ext.train.dataset.spec import DatasetSpec

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
METADATA_CAPTION_KEYS = ("text", "caption", "prompt")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_EXAMPLES = 3


def _examples(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (f" and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else "")


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


@dataclass
class _Scan:
    spec: DatasetSpec
    decode: bool
    records: list[ImageRecord] = field(default_factory=list)
    class_records: list[ImageRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sources: list[SourceSummary] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    seen: set[Path] = field(default_factory=set)
    with_caption: int = 0
    class_found: int = 0

    @property
    def min_side(self) -> int:
        spec = self.spec
        return spec.bucket_reso_steps if spec.enable_bucket and spec.bucket_no_upscale else 1

    def _name(self, base: str) -> str:
        taken = {s.name for s in self.sources}
        name, k = base, 2
        while name in taken:
            name, k = f"{base} ({k})", k + 1
        return name

    def _probe(self, path: Path) -> tuple[int, int] | None:
        if path.name.startswith("."):
            self.skipped.append((str(path), "hidden file (e.g. macOS '._' metadata), not an image"))
            return None
        probe = probe_image(path, max_pixels=self.spec.max_image_pixels, min_side=self.min_side, decode=self.decode)
        if not probe.ok:
            self.skipped.append((str(path), probe.reason))
            return None
        return probe.size

    def _list_dir(self, folder: Path) -> tuple[list[Path], list[Path], dict[str, int]]:
        """(images, subfolders, unsupported-extension counts) of one folder, sorted by name."""
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as err:
            raise DatasetError(f"cannot list the folder {folder}: {err.strerror or err}") from err
        images, subdirs, unsupported = [], [], {}
        for p in entries:
            if p.is_dir():
                if not p.name.startswith("."):
                    subdirs.append(p)
            elif is_image_name(p):
                images.append(p)
            elif p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
                unsupported[p.suffix.lower()] = unsupported.get(p.suffix.lower(), 0) + 1
        return images, subdirs, unsupported

    def _report_unsupported(self, folder: Path, unsupported: dict[str, int]) -> None:
        if unsupported:
            counts = ", ".join(f"{n} {ext}" for ext, n in sorted(unsupported.items()))
            self.problems.append(
                f"{folder}: {counts} file(s) ignored: supported image types are {' '.join(IMAGE_EXTENSIONS)}; "
                "convert them (e.g. to PNG)"
            )

    def scan_folder(
        self,
        folder: Path,
        *,
        kind: str,
        repeats: int,
        fallback: str,
        fallback_label: str,
        is_class: bool = False,
        name: str | None = None,
        images: list[Path] | None = None,
    ) -> tuple[list[ImageRecord], SourceSummary]:
        """Records of the images of one folder (listed here unless `images` is given) and its summary."""
        if images is None:
            images, subdirs, unsupported = self._list_dir(folder)
            self._report_unsupported(folder, unsupported)
            if subdirs:
                self.problems.append(
                    f"subfolders of {folder} are not scanned ({_examples(d.name for d in subdirs)}): move their "
                    "images up or into their own N_name folder"
                )
        out: list[ImageRecord] = []
        missing: list[str] = []
        captions: list[str] = []
        for path in images:
            key = _resolved(path)
            if key in self.seen:
                continue
            size = self._probe(path)
            if size is None:
                continue
            self.seen.add(key)
            cap_path = find_caption_file(path, self.spec.caption_extension)
            if cap_path is None:
                caption = fallback
                missing.append(path.name)
            else:
                cap = read_caption_file(cap_path)
                caption = cap.text
                if cap.note:
                    self.problems.append(f"caption file {cap_path}: {cap.note}")
                if not is_class:
                    self.with_caption += 1
            captions.append(caption)
            out.append(ImageRecord(path, caption, repeats, is_class, str(folder), size))
        src_name = self._name(name or folder.name)
        if missing:
            what = f"use {fallback_label} {fallback!r}" if fallback else "train with an empty caption"
            if self.spec.trigger_word and not is_class:
                what += f" (plus the trigger word {self.spec.trigger_word!r})"
            self.problems.append(
                f"{len(missing)} of {len(out)} images in {folder} have no caption file "
                f"({self.spec.caption_extension}): they {what}; e.g. {_examples(missing)}"
            )
        summary = SourceSummary(src_name, str(folder), kind, len(out), repeats, len(out) * repeats, len(missing))
        self.tag_frequency[src_name] = tag_counts(captions)
        return out, summary

    def add(self, records: list[ImageRecord], summary: SourceSummary) -> None:
        self.records.extend(records)
        self.sources.append(summary)

    def scan_metadata(self, path: Path) -> set[Path]:
        """Add the images listed in a metadata.jsonl; return the resolved paths it lists."""
        if not path.is_file():
            raise DatasetError(
                f"metadata_file {path} does not exist: give the path of a metadata.jsonl with file_name/text lines"
            )
        base = path.parent
        try:
            raw = path.read_bytes().decode("utf-8-sig", errors="replace")
        except OSError as err:
            raise DatasetError(f"cannot read metadata_file {path}: {err.strerror or err}") from err
        listed: set[Path] = set()
        out: list[ImageRecord] = []
        captions: list[str] = []
        bad_lines: list[str] = []
        no_caption: list[str] = []
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                bad_lines.append(f"line {line_no} is not JSON ({err.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str) or not obj["file_name"]:
                bad_lines.append(f'line {line_no} has no "file_name" string')
                continue
            image = base / obj["file_name"]
            key = _resolved(image)
            if key in listed:
                bad_lines.append(f"line {line_no} repeats {obj['file_name']!r} (first entry kept)")
                continue
            listed.add(key)
            if not image.is_file():
                self.skipped.append((str(image), f"listed in {path.name} line {line_no} but the file does not exist"))
                continue
            if not is_image_name(image):
                self.skipped.append((str(image), f"unsupported extension (use {' '.join(IMAGE_EXTENSIONS)})"))
                continue
            caption, alts = "", ()
            key_used = next((k for k in METADATA_CAPTION_KEYS if k in obj), None)
            value = obj.get(key_used) if key_used else None
            if isinstance(value, str):
                caption = value.strip()
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                caption, alts = value[0].strip(), tuple(v.strip() for v in value[1:])
            else:
                no_caption.append(obj["file_name"])
            if key in self.seen:
                continue
            size = self._probe(image)
            if size is None:
                continue
            self.seen.add(key)
            if caption or alts:
                self.with_caption += 1
            captions.append(caption)
            out.append(ImageRecord(image, caption, 1, False, str(path), size, alts))
        if bad_lines:
            self.problems.append(f"{path}: {len(bad_lines)} line(s) skipped: {_examples(bad_lines)}")
        if no_caption:
            self.problems.append(
                f"{path}: {len(no_caption)} entries have no caption string in "
                f"{'/'.join(METADATA_CAPTION_KEYS)}: they train with an empty caption; e.g. {_examples(no_caption)}"
            )
        name = self._name(base.name or path.name)
        self.tag_frequency[name] = tag_counts(captions)
        self.add(out, SourceSummary(name, str(path), "metadata", len(out), 1, len(out), len(no_caption)))
        unlisted = [
            p.name for p in sorted(base.iterdir()) if p.is_file() and is_image_name(p) and _resolved(p) not in listed
        ]
        if unlisted:
            self.problems.append(
                f"{len(unlisted)} images in {base} are not listed in {path.name} and are not used: "
                f"add lines for them or move them out; e.g. {_examples(unlisted)}"
            )
        return listed

    def scan_train_dir(self, root: Path, root_is_metadata: bool) -> None:
        """Add the images of train_data_dir: loose ones (unless a metadata.jsonl there owns them) and subfolders."""
        images, subdirs, unsupported = self._list_dir(root)
        self._report_unsupported(root, unsupported)
        if images and not root_is_metadata:
            self.add(*self.scan_folder(root, kind="folder", repeats=1, fallback="", fallback_label="", images=images))
        skip = {_resolved(p) for p in (self.spec.instance_dir, self.spec.class_dir) if p is not None}
        for sub in subdirs:
            if _resolved(sub) in skip:
                continue
            m = _REPEAT_FOLDER.match(sub.name)
            if m is None:
                self._plain_subfolder(sub)
                continue
            repeats, tokens = int(m.group(1)), m.group(2).strip()
            if repeats < 1:
                self.problems.append(
                    f"folder {sub.name!r} in {root} has {repeats} repeats: its images are not used; rename it to "
                    f"'1_{tokens}' or more to use them"
                )
                continue
            records, summary = self.scan_folder(
                sub, kind="repeat_folder", repeats=repeats, fallback=tokens, fallback_label="the folder's class tokens"
            )
            if not records:
                self.problems.append(f"folder {sub} has no usable images")
            self.add(records, summary)

    def _plain_subfolder(self, sub: Path) -> None:
        images, _, _ = self._list_dir(sub)
        fresh = [p for p in images if _resolved(p) not in self.seen]
        if not fresh:
            if not images:
                self.problems.append(f"folder {sub} has no images and no N_ repeat prefix; it is ignored")
            return
        digits = re.match(r"^(\d+)\D", sub.name)
        hint = (
            f"'{digits.group(1)}_{sub.name[len(digits.group(1)) :].lstrip(' -._')}'" if digits else f"'10_{sub.name}'"
        )
        at = len(self.problems)
        records, summary = self.scan_folder(sub, kind="folder", repeats=1, fallback="", fallback_label="")
        self.problems.insert(
            at,
            f"folder {sub.name!r} in {sub.parent} has no 'N_' repeat prefix: its {len(records)} usable images are "
            f"used once per epoch. Rename it to e.g. {hint} (N = repeats per epoch) to repeat them; sd-scripts would "
            "ignore this folder entirely",
        )
        self.add(records, summary)

    def scan_class_dir(self, folder: Path) -> None:
        spec = self.spec
        if not folder.is_dir():
            records: list[ImageRecord] = []
            summary = SourceSummary(self._name(folder.name or "class"), str(folder), "class", 0, 1, 0)
        else:
            records, summary = self.scan_folder(
                folder,
                kind="class",
                repeats=1,
                fallback=spec.class_prompt or "",
                fallback_label="the class prompt",
                is_class=True,
            )
        found = self.class_found = len(records)
        if spec.num_class_images:
            missing = max(0, spec.num_class_images - found)
            if missing:
                self.problems.append(
                    f"class_dir {folder} has {found} of num_class_images={spec.num_class_images} class images: "
                    f"{missing} will be generated with the base model before training (prompt {spec.class_prompt!r})"
                )
            if found > spec.num_class_images:
                self.problems.append(
                    f"class_dir {folder} has {found} class images; num_class_images={spec.num_class_images} of them "
                    "are used (the first by name)"
                )
                records = records[: spec.num_class_images]
        elif not records:
            self.problems.append(
                f"class_dir {folder} has no usable class images: set num_class_images to generate them, or add images"
            )
        self.class_records = records
        summary.images = len(records)
        self.sources.append(summary)

    def balance_class(self) -> None:
        """Give the class images repeats so they total the training samples (sd-scripts' rule, module docstring)."""
        if not self.class_records:
            return
        summary = next(s for s in self.sources if s.kind == "class")
        train = sum(r.repeats for r in self.records)
        count = len(self.class_records)
        if train == 0:
            self.problems.append("class images are not used: there are no training images to balance them with")
            self.class_records = []
        elif count > train:
            self.problems.append(
                f"{count} class images but only {train} training samples per epoch: the first {train} class images "
                "are used (sd-scripts balances class images to the training samples)"
            )
            self.class_records = [_with_repeats(r, 1) for r in self.class_records[:train]]
        else:
            base, extra = divmod(train, count)
            self.class_records = [
                _with_repeats(r, base + (1 if i < extra else 0)) for i, r in enumerate(self.class_records)
            ]
        summary.images = len(self.class_records)
        summary.samples = sum(r.repeats for r in self.class_records)


def _with_repeats(record: ImageRecord, repeats: int) -> ImageRecord:
    return replace(record, repeats=repeats)


def _check_dir(path: Path | None, name: str, holds: str) -> None:
    if path is not None and not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{name} {path} {what}: point {name} at the folder that holds {holds}")


def scan_dataset(spec: DatasetSpec, *, decode: bool = False) -> tuple[list[ImageRecord], DatasetReport]:
    """Find every usable image of `spec` (training images first, then class images).

    Reads image headers only (PNG files are also checked for damage); `decode=True` decodes every image as training
    will, which also catches truncated JPEG/WebP files: use it before a real run. Raises `DatasetError` only when the
    configuration itself is unusable (no source given, a folder or metadata file that does not exist); everything
    about the content goes into the report's `problems` and `skipped`. The report has no buckets or steps yet:
    `summarize` adds them.
    """
    if spec.train_data_dir is None and spec.metadata_file is None and spec.instance_dir is None:
        raise DatasetError(
            "no training images configured: set train_data_dir (a folder of images with .txt captions or N_name "
            "repeat folders), metadata_file (a metadata.jsonl) or instance_dir (DreamBooth)"
        )
    _check_dir(spec.train_data_dir, "train_data_dir", "the training images")
    _check_dir(spec.instance_dir, "instance_dir", "the instance images")
    if spec.class_dir is not None and (spec.class_dir.exists() or not spec.num_class_images):
        # a missing class_dir is fine when num_class_images asks for generated class images: it is created then
        _check_dir(spec.class_dir, "class_dir", "the class images (or set num_class_images to generate them)")

    scan = _Scan(spec, decode)
    root_is_metadata = False
    if spec.metadata_file is not None:
        scan.scan_metadata(spec.metadata_file)
        root_is_metadata = spec.train_data_dir is not None and _resolved(spec.metadata_file.parent) == _resolved(
            spec.train_data_dir
        )
    if spec.train_data_dir is not None:
        before = 0 if root_is_metadata else len(scan.records)  # records that count as train_data_dir's own
        auto = spec.train_data_dir / METADATA_NAME
        if not root_is_metadata and auto.is_file():
            logger.info("captions of the images in %s are read from %s", spec.train_data_dir, auto)
            scan.scan_metadata(auto)
            root_is_metadata = True
        scan.scan_train_dir(spec.train_data_dir, root_is_metadata)
        if len(scan.records) == before:
            scan.problems.append(
                f"train_data_dir {spec.train_data_dir} has no usable images (supported: {' '.join(IMAGE_EXTENSIONS)}, "
                "directly inside or in N_name subfolders)"
            )
    if spec.instance_dir is not None:
        records, summary = scan.scan_folder(
            spec.instance_dir,
            kind="instance",
            repeats=1,
            fallback=spec.instance_prompt or "",
            fallback_label="the instance prompt",
        )
        if not records:
            scan.problems.append(f"instance_dir {spec.instance_dir} has no usable images")
        scan.add(records, summary)
    if spec.class_dir is not None:
        scan.scan_class_dir(spec.class_dir)
        scan.balance_class()

    train = scan.records
    if not train:
        scan.problems.insert(0, "no usable training images: there is nothing to train")
    elif scan.with_caption == 0:
        scan.problems.append(
            f"none of the {len(train)} training images has a caption (no {spec.caption_extension} files next to them, "
            "no metadata.jsonl text): captions are only the folder tokens/prompts/trigger word shown above"
        )

    class_missing = max(0, spec.num_class_images - scan.class_found) if spec.num_class_images else 0
    records = train + scan.class_records
    report = DatasetReport(
        images=len(train),
        class_images=len(scan.class_records),
        repeats_total=sum(r.repeats for r in records),
        problems=scan.problems,
        skipped=scan.skipped,
        sources=scan.sources,
        tag_frequency=scan.tag_frequency,
        resolution=spec.resolution,
        class_images_missing=class_missing,
    )
    logger.info(
        "dataset scan: %d images, %d class images, %d skipped, %d problems",
        report.images,
        report.class_images,
        len(report.skipped),
        len(report.problems),
    )
    return records, report
