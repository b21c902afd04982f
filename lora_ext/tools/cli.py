"""The model tools' CLI subcommands (`python -m lora_ext merge-model|merge-loras|resize|extract|convert`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _Bar:
    """A one-line progress bar on stderr (only when stderr is a terminal or when asked)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.last = -1

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        pct = int(100 * done / total)
        if pct == self.last:
            return
        self.last = pct
        filled = pct * 30 // 100
        print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}%", end="", file=sys.stderr,
              flush=True)
        if done >= total:
            print(file=sys.stderr)


def _lora_dirs(args: argparse.Namespace, model: str | None = None) -> list[Path]:
    from lora_ext.app.cli import default_lora_dirs

    if args.lora_dir:
        return [Path(d) for d in args.lora_dir]
    return default_lora_dirs(Path(model) if model else None)


def _emit(args: argparse.Namespace, report) -> int:
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, default=str))
    else:
        for line in report.lines():
            print(line)
    return 0


def cmd_merge_model(args: argparse.Namespace) -> int:
    from lora_ext.tools.args import parse_lora_arg
    from lora_ext.tools.merge_model import merge_model

    dirs = _lora_dirs(args, args.model)
    loras = [parse_lora_arg(text, dirs) for text in args.lora]
    report = merge_model(args.model, loras, Path(args.out), dtype=args.dtype, overwrite=args.force,
                         progress=_Bar("merge-model", sys.stderr.isatty() and not args.json))
    return _emit(args, report)


def add_tool_parsers(sub) -> None:
    s = sub.add_parser("merge-model", help="merge LoRAs into a checkpoint (exactly what <lora:...> tags give)",
                       description="Write a checkpoint with LoRAs merged in: the merged weights equal, bit for bit, "
                       "what the prompt tags apply. Streams the checkpoint tensor by tensor (memory: about one "
                       "tensor plus the LoRAs). Single file in, single file out; diffusers folder in, folder out.")
    s.add_argument("--model", required=True, help="base checkpoint: .safetensors single file, diffusers folder, or "
                   "'shapes'")
    s.add_argument("--lora", action="append", required=True, metavar="NAME_OR_PATH[:W[:UNET]][:lbw=..]",
                   help="a LoRA and its tag arguments, e.g. style:0.8, style:1:0.5 (te 1, unet 0.5), "
                   "style:1:lbw=INALL, path/to/file.safetensors:0.7 or a whole tag <lora:style:0.8> (repeatable; "
                   "merged in order)")
    s.add_argument("--lora-dir", action="append", default=[], help="folder to look LoRA names up in (repeatable; "
                   "default: models/Lora and <model dir>/Lora)")
    s.add_argument("--out", required=True, help="output .safetensors file (or folder for a diffusers input)")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep each "
                   "tensor's dtype; merged in the dtype the patcher would see)")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_merge_model)
