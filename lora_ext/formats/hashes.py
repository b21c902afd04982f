"""File hashes as the WebUI ecosystem computes them.

- `sha256_file`: sha256 of the whole file (A1111 `calculate_sha256`; used for non-safetensors LoRAs).
- `addnet_hash_safetensors`: sha256 of everything after the 8-byte length and the JSON header, i.e. of the tensor
  data only, so editing metadata does not change it (kohya's "addnet hash", A1111 `hashes.addnet_hash_safetensors`).
- `legacy_hash`: first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (A1111's old `model_hash`,
  sd-scripts' `sshs_legacy_hash`). Files shorter than 1 MiB hash the empty string, as there.
- `lora_short_hash`: the 12 characters A1111 v1.10 writes as "Lora hashes" in the infotext.
- `sshs_hashes_for`: the `sshs_model_hash` / `sshs_legacy_hash` metadata sd-scripts stores when it writes a LoRA.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from lora_ext.errors import LoraFileError
from lora_ext.formats.safetensors_io import prepare_tensors_for_write, read_header, validate_metadata_for_write

_BLOCK = 1024 * 1024
LEGACY_HASH_OFFSET = 0x100000
"""1 MiB: where the legacy hash window starts."""
LEGACY_HASH_SIZE = 0x10000
"""64 KiB: how many bytes the legacy hash reads."""
SHORT_HASH_LEN = 12


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lowercase hex sha256 of the whole file, read in 1 MiB blocks."""
    with _open(path) as f:
        return _sha256_stream(f)


def addnet_hash_safetensors(path: str | os.PathLike[str]) -> str:
    """Lowercase hex sha256 of the bytes after the header (8 + N) of a `.safetensors` file: its tensor data."""
    p = Path(path)
    with _open(p) as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(head) != 8:
            raise LoraFileError(p, f"file is {size} bytes, too short for a safetensors header", key="header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise LoraFileError(p, f"header length {n} is larger than the file", key="header")
        f.seek(8 + n)
        return _sha256_stream(f)


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """First 8 hex digits of sha256(file[1 MiB : 1 MiB + 64 KiB])."""
    with _open(path) as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def lora_content_hash(path: str | os.PathLike[str], *, addnet: bool = True) -> str:
    """The full hash of a LoRA file when its metadata names none: the addnet hash (tensor data only) of a
    `.safetensors` file (extension compared case-insensitively), the sha256 of the whole file otherwise and, with
    `addnet=False` (Forge's rule), for every file."""
    is_safetensors = Path(path).suffix.lower() == ".safetensors"
    return addnet_hash_safetensors(path) if addnet and is_safetensors else sha256_file(path)


def lora_short_hash(path: str | os.PathLike[str], metadata: Mapping[str, object] | None = None, *,
                    addnet: bool = True) -> str:
    """The 12-character hash A1111 v1.10's Lora extension shows and writes as "Lora hashes".

    A1111's rule: for a `.safetensors` file (extension compared case-insensitively) it takes the `sshs_model_hash`
    metadata value when that is non-empty, else the addnet hash (tensor data only); any other file gets the sha256
    of the whole file (its metadata is never read). The result is the first 12 characters. `metadata` is the file's
    header metadata; when None it is read from the file. `addnet=False`: Forge's rule (f2.0.1), the same except that
    a `.safetensors` file without `sshs_model_hash` gets the sha256 of the whole file too (Forge's `hashes.sha256`
    ignores its `use_addnet_hash` argument).
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return sha256_file(p)[:SHORT_HASH_LEN]
    if metadata is None:
        metadata = read_header(p).metadata
    stored = metadata.get("sshs_model_hash")
    if isinstance(stored, str) and stored:
        return stored[:SHORT_HASH_LEN]
    return lora_content_hash(p, addnet=addnet)[:SHORT_HASH_LEN]


def sshs_hashes_for(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) for a LoRA about to be written, as sd-scripts computes them.

    Both come from the bytes `safetensors.torch.save` produces for `tensors` with only the `ss_*` entries of
    `metadata` (training metadata, meant to be immutable; user-editable fields are left out so editing them does not
    change the hashes): the model hash is the sha256 of the tensor data after the header, which equals
    `addnet_hash_safetensors` of the final file whatever its metadata; the legacy hash is `legacy_hash` of those bytes.
    """
    ss_meta = validate_metadata_for_write({k: v for k, v in (metadata or {}).items() if k.startswith("ss_")})
    blob = safetensors.torch.save(prepare_tensors_for_write(tensors), metadata=ss_meta)
    n = int.from_bytes(blob[:8], "little")
    view = memoryview(blob)
    model_hash = hashlib.sha256(view[8 + n :]).hexdigest()
    legacy = hashlib.sha256(view[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_SIZE]).hexdigest()[:8]
    return model_hash, legacy


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    p = Path(path)
    try:
        return open(p, "rb")
    except FileNotFoundError as exc:
        raise LoraFileError(p, "file not found", hint="check the path") from exc
    except OSError as exc:
        raise LoraFileError(p, f"cannot read the file: {exc.strerror or exc}") from exc


def _sha256_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_BLOCK):
        h.update(chunk)
    return h.hexdigest()
