"""Tensor-by-tensor reading and writing of `.safetensors` files (the model tools, and model loading without a map).

`TensorFile` reads one tensor at a time at its byte offsets (validated header first: `read_header`), or copies a
tensor's bytes to another file without making a tensor of them; `StreamWriter` writes a safetensors file whose header
is known before any data (the tools never change a shape, and they know every dtype in advance), tensor after tensor,
so peak memory is one tensor, not the model. Files are written atomically (`_atomic_write`: temporary file, fsync,
rename; nothing left behind on failure, including a full disk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lora_ext.formats.safetensors_io import (
    DTYPE_BITS,
    METADATA_KEY,
    SafetensorsHeader,
    _atomic_write,
    _check_target,
    read_header,
    validate_metadata_for_write,
)

_COPY_BLOCK = 16 << 20  # bytes copied at a time for tensors passed through unchanged

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **({"F8_E4M3": torch.float8_e4m3fn} if hasattr(torch, "float8_e4m3fn") else {}),
    **({"F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e5m2") else {}),
}
DTYPE_NAMES: Mapping[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})


class TensorFile:
    """A `.safetensors` file opened for reading tensor by tensor (its header validated once)."""

    def __init__(self, path: str | os.PathLike[str], header: SafetensorsHeader | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_header(self.path)
        self._fh: BinaryIO | None = None

    def __enter__(self) -> TensorFile:
        self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def keys(self) -> list[str]:
        """Keys in the order of their data in the file."""
        return sorted(self.header.tensors, key=lambda k: self.header.tensors[k].data_offsets[0])

    def _seek(self, key: str) -> tuple[BinaryIO, int]:
        if self._fh is None:
            raise RuntimeError("TensorFile must be used as a context manager")
        info = self.header.tensors[key]
        self._fh.seek(self.header.data_start + info.data_offsets[0])
        return self._fh, info.nbytes

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key`, in memory (its own storage, 64-byte aligned like any fresh allocation)."""
        info = self.header.tensors[key]
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{self.path} [{key}]: dtype {info.dtype} is not supported by the model tools")
        fh, n = self._seek(key)
        out = torch.empty(info.shape, dtype=dtype)
        if n:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = fh.readinto(view)
            if got != n:
                raise OSError(f"{self.path} [{key}]: file ended after {got} of {n} bytes")
        return out

    def copy_bytes(self, key: str, dst: BinaryIO) -> None:
        """Write the raw bytes of `key` to `dst` in blocks (no tensor is made)."""
        fh, n = self._seek(key)
        while n:
            block = fh.read(min(n, _COPY_BLOCK))
            if not block:
                raise OSError(f"{self.path} [{key}]: file ended early")
            dst.write(block)
            n -= len(block)


class TensorFiles:
    """`TensorFile`s kept open, one per path, until the context ends (reads that jump between several files)."""

    def __init__(self) -> None:
        self._open: dict[Path, TensorFile] = {}

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for tf in self._open.values():
            tf.__exit__()
        self._open.clear()

    def get(self, path: Path, header: SafetensorsHeader | None = None) -> TensorFile:
        tf = self._open.get(path)
        if tf is None:
            tf = self._open[path] = TensorFile(path, header).__enter__()
        return tf


@dataclass(frozen=True)
class Entry:
    """One tensor of a file to write: its key, safetensors dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BITS[self.dtype] // 8


def encode_header(head: Mapping[str, object]) -> bytes:
    """The 8-byte length and the compact JSON header, space-padded to a multiple of 8 bytes, in `head`'s key order."""
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The header for `entries` written in order (metadata first)."""
    head: dict[str, object] = {}
    if metadata:
        head[METADATA_KEY] = dict(metadata)
    offset = 0
    for e in entries:
        head[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    return encode_header(head)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes (little-endian, C order) without copying a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Write a safetensors file atomically, tensor by tensor, in the order of `entries`.

    `produce(fh, entry)` is called once per entry and must write exactly `entry.nbytes` bytes (checked).
    `verify(tmp_path)` runs on the complete temporary file before it replaces `path` (raise to refuse it).
    `write_into(fh, produce)` writes the same bytes into an open file (a file inside a folder that is itself built
    aside and renamed into place).
    """

    def __init__(self, path: str | os.PathLike[str], entries: Sequence[Entry], metadata: Mapping[str, str] | None,
                 *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self.metadata = validate_metadata_for_write(metadata, self.path)
        self.overwrite = overwrite
        _check_target(self.path, overwrite)

    def write_into(self, fh: BinaryIO, produce: Callable[[BinaryIO, Entry], None]) -> None:
        fh.write(header_bytes(self.entries, self.metadata))
        for entry in self.entries:
            start = fh.tell()
            produce(fh, entry)
            written = fh.tell() - start
            if written != entry.nbytes:
                raise RuntimeError(f"internal error: {entry.key} wrote {written} bytes, expected {entry.nbytes}")
        fh.flush()

    def write(self, produce: Callable[[BinaryIO, Entry], None],
              verify: Callable[[Path], None] | None = None) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                self.write_into(fh, produce)
            if verify is not None:
                verify(tmp)

        return _atomic_write(self.path, write, self.overwrite)
