"""`python -m lora_ext ...`: inspect, tiny-model, generate, train, demo.

Each subcommand is a thin layer over library calls; errors of type LoraExtError are printed as one clear line on
stderr and give exit status 2. `--json` prints machine-readable results on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lora_ext.app.paths import default_lora_dirs
from lora_ext.errors import LoraExtError

log = logging.getLogger("lora_ext")


# ----------------------------------------------------------------------------------------------------------- inspect

_NUMERIC = re.compile(r"^\d+$")


def module_type(name: str) -> str:
    """Layer type of a module name for summaries: the part after the last block index, e.g. "attn1_to_q", "mlp_fc1",
    "to_out" (index suffixes of to_out.0 / ff.net.0 dropped)."""
    tokens = re.split(r"[._]", name)
    while tokens and _NUMERIC.match(tokens[-1]):
        tokens.pop()
    last = max((i for i, t in enumerate(tokens) if _NUMERIC.match(t)), default=-1)
    tail = [t for t in tokens[last + 1 :] if not _NUMERIC.match(t)]
    return "_".join(tail) or name


def _component(name: str) -> str:
    if name.startswith(("lora_te2_", "text_encoder_2.")):
        return "te2"
    if name.startswith(("lora_te", "text_encoder.")):
        return "te1"
    return "unet"


def inspect_file(path: Path, model: Path | None = None) -> dict:
    """Everything `inspect` reports, as a dict."""
    from lora_ext.formats.hashes import lora_short_hash, sha256_file
    from lora_ext.formats.metadata import metadata_summary
    from lora_ext.formats.network import load_lora

    net = load_lora(path)
    types: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "algorithms": set(), "ranks": set(),
                                                               "alphas": set(), "dora": 0})
    for m in net.modules.values():
        row = types[(_component(m.name), module_type(m.name))]
        row["count"] += 1
        row["algorithms"].add(m.algorithm.name)
        if m.algorithm.rank is not None:
            row["ranks"].add(int(m.algorithm.rank))
        if m.algorithm.alpha is not None:
            row["alphas"].add(float(m.algorithm.alpha))
        row["dora"] += m.dora_scale is not None
    module_types = [
        {"component": comp, "type": typ, "count": r["count"], "algorithms": sorted(r["algorithms"]),
         "ranks": sorted(r["ranks"]), "alphas": sorted(r["alphas"]), "dora": r["dora"]}
        for (comp, typ), r in sorted(types.items())
    ]
    result = {
        "file": str(path),
        "name": net.name,
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "short_hash": lora_short_hash(path, net.metadata),
        "architecture": {"arch": net.arch.arch, "label": net.arch.label, "evidence": net.arch.evidence,
                         "metadata_says": net.arch.from_metadata},
        "modules": len(net.modules),
        "algorithms": net.algorithms,
        "module_types": module_types,
        "unknown_keys": net.unknown_keys,
        "bundled_embeddings": sorted(net.bundled_embeddings),
        "metadata": metadata_summary(net.metadata),
    }
    if model is not None:
        from lora_ext.models.loading import load_pipeline
        from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline

        loaded = load_pipeline(model)
        patcher = Patcher(adapter_for_pipeline(loaded.pipe))
        report = patcher.check([ActiveLora(net)])
        result["coverage"] = {"model": str(model), "model_arch": loaded.arch, **report.networks[0].to_dict()}
    return result


def _print_inspect(info: dict) -> None:
    from lora_ext.patch.report import group_order

    arch = info["architecture"]
    print(f"{info['file']}  ({info['size_bytes'] / 2**20:.2f} MiB, hash {info['short_hash']})")
    print(f"  architecture: {arch['label']} ({arch['evidence']})")
    algos = ", ".join(f"{k} x{v}" for k, v in sorted(info["algorithms"].items()))
    print(f"  modules: {info['modules']} ({algos})")
    for row in info["module_types"]:
        ranks = ",".join(map(str, row["ranks"])) or "-"
        alphas = ",".join(f"{a:g}" for a in row["alphas"]) or "-"
        dora = f", dora {row['dora']}" if row["dora"] else ""
        print(f"    {row['component']:5} {row['type']:28} x{row['count']:<4} {'/'.join(row['algorithms']):10} "
              f"rank {ranks:8} alpha {alphas}{dora}")
    if info["unknown_keys"]:
        print(f"  unknown keys: {len(info['unknown_keys'])} (e.g. {info['unknown_keys'][0]})")
    if info["bundled_embeddings"]:
        print(f"  bundled embeddings: {', '.join(info['bundled_embeddings'])}")
    meta = info["metadata"]
    if meta:
        print("  metadata:")
        for k, v in meta.items():
            text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
            print(f"    {k}: {text[:200]}")
    cov = info.get("coverage")
    if cov:
        print(f"  against {cov['model']} ({cov['model_arch']}):")
        if cov.get("error"):
            print(f"    NOT applicable: {cov['error']}")
        else:
            print(f"    {cov['modules_applied']}/{cov['modules_total']} modules match")
            applied, unmatched = cov["applied_by_group"], cov["unmatched_by_group"]
            for g in sorted(set(applied) | set(unmatched), key=group_order):  # one grouping for both
                missed = f", {unmatched[g]} unmatched" if unmatched.get(g) else ""
                print(f"      {g}: {applied.get(g, 0)} applied{missed}")
            if cov["unmatched"]:
                print(f"    unmatched: {len(cov['unmatched'])}")
                for n in cov["unmatched"][:10]:
                    print(f"      {n}")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(Path(args.file), Path(args.model) if args.model else None)
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False, default=str)
        print()
    else:
        _print_inspect(info)
    return 0


# -------------------------------------------------------------------------------------------------------- tiny-model


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from lora_ext.models.tiny import save_tiny_model

    path = save_tiny_model(args.arch, Path(args.out), fmt=args.format)
    if args.json:
        print(json.dumps({"path": str(path), "arch": args.arch, "format": args.format}))
    else:
        print(f"wrote tiny {args.arch} model ({args.format}) to {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_ext.app.runner import GenerateRequest, generate_with_loras

    req = GenerateRequest(model=Path(args.model), prompt=args.prompt, negative=args.negative, seed=args.seed,
                          steps=args.steps, width=args.width, height=args.height, cfg=args.cfg,
                          scheduler=args.scheduler, out=Path(args.out),
                          lora_dirs=[Path(d) for d in args.lora_dir] or default_lora_dirs(Path(args.model)),
                          skip_bad=args.skip_bad)
    result = generate_with_loras(req)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, default=str))
    else:
        for line in result.report_lines():
            print(line)
        print(f"wrote {result.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lora_ext.app.demo import run_demo

    summary = run_demo(Path(args.out))
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


# ------------------------------------------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    """Run `python -m lora_ext.train ARGS --json-events` in a child process (a crash or OOM there cannot take this
    process down): its JSON event lines are streamed to stdout, its progress line goes to stderr, and its exit status
    is returned (0 finished, 3 cancelled, 2 error, 1 crash). `python -m lora_ext train --help` shows the options.

    The rules of lora_ext.train.process hold: when this process's stdout closes (`| head`), forwarding stops and the
    training goes on (this process waits for it); SIGINT, SIGTERM or SIGHUP here are passed on as SIGTERM, so the
    child saves a checkpoint and stops; if this process is killed outright, the child notices and does the same."""
    import signal

    from lora_ext.train.process import start_training

    child = start_training(args.train_args, verbose=args.verbose)
    forward = {"on": True}

    def stop_child(signum: int, frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, stop_child) for s in handled}
    try:
        with child:
            for line in child.stdout or ():
                if forward["on"]:
                    try:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    except (OSError, ValueError):  # our reader went away: keep draining, the child goes on
                        forward["on"] = False
                        _silence_stdout()
            return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _silence_stdout() -> None:
    """Point a broken stdout at /dev/null, so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# -------------------------------------------------------------------------------------------------------------- main


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from lora_ext.ui.app import run
    except ImportError as exc:
        raise LoraExtError(f"the app needs gradio and uvicorn ({exc}); install them with "
                           "`pip install 'lora_ext[ui]'`") from exc
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ext")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe a LoRA file (algorithms, ranks, architecture, metadata, coverage)")
    s.add_argument("file", help="LoRA file (.safetensors, or legacy .pt/.ckpt/.bin)")
    s.add_argument("--model", help="base model (diffusers folder or single-file checkpoint) to check coverage against")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("tiny-model", help="write a deterministic tiny random-weight model (offline)")
    s.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="model family (default: sd15)")
    s.add_argument("--out", required=True, help="output directory (single-file: <out>/tiny-<arch>.safetensors + "
                   "the .yaml and text-encoder files A1111 needs next to it)")
    s.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers",
                   help="diffusers folder or the original LDM/SGM single file A1111 loads (default: diffusers)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tiny_model)

    s = sub.add_parser("generate", help="generate an image; <lora:name:weight> tags in the prompt are applied")
    s.add_argument("--model", required=True, help="diffusers folder or single-file SD1.x/SD2.x/SDXL checkpoint")
    s.add_argument("--prompt", required=True, help='prompt, may contain tags like "<lora:name:0.8>"')
    s.add_argument("--negative", default="", help="negative prompt (LoRA tags are not read here, as in A1111)")
    s.add_argument("--lora-dir", action="append", default=[],
                   help="directory with LoRA files (repeatable; default: models/Lora and <model dir>/Lora)")
    s.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    s.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    s.add_argument("--width", type=int, default=512, help="width in pixels (default 512)")
    s.add_argument("--height", type=int, default=512, help="height in pixels (default 512)")
    s.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    s.add_argument("--scheduler", default="euler",
                   help="ddim|euler|euler_a|dpmpp_2m|pndm|lms|heun|ddpm (default euler)")
    s.add_argument("--skip-bad", action="store_true",
                   help="leave out LoRAs that cannot be applied (reported) instead of failing")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--json", action="store_true", help="print the LoRA report as JSON")
    s.set_defaults(func=cmd_generate)

    # every argument goes to `python -m lora_ext.train` (prefix "+": argparse here leaves "--..." alone)
    s = sub.add_parser("train", help="train a LoRA in a child process (see `train --help`); streams JSON events",
                       prefix_chars="+", add_help=False)
    s.add_argument("train_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("ui", help="the app in a browser: train, generate, library (+ the REST API); prints its URL")
    from lora_ext.ui.app import add_ui_arguments

    add_ui_arguments(s)
    s.set_defaults(func=cmd_ui)

    s = sub.add_parser("demo", help="the shapes model learns a heart: trains a LoRA, images with and without it")
    s.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)
    from lora_ext.tools.cli import add_tool_parsers

    add_tool_parsers(sub)
    p.description = (f"LoRA for Stable Diffusion. Commands: {', '.join(sub.choices)}. "
                     "`python -m lora_ext COMMAND --help` shows each one's options.")
    return p


def _quiet_progress_bars() -> None:
    """Loading bars of diffusers/transformers would bury our report lines; the CLI prints its own summary."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_progress_bars()
    try:
        return int(args.func(args) or 0)
    except LoraExtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
