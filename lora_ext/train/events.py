"""Progress of a training run as a stream of JSON events, plus a one-line console progress display.

Every event is one JSON object per line in <run_dir>/events.jsonl (appended: a resumed run continues the file),
optionally echoed on stdout (`--json-events`, what `python -m lora_ext train` and the WebUI job runner read) and
passed to an in-process callback. Common fields: `type`, `time` (unix seconds). Types and their fields:

    start       run_dir, pid (the training process), config, arch, total_steps, total_epochs, steps_per_epoch,
                global_step (0 or resumed), num_processes, dataset (the dataset report), resumed_from (checkpoint
                path or null)
    step        step, total_steps, epoch, loss (raw), loss_avg (exponential moving average, beta 0.9, bias-
                corrected), lr (UNet group), lr_te (null without text-encoder LoRA), it_s, eta_s, peak_memory_bytes,
                memory_kind ("cuda" max_memory_allocated | "rss" peak resident set size)
    epoch       epoch (finished, 1-based), step, loss_avg
    checkpoint  step, epoch, path, lora_path, removed (older checkpoints pruned)
    sample      step, epoch, paths, prompts
    warning     message
    error       message, step (or null), error (exception class), checkpoint (last good one or null)
    done        status ("finished" | "cancelled"), step, epoch, output (exported file or null), checkpoint,
                reason (why a run was cancelled, else null), elapsed_s; already_exported: true when a resumed run
                had finished and its file was already written (nothing was done)

Events of a run that fails before its run folder exists (a missing model, an empty dataset) reach the echo and the
callback only: no folder is created for a run that never started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from lora_ext.runfolder import EVENTS_FILE  # noqa: F401 - re-exported beside the format it names

logger = logging.getLogger(__name__)

EVENT_TYPES = ("start", "step", "epoch", "validation", "checkpoint", "sample", "warning", "error", "done")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class EventLog:
    """Writes events. Only the main process of a multi-process run should have `enabled=True`.

    path: the events.jsonl file; None = not yet: events are kept in memory and written first when `open(path)` is
    called (a run creates its folder only once its inputs are known to be good). echo: stream for a copy of every
    line (e.g. sys.stdout); when writing to it fails (a closed pipe), echoing stops and the file goes on (noted there
    as a warning). callback: called with each event dict (in-process runners). Lines are flushed as written.
    """

    def __init__(self, path: Path | None, *, echo: IO[str] | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, enabled: bool = True) -> None:
        self.path: Path | None = None
        self.echo = echo
        self.callback = callback
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._pending: list[str] = []
        if path is not None:
            self.open(path)

    def open(self, path: Path) -> None:
        """Start writing to `path` (appending; created with its folder), beginning with the events kept so far."""
        if not self.enabled or (self._file is not None and self.path == path):
            return
        self.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed in close()
        for line in self._pending:
            self._file.write(line + "\n")
        self._pending.clear()
        self._file.flush()

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        """Write one event (NaN/inf floats become null, so the line stays valid JSON); returns it."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {"type": type, "time": round(time.time(), 3)}
        event.update({k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in fields.items()})
        if not self.enabled:
            return event
        line = json.dumps(event, default=_json_default, ensure_ascii=False, allow_nan=False)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._pending.append(line)
        if self.echo is not None:
            self._echo(line)
        if self.callback is not None:
            self.callback(event)
        return event

    def _echo(self, line: str) -> None:
        try:
            self.echo.write(line + "\n")
            self.echo.flush()
        except (OSError, ValueError) as exc:  # BrokenPipeError, EIO, or a closed file object
            stream, self.echo = self.echo, None
            _silence(stream)
            logger.info("event stream closed (%s); events continue in %s", exc, self.path or "the run folder")
            self.emit("warning", message=f"the event stream (stdout) was closed ({type(exc).__name__}); training goes "
                                         f"on, its events are in {self.path or 'events.jsonl'}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _silence(stream: IO[str] | None) -> None:
    """Point a broken standard stream at /dev/null, so that the interpreter's final flush does not fail again (the
    Python documentation's advice for SIGPIPE). Other streams are left alone."""
    if stream is None or stream not in (sys.stdout, sys.stderr):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of an events.jsonl file (a torn last line, from a killed process, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class LossAverage:
    """Exponential moving average of the loss with bias correction (the first value is exact)."""

    beta: float = 0.9
    value: float = 0.0
    count: int = 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.value = self.beta * self.value + (1.0 - self.beta) * loss
        return self.average

    @property
    def average(self) -> float | None:
        if self.count == 0:
            return None
        return self.value / (1.0 - self.beta**self.count)

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.value, self.count = float(state["beta"]), float(state["value"]), int(state["count"])


@dataclass
class Throughput:
    """Steps per second and ETA over the steps of this process (the first step, with its warm-up, not counted)."""

    total_steps: int
    start_step: int
    _t0: float | None = None
    _s0: int = 0
    _last: float = field(default_factory=time.perf_counter)

    def update(self, step: int) -> tuple[float | None, float | None]:
        """(it/s, ETA seconds) after finishing optimizer step `step`; None while unknown."""
        now = time.perf_counter()
        self._last = now
        if self._t0 is None:
            self._t0, self._s0 = now, step
            return None, None
        done = step - self._s0
        rate = done / (now - self._t0) if now > self._t0 else None
        eta = (self.total_steps - step) / rate if rate else None
        return rate, eta


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max_memory_allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "cuda"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(rss_kib) * 1024, "rss"


class ConsoleProgress:
    """A one-line progress display on stderr: rewritten in place on a terminal, else a line every `every_s`."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 5.0, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.enabled = enabled
        self._last = 0.0

    def update(self, event: dict[str, Any], force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not (self.tty or force or now - self._last >= self.every_s):
            return
        self._last = now
        line = format_step(event)
        self._write("\r" + line.ljust(100)[:160] if self.tty else line + "\n")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        self._write(("\r" + " " * 100 + "\r" if self.tty else "") + text + "\n")

    def _write(self, text: str) -> None:
        """Write and flush; a stream that fails (a closed terminal or pipe) switches the display off, never the run."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False
            _silence(self.stream)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_step(e: dict[str, Any]) -> str:
    """'step 10/20 (50%) epoch 2 loss 0.1234 avg 0.1500 lr 1.00e-04 3.2 it/s ETA 0:00:03 mem 1.2 GiB'."""
    total = e.get("total_steps") or 0
    pct = f" ({100 * e['step'] // total}%)" if total else ""
    loss = e.get("loss")
    avg = e.get("loss_avg")
    rate = e.get("it_s")
    parts = [f"step {e['step']}/{total}{pct}", f"epoch {e.get('epoch')}",
             f"loss {loss:.4f}" if loss is not None else "loss ?",
             f"avg {avg:.4f}" if avg is not None else "",
             f"lr {e['lr']:.2e}" if e.get("lr") is not None else "",
             f"{rate:.2f} it/s" if rate else "", f"ETA {_fmt_seconds(e.get('eta_s'))}",
             f"mem {e['peak_memory_bytes'] / 2**30:.1f} GiB" if e.get("peak_memory_bytes") else ""]
    return " ".join(p for p in parts if p)
