"""What the model tools share: their error type, output-path rules and option parsing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lora_ext.errors import LoraExtError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ToolError(LoraExtError, ValueError):
    """A model tool cannot do what was asked (bad option, output path, input combination); says what to do."""


def dtype_arg(value: str | None) -> torch.dtype | None:
    if value is None or value == "":
        return None
    dt = DTYPES.get(str(value).lower())
    if dt is None:
        raise ToolError(f"unknown dtype {value!r}; valid: fp32, fp16, bf16")
    return dt


def check_output(out: Path, *, overwrite: bool, allowed_dirs: Sequence[Path] | None = None,
                 folder: bool = False) -> None:
    """Refuse an output that exists (unless `overwrite`), whose folder is missing, or (when `allowed_dirs` is given,
    as the REST API and the UI do) that lies outside those folders."""
    out = Path(out)
    if allowed_dirs is not None:
        resolved = out.resolve()
        if not any(resolved.is_relative_to(Path(d).resolve()) for d in allowed_dirs):
            where = ", ".join(str(d) for d in allowed_dirs) or "(none)"
            raise ToolError(f"{out}: outputs may only be written inside {where}")
    if not out.parent.is_dir():
        raise ToolError(f"{out}: the folder {out.parent} does not exist; create it first")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ToolError(f"{out}: already exists; choose another name or pass --force")
        if folder != out.is_dir():
            raise ToolError(f"{out}: exists and is a {'folder' if out.is_dir() else 'file'}; choose another name")
