"""Finding files in the catalogue: by the name a prompt uses (`IndexResolver`, what every host's session resolves
with) and by the hash an infotext names (`find_by_hash`, for pasted infotexts).

Names follow A1111 v1.10's rules (`LoraIndex.get`: file stem, alias, `sub/dir/name`); an unknown name triggers one
rescan, so a file added since the last listing is found. Hashes are A1111's short hashes (`LoraIndex.full_hash`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from lora_ext.errors import LoraExtError, LoraNotFoundError
from lora_ext.formats.hashes import lora_short_hash
from lora_ext.library.index import LoraEntry, LoraIndex

log = logging.getLogger(__name__)

PASTE_HASH_BUDGET = 4 << 30
"""Bytes of not-yet-hashed LoRA files `find_by_hash` is willing to read to resolve one pasted hash."""


class IndexResolver:
    """`lora_ext.session.Resolver` over a `LoraIndex`."""

    def __init__(self, index: LoraIndex) -> None:
        self.index = index

    def resolve(self, name: str) -> Path:
        """The file `<lora:name:...>` means. Raises LoraNotFoundError naming the folders searched."""
        entry = self.index.get(name)
        if entry is None:
            self.index.refresh()
            entry = self.index.get(name)
        if entry is None:
            dirs = ", ".join(str(d) for d in self.index.dirs) or "(no LoRA folder)"
            raise LoraNotFoundError(f"Lora not found: {name} (searched {dirs} by file name, alias and sub/dir/name); "
                                    "check the name in your LoRA folder")
        return Path(entry.path)

    def shorthash(self, path: Path, metadata: Mapping[str, str]) -> str:
        """The 12-character hash A1111 writes as "Lora hashes" (computed once per file version, then kept)."""
        entry = self.index.entry_for_path(path)
        if entry is None:
            return lora_short_hash(path, metadata, addnet=self.index.addnet_hashes)
        return entry.shorthash or self.index.full_hash(entry)[:12]


def find_by_hash(index: LoraIndex, short: str, budget: int = PASTE_HASH_BUDGET) -> LoraEntry | None:
    """The entry whose hash starts with `short`. Files never hashed (listing does not hash) are hashed on demand,
    smallest first, up to `budget` bytes, so a LoRA downloaded under another name is still found; the hashes learnt
    on the way are written to the index's cache once."""
    entry = index.by_hash(short)
    if entry is not None:
        return entry
    try:
        for candidate in sorted((e for e in index.entries() if not e.shorthash), key=lambda e: e.size):
            if candidate.size > budget:
                break
            budget -= candidate.size
            try:
                if index.full_hash(candidate, persist=False).lower().startswith(short.lower()):
                    return index.entry_for_path(candidate.path) or candidate
            except LoraExtError as err:
                log.debug("lora_ext: cannot hash %s: %s", candidate.path, err)
    finally:
        index.save()
    return None
