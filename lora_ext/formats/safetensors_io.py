"""Safe reading and atomic writing of `.safetensors` files.

File layout (safetensors format): 8 bytes little-endian u64 `N`, then `N` bytes of UTF-8 JSON (an object, padded
with trailing spaces), then the data buffer. Each JSON entry other than `"__metadata__"` is
`{"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}` with offsets relative to the start of the buffer;
the tensors must tile the buffer exactly (no gaps, no overlaps, nothing after the last one). `"__metadata__"`, if
present, maps str -> str.

`read_header` checks all of that before a single tensor byte is touched, so a hostile or damaged file fails with a
`LoraFileError` that names the file, the key and the cause, instead of an opaque error (or a huge allocation) deep
inside a library. It is slightly stricter than the library in one respect: a key that appears twice in the JSON
(which parsers resolve differently) is rejected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lora_ext.errors import LoraFileError

logger = logging.getLogger(__name__)

MAX_HEADER_SIZE = 100_000_000
"""Largest JSON header accepted, in bytes (the same bound as the safetensors library)."""

METADATA_KEY = "__metadata__"

DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
"""Bits per element of every dtype name the safetensors format defines."""

_DAMAGED_HINT = "the file is damaged or incomplete; download or export it again"
_NOT_SAFETENSORS_HINT = "this is not a valid .safetensors file; re-export it with a current safetensors version"


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. `data_offsets` are byte offsets relative to the start of the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a `.safetensors` file. `header_size` is `N` (the JSON length, padding included)."""

    path: Path
    header_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer (8 + N)."""
        return 8 + self.header_size


# --------------------------------------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate only the header of `path` (no tensor data is read).

    Raises `LoraFileError` (naming the file, the tensor key or field at fault, and what to do) for anything that does
    not follow the safetensors format exactly.
    """
    p = Path(path)
    file_size = _file_size(p)
    if file_size < 8:
        raise LoraFileError(
            p, f"file is {file_size} bytes, too short for a safetensors header (needs at least 8)", hint=_DAMAGED_HINT
        )
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:  # the file shrank under us
                raise LoraFileError(p, "file was truncated while reading its header", key="header", hint=_DAMAGED_HINT)
            (n,) = struct.unpack("<Q", head)
            problem = _length_problem(n, file_size)
            if problem is not None:
                reason, hint = problem
                raise LoraFileError(p, reason, key="header", hint=_other_format_hint(head) or hint)
            raw = f.read(n)
    except OSError as exc:
        raise LoraFileError(p, f"cannot read the file: {exc.strerror or exc}") from exc
    if len(raw) != n:  # the file shrank under us
        raise LoraFileError(p, "file was truncated while reading its header", key="header", hint=_DAMAGED_HINT)
    header_obj = _parse_header_json(p, raw)
    metadata = _validate_metadata(p, header_obj.pop(METADATA_KEY, None))
    tensors = {key: _tensor_info(p, key, entry) for key, entry in header_obj.items()}
    _check_layout(p, tensors, data_len=file_size - 8 - n)
    return SafetensorsHeader(path=p, header_size=n, tensors=tensors, metadata=metadata, file_size=file_size)


def _length_problem(n: int, file_size: int) -> tuple[str, str] | None:
    """(reason, hint) when a header length `n` cannot be right for a file of `file_size` bytes, else None."""
    if n > MAX_HEADER_SIZE:
        return f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit", _NOT_SAFETENSORS_HINT
    if n > file_size - 8:
        return f"header length {n} is larger than the {file_size - 8} bytes that follow it", _DAMAGED_HINT
    return None


def load_tensors(
    path: str | os.PathLike[str],
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    header: SafetensorsHeader | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensors (all, or only `keys`) from a `.safetensors` file onto `device`.

    The header is validated first (or `header` from an earlier `read_header` of the same file is reused); the data is
    then read with `safetensors.safe_open`. Every failure is a `LoraFileError`.
    """
    p = Path(path)
    if header is None:
        header = read_header(p)
    elif _file_size(p) != header.file_size:
        raise LoraFileError(p, "file changed since its header was read", hint="read it again")
    if isinstance(keys, str):
        raise TypeError("keys must be an iterable of tensor names, not a single str")
    wanted = list(header.tensors) if keys is None else list(keys)
    for key in wanted:
        if key not in header.tensors:
            raise LoraFileError(p, "no tensor with this name in the file", key=key)
    dev = str(device) if isinstance(device, torch.device) else device
    out: dict[str, torch.Tensor] = {}
    current = None
    try:
        with safetensors.safe_open(str(p), framework="pt", device=dev) as f:
            for key in wanted:
                current = key
                out[key] = f.get_tensor(key)
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise LoraFileError(
            p, f"safetensors could not load the tensor data: {exc}", key=current, hint=_DAMAGED_HINT
        ) from exc
    return out


def _other_format_hint(head: bytes) -> str | None:
    """A hint when the first bytes show a PyTorch file (zip archive or pickle) that was named .safetensors."""
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive, probably a PyTorch .pt/.ckpt file named .safetensors; rename it to .pt"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "it is a Python pickle, probably a PyTorch .pt/.ckpt file named .safetensors; rename it to .pt"
    return None


def _file_size(p: Path) -> int:
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise LoraFileError(p, "file not found", hint="check the path") from exc
    except OSError as exc:
        raise LoraFileError(p, f"cannot access the file: {exc.strerror or exc}") from exc
    if not p.is_file():
        raise LoraFileError(p, "not a regular file", hint="pass the path of a .safetensors file")
    return st.st_size


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_header_json(p: Path, raw: bytes) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraFileError(
            p, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})", key="header", hint=_NOT_SAFETENSORS_HINT
        ) from exc
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise LoraFileError(p, "key appears twice in the header", key=exc.key, hint=_NOT_SAFETENSORS_HINT) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer with too many digits
        raise LoraFileError(p, f"header is not valid JSON: {exc}", key="header", hint=_NOT_SAFETENSORS_HINT) from exc
    if not isinstance(obj, dict):
        raise LoraFileError(
            p, f"header is a JSON {_json_type(obj)}, not an object", key="header", hint=_NOT_SAFETENSORS_HINT
        )
    return obj


def _validate_metadata(p: Path, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LoraFileError(
            p,
            f"metadata is a JSON {_json_type(raw)}, not an object of strings",
            key=METADATA_KEY,
            hint=_NOT_SAFETENSORS_HINT,
        )
    for k, v in raw.items():
        if not isinstance(v, str):
            raise LoraFileError(
                p,
                f"metadata value is a JSON {_json_type(v)}, but every metadata value must be a string",
                key=f"{METADATA_KEY}.{k}",
                hint=_NOT_SAFETENSORS_HINT,
            )
    return dict(raw)


def _json_type(x: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _is_nonneg_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(p: Path, key: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise LoraFileError(
            p, f"tensor entry is a JSON {_json_type(entry)}, not an object", key=key, hint=_NOT_SAFETENSORS_HINT
        )
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise LoraFileError(p, f"tensor entry has no {field!r}", key=key, hint=_NOT_SAFETENSORS_HINT)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise LoraFileError(
            p, f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})", key=key, hint=_NOT_SAFETENSORS_HINT
        )
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise LoraFileError(
            p, f"shape {shape!r} is not a list of non-negative integers", key=key, hint=_NOT_SAFETENSORS_HINT
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nonneg_int(o) for o in offsets)):
        raise LoraFileError(
            p, f"data_offsets {offsets!r} is not a pair of non-negative integers", key=key, hint=_NOT_SAFETENSORS_HINT
        )
    begin, end = offsets
    if end < begin:
        raise LoraFileError(p, f"data_offsets end {end} is before begin {begin}", key=key, hint=_NOT_SAFETENSORS_HINT)
    info = TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end))
    bits = info.numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise LoraFileError(
            p, f"{info.numel} elements of {dtype} do not fill whole bytes", key=key, hint=_NOT_SAFETENSORS_HINT
        )
    if bits // 8 != info.nbytes:
        raise LoraFileError(
            p,
            f"shape {list(shape)} of {dtype} needs {bits // 8} bytes but data_offsets span {info.nbytes}",
            key=key,
            hint=_NOT_SAFETENSORS_HINT,
        )
    return info


def _check_layout(p: Path, tensors: Mapping[str, TensorInfo], data_len: int) -> None:
    """Tensors must tile [0, data_len) exactly: in bounds, no overlap, no gap, nothing after the last one."""
    for key, info in tensors.items():
        if info.data_offsets[1] > data_len:
            raise LoraFileError(
                p,
                f"data_offsets {list(info.data_offsets)} run past the end of the data ({data_len} bytes)",
                key=key,
                hint=_DAMAGED_HINT,
            )
    pos, prev = 0, None
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].data_offsets, kv[0])):
        begin, end = info.data_offsets
        if begin < pos:
            raise LoraFileError(p, f"tensor data overlaps tensor {prev!r}", key=key, hint=_NOT_SAFETENSORS_HINT)
        if begin > pos:
            raise LoraFileError(
                p, f"{begin - pos} unused bytes before this tensor's data", key=key, hint=_NOT_SAFETENSORS_HINT
            )
        pos, prev = end, key
    if pos != data_len:
        raise LoraFileError(
            p,
            f"{data_len - pos} bytes after the last tensor belong to no tensor",
            key="header",
            hint=_NOT_SAFETENSORS_HINT,
        )


# ------------------------------------------------------------------------------------------------ fast header reading
#
# Listing thousands of LoRA files needs each header's metadata and the shapes of a few keys, not 800 validated
# entries. The safetensors library writes headers in one compact layout (metadata first, entries in data order, no
# spaces); for that layout the reader below decodes only the metadata and cuts keys and shapes out of the text. It
# applies `read_header`'s rules where it reads (framing, metadata, the tensors ending where the file ends) and returns
# None for anything else, so that the caller falls back to `read_header`, which validates everything and says why.

_DECODER = json.JSONDecoder()
_META_OPEN = '{"__metadata__":'
_ENTRY_OPEN = '{"dtype":'
_KEY_END = '":{"dtype":'
_NEXT_KEY = re.compile(r'\},"([^"]*)":\{"dtype":')  # a literal "}" first: the regex engine scans for it in C


@dataclass(frozen=True, slots=True)
class CompactHeader:
    """A header in the safetensors library's compact layout, its tensor entries left as text.

    `layout` identifies the tensor entries (keys, dtypes, shapes, offsets; not the metadata) as (length, Python's keyed
    SipHash of their bytes): files written by the same trainer with the same settings share it."""

    metadata: dict[str, str]
    entries: str
    layout: tuple[int, int]

    def keys(self) -> list[str] | None:
        """The tensor keys in order; None when the entries are not all compact (spaces, field order, escapes)."""
        region = self.entries
        if "\\" in region or not region.startswith(('{"', ',"')):
            return None
        end = region.find(_KEY_END, 2)
        if end < 0 or '"' in region[2:end]:
            return None
        keys = [region[2:end], *_NEXT_KEY.findall(region, end)]
        return keys if len(keys) == region.count('"data_offsets"') else None

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of `key`'s entry (for a key `keys()` returned), None when it cannot be read."""
        region = self.entries
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


def read_compact_header(path: str | os.PathLike[str], file_size: int) -> CompactHeader | None:
    """The header of a file of `file_size` bytes when it is in the compact layout and its tensors end where the file
    ends; None otherwise (use `read_header`). Raises OSError when the file cannot be read."""
    got = _read_header_text(path, file_size)
    if got is None:
        return None
    raw, text = got
    split = _split_metadata(text)
    if split is None:
        return None
    metadata, start = split
    region = text[start:]
    last = region.rfind(_ENTRY_OPEN)
    if last < 0 or _data_end(region, last) != file_size - 8 - len(raw):
        return None  # no tensors, another layout, or data missing
    # the entries' bytes without the padding (which depends on the metadata's length)
    byte_start = start if text.isascii() else len(text[:start].encode("utf-8"))
    entries = memoryview(raw)[byte_start : raw.rfind(b"}") + 1]
    return CompactHeader(metadata, region, (len(entries), hash(entries)))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a `.safetensors` file, decoding only the metadata when it comes first (the library's
    layout), else through `read_header`. Raises `LoraFileError` (or OSError) when it cannot be read."""
    got = _read_header_text(path, os.stat(path).st_size)
    split = _split_metadata(got[1]) if got is not None else None
    if split is not None:
        return split[0]
    return read_header(path).metadata


def _read_header_text(path: str | os.PathLike[str], file_size: int) -> tuple[bytes, str] | None:
    """The JSON header as (bytes, text) when the framing follows `read_header`'s rules, else None."""
    if file_size < 10:
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        n = int.from_bytes(head, "little")
        if n < 2 or _length_problem(n, file_size) is not None:
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
    there is none) for a header whose metadata comes first or is absent; None for other layouts or bad metadata."""
    if text.startswith(_META_OPEN):
        try:
            meta, end = _DECODER.raw_decode(text, len(_META_OPEN))
        except ValueError:
            return None
        if type(meta) is not dict or not set(map(type, meta.values())) <= {str}:
            return None  # `_validate_metadata`'s rule: an object of strings
        return meta, end
    if f'"{METADATA_KEY}"' in text or not text.startswith("{"):
        return None
    return {}, 0


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


# --------------------------------------------------------------------------------------------------------- writing


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `tensors` (+ str->str `metadata`) to `path` atomically; return the path.

    The file is written to a temporary file in the same directory, flushed and fsynced, then moved into place with
    `os.replace`: readers see the old file or the complete new one, never a partial one, and a failure leaves
    neither a partial file nor the temporary file behind. Non-contiguous, shared-storage or non-CPU tensors are
    copied as needed; the caller's tensors are not modified. `overwrite=False` refuses an existing `path`.
    """
    p = Path(path)
    _check_target(p, overwrite)
    meta = validate_metadata_for_write(metadata, p)
    prepared = prepare_tensors_for_write(tensors, p)
    return _atomic_write(p, lambda tmp: safetensors.torch.save_file(prepared, str(tmp), metadata=meta), overwrite)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (same guarantees as `save_safetensors_atomic`); return the path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    p = Path(path)
    _check_target(p, overwrite)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic_write(p, write, overwrite)


def validate_metadata_for_write(
    metadata: Mapping[str, str] | None, path: str | os.PathLike[str] | None = None
) -> dict[str, str] | None:
    """Return `metadata` as a plain dict after checking every key and value is a str (else `LoraFileError`)."""
    if metadata is None:
        return None
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str):
            raise LoraFileError(path, f"metadata key {k!r} is {type(k).__name__}, not str", key=str(k))
        if not isinstance(v, str):
            raise LoraFileError(
                path,
                f"metadata value is {type(v).__name__}, but safetensors metadata values must be strings",
                key=f"{METADATA_KEY}.{k}",
                hint="convert it first, e.g. json.dumps(value) or str(value)",
            )
        out[k] = v
    return out


def prepare_tensors_for_write(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """Detached CPU tensors that own their whole storage, as safetensors requires; copies only where needed."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise LoraFileError(path, f"tensor name {key!r} is {type(key).__name__}, not str", key=str(key))
        if key == METADATA_KEY:
            raise LoraFileError(path, f"{METADATA_KEY!r} is reserved and cannot name a tensor", key=key)
        if not isinstance(t, torch.Tensor):
            raise LoraFileError(path, f"value is {type(t).__name__}, not a torch.Tensor", key=key)
        if t.layout != torch.strided:
            raise LoraFileError(path, f"{t.layout} tensors cannot be saved", key=key, hint="call .to_dense() first")
        try:
            t = t.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            owns_storage = t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
            if not t.is_contiguous() or not owns_storage or (ptr != 0 and ptr in seen_storages):
                t = t.clone(memory_format=torch.contiguous_format)
                ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError) as exc:
            raise LoraFileError(path, f"tensor cannot be copied for saving: {exc}", key=key) from exc
        if ptr != 0:
            seen_storages.add(ptr)
        out[key] = t
    return out


def _check_target(p: Path, overwrite: bool) -> None:
    if p.is_dir():
        raise LoraFileError(p, "a directory exists at this path", hint="choose a file name")
    if not overwrite and (p.exists() or p.is_symlink()):
        raise LoraFileError(p, "file already exists", hint="choose another name or allow overwriting")
    if not p.parent.is_dir():
        raise LoraFileError(p, f"folder {str(p.parent)!r} does not exist", hint="create it first")


def _atomic_write(p: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    mode = _new_file_mode(p)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise LoraFileError(p, f"cannot create a file in {str(p.parent)!r}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, p)
        else:
            _move_no_clobber(tmp, p)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, LoraFileError):
            raise LoraFileError(
                p, f"writing failed: {exc}", hint="no file was written; check the disk and the data"
            ) from exc
        raise
    fsync_dir(p.parent)
    logger.debug("wrote %s", p)
    return p


def _move_no_clobber(tmp: Path, p: Path) -> None:
    """Move `tmp` to `p` unless `p` exists; a hard link makes the check and the move one atomic step."""
    try:
        os.link(tmp, p)
    except FileExistsError as exc:
        raise LoraFileError(p, "file already exists", hint="choose another name or allow overwriting") from exc
    except OSError:  # file system without hard links: check, then move (a small race remains)
        if p.exists():
            raise LoraFileError(p, "file already exists", hint="choose another name or allow overwriting") from None
        os.replace(tmp, p)
        return
    tmp.unlink()


def fsync_dir(d: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode(p: Path) -> int:
    """Permissions for the new file: those of the file it replaces, else 0o666 minus the umask (as `open` would)."""
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        pass
    umask = 0o022
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return 0o666 & ~umask
