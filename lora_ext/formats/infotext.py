"""The "Lora hashes" field of A1111's infotext (generation parameters), written and read as A1111 v1.10 does, and the
"parameters" text the CLI writes into its PNGs. Both hosts use this module; nothing else formats or parses it.

A1111's rules (built-in Lora extension, `modules/processing.py` and `modules/infotext_utils.py`):
- key: the name as written in the prompt with ":" and "," removed; value: the file's 12-character short hash;
- the field's value is `name: hash, name: hash`, quoted (JSON string) in the infotext line because it holds ":";
- on paste, the value is split at "," and each part at its first ":" (both sides stripped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

FIELD = "Lora hashes"
_NAME_DROP = str.maketrans("", "", ":,")
_TAG_NAME = re.compile(r"<(lora|lyco):([^:>]+)(?=[:>])")


def infotext_name(name: str) -> str:
    """The key a prompt name gets in "Lora hashes" (A1111 removes ":" and ",")."""
    return name.translate(_NAME_DROP)


def format_lora_hashes(hashes: Mapping[str, str]) -> str:
    """The field's value for {infotext name: short hash}, in insertion order ("" when empty)."""
    return ", ".join(f"{k}: {v}" for k, v in hashes.items())


def parse_lora_hashes(text: str) -> dict[str, str]:
    """{name: hash} from the field's value as pasted (parts without ":" are skipped, as A1111 would fail on them)."""
    out: dict[str, str] = {}
    for part in str(text).split(","):
        name, sep, value = part.strip().partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def quote(value: str) -> str:
    """A1111 `infotext_utils.quote`: a value holding ",", ":" or a newline is written as a JSON string."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


@dataclass
class GenerationParameters:
    """What the PNG "parameters" text says about one image (A1111 layout: prompt, negative prompt, settings line)."""

    prompt: str
    steps: int
    sampler: str
    cfg: float
    seed: int
    width: int
    height: int
    negative: str = ""
    lora_hashes: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [self.prompt]
        if self.negative:
            lines.append(f"Negative prompt: {self.negative}")
        params = {"Steps": str(self.steps), "Sampler": self.sampler, "CFG scale": f"{self.cfg:g}",
                  "Seed": str(self.seed), "Size": f"{self.width}x{self.height}"}
        if self.lora_hashes:
            params[FIELD] = format_lora_hashes(self.lora_hashes)
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items()))
        return "\n".join(lines)


def relink_prompt(prompt: str, hashes: Mapping[str, str], name_for_hash: Callable[[str], str | None]) -> str:
    """Rewrite `<lora:NAME:` in a pasted prompt to `<lora:LOCAL:` where "Lora hashes" gives NAME a hash and
    `name_for_hash(hash)` knows a local file with it (its prompt name); other tags stay as they are."""

    def replace(m: re.Match[str]) -> str:
        short = hashes.get(m.group(2))
        local = name_for_hash(short) if short else None
        return m.group(0) if local is None else f"<{m.group(1)}:{local}"

    return _TAG_NAME.sub(replace, prompt)
