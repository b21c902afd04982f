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
  `addnet_hashes=False` gives Forge's rule instead: the sha256 of the whole file for `.safetensors` too.
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

The catalogue is in three parts: this module (naming, lookup, hashes: the entries and A1111's rules above),
`lora_ext.library.scan` (the walk, what each header says, sidecars and previews) and `lora_ext.library.cache` (the
per-file records and their versioned cache file). Headers are read with the fast compact-layout reader of
`lora_ext.formats.safetensors_io` (only the metadata is JSON-decoded; identical tensor layouts are analysed once per
scan); anything else goes through its validating `read_header`. Listing checks a header's framing, its metadata and
that its tensors end where the file ends; every tensor entry is validated when the file is loaded.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_ext.errors import LoraFileError
from lora_ext.formats.hashes import SHORT_HASH_LEN, lora_content_hash
from lora_ext.formats.safetensors_io import read_metadata
from lora_ext.library.cache import SD_VERSIONS, FileRecord, SidecarRecord, load_cache, save_cache
from lora_ext.library.scan import (
    LORA_EXTENSIONS,
    PREVIEW_EXTENSIONS,
    Found,
    description_name,
    inspect,
    preview_name,
    read_sidecar,
    walk,
)

logger = logging.getLogger(__name__)

PREFERRED_FILENAME = "Filename"
PREFERRED_ALIAS = "Alias from file"
ALWAYS_FORBIDDEN_ALIASES = frozenset({"none"})
"""A1111 also lists "Addams", but compares lowercased text with it, so it never matches; "none" is the real one."""

_TAG_BREAKING = re.compile(r"[:<>]")

__all__ = ["LORA_EXTENSIONS", "PREFERRED_ALIAS", "PREFERRED_FILENAME", "PREVIEW_EXTENSIONS", "SD_VERSIONS",
           "LoraEntry", "LoraIndex"]


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
        addnet_hashes: bool = True,
    ) -> None:
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self._dirs = tuple(Path(d) for d in dirs)
        self._cache_file = Path(cache_file) if cache_file is not None else None
        self._include_hidden = include_hidden
        self._preview_extensions = tuple(e.lower().lstrip(".") for e in preview_extensions)
        self.addnet_hashes = addnet_hashes
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        self._records: dict[str, FileRecord] = {}
        self._sidecars: dict[str, SidecarRecord] = {}
        self._slots: dict[str, tuple[int, int, _MetadataSlot]] = {}
        # path -> (record, sidecar, preview name, description name, entry) of the last listing
        self._made: dict[str, tuple[FileRecord, SidecarRecord | None, str | None, str | None, LoraEntry]] = {}
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
            found = walk(self._dirs, self._include_hidden)
            memo: dict = {}  # tensor layout -> what its keys say, for this scan (`scan.inspect`)
            records: dict[str, FileRecord] = {}
            sidecars: dict[str, SidecarRecord] = {}
            entries: list[LoraEntry] = []
            for f in found:
                path = f.path
                rec = self._records.get(path)
                if rec is None or rec.size != f.size or rec.mtime_ns != f.mtime_ns:
                    rec = inspect(path, f.size, f.mtime_ns, memo)
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
        tensor data (`.safetensors`, the "addnet" hash) or of the whole file (others, and every file with
        `addnet_hashes=False`, Forge's rule), lowercase hex.

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
        value = lora_content_hash(key, addnet=self.addnet_hashes)
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

    def _make_entry(self, f: Found, rec: FileRecord, sidecars: dict[str, SidecarRecord]) -> LoraEntry:
        """The entry for a file; the previous listing's entry object when nothing about it changed."""
        path = f.path
        stem = os.path.splitext(f.name)[0]
        side = None
        if stem + ".json" in f.siblings:
            side_path = os.path.join(f.dir, stem + ".json")
            side = sidecars.get(side_path) or self._sidecar(side_path)
            if side is not None:
                sidecars[side_path] = side
        preview = preview_name(stem, f.siblings, self._preview_extensions)
        description = description_name(stem, f.siblings)
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

    def _slot(self, path: str, f: Found, rec: FileRecord) -> _MetadataSlot | None:
        if rec.facts.n_modules is None:  # a pickle, or a header that could not be read
            return None
        held = self._slots.get(path)
        if held is not None and held[0] == f.size and held[1] == f.mtime_ns:
            return held[2]
        slot = _MetadataSlot(path)
        self._slots[path] = (f.size, f.mtime_ns, slot)
        return slot

    def _sidecar(self, path: str) -> SidecarRecord | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        old = self._sidecars.get(path)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            return old
        self._cache_dirty = True
        data, problem = read_sidecar(path, st.st_size)
        return SidecarRecord(st.st_size, st.st_mtime_ns, data, problem)

    # --- cache file -----------------------------------------------------------------------------------------------
    def _load_cache(self) -> None:
        if self._cache_loaded:
            return
        self._cache_loaded = True
        if self._cache_file is None:
            return
        contents = load_cache(self._cache_file)
        if contents is None:  # missing, unreadable or foreign: rebuilt and rewritten
            self._cache_dirty = True
            return
        self._records.update(contents.records)
        self._sidecars.update(contents.sidecars)
        if not contents.complete:
            self._cache_dirty = True  # rewrite without the records that were dropped

    def _save_cache(self) -> None:
        if self._cache_file is None or not self._cache_dirty:
            return
        if save_cache(self._cache_file, self._records, self._sidecars):
            self._cache_dirty = False


def _read_metadata(path: str) -> dict[str, str]:
    """The header metadata of a `.safetensors` file; {} (logged) when it cannot be read."""
    try:
        return read_metadata(path)
    except (OSError, LoraFileError) as exc:
        logger.warning("metadata of %s could not be read: %s", path, exc)
        return {}


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
