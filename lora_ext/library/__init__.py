"""The catalogue of the user's LoRA files (what `<lora:NAME:...>` resolves to, what the cards and REST list show).

Pure library: no WebUI imports. See `lora_ext.library.index` for the rules (A1111 v1.10's Lora extension, plus
key-based base-model detection, lazy hashes and a persistent header cache).
"""

from __future__ import annotations

from lora_ext.library.index import (
    LORA_EXTENSIONS,
    PREFERRED_ALIAS,
    PREFERRED_FILENAME,
    PREVIEW_EXTENSIONS,
    SD_VERSIONS,
    LoraEntry,
    LoraIndex,
)

__all__ = [
    "LORA_EXTENSIONS",
    "PREFERRED_ALIAS",
    "PREFERRED_FILENAME",
    "PREVIEW_EXTENSIONS",
    "SD_VERSIONS",
    "LoraEntry",
    "LoraIndex",
]
