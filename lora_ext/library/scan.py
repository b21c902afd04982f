"""What is on disk: the walk over the LoRA folders, what each file's header says, and the sidecars beside it.

The walk follows AUTOMATIC1111 v1.10's `modules.util.walk_files` order (see `lora_ext.library.index` for the rules);
training run folders (`lora_ext.runfolder.is_run_folder`) are not walked. A file's header is read through the fast
compact-layout reader of `lora_ext.formats.safetensors_io` (falling back to the validating `read_header`) and turned
into `Facts`: base model (key names and shapes first, `lora_ext.formats.arch`, then metadata), algorithm, rank,
module count. Pickles are never opened. Sidecars: `<stem>.json` (the card's user metadata), previews and
descriptions found among the names of the file's directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_ext import families
from lora_ext.errors import LoraFileError
from lora_ext.formats.algorithms import ALGORITHMS
from lora_ext.formats.arch import detect_arch
from lora_ext.formats.keys import PLAIN_SUFFIXES, split_key
from lora_ext.formats.metadata import base_model_from_metadata
from lora_ext.formats.safetensors_io import read_compact_header, read_header
from lora_ext.library.cache import Facts, FileRecord
from lora_ext.runfolder import is_run_folder

logger = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
"""File extensions listed (compared lowercased), as A1111's Lora extension."""
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
"""A1111's default preview extensions; for each, `<stem>.<ext>` is tried before `<stem>.preview.<ext>`."""
DESCRIPTION_SUFFIXES = (".txt", ".description.txt")
SIDECAR_MAX_BYTES = 1 << 20
"""A `<stem>.json` sidecar larger than this is not read (A1111's are a few hundred bytes)."""

_META_BASE_FIELDS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")
_DIGIT_RUNS = re.compile(r"([0-9]+)")
# algorithm name -> the suffixes that mark one module of it, in registry order
_ALGORITHM_ANCHORS = tuple((cls.name, cls.anchors) for cls in ALGORITHMS)


# --------------------------------------------------------------------------------------------------------- the walk


@dataclass(frozen=True, slots=True)
class Found:
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


def walk(dirs: Sequence[Path], include_hidden: bool) -> list[Found]:
    """A1111 `walk_files` order, symlinked directories followed once each (no cycles, no directory twice)."""
    visited: set[tuple[int, int]] = set()
    found: list[Found] = []
    for root in dirs:
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
            names, candidates, subdirs = _scan_dir(d, visited, include_hidden)
            listed.append((d, rel, names, candidates))
            stack.extend((os.path.join(d, s), (*rel, s)) for s in subdirs)
        listed.sort(key=lambda item: natural_key(item[0]))
        for d, rel, names, candidates in listed:
            for de in sorted(candidates, key=lambda de: natural_key(de.name)):
                try:
                    fst = de.stat()
                except OSError as exc:
                    logger.warning("LoRA file %s cannot be read (%s); not listed", de.path, exc.strerror or exc)
                    continue
                if stat.S_ISREG(fst.st_mode):
                    found.append(Found(root_path, d, rel, de.name, fst.st_size, fst.st_mtime_ns, names))
    return found


def _scan_dir(
    d: str, visited: set[tuple[int, int]], include_hidden: bool
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
            if not include_hidden and de.name.startswith("."):
                continue
            try:
                dst = de.stat()
            except OSError:
                continue
            dirs.append((de.is_symlink(), natural_key(de.name), de.name, (dst.st_dev, dst.st_ino)))
    if is_run_folder(names, {entry[2] for entry in dirs}):  # training state, not LoRAs (lora_ext.runfolder)
        logger.debug("%s is a training run folder; not listed", d)
        return frozenset(), [], []
    subdirs = []
    for *_, name, key in sorted(dirs):  # a folder reached twice is walked once: real folders first, then by name
        if key not in visited:
            visited.add(key)
            subdirs.append(name)
    return frozenset(names), candidates, subdirs


def natural_key(text: str) -> list[object]:
    """A1111's natural sort: runs of ASCII digits compare as numbers, the rest case-insensitively."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(_DIGIT_RUNS.split(text))]


# ------------------------------------------------------------------------------------------------ reading one file


_PICKLE_FACTS = Facts("Unknown", "none", "pickled file (.pt/.ckpt): not opened while listing", None, None, None)
_UNREADABLE_FACTS = Facts("Unknown", "none", "the header could not be read", None, None, None)


@dataclass(frozen=True, slots=True)
class _Structure:
    """What the tensor keys of a header say, independent of the file: shared by files with the same layout."""

    algorithm: str | None
    rank: int | None
    n_modules: int
    arch: str | None  # "sd1" | "sd2" | "sdxl" | None, from key names and shapes only
    evidence: str
    problem: str | None = None  # reason, without the file name


def inspect(path: str, size: int, mtime_ns: int, memo: dict[tuple[int, int], _Structure]) -> FileRecord:
    """Learn what listing needs from one file version: its header only, never a pickle. `memo` (per scan) maps
    a compact header's tensor layout to what its keys say, so that files sharing a layout are analysed once."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return FileRecord(size, mtime_ns, None, None, _PICKLE_FACTS)
    try:
        fast = _fast_structure(path, size, memo)
        if fast is not None:
            metadata, structure = fast
        else:
            header = read_header(path)
            metadata = header.metadata
            keys = list(header.tensors)
            structure = _analyse_keys(keys, lambda i: header.tensors[keys[i]].shape)
    except LoraFileError as exc:
        return FileRecord(size, mtime_ns, None, None, _UNREADABLE_FACTS, (str(exc),))
    sd_version, source, evidence = _sd_version(structure, metadata)
    alias = metadata.get("ss_output_name")
    return FileRecord(
        size=size,
        mtime_ns=mtime_ns,
        alias=alias if alias and alias.strip() else None,
        sshs=metadata.get("sshs_model_hash") or None,
        facts=Facts(sd_version, source, evidence, structure.algorithm, structure.rank, structure.n_modules),
        problems=(str(LoraFileError(path, structure.problem)),) if structure.problem else (),
    )


def _sd_version(structure: _Structure, metadata: Mapping[str, str]) -> tuple[str, str, str]:
    """(sd_version, source, evidence): key names/shapes first, then metadata (A1111's fields first)."""
    base = base_model_from_metadata(metadata)
    if structure.arch is not None:
        evidence = structure.evidence
        if base is not None and base != structure.arch:
            evidence += (f"; the metadata says {families.label(base)}, but key names and shapes outrank "
                         "metadata")
        return families.sd_version(structure.arch), "keys", evidence
    if base is None:
        return "Unknown", "none", "no base-model metadata, and the key names and shapes are not conclusive"
    fields = [f"{k}={metadata[k]}" for k in _META_BASE_FIELDS if metadata.get(k)]
    said = ", ".join(fields) if fields else "kohya ss_* metadata without a base-model field (A1111 reads it as SD1)"
    if base in families.FAMILIES:
        return families.sd_version(base), "metadata", f"metadata: {said}"
    return "Unknown", "metadata", f"metadata says {families.label(base)} (not {'/'.join(families.SD_VERSIONS)}): {said}"


def _fast_structure(
    path: str, size: int, memo: dict[tuple[int, int], _Structure]
) -> tuple[dict[str, str], _Structure] | None:
    """Metadata and key structure from a compact header (`read_compact_header`), or None to fall back."""
    try:
        header = read_compact_header(path, size)
    except OSError:
        return None
    if header is None:
        return None
    structure = memo.get(header.layout)
    if structure is None:
        keys = header.keys()
        if keys is None:
            return None
        structure = _analyse_keys(keys, lambda i: header.shape(keys[i]))
        memo[header.layout] = structure
    return header.metadata, structure


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
    arch = guess.arch if guess.arch in families.FAMILIES else None
    return _Structure("+".join(kinds) or None, rank, len(modules), arch, guess.evidence)

# ---------------------------------------------------------------------------------------------------------- sidecars


def preview_name(stem: str, siblings: frozenset[str], extensions: Sequence[str]) -> str | None:
    """The preview image's name among `siblings`: `<stem>.<ext>` before `<stem>.preview.<ext>`, ext by ext."""
    for ext in extensions:
        for name in (f"{stem}.{ext}", f"{stem}.preview.{ext}"):
            if name in siblings:
                return name
    return None


def description_name(stem: str, siblings: frozenset[str]) -> str | None:
    """The description file's name among `siblings` (`<stem>.txt`, then `<stem>.description.txt`)."""
    return next((stem + s for s in DESCRIPTION_SUFFIXES if stem + s in siblings), None)


def read_sidecar(path: str, size: int) -> tuple[dict, str | None]:
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
