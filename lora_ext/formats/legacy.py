"""Loading LoRA files of any supported format without running code from the file.

Legacy PyTorch files (`.pt`, `.ckpt`, `.bin`, `.pth`) are pickles. They are only ever opened with
`torch.load(weights_only=True)`, whose restricted unpickler accepts tensors, containers and plain values and refuses
every other global (such as `os.system`): a file that needs more is rejected with `UnsafeFileError` and the advice to
convert it to `.safetensors` from a trusted environment. Nothing in the file is executed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ext.errors import LoraFileError, UnsafeFileError
from lora_ext.formats.safetensors_io import load_tensors, read_header

logger = logging.getLogger(__name__)

LEGACY_EXTENSIONS = frozenset({".pt", ".ckpt", ".bin", ".pth"})
SAFETENSORS_EXTENSION = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model", "module")
"""Keys under which training checkpoints nest the actual state dict; unwrapped only when they hold tensors."""
MAX_NESTING = 16
"""Dicts nested deeper than this are skipped (a state dict is flat; a hostile file could nest without limit)."""

_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")
_UNSAFE_MARKERS = ("Unsupported global", "GLOBAL ", "Unsupported operand", "not an allowed global", "is blocked")
_CONVERT_HINT = (
    "it was not loaded; if you trust its source, convert it to .safetensors in a separate environment and use that"
)
_DAMAGED_HINT = "the file is damaged or incomplete; download or export it again"


def load_legacy(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a pickled PyTorch state dict safely: (tensors on CPU, other plain values as str metadata).

    A top-level `{"state_dict": {...}}` / `{"model": {...}}` / `{"module": {...}}` wrapper is unwrapped when the
    top level holds no tensors itself. Nested dicts are flattened with "." (as `nn.Module.state_dict` names them).
    Non-tensor leaves (str, int, float, bool, None, lists of those) become metadata strings; anything else is
    logged and skipped. Raises `UnsafeFileError` for content that needs arbitrary unpickling, `LoraFileError` for
    empty, truncated or unreadable files.
    """
    p = Path(path)
    size = _regular_file_size(p)
    if size == 0:
        raise LoraFileError(p, "file is empty (0 bytes)", hint=_DAMAGED_HINT)
    is_zip = zipfile.is_zipfile(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise _classify_unpickling_error(p, exc) from None
    except Exception as exc:  # torch.load on untrusted bytes can fail in many ways; all mean "cannot read"
        kind = "PyTorch zip archive" if is_zip else "PyTorch pickle"
        raise LoraFileError(
            p, f"cannot read it as a {kind} ({type(exc).__name__}: {_first_line(exc)})", hint=_DAMAGED_HINT
        ) from exc
    return _split_state_dict(p, obj)


def load_any(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA file by its extension: (tensors on `device`, str->str metadata).

    `.safetensors`: validated header, then the tensors; metadata from the header. `.pt/.ckpt/.bin/.pth`:
    `load_legacy`. Any other extension: `LoraFileError`.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext == SAFETENSORS_EXTENSION:
        header = read_header(p)
        return load_tensors(p, device=device, header=header), dict(header.metadata)
    if ext in LEGACY_EXTENSIONS:
        tensors, metadata = load_legacy(p)
        if torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors, metadata
    known = ", ".join(sorted({SAFETENSORS_EXTENSION, *LEGACY_EXTENSIONS}))
    raise LoraFileError(
        p, f"unknown file extension {p.suffix or '(none)'!r}", hint=f"LoRA files must end in one of: {known}"
    )


def _regular_file_size(p: Path) -> int:
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise LoraFileError(p, "file not found", hint="check the path") from exc
    except OSError as exc:
        raise LoraFileError(p, f"cannot access the file: {exc.strerror or exc}") from exc
    if not p.is_file():
        raise LoraFileError(p, "not a regular file", hint="pass the path of a LoRA file")
    return st.st_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _classify_unpickling_error(p: Path, exc: pickle.UnpicklingError) -> LoraFileError:
    """torch reports both forbidden content and plain corruption as UnpicklingError; tell them apart by message."""
    msg = str(exc)
    m = _GLOBAL_RE.search(msg)
    if m:
        return UnsafeFileError(
            p,
            f"the pickle calls or builds {m.group(1)}, which a weights file never needs",
            key=m.group(1),
            hint=_CONVERT_HINT,
        )
    if any(marker in msg for marker in _UNSAFE_MARKERS):
        detail = next((line.strip() for line in msg.splitlines() if "Unsupported" in line), "unsupported content")
        return UnsafeFileError(p, f"the pickle holds content the safe loader refuses ({detail})", hint=_CONVERT_HINT)
    return LoraFileError(p, f"the pickle data is damaged ({_first_line(exc)})", hint=_DAMAGED_HINT)


def _split_state_dict(p: Path, obj: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not isinstance(obj, Mapping):
        raise LoraFileError(
            p, f"file holds a {type(obj).__name__}, not a dict of tensors", hint="this does not look like a LoRA file"
        )
    container: Mapping = obj
    outer: dict[object, object] = {}
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in WRAPPER_KEYS:
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and _has_tensor(inner):
                container = inner
                outer = {k: v for k, v in obj.items() if k != wrapper}
                logger.debug("%s: using the state dict under %r", p, wrapper)
                break
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    skipped: list[str] = []
    _collect(p, container, "", tensors, metadata, skipped)
    outer_tensors: dict[str, torch.Tensor] = {}
    outer_metadata: dict[str, str] = {}
    _collect(p, outer, "", outer_tensors, outer_metadata, skipped)
    skipped.extend(outer_tensors)  # weights outside the state dict (EMA copies, optimizer state) are not the LoRA
    for k, v in outer_metadata.items():
        metadata.setdefault(k, v)
    if skipped:
        logger.warning(
            "%s: ignored %d entries that are neither weights nor plain values: %s",
            p,
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    if not tensors:
        raise LoraFileError(p, "file contains no tensors", hint="this does not look like a LoRA file")
    return tensors, metadata


def _has_tensor(d: Mapping, depth: int = 0) -> bool:
    if depth > MAX_NESTING:
        return False
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _has_tensor(v, depth + 1)) for v in d.values()
    )


_PLAIN = (str, int, float, bool, type(None))


def _collect(
    p: Path,
    d: Mapping,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    skipped: list[str],
    depth: int = 0,
) -> None:
    if depth > MAX_NESTING:
        skipped.append(f"{prefix}*")
        return
    for k, v in d.items():
        name = f"{prefix}{k}"
        if name in tensors or name in metadata:
            raise LoraFileError(p, "two entries have this name after flattening nested dicts", key=name)
        if isinstance(v, torch.Tensor):
            tensors[name] = v
        elif isinstance(v, Mapping):
            _collect(p, v, f"{name}.", tensors, metadata, skipped, depth + 1)
        elif isinstance(v, _PLAIN):
            metadata[name] = str(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v):
            metadata[name] = json.dumps(list(v))
        else:
            skipped.append(name)
