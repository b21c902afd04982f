"""The catalogue of the user's LoRA files: names, aliases, base-model version, hashes, sidecars, previews.

Listing follows AUTOMATIC1111 v1.10's built-in Lora extension (`networks.list_available_networks`,
`network.NetworkOnDisk`, `modules.util.walk_files`, `ui_extra_networks.find_preview`):

- files ending in `.safetensors`, `.pt` or `.ckpt` (any case) anywhere under each directory, symlinked directories
  followed, in A1111's order: directories by natural sort of their path, files by natural sort of their name, the
  directories in the order given. Hidden directories (name starting with ".") are listed unless
  `include_hidden=False` (A1111's "list_hidden_files", on by default); hidden files are always listed, as there.
- name = file stem; alias = the `ss_output_name` metadata when present, else the name. When an alias is already
  taken by an earlier file's name or alias, that alias (lowercased) becomes forbidden; "none" is always forbidden.
- lookup (`get`): a forbidden text resolves by file name only; anything else by name or alias, where a later file's
  name or alias replaces an earlier one under the same text (so a duplicate name resolves to the last file listed).
- `display_name` is A1111's `get_alias` (setting "lora_preferred_name": "Alias from file" | "Filename").
- sd_version from metadata: `ss_base_model_version` "sdxl_*" -> SDXL, `ss_v2` "True" -> SD2, then (unlike A1111)
  `modelspec.architecture` and the other `ss_base_model_version` values; other kohya `ss_*` metadata -> SD1.
- shorthash: the first 12 characters of the `sshs_model_hash` metadata if set, else of the "addnet" sha256 of the
  tensor data (`.safetensors`) or the sha256 of the whole file (others), known only once computed (`full_hash`).
- sidecars next to the file: `<stem>.json` (the card's user metadata: description, sd version, activation text,
  preferred weight, negative text, notes), previews `<stem>.<ext>` before `<stem>.preview.<ext>` for ext in png, jpg,
  jpeg, webp, gif (A1111 checks its extensions in set order; ours is fixed), descriptions `<stem>.txt`,
  `<stem>.description.txt`.

Beyond A1111:
- the base model is also read from the key names and shapes in the header (second text encoder, the width that
  cross-attention reads: 768 SD1, 1024 SD2, 2048 SDXL, ...; `lora_ext.formats.arch`), and these outrank metadata;
  `sd_version_source` / `sd_version_evidence` say which decided. Metadata that names no base model (e.g. diffusers'
  `{"format": "pt"}`) gives Unknown, not SD1. Pickled files (`.pt`, `.ckpt`) are never opened while listing.
- every file is listed, also when two share a name; `get("sub/dir/name")` (path relative to its directory, with or
  without the extension) reaches each of them, and `display_name` falls back to that form when the name or alias
  would resolve to another file. `display_name` does not offer an alias that would break the tag (":", "<", ">"),
  and a blank `ss_output_name` is no alias.
- a folder reached twice (a symlink to a listed folder, a directory given twice or inside another) is walked once,
  real folders before links; A1111 lists such files twice, which makes all their aliases forbidden.
- listing never hashes a file: `full_hash` computes on demand and caches. A cache file keeps what was learnt from each
  header by (path, size, mtime_ns), so a warm listing is a directory walk plus a `stat` per file. The header's
  metadata itself is not cached: `LoraEntry.metadata` reads it from the file on first access.
- a file that cannot be read is still listed, with `sd_version` Unknown and the reason in `problems`.
- training run folders and their checkpoints (`lora_ext.runfolder.is_run_folder`) are not walked: their
  `lora.safetensors`/`.pt` files are training state, not LoRAs to use (A1111 lists them).

Headers are read with a fast path for the compact layout the safetensors library writes (metadata first, entries
in data order): only the metadata is JSON-decoded, the keys are cut out of the text and the shapes of the few keys
that matter are parsed; identical tensor layouts (same keys, dtypes, shapes: common across a collection) are
analysed once per scan. Anything else goes through `safetensors_io.read_header` (full validation). Listing checks a
header's framing, its metadata and that its tensors end where the file ends; every tensor entry is validated when
the file is loaded.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_ext.errors import LoraFileError
from lora_ext.formats.algorithms import ALGORITHMS
from lora_ext.formats.arch import ARCH_NAMES, detect_arch
from lora_ext.formats.hashes import SHORT_HASH_LEN, addnet_hash_safetensors, sha256_file
from lora_ext.formats.keys import PLAIN_SUFFIXES, split_key
from lora_ext.formats.metadata import base_model_from_metadata
from lora_ext.formats.safetensors_io import MAX_HEADER_SIZE, read_header, write_bytes_atomic
from lora_ext.runfolder import is_run_folder

logger = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
"""File extensions listed (compared lowercased), as A1111's Lora extension."""
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
"""A1111's default preview extensions; for each, `<stem>.<ext>` is tried before `<stem>.preview.<ext>`."""
DESCRIPTION_SUFFIXES = (".txt", ".description.txt")
PREFERRED_FILENAME = "Filename"
PREFERRED_ALIAS = "Alias from file"
ALWAYS_FORBIDDEN_ALIASES = frozenset({"none"})
"""A1111 also lists "Addams", but compares lowercased text with it, so it never matches; "none" is the real one."""
SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")
SIDECAR_MAX_BYTES = 1 << 20
"""A `<stem>.json` sidecar larger than this is not read (A1111's are a few hundred bytes)."""
CACHE_FORMAT = "lora_ext.library.index"
CACHE_VERSION = 1
CACHE_MAX_BYTES = 256 << 20

_ARCH_TO_SD = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
_META_BASE_FIELDS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")
_TAG_BREAKING = re.compile(r"[:<>]")
_DIGIT_RUNS = re.compile(r"([0-9]+)")
_DECODER = json.JSONDecoder()
_META_OPEN = '{"__metadata__":'
_ENTRY_OPEN = '{"dtype":'
_KEY_END = '":{"dtype":'
_NEXT_KEY = re.compile(r'\},"([^"]*)":\{"dtype":')  # a literal "}" first: the regex engine scans for it in C

# algorithm name -> the suffixes that mark one module of it, in registry order
_ALGORITHM_ANCHORS = tuple((cls.name, cls.anchors) for cls in ALGORITHMS)


# ------------------------------------------------------------------------------------------------------------ records


class _MetadataSlot:
    """The header metadata of one file version, read on first use and then kept (a benign race at worst reads twice)."""

    __slots__ = ("path", "value")

    def __init__(self, path: str, value: dict[str, str] | None = None) -> None:
        self.path = path
        self.value = value

    def get(self) -> dict[str, str]:
        if self.value is None:
            self.value = _read_metadata(self.path)
        return self.value



@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file as listed. Immutable; a refresh or a new hash makes new entries.

    `relpath` is POSIX, relative to `root` (the listed directory it was found under), extension included.
    `sd_version` is "SD1" | "SD2" | "SDXL" | "Unknown"; `sd_version_source` is "keys" (names/shapes in the header),
    "metadata" or "none"; `sd_version_evidence` says what decided, in words. `algorithm` is "lora" (LoRA/LoCon),
    "loha", "lokr", "full", "norm", "ia3" or "dora" (LoRA with dora_scale), several joined by "+" (most modules
    first, "+dora" last), None when not inspected (pickles, unreadable files). `rank` is the first
    lora_down/lora_A factor's rows. `shorthash` is 12 hex characters or None while unknown. `user_metadata` is the
    `<stem>.json` sidecar ({} when absent or broken); `problems` names each file that could not be read and why.
    `metadata` (a property) is the safetensors header metadata, read from the file (as it is then) on first access
    and kept ({} for pickles and unreadable headers; {} and a logged warning if the file has become unreadable);
    treat it as read-only.
    """

    name: str
    alias: str
    path: Path
    root: Path
    relpath: str
    size: int
    mtime_ns: int
    sd_version: str
    sd_version_source: str
    sd_version_evidence: str
    algorithm: str | None
    rank: int | None
    n_modules: int | None
    shorthash: str | None
    preview: Path | None
    description_file: Path | None
    user_metadata: dict = field(compare=False)
    problems: tuple[str, ...] = ()
    metadata_slot: _MetadataSlot | None = field(default=None, compare=False, repr=False)

    @property
    def metadata(self) -> dict[str, str]:
        return self.metadata_slot.get() if self.metadata_slot is not None else {}

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix.lower() == ".safetensors"

    @property
    def effective_sd_version(self) -> str:
        """The card's version: the sidecar's "sd version" when it is one of `SD_VERSIONS` (as A1111), else ours."""
        v = self.user_metadata.get("sd version")
        return v if v in SD_VERSIONS else self.sd_version


@dataclass(frozen=True, slots=True)
class _Structure:
    """What the tensor keys of a header say, independent of the file: shared by files with the same layout."""

    algorithm: str | None
    rank: int | None
    n_modules: int
    arch: str | None  # "sd1" | "sd2" | "sdxl" | None, from key names and shapes only
    evidence: str
    problem: str | None = None  # reason, without the file name


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a header says about the base model and the algorithm; shared by the files that say the same."""

    sd_version: str
    sd_version_source: str
    sd_version_evidence: str
    algorithm: str | None
    rank: int | None
    n_modules: int | None

    def to_json(self) -> list[object]:
        return [self.sd_version, self.sd_version_source, self.sd_version_evidence, self.algorithm, self.rank,
                self.n_modules]

    @classmethod
    def from_json(cls, obj: object) -> _Facts | None:
        """None for anything but a list this version wrote."""
        if type(obj) is not list or len(obj) != 6:
            return None
        sd, source, evidence, algorithm, rank, n_modules = obj
        if sd not in SD_VERSIONS or not (_is_str(source) and _is_str(evidence) and _is_opt_str(algorithm)
                                         and _is_opt_int(rank) and _is_opt_int(n_modules)):
            return None
        return cls(sd, source, evidence, algorithm, rank, n_modules)


@dataclass(frozen=True, slots=True)
class _FileRecord:
    """What the index keeps per file version (also the cache file's record). `sshs` is the full `sshs_model_hash`
    metadata, `hash` a computed full hash (addnet sha256 or file sha256); both valid for (size, mtime_ns) only."""

    size: int
    mtime_ns: int
    alias: str | None
    sshs: str | None
    facts: _Facts
    problems: tuple[str, ...] = ()
    hash: str | None = None

    @property
    def full_hash(self) -> str | None:
        return self.sshs or self.hash

    def to_json(self, facts_index: int) -> list[object]:
        return [self.size, self.mtime_ns, self.alias, self.sshs, facts_index, list(self.problems) or None, self.hash]

    @classmethod
    def from_json(cls, obj: object, facts: Sequence[_Facts]) -> _FileRecord | None:
        """None for anything but a list this version wrote (`facts`: the cache's facts table)."""
        if type(obj) is not list or len(obj) != 7:
            return None
        size, mtime_ns, alias, sshs, fi, problems, full = obj
        if not (_is_int(size) and _is_int(mtime_ns) and _is_opt_str(alias) and _is_opt_str(sshs) and _is_int(fi)
                and 0 <= fi < len(facts) and _is_opt_str(full)):
            return None
        if problems is None:
            problems = ()
        elif type(problems) is list and all(_is_str(x) for x in problems):
            problems = tuple(problems)
        else:
            return None
        return cls(size, mtime_ns, alias, sshs, facts[fi], problems, full)


@dataclass(frozen=True, slots=True)
class _SidecarRecord:
    size: int
    mtime_ns: int
    data: dict
    problem: str | None

    def to_json(self) -> list[object]:
        return [self.size, self.mtime_ns, self.data, self.problem]

    @classmethod
    def from_json(cls, obj: object) -> _SidecarRecord | None:
        if type(obj) is not list or len(obj) != 4:
            return None
        size, mtime_ns, data, problem = obj
        if not (_is_int(size) and _is_int(mtime_ns) and type(data) is dict and _is_opt_str(problem)):
            return None
        return cls(size, mtime_ns, data, problem)


def _is_int(x: object) -> bool:
    return type(x) is int


def _is_opt_int(x: object) -> bool:
    return x is None or type(x) is int


def _is_str(x: object) -> bool:
    return type(x) is str


def _is_opt_str(x: object) -> bool:
    return x is None or type(x) is str


@dataclass(frozen=True, slots=True)
class _Found:
    """A LoRA file met by the directory walk."""

    root: Path
    dir: str
    rel_dir: tuple[str, ...]
    name: str
    size: int
    mtime_ns: int
    siblings: frozenset[str]  # names of the non-directory entries of its directory

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.name)


class _Snapshot:
    """An immutable view of one listing with A1111's lookup tables. `full_hashes`: path -> known full hash."""

    def __init__(self, entries: Sequence[LoraEntry], full_hashes: Mapping[str, str]) -> None:
        self.entries = tuple(entries)
        self.by_name: dict[str, LoraEntry] = {}
        self.aliases: dict[str, LoraEntry] = {}
        forbidden = set(ALWAYS_FORBIDDEN_ALIASES)
        self.by_relpath: dict[str, LoraEntry] = {}
        self.by_path: dict[str, LoraEntry] = {}
        self.hashes: list[tuple[str, LoraEntry]] = []
        for e in self.entries:
            # A1111 `process_network_files`, step by step
            self.by_name[e.name] = e
            if e.alias in self.aliases:
                forbidden.add(e.alias.lower())
            self.aliases[e.name] = e
            self.aliases[e.alias] = e
            stem_rel = e.relpath.rsplit(".", 1)[0]
            self.by_relpath[stem_rel] = e
            self.by_relpath[e.relpath] = e
            self.by_path[os.path.normcase(str(e.path))] = e
            full = full_hashes.get(str(e.path))
            if full:
                self.hashes.append((full.lower(), e))
        self.forbidden = frozenset(forbidden)

    def lookup(self, name: str) -> LoraEntry | None:
        if name.lower() in self.forbidden:
            entry = self.by_name.get(name)
        else:
            entry = self.aliases.get(name)
        if entry is None and ("/" in name or "\\" in name):
            entry = self.by_relpath.get(name.replace("\\", "/").strip("/"))
        return entry


# -------------------------------------------------------------------------------------------------------------- index


class LoraIndex:
    """The LoRA files under `dirs`, listed as A1111's Lora extension lists them (see the module docstring).

    Constructing does no I/O; the first call that needs the listing scans. Safe to use from several threads:
    `refresh` and `full_hash` serialise on a lock, readers use the current immutable snapshot.
    `cache_file`: where header facts and computed hashes persist across processes (JSON, written atomically when
    something changed); a missing, corrupt or foreign cache is ignored and rewritten.
    """

    def __init__(
        self,
        dirs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        cache_file: str | os.PathLike[str] | None = None,
        include_hidden: bool = True,
        preview_extensions: Sequence[str] = PREVIEW_EXTENSIONS,
    ) -> None:
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self._dirs = tuple(Path(d) for d in dirs)
        self._cache_file = Path(cache_file) if cache_file is not None else None
        self._include_hidden = include_hidden
        self._preview_extensions = tuple(e.lower().lstrip(".") for e in preview_extensions)
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        self._records: dict[str, _FileRecord] = {}
        self._sidecars: dict[str, _SidecarRecord] = {}
        self._slots: dict[str, tuple[int, int, _MetadataSlot]] = {}
        # path -> (record, sidecar, preview name, description name, entry) of the last listing
        self._made: dict[str, tuple[_FileRecord, _SidecarRecord | None, str | None, str | None, LoraEntry]] = {}
        self._cache_loaded = False
        self._cache_dirty = False

    # --- listing --------------------------------------------------------------------------------------------------
    @property
    def dirs(self) -> tuple[Path, ...]:
        return self._dirs

    def refresh(self) -> list[LoraEntry]:
        """Rescan the directories: `stat` every file, read the header only of new or changed files; return the
        entries in listing order. Persists the cache file when anything changed."""
        with self._lock, _gc_paused():
            self._load_cache()
            found = self._walk()
            memo: dict[tuple[int, int], _Structure] = {}
            records: dict[str, _FileRecord] = {}
            sidecars: dict[str, _SidecarRecord] = {}
            entries: list[LoraEntry] = []
            for f in found:
                path = f.path
                rec = self._records.get(path)
                if rec is None or rec.size != f.size or rec.mtime_ns != f.mtime_ns:
                    rec = _inspect(path, f.size, f.mtime_ns, memo)
                    self._cache_dirty = True
                records[path] = rec
                entries.append(self._make_entry(f, rec, sidecars))
            if records.keys() != self._records.keys() or sidecars.keys() != self._sidecars.keys():
                self._cache_dirty = True
            self._records = records
            self._sidecars = sidecars
            self._slots = {p: s for p, s in self._slots.items() if p in records}
            self._made = {p: m for p, m in self._made.items() if p in records}
            self._snapshot = _Snapshot(entries, self._known_hashes())
            self._save_cache()
            return list(entries)

    def entries(self) -> tuple[LoraEntry, ...]:
        """The current listing (scans first if nothing was listed yet). The tuple never changes afterwards."""
        return self._current().entries

    def get(self, name: str) -> LoraEntry | None:
        """The file `<lora:name:...>` means: A1111's rules (a forbidden alias by file name only, else name or alias,
        later files replacing earlier ones), then `sub/dir/name` relative to its directory (extension optional)."""
        if not name:
            return None
        return self._current().lookup(name)

    def entry_for_path(self, path: str | os.PathLike[str]) -> LoraEntry | None:
        """The listed entry for a file path (compared as an absolute path), or None."""
        return self._current().by_path.get(os.path.normcase(os.path.abspath(path)))

    def by_hash(self, shorthash_prefix: str) -> LoraEntry | None:
        """The entry whose known hash starts with `shorthash_prefix` (case-insensitive), as pasted from the
        infotext's "Lora hashes". Only hashes already known count (metadata `sshs_model_hash` or computed by
        `full_hash`); listing never hashes. None when nothing or several different hashes match."""
        prefix = shorthash_prefix.strip().lower()
        if not prefix:
            return None
        matches = [(h, e) for h, e in self._current().hashes if h.startswith(prefix)]
        if not matches or any(h[:SHORT_HASH_LEN] != matches[0][0][:SHORT_HASH_LEN] for h, _ in matches[1:]):
            return None
        return matches[0][1]

    def display_name(self, entry: LoraEntry, preferred: str = PREFERRED_ALIAS) -> str:
        """The text to put in `<lora:TEXT:...>` for `entry`: A1111's `get_alias` (the file name when `preferred`
        is "Filename" or the alias is forbidden, else the alias), except that a text that would resolve to another
        file (a duplicate name) or would break the tag (":", "<", ">") falls back to the name, then to the path
        form `sub/dir/name`."""
        snap = self._current()
        use_name = (
            preferred == PREFERRED_FILENAME
            or entry.alias.lower() in snap.forbidden
            or _TAG_BREAKING.search(entry.alias) is not None
        )
        first = entry.name if use_name else entry.alias
        for text in (first, entry.name):
            found = snap.lookup(text)
            if found is not None and found.path == entry.path:
                return text
        text = entry.relpath.rsplit(".", 1)[0]
        return text if "/" in text else "/" + text  # "/name": the top-level file when a subfolder has one too

    @property
    def forbidden_aliases(self) -> frozenset[str]:
        """Lowercased aliases that resolve by file name only (shared by several files, and "none")."""
        return self._current().forbidden

    # --- hashes ---------------------------------------------------------------------------------------------------
    def full_hash(self, entry: LoraEntry, *, persist: bool = True) -> str:
        """The file's full hash as A1111 uses it: the `sshs_model_hash` metadata when set, else the sha256 of the
        tensor data (`.safetensors`, the "addnet" hash) or of the whole file (others), lowercase hex.

        Computing reads the whole file (outside the lock); the result is kept for this (size, mtime_ns) of the file,
        shown as the entry's `shorthash` from then on and persisted (`persist=False`: kept in memory until `save()`,
        for callers that hash many files in a row). Raises `LoraFileError` if the file cannot be read.
        """
        key = str(entry.path)
        with self._lock:
            rec = self._records.get(key)
            if rec is not None and rec.size == entry.size and rec.mtime_ns == entry.mtime_ns and rec.full_hash:
                return rec.full_hash
        if entry.is_safetensors:
            sshs = entry.metadata.get("sshs_model_hash")
            if sshs:
                return sshs
        before = _stat_or_none(key)
        value = addnet_hash_safetensors(key) if entry.is_safetensors else sha256_file(key)
        after = _stat_or_none(key)
        with self._lock:
            rec = self._records.get(key)
            unchanged = before is not None and after is not None and before == after
            if unchanged and rec is not None and (rec.size, rec.mtime_ns) == before:
                self._records[key] = replace(rec, hash=value)
                self._cache_dirty = True
                snap = self._snapshot
                if snap is not None:
                    shorthash = value[:SHORT_HASH_LEN]
                    self._snapshot = _Snapshot(
                        [replace(e, shorthash=shorthash) if str(e.path) == key else e for e in snap.entries],
                        self._known_hashes(),
                    )
                if persist:
                    self._save_cache()
        return value

    def save(self) -> None:
        """Write the cache file now if anything changed since it was last written (no-op without a cache file)."""
        with self._lock:
            self._save_cache()

    # --- internals ------------------------------------------------------------------------------------------------
    def _current(self) -> _Snapshot:
        snap = self._snapshot
        if snap is not None:
            return snap
        with self._lock:
            if self._snapshot is None:
                self.refresh()
            return self._snapshot  # type: ignore[return-value]  # refresh() always sets it

    def _known_hashes(self) -> dict[str, str]:
        return {p: r.full_hash for p, r in self._records.items() if r.full_hash}

    def _walk(self) -> list[_Found]:
        """A1111 `walk_files` order, symlinked directories followed once each (no cycles, no directory twice)."""
        visited: set[tuple[int, int]] = set()
        found: list[_Found] = []
        for root in self._dirs:
            root_str = os.path.abspath(root)
            try:
                st = os.stat(root_str)
            except OSError:
                logger.debug("LoRA folder %s does not exist; skipped", root_str)
                continue
            if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            root_path = Path(root_str)
            listed: list[tuple[str, tuple[str, ...], frozenset[str], list[os.DirEntry[str]]]] = []
            stack: list[tuple[str, tuple[str, ...]]] = [(root_str, ())]
            while stack:
                d, rel = stack.pop()
                names, candidates, subdirs = self._scan_dir(d, visited)
                listed.append((d, rel, names, candidates))
                stack.extend((os.path.join(d, s), (*rel, s)) for s in subdirs)
            listed.sort(key=lambda item: _natural_key(item[0]))
            for d, rel, names, candidates in listed:
                for de in sorted(candidates, key=lambda de: _natural_key(de.name)):
                    try:
                        fst = de.stat()
                    except OSError as exc:
                        logger.warning("LoRA file %s cannot be read (%s); not listed", de.path, exc.strerror or exc)
                        continue
                    if stat.S_ISREG(fst.st_mode):
                        found.append(_Found(root_path, d, rel, de.name, fst.st_size, fst.st_mtime_ns, names))
        return found

    def _scan_dir(
        self, d: str, visited: set[tuple[int, int]]
    ) -> tuple[frozenset[str], list[os.DirEntry[str]], list[str]]:
        names: set[str] = set()
        candidates: list[os.DirEntry[str]] = []
        dirs: list[tuple[bool, list[object], str, tuple[int, int]]] = []
        try:
            it = os.scandir(d)
        except OSError as exc:
            logger.warning("LoRA folder %s cannot be listed (%s); skipped", d, exc.strerror or exc)
            return frozenset(), [], []
        with it:
            for de in it:
                try:
                    is_dir = de.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    names.add(de.name)
                    if os.path.splitext(de.name)[1].lower() in LORA_EXTENSIONS:
                        candidates.append(de)
                    continue
                if not self._include_hidden and de.name.startswith("."):
                    continue
                try:
                    dst = de.stat()
                except OSError:
                    continue
                dirs.append((de.is_symlink(), _natural_key(de.name), de.name, (dst.st_dev, dst.st_ino)))
        if is_run_folder(names, {entry[2] for entry in dirs}):  # training state, not LoRAs (lora_ext.runfolder)
            logger.debug("%s is a training run folder; not listed", d)
            return frozenset(), [], []
        subdirs = []
        for *_, name, key in sorted(dirs):  # a folder reached twice is walked once: real folders first, then by name
            if key not in visited:
                visited.add(key)
                subdirs.append(name)
        return frozenset(names), candidates, subdirs

    def _make_entry(self, f: _Found, rec: _FileRecord, sidecars: dict[str, _SidecarRecord]) -> LoraEntry:
        """The entry for a file; the previous listing's entry object when nothing about it changed."""
        path = f.path
        stem = os.path.splitext(f.name)[0]
        side = None
        if stem + ".json" in f.siblings:
            side_path = os.path.join(f.dir, stem + ".json")
            side = sidecars.get(side_path) or self._sidecar(side_path)
            if side is not None:
                sidecars[side_path] = side
        preview = next((name for name in self._preview_names(stem) if name in f.siblings), None)
        description = next((stem + s for s in DESCRIPTION_SUFFIXES if stem + s in f.siblings), None)
        made = self._made.get(path)
        if made is not None:
            old_rec, old_side, old_preview, old_description, old_entry = made
            if old_rec is rec and old_side is side and old_preview == preview and old_description == description:
                return old_entry
        full = rec.full_hash
        entry = LoraEntry(
            name=stem,
            alias=rec.alias or stem,
            path=Path(path),
            root=f.root,
            relpath="/".join((*f.rel_dir, f.name)),
            size=f.size,
            mtime_ns=f.mtime_ns,
            sd_version=rec.facts.sd_version,
            sd_version_source=rec.facts.sd_version_source,
            sd_version_evidence=rec.facts.sd_version_evidence,
            algorithm=rec.facts.algorithm,
            rank=rec.facts.rank,
            n_modules=rec.facts.n_modules,
            shorthash=full[:SHORT_HASH_LEN] if full else None,
            preview=Path(f.dir, preview) if preview else None,
            description_file=Path(f.dir, description) if description else None,
            user_metadata=dict(side.data) if side is not None else {},
            problems=(*rec.problems, side.problem) if side is not None and side.problem else rec.problems,
            metadata_slot=self._slot(path, f, rec),
        )
        self._made[path] = (rec, side, preview, description, entry)
        return entry

    def _preview_names(self, stem: str) -> Iterator[str]:
        for ext in self._preview_extensions:
            yield f"{stem}.{ext}"
            yield f"{stem}.preview.{ext}"

    def _slot(self, path: str, f: _Found, rec: _FileRecord) -> _MetadataSlot | None:
        if rec.facts.n_modules is None:  # a pickle, or a header that could not be read
            return None
        held = self._slots.get(path)
        if held is not None and held[0] == f.size and held[1] == f.mtime_ns:
            return held[2]
        slot = _MetadataSlot(path)
        self._slots[path] = (f.size, f.mtime_ns, slot)
        return slot

    def _sidecar(self, path: str) -> _SidecarRecord | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        old = self._sidecars.get(path)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            return old
        self._cache_dirty = True
        data, problem = _read_sidecar(path, st.st_size)
        return _SidecarRecord(st.st_size, st.st_mtime_ns, data, problem)

    # --- cache file -----------------------------------------------------------------------------------------------
    def _load_cache(self) -> None:
        if self._cache_loaded:
            return
        self._cache_loaded = True
        if self._cache_file is None:
            return
        try:
            size = self._cache_file.stat().st_size
            if size > CACHE_MAX_BYTES:
                raise ValueError(f"{size} bytes is more than this index ever writes")
            obj = json.loads(self._cache_file.read_bytes())
        except FileNotFoundError:
            self._cache_dirty = True
            return
        except (OSError, ValueError, RecursionError) as exc:
            logger.warning("LoRA index cache %s is unreadable (%s); rebuilding it", self._cache_file, exc)
            self._cache_dirty = True
            return
        if not (isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and obj.get("version") == CACHE_VERSION):
            logger.warning("%s is not a lora_ext index cache of version %d; rebuilding it", self._cache_file,
                           CACHE_VERSION)
            self._cache_dirty = True
            return
        facts_raw, files, sidecars = obj.get("facts"), obj.get("files"), obj.get("sidecars")
        if not (type(facts_raw) is list and type(files) is dict and type(sidecars) is dict):
            logger.warning("LoRA index cache %s is incomplete; rebuilding it", self._cache_file)
            self._cache_dirty = True
            return
        facts = [_Facts.from_json(f) for f in facts_raw]
        valid = [f for f in facts if f is not None]
        for path, raw in files.items():
            rec = _FileRecord.from_json(raw, facts)  # type: ignore[arg-type]  # None facts are caught below
            if rec is not None and rec.facts is not None:
                self._records[path] = rec
        for path, raw in sidecars.items():
            side = _SidecarRecord.from_json(raw)
            if side is not None:
                self._sidecars[path] = side
        if len(valid) != len(facts) or len(self._records) != len(files) or len(self._sidecars) != len(sidecars):
            self._cache_dirty = True  # rewrite without the records that were dropped

    def _save_cache(self) -> None:
        if self._cache_file is None or not self._cache_dirty:
            return
        facts: dict[_Facts, int] = {}
        files = {p: r.to_json(facts.setdefault(r.facts, len(facts))) for p, r in self._records.items()}
        obj = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "facts": [f.to_json() for f in facts],
            "files": files,
            "sidecars": {p: s.to_json() for p, s in self._sidecars.items()},
        }
        # ASCII with \u escapes: also file names that are not valid UTF-8 (surrogate-escaped by os) round-trip
        data = json.dumps(obj, separators=(",", ":")).encode("ascii")
        try:
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self._cache_file, data)
        except (OSError, LoraFileError) as exc:
            logger.warning("LoRA index cache %s could not be written (%s); the next start lists from scratch",
                           self._cache_file, exc)
            return
        self._cache_dirty = False


# ------------------------------------------------------------------------------------------------ reading one file


_PICKLE_FACTS = _Facts("Unknown", "none", "pickled file (.pt/.ckpt): not opened while listing", None, None, None)
_UNREADABLE_FACTS = _Facts("Unknown", "none", "the header could not be read", None, None, None)


def _inspect(path: str, size: int, mtime_ns: int, memo: dict[tuple[int, int], _Structure]) -> _FileRecord:
    """Learn what listing needs from one file version: its header only, never a pickle."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return _FileRecord(size, mtime_ns, None, None, _PICKLE_FACTS)
    try:
        fast = _fast_header(path, size, memo)
        if fast is not None:
            metadata, structure = fast
        else:
            header = read_header(path)
            metadata = header.metadata
            keys = list(header.tensors)
            structure = _analyse_keys(keys, lambda i: header.tensors[keys[i]].shape)
    except LoraFileError as exc:
        return _FileRecord(size, mtime_ns, None, None, _UNREADABLE_FACTS, (str(exc),))
    sd_version, source, evidence = _sd_version(structure, metadata)
    alias = metadata.get("ss_output_name")
    return _FileRecord(
        size=size,
        mtime_ns=mtime_ns,
        alias=alias if alias and alias.strip() else None,
        sshs=metadata.get("sshs_model_hash") or None,
        facts=_Facts(sd_version, source, evidence, structure.algorithm, structure.rank, structure.n_modules),
        problems=(str(LoraFileError(path, structure.problem)),) if structure.problem else (),
    )


def _sd_version(structure: _Structure, metadata: Mapping[str, str]) -> tuple[str, str, str]:
    """(sd_version, source, evidence): key names/shapes first, then metadata (A1111's fields first)."""
    base = base_model_from_metadata(metadata)
    if structure.arch is not None:
        evidence = structure.evidence
        if base is not None and base != structure.arch:
            evidence += (f"; the metadata says {ARCH_NAMES.get(base, base)}, but key names and shapes outrank "
                         "metadata")
        return _ARCH_TO_SD[structure.arch], "keys", evidence
    if base is None:
        return "Unknown", "none", "no base-model metadata, and the key names and shapes are not conclusive"
    fields = [f"{k}={metadata[k]}" for k in _META_BASE_FIELDS if metadata.get(k)]
    said = ", ".join(fields) if fields else "kohya ss_* metadata without a base-model field (A1111 reads it as SD1)"
    if base in _ARCH_TO_SD:
        return _ARCH_TO_SD[base], "metadata", f"metadata: {said}"
    return "Unknown", "metadata", f"metadata says {ARCH_NAMES.get(base, base)} (not SD1/SD2/SDXL): {said}"


def _read_header_text(path: str, size: int) -> tuple[bytes, str] | None:
    """The JSON header as (bytes, text) when the framing is sane, else None (the full reader will say why)."""
    if size < 10:
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER_SIZE or n > size - 8:
            return None
        raw = f.read(n)
    if len(raw) != n:
        return None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _split_metadata(text: str) -> tuple[dict[str, str], int] | None:
    """(metadata, index where the tensor entries start: at the "," after the metadata, or at the opening "{" when
    there is none) for a header whose metadata comes first or is absent; None for other layouts."""
    if text.startswith(_META_OPEN):
        try:
            meta, end = _DECODER.raw_decode(text, len(_META_OPEN))
        except ValueError:
            return None
        if type(meta) is not dict or not set(map(type, meta.values())) <= {str}:
            return None
        return meta, end
    if '"__metadata__"' in text or not text.startswith("{"):
        return None
    return {}, 0


def _fast_header(
    path: str, size: int, memo: dict[tuple[int, int], _Structure]
) -> tuple[dict[str, str], _Structure] | None:
    """Metadata and key structure from a compact header (the safetensors library's layout), or None to fall back."""
    try:
        got = _read_header_text(path, size)
    except OSError:
        return None
    if got is None:
        return None
    raw, text = got
    split = _split_metadata(text)
    if split is None:
        return None
    metadata, start = split
    region = text[start:]
    last = region.rfind(_ENTRY_OPEN)
    if last < 0 or _data_end(region, last) != size - 8 - len(raw):
        return None  # no tensors, other layout, or data missing: the full reader decides
    # The memo key: the tensor entries' bytes without the padding (which depends on the metadata's length), as
    # (length, Python's keyed SipHash of them): as good as a digest for telling layouts apart, and 2.5x faster.
    byte_start = start if text.isascii() else len(text[:start].encode("utf-8"))
    entries = memoryview(raw)[byte_start : raw.rfind(b"}") + 1]
    digest = (len(entries), hash(entries))
    structure = memo.get(digest)
    if structure is None:
        keys = _compact_keys(region)
        if keys is None:
            return None
        structure = _analyse_keys(keys, lambda i: _compact_shape(region, keys[i]))
        memo[digest] = structure
    return metadata, structure


def _data_end(region: str, last: int) -> int | None:
    """The end offset of the entry that starts at `last` (in data order, the end of all tensor data)."""
    a = region.find('"data_offsets":[', last)
    b = region.find("]", a)
    if a < 0 or b < 0:
        return None
    parts = region[a + 16 : b].split(",")
    try:
        return int(parts[1]) if len(parts) == 2 else None
    except ValueError:
        return None


def _compact_keys(region: str) -> list[str] | None:
    """The tensor keys of compact entries `{"k0":{"dtype":...},"k1":{"dtype":...}}` (or `,"k0":...` after the
    metadata), in order; None for any other layout (spaces, field order, escapes), so the full reader takes over."""
    if "\\" in region or not region.startswith(('{"', ',"')):
        return None
    end = region.find(_KEY_END, 2)
    if end < 0 or '"' in region[2:end]:
        return None
    keys = [region[2:end], *_NEXT_KEY.findall(region, end)]
    return keys if len(keys) == region.count('"data_offsets"') else None


def _compact_shape(region: str, key: str) -> tuple[int, ...] | None:
    """The shape of `key`'s entry in a region `_compact_keys` accepted."""
    at = region.find(f'"{key}{_KEY_END}')
    if at < 0:
        return None
    a = region.find('"shape":[', at)
    b = region.find("]", a)
    if a < 0 or b < 0 or b > region.find("}", at + len(key) + len(_KEY_END)):
        return None
    inner = region[a + 9 : b]
    try:
        return tuple(int(x) for x in inner.split(",")) if inner else ()
    except ValueError:
        return None


class _KeyTable:
    """A header's LoRA keys split into (module, normalised suffix) by `lora_ext.formats.keys` rules, shapes on demand.

    When every key is "<dotless module>.<plain suffix>" (kohya/LyCORIS files) they are split at the first dot, which
    is what `split_key` would do; otherwise every key goes through `split_key`, and keys it does not know are left
    out. `shape_of(i)` is the shape of the file's i-th key.
    """

    def __init__(self, keys: Sequence[str], shape_of: Callable[[int], tuple[int, ...] | None]) -> None:
        parts = [k.partition(".") for k in keys]
        modules = tuple([p[0] for p in parts])
        suffixes = tuple([p[2] for p in parts])
        if PLAIN_SUFFIXES.issuperset(suffixes):
            self.joined: Sequence[str] = keys
            self.positions: Sequence[int] = range(len(keys))
        else:
            split = [(i, sk) for i, k in enumerate(keys) if (sk := split_key(k)) is not None]
            modules = tuple(sk.module for _, sk in split)
            suffixes = tuple(sk.suffix for _, sk in split)
            self.joined = [f"{sk.module}.{sk.suffix}" for _, sk in split]
            self.positions = [i for i, _ in split]
        self.modules: tuple[str, ...] = modules
        self.suffixes: tuple[str, ...] = suffixes
        self._shape_of = shape_of

    def shape(self, module: str, suffix: str) -> tuple[int, ...] | None:
        try:
            p = self.joined.index(f"{module}.{suffix}")
        except ValueError:
            return None
        return self._shape_of(self.positions[p])


class _ModuleShapes(Mapping):
    """suffix -> shape of one module's tensors, parsed on access."""

    def __init__(self, table: _KeyTable, module: str) -> None:
        self._table, self._module = table, module

    def __getitem__(self, suffix: str) -> tuple[int, ...]:
        shape = self._table.shape(self._module, suffix)
        if shape is None:
            raise KeyError(suffix)
        return shape

    def __iter__(self) -> Iterator[str]:
        return (s for m, s in zip(self._table.modules, self._table.suffixes) if m == self._module)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _ModulesView(Mapping):
    """module -> _ModuleShapes: what `detect_arch` reads, without building every module's dict."""

    def __init__(self, table: _KeyTable, modules: Mapping[str, None]) -> None:
        self._table, self._modules = table, modules

    def __getitem__(self, module: str) -> _ModuleShapes:
        if module not in self._modules:
            raise KeyError(module)
        return _ModuleShapes(self._table, module)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def _analyse_keys(keys: Sequence[str], shape_of: Callable[[int], tuple[int, ...] | None]) -> _Structure:
    """Algorithm, rank, module count and key-based architecture from a header's tensor keys (`shape_of(i)`: the
    shape of keys[i], None when unknown)."""
    table = _KeyTable(keys, shape_of)
    modules = dict.fromkeys(table.modules)
    if not modules:
        example = f" (e.g. {keys[0]!r})" if keys else ""
        why = f"none of its {len(keys)} tensor keys is a LoRA key{example}" if keys else "it holds no tensors"
        return _Structure(None, None, 0, None, "no LoRA keys", f"{why}; is it a LoRA file?")
    counts = Counter(table.suffixes)
    found = [(sum(counts[a] for a in anchors), name) for name, anchors in _ALGORITHM_ANCHORS]
    kinds = [name for n, name in sorted(found, key=lambda nf: -nf[0]) if n]
    if counts["dora_scale"]:
        kinds = ["dora"] if kinds == ["lora"] else [*kinds, "dora"]
    rank = None
    if counts["lora_down.weight"]:
        first = table.positions[table.suffixes.index("lora_down.weight")]
        shape = shape_of(first)
        rank = int(shape[0]) if shape else None
    guess = detect_arch(_ModulesView(table, modules), None)
    arch = guess.arch if guess.arch in _ARCH_TO_SD else None
    return _Structure("+".join(kinds) or None, rank, len(modules), arch, guess.evidence)


def _read_metadata(path: str) -> dict[str, str]:
    """The header metadata of a `.safetensors` file; {} (logged) when it cannot be read."""
    try:
        size = os.stat(path).st_size
        got = _read_header_text(path, size)
        split = _split_metadata(got[1]) if got is not None else None
        if split is not None:
            return split[0]
        return read_header(path).metadata
    except (OSError, LoraFileError) as exc:
        logger.warning("metadata of %s could not be read: %s", path, exc)
        return {}


def _read_sidecar(path: str, size: int) -> tuple[dict, str | None]:
    """A `<stem>.json` sidecar: (its object, None) or ({}, problem naming the file)."""
    if size > SIDECAR_MAX_BYTES:
        return {}, str(LoraFileError(path, f"{size} bytes is too large for a LoRA card sidecar; not read"))
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except OSError as exc:
        return {}, str(LoraFileError(path, f"cannot read the file: {exc.strerror or exc}"))
    except (ValueError, RecursionError) as exc:
        return {}, str(LoraFileError(path, f"not valid JSON ({exc})", hint="fix or delete the file"))
    if not isinstance(obj, dict):
        return {}, str(LoraFileError(path, "is not a JSON object", hint="fix or delete the file"))
    return obj, None


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a listing builds its objects (tens of thousands, no reference
    cycles among them). Otherwise they trigger collections that traverse everything else the process holds (in the
    WebUI: torch, gradio, models), which in a fresh process with torch costs about as much as the listing itself.
    The collector's own work is deferred, not skipped; it is turned back on only if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stat_or_none(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _natural_key(text: str) -> list[object]:
    """A1111's natural sort: runs of ASCII digits compare as numbers, the rest case-insensitively."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(_DIGIT_RUNS.split(text))]
