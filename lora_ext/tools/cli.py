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
    from lora_ext.app.paths import default_lora_dirs

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


def _lora_input(text: str, dirs: list[Path]) -> tuple[Path, float]:
    from lora_ext.tools.args import parse_lora_arg, ref_weights

    item = parse_lora_arg(text, dirs)
    return item.path, ref_weights(item.ref)


def cmd_merge_loras(args: argparse.Namespace) -> int:
    from lora_ext.tools.lora_tools import merge_loras

    dirs = _lora_dirs(args)
    report = merge_loras([_lora_input(t, dirs) for t in args.inputs], Path(args.out), rank=args.rank,
                         model=args.model, dtype=args.dtype, overwrite=args.force,
                         progress=_Bar("merge-loras", sys.stderr.isatty() and not args.json))
    return _emit(args, report)


def cmd_resize(args: argparse.Namespace) -> int:
    from lora_ext.tools.lora_tools import resize_lora

    path, _ = _lora_input(args.input, _lora_dirs(args))
    report = resize_lora(path, Path(args.out), rank=args.rank, dynamic=args.dynamic, param=args.param,
                         model=args.model, dtype=args.dtype, overwrite=args.force,
                         progress=_Bar("resize", sys.stderr.isatty() and not args.json))
    return _emit(args, report)


def cmd_extract(args: argparse.Namespace) -> int:
    from lora_ext.tools.lora_tools import extract_lora

    report = extract_lora(args.base, args.tuned, Path(args.out), rank=args.rank, conv_rank=args.conv_rank,
                          min_diff=args.min_diff, dtype=args.dtype, overwrite=args.force,
                          progress=_Bar("extract", sys.stderr.isatty() and not args.json))
    return _emit(args, report)


def cmd_convert(args: argparse.Namespace) -> int:
    from lora_ext.tools.lora_tools import convert_lora

    path, _ = _lora_input(args.input, _lora_dirs(args))
    report = convert_lora(path, Path(args.out), to=args.to, model=args.model, dtype=args.dtype, overwrite=args.force)
    return _emit(args, report)


def _common(s, *, model_help: str | None = None) -> None:
    if model_help:
        s.add_argument("--model", help=model_help)
    s.add_argument("--lora-dir", action="append", default=[], help="folder to look LoRA names up in (repeatable; "
                   "default: models/Lora)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="dtype of the written tensors (default: the "
                   "input's)")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--json", action="store_true", help="print the report as JSON")


_MODEL_HELP = ("base model (file, folder or 'shapes'): its layer names; needed for DoRA/IA3 modules and for files "
               "whose family cannot be told (default: the family's real model)")


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

    s = sub.add_parser("merge-loras", help="merge several LoRAs with weights into one LoRA (exact, or at a rank)",
                       description="Several LoRAs with weights into one file. Without --rank the result is exact "
                       "(ranks concatenated: its delta is the weighted sum); with --rank N each layer's summed delta "
                       "is replaced by its best rank-N approximation (SVD) and the error is reported.")
    s.add_argument("inputs", nargs="+", metavar="IN[:W]", help="LoRA file or name, with an optional weight")
    s.add_argument("--rank", type=int, help="rank of the result (SVD per layer); default: exact")
    _common(s, model_help=_MODEL_HELP)
    s.set_defaults(func=cmd_merge_loras)

    s = sub.add_parser("resize", help="resize a LoRA to a lower rank (fixed, or dynamic per layer as kohya's)",
                       description="A LoRA at a lower rank: the best approximation of each layer (SVD). --rank N for "
                       "a fixed rank; --dynamic sv_ratio|sv_fro|sv_cumulative --param P picks each layer's rank as "
                       "kohya's resize_lora.py does (with --rank as the cap).")
    s.add_argument("input", metavar="IN", help="LoRA file or name")
    s.add_argument("--rank", type=int, help="new rank (with --dynamic: the largest rank allowed)")
    s.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"], help="per-layer rank rule")
    s.add_argument("--param", type=float, help="the rule's parameter: sv_ratio >= 1 (e.g. 2), sv_fro / "
                   "sv_cumulative in (0, 1] (e.g. 0.9)")
    _common(s, model_help=_MODEL_HELP)
    s.set_defaults(func=cmd_resize)

    s = sub.add_parser("extract", help="extract a LoRA from a tuned checkpoint and its base",
                       description="A LoRA from the difference of a fine-tuned checkpoint and its base model: the best "
                       "rank-N factors of each changed layer (SVD), text encoders included when they changed.")
    s.add_argument("--base", required=True, help="the base checkpoint (.safetensors or diffusers folder)")
    s.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    s.add_argument("--rank", type=int, required=True, help="rank of linear and 1x1 conv layers")
    s.add_argument("--conv-rank", type=int, help="rank of 3x3 conv layers (LoCon); default: not extracted")
    s.add_argument("--min-diff", type=float, default=1e-6, help="skip layers whose largest change is at most this "
                   "(default 1e-6)")
    _common(s)
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("convert", help="convert a LoRA between kohya and diffusers/PEFT names (and dtypes)",
                       description="Rename a LoRA's modules to kohya names (lora_unet_*/lora_te*_*, which every host "
                       "reads) or diffusers/PEFT names (unet.*.lora_A.weight), optionally changing the dtype.")
    s.add_argument("input", metavar="IN", help="LoRA file or name")
    s.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    _common(s, model_help=_MODEL_HELP)
    s.set_defaults(func=cmd_convert)
