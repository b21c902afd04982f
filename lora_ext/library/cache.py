"""What the catalogue keeps per file version, and the cache file that keeps it across processes.

A record holds only what was learnt from a file's header (alias, `sshs_model_hash`, base model and evidence,
algorithm, rank, module count, problems) plus a computed full hash, valid for one (size, mtime_ns) of the file; and,
per `<stem>.json` sidecar, its parsed content. The header metadata itself is not kept (`LoraEntry.metadata` reads
it on first access).

The cache file is JSON with named fields and a version:

    {"format": "lora_ext.library.index", "version": 2,
     "facts": [{"sd_version": ..., "sd_version_source": ..., "sd_version_evidence": ..., "algorithm": ...,
                "rank": ..., "n_modules": ...}, ...],                  # shared by the files that say the same
     "files": {path: {"size": ..., "mtime_ns": ..., "facts": <index into "facts">,
                      "alias": ..., "sshs": ..., "problems": [...], "hash": ...}},   # the last four left out when
                                                                                     # None / empty
     "sidecars": {path: {"size": ..., "mtime_ns": ..., "data": {...}, "problem": ...}}}

A file of another format or version, or one that cannot be read, is ignored (and rewritten by the next save); a
record with a missing, extra or mistyped field is dropped alone, so only that file is read again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lora_ext import families
from lora_ext.errors import LoraFileError
from lora_ext.formats.safetensors_io import write_bytes_atomic

logger = logging.getLogger(__name__)

SD_VERSIONS = (*families.SD_VERSIONS, "Unknown")  # A1111's card spellings ("SD1", ...) and "Unknown"
CACHE_FORMAT = "lora_ext.library.index"
CACHE_VERSION = 2
"""1: positional lists (before 2026-12); 2: named fields."""
CACHE_MAX_BYTES = 256 << 20


def _is_int(x: object) -> bool:
    return type(x) is int


def _is_str(x: object) -> bool:
    return type(x) is str


def _is_opt_int(x: object) -> bool:
    return x is None or type(x) is int


def _is_opt_str(x: object) -> bool:
    return x is None or type(x) is str


def _is_str_list(x: object) -> bool:
    return type(x) is list and all(type(v) is str for v in x)


_Schema = Mapping[str, Callable[[object], bool]]  # field name -> check of its JSON value


def _fits(obj: object, schema: _Schema) -> bool:
    """Is `obj` a JSON object with exactly the fields of `schema`, each passing its check?"""
    return type(obj) is dict and obj.keys() == schema.keys() and all(check(obj[k]) for k, check in schema.items())


@dataclass(frozen=True, slots=True)
class Facts:
    """What a header says about the base model and the algorithm; shared by the files that say the same."""

    sd_version: str  # one of SD_VERSIONS
    sd_version_source: str  # "keys" | "metadata" | "none"
    sd_version_evidence: str
    algorithm: str | None
    rank: int | None
    n_modules: int | None

    _SCHEMA: ClassVar[_Schema] = {"sd_version": lambda x: x in SD_VERSIONS, "sd_version_source": _is_str,
                                  "sd_version_evidence": _is_str, "algorithm": _is_opt_str, "rank": _is_opt_int,
                                  "n_modules": _is_opt_int}

    def to_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self._SCHEMA}

    @classmethod
    def from_json(cls, obj: object) -> Facts | None:
        """None for anything but an object this version wrote."""
        return cls(**obj) if _fits(obj, cls._SCHEMA) else None  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the index keeps per file version. `sshs` is the full `sshs_model_hash` metadata, `hash` a computed full
    hash (addnet sha256 or file sha256); both valid for (size, mtime_ns) only."""

    size: int
    mtime_ns: int
    alias: str | None
    sshs: str | None
    facts: Facts
    problems: tuple[str, ...] = ()
    hash: str | None = None

    _FIELDS: ClassVar[frozenset[str]] = frozenset({"size", "mtime_ns", "alias", "sshs", "facts", "problems", "hash"})
    """The JSON fields; "alias", "sshs", "problems" and "hash" are left out when None / empty."""

    @property
    def full_hash(self) -> str | None:
        return self.sshs or self.hash

    def to_json(self, facts_index: int) -> dict[str, object]:
        obj: dict[str, object] = {"size": self.size, "mtime_ns": self.mtime_ns, "facts": facts_index}
        if self.alias is not None:
            obj["alias"] = self.alias
        if self.sshs is not None:
            obj["sshs"] = self.sshs
        if self.problems:
            obj["problems"] = list(self.problems)
        if self.hash is not None:
            obj["hash"] = self.hash
        return obj

    @classmethod
    def from_json(cls, obj: object, facts: Sequence[Facts | None]) -> FileRecord | None:
        """None for anything but an object this version wrote whose facts index names valid facts.

        The checks are written out: a warm listing reads one record per file, so this is its hot loop."""
        if type(obj) is not dict or not obj.keys() <= cls._FIELDS:
            return None
        get = obj.get
        size, mtime_ns, fi = get("size"), get("mtime_ns"), get("facts")
        alias, sshs, problems, full = get("alias"), get("sshs"), get("problems", []), get("hash")
        if not (type(size) is int and type(mtime_ns) is int and (alias is None or type(alias) is str)
                and (sshs is None or type(sshs) is str) and type(fi) is int and 0 <= fi < len(facts)
                and (full is None or type(full) is str) and type(problems) is list
                and (not problems or _is_str_list(problems))):
            return None
        found = facts[fi]
        return None if found is None else cls(size, mtime_ns, alias, sshs, found, tuple(problems), full)


@dataclass(frozen=True, slots=True)
class SidecarRecord:
    """A `<stem>.json` sidecar as read at (size, mtime_ns): its object, or {} and the problem."""

    size: int
    mtime_ns: int
    data: dict
    problem: str | None

    _SCHEMA: ClassVar[_Schema] = {"size": _is_int, "mtime_ns": _is_int, "data": lambda x: type(x) is dict,
                                  "problem": _is_opt_str}

    def to_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self._SCHEMA}

    @classmethod
    def from_json(cls, obj: object) -> SidecarRecord | None:
        if type(obj) is not dict or obj.keys() != cls._SCHEMA.keys():
            return None
        size, mtime_ns, data, problem = obj["size"], obj["mtime_ns"], obj["data"], obj["problem"]
        valid = type(size) is int and type(mtime_ns) is int and type(data) is dict
        return cls(size, mtime_ns, data, problem) if valid and _is_opt_str(problem) else None


@dataclass
class CacheContents:
    """What a cache file held. `complete` is False when records were dropped (the file should be rewritten)."""

    records: dict[str, FileRecord]
    sidecars: dict[str, SidecarRecord]
    complete: bool


def load_cache(path: Path) -> CacheContents | None:
    """The records of a cache file; None (logged unless the file is simply missing) when there is nothing to use."""
    try:
        size = path.stat().st_size
        if size > CACHE_MAX_BYTES:
            raise ValueError(f"{size} bytes is more than this index ever writes")
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        logger.warning("LoRA index cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if not (isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and obj.get("version") == CACHE_VERSION):
        logger.warning("%s is not a lora_ext index cache of version %d; rebuilding it", path, CACHE_VERSION)
        return None
    facts_raw, files, sidecars = obj.get("facts"), obj.get("files"), obj.get("sidecars")
    if not (type(facts_raw) is list and type(files) is dict and type(sidecars) is dict):
        logger.warning("LoRA index cache %s is incomplete; rebuilding it", path)
        return None
    facts = [Facts.from_json(f) for f in facts_raw]
    records = {p: rec for p, raw in files.items() if (rec := FileRecord.from_json(raw, facts)) is not None}
    sides = {p: side for p, raw in sidecars.items() if (side := SidecarRecord.from_json(raw)) is not None}
    complete = None not in facts and len(records) == len(files) and len(sides) == len(sidecars)
    return CacheContents(records, sides, complete)


def save_cache(path: Path, records: Mapping[str, FileRecord], sidecars: Mapping[str, SidecarRecord]) -> bool:
    """Write the cache file atomically; False (logged) when it could not be written."""
    facts: dict[Facts, int] = {}
    files = {p: r.to_json(facts.setdefault(r.facts, len(facts))) for p, r in records.items()}
    obj = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "facts": [f.to_json() for f in facts],
        "files": files,
        "sidecars": {p: s.to_json() for p, s in sidecars.items()},
    }
    # ASCII with \u escapes: also file names that are not valid UTF-8 (surrogate-escaped by os) round-trip
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    try:
        os.makedirs(path.parent, exist_ok=True)
        write_bytes_atomic(path, data)
    except (OSError, LoraFileError) as exc:
        logger.warning("LoRA index cache %s could not be written (%s); the next start lists from scratch", path, exc)
        return False
    return True
