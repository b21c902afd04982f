"""A model-tool job in a child process: `python -m lora_ext.tools.job SPEC.json`, started by the job runner.

SPEC: {"tool": "merge-model" | "merge-loras" | "resize" | "extract" | "convert", "args": {...}, "run_dir": DIR}. The
arguments are those of the tool's function (`TOOLS`), already checked by the service (paths inside the server's
folders). Events, one JSON object per line on stdout and in <run_dir>/events.jsonl, in the training events' format
so that the same runner, views and SSE stream follow a tool job: `start` (total_steps = 1000: progress in permille),
`step` (step), `done` (status "finished", output, report) or `error` (message). SIGTERM/SIGINT stop the tool: the
atomic writers remove their temporary file, nothing is left; the exit status is 3 (cancelled). Exit status 2: an
expected error (the message says what to do), 1: a crash.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lora_ext.runfolder import EVENTS_FILE
from lora_ext.train.events import EventLog

PERMILLE = 1000


def _merge_model(args: Mapping[str, Any], progress) -> Any:
    from lora_ext.prompt import parse_tag
    from lora_ext.tools.merge_model import LoraInput, merge_model

    loras = [LoraInput(Path(item["path"]), parse_tag(item["tag"])) for item in args["loras"]]
    return merge_model(args["model"], loras, Path(args["out"]), dtype=args.get("dtype"),
                       overwrite=bool(args.get("overwrite")), progress=progress)


def _merge_loras(args: Mapping[str, Any], progress) -> Any:
    from lora_ext.tools.lora_tools import merge_loras

    return merge_loras([(Path(p), float(w)) for p, w in args["inputs"]], Path(args["out"]), rank=args.get("rank"),
                       model=args.get("model"), dtype=args.get("dtype"), overwrite=bool(args.get("overwrite")),
                       progress=progress)


def _resize(args: Mapping[str, Any], progress) -> Any:
    from lora_ext.tools.lora_tools import resize_lora

    return resize_lora(Path(args["input"]), Path(args["out"]), rank=args.get("rank"), dynamic=args.get("dynamic"),
                       param=args.get("param"), model=args.get("model"), dtype=args.get("dtype"),
                       overwrite=bool(args.get("overwrite")), progress=progress)


def _extract(args: Mapping[str, Any], progress) -> Any:
    from lora_ext.tools.lora_tools import extract_lora

    return extract_lora(args["base"], args["tuned"], Path(args["out"]), rank=int(args["rank"]),
                        conv_rank=args.get("conv_rank"), min_diff=float(args.get("min_diff", 1e-6)),
                        dtype=args.get("dtype"), overwrite=bool(args.get("overwrite")), progress=progress)


def _convert(args: Mapping[str, Any], progress) -> Any:
    from lora_ext.tools.lora_tools import convert_lora

    return convert_lora(Path(args["input"]), Path(args["out"]), to=args["to"], model=args.get("model"),
                        dtype=args.get("dtype"), overwrite=bool(args.get("overwrite")))


TOOLS: Mapping[str, Callable[[Mapping[str, Any], Callable], Any]] = {
    "merge-model": _merge_model, "merge-loras": _merge_loras, "resize": _resize, "extract": _extract,
    "convert": _convert}


class _Progress:
    """Tool progress (done, total) as `step` events in permille, one per change."""

    def __init__(self, events) -> None:
        self.events = events
        self.last = -1

    def __call__(self, done: int, total: int, what: str = "") -> None:
        step = int(PERMILLE * done / total) if total else 0
        if step != self.last:
            self.last = step
            self.events.emit("step", step=step, total_steps=PERMILLE, what=what)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    with EventLog(Path(spec["run_dir"]) / EVENTS_FILE, echo=sys.stdout) as events:
        return _run(spec, events)


def _run(spec: Mapping[str, Any], events: EventLog) -> int:
    from lora_ext.errors import LoraExtError

    tool = TOOLS.get(spec.get("tool"))
    try:  # a cancel can arrive as soon as the parent has read the start line, before its write has returned here
        events.emit("start", run_dir=spec["run_dir"], total_steps=PERMILLE, global_step=0, tool=spec.get("tool"))
        if tool is None:
            events.emit("error", message=f"unknown tool {spec.get('tool')!r}; valid: {', '.join(TOOLS)}")
            return 2
        report = tool(spec["args"], _Progress(events))
    except KeyboardInterrupt:
        events.emit("done", status="cancelled", output=None)
        return 3
    except LoraExtError as err:
        events.emit("error", message=str(err))
        return 2
    except Exception as err:  # noqa: BLE001 - reported, then the crash status
        events.emit("error", message=f"{type(err).__name__}: {err}")
        return 1
    events.emit("step", step=PERMILLE, total_steps=PERMILLE)
    events.emit("done", status="finished", output=str(report.out), report=report.to_dict(), lines=report.lines())
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
