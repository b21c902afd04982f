"""Captions: reading caption files and turning a stored caption into the text of one training sample.

Per sample, in this order (random choices from the sample's caption generator, see `augment.sample_rng`):
  1. a caption with alternatives (a metadata.jsonl `text` list) picks one uniformly;
  2. caption dropout: with probability `caption_dropout` the whole caption becomes "" (trigger included, as
     sd-scripts drops the prefix too);
  3. shuffle_caption: the comma-separated tags after the first `keep_tokens` are shuffled (tags are stripped, empty
     tags dropped, rejoined with ", "); without shuffling the text is left exactly as written;
  4. the trigger word (not for class images) is put first as its own tag: moved there if the caption already has it
     as a tag, left alone if it appears inside a longer tag or sentence, otherwise prepended as "trigger, caption".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Caption file extensions tried for an image, after the configured one.
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class CaptionFile:
    """A caption read from disk: `text` (first line, stripped), `path`, and what was odd about it (or "")."""

    text: str
    path: Path
    note: str = ""


def find_caption_file(image: Path, caption_extension: str) -> Path | None:
    """The caption file of `image`: same stem with `caption_extension`, else with the other standard extension."""
    for ext in (caption_extension, *[e for e in CAPTION_EXTENSIONS if e != caption_extension]):
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption_file(path: Path) -> CaptionFile:
    """Read a caption file as sd-scripts does: UTF-8, first line, stripped. Never raises for content problems."""
    raw = path.read_bytes()
    note = ""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        note = "not UTF-8 (undecodable bytes replaced); re-save it as UTF-8"
    lines = [line.strip() for line in text.splitlines()]
    first = lines[0] if lines else ""
    extra = [line for line in lines[1:] if line]
    if extra and not note:
        note = f"has {len(extra) + 1} lines; only the first is used (as sd-scripts does)"
    return CaptionFile(first, path, note)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def tag_counts(captions: Sequence[str]) -> dict[str, int]:
    """Tag -> number of captions it appears in, lower-cased (sd-scripts' ss_tag_frequency rule)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def apply_trigger(caption: str, trigger: str) -> str:
    """Put `trigger` first as its own tag (see rule 4 of the module docstring)."""
    if not trigger:
        return caption
    if not caption.strip():
        return trigger
    tags = split_tags(caption)
    low = trigger.lower()
    if any(t.lower() == low for t in tags):
        rest = [t for t in tags if t.lower() != low]
        return ", ".join([trigger, *rest])
    if re.search(r"(?<!\w)" + re.escape(low) + r"(?!\w)", caption.lower()):
        return caption
    return f"{trigger}, {caption}"


def build_caption(
    caption: str,
    alternatives: Sequence[str],
    rng: np.random.Generator,
    *,
    shuffle: bool,
    keep_tokens: int,
    dropout: float,
    trigger: str,
) -> str:
    """The caption of one sample (rules 1-4 of the module docstring). Draws exactly three values from `rng`."""
    pick, drop, order_seed = rng.random(), rng.random(), int(rng.integers(0, 2**63 - 1))
    choices = [caption, *alternatives]
    text = choices[min(int(pick * len(choices)), len(choices) - 1)]
    if dropout > 0 and drop < dropout:
        return ""
    if shuffle:
        tags = split_tags(text)
        fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
        perm = np.random.default_rng(order_seed).permutation(len(flex))
        text = ", ".join(fixed + [flex[i] for i in perm])
    return apply_trigger(text, trigger)
