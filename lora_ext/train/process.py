"""Training in a child process: how a runner starts it and what the child does when its runner goes away.

`start_training(args)` runs `python -m lora_ext.train ARGS --json-events` with this interpreter (the WebUI's own
Python inside the WebUI): a crash or out-of-memory there cannot take the runner down, and memory is returned when the
child ends. Every runner (`python -m lora_ext train`, the training tab's job runner) starts training through here and
relies on these rules, which the child follows:

- **Closed stdout: training goes on.** The JSON event lines on stdout are a copy; `<run_dir>/events.jsonl` is the
  record. When stdout is closed (`... | head -2`, a runner that stopped reading), the child stops echoing, notes it in
  events.jsonl, and keeps training to the end. A runner that only wants to stop reading may close the pipe.
- **Runner gone: stop with a checkpoint.** A child started here knows its runner's process id
  (`LORA_EXT_PARENT_PID`); when it is no longer the child's parent (the runner was killed, even with SIGKILL, or the
  WebUI restarted), the child finishes the optimizer step in progress, writes a checkpoint and exits with status 3,
  exactly as for a STOP file. Why not keep training: the runner is what gives the GPU back to the WebUI's model and
  what a person watches; an orphan would hold the GPU that a restarted WebUI loads its model onto, with nobody to
  see or cancel it. The run folder resumes with `python -m lora_ext.train --resume RUN_DIR` (or from the tab).
- **Signals**: SIGTERM, SIGINT and SIGHUP (a closed terminal) also stop with a checkpoint; a second SIGINT stops at
  once. Runners forward SIGTERM to the child when they are asked to stop, and wait for it.

Exit status of the child: 0 finished, 3 cancelled (checkpoint saved), 2 expected error, 1 crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PARENT_ENV = "LORA_EXT_PARENT_PID"


def training_command(args: Sequence[str], *, json_events: bool = True, verbose: bool = False) -> list[str]:
    """The child's command line: this interpreter, `-m lora_ext.train`, the arguments (+ --json-events)."""
    cmd = [sys.executable, "-m", "lora_ext.train", *args]
    if json_events:
        cmd.append("--json-events")
    if verbose:
        cmd.append("--verbose")
    return cmd


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) + this package on PYTHONPATH + this process's id as the child's runner."""
    import lora_ext

    env = dict(os.environ if base is None else base)
    root = str(Path(lora_ext.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env[PARENT_ENV] = str(os.getpid())
    return env


def start_child(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, **popen_kwargs: Any) -> subprocess.Popen:
    """Start `cmd` as a runner's child (this package on PYTHONPATH, the runner's pid in its environment); stdout is a
    text pipe of JSON event lines unless `popen_kwargs` says otherwise."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    if popen_kwargs["stdout"] is subprocess.PIPE:
        popen_kwargs.setdefault("text", True)
        popen_kwargs.setdefault("encoding", "utf-8")
        popen_kwargs.setdefault("bufsize", 1)
    return subprocess.Popen(list(cmd), env=child_environment(env), **popen_kwargs)


def start_training(args: Sequence[str], *, verbose: bool = False, env: Mapping[str, str] | None = None,
                   **popen_kwargs: Any) -> subprocess.Popen:
    """Start `python -m lora_ext.train ARGS --json-events` (see `start_child`)."""
    return start_child(training_command(args, verbose=verbose), env=env, **popen_kwargs)


def runner_pid() -> int | None:
    """The process id of the runner that started this process through `start_training`, else None."""
    raw = os.environ.get(PARENT_ENV, "")
    return int(raw) if raw.isdigit() else None


def runner_gone(pid: int | None) -> bool:
    """True when this process was started by runner `pid` and that runner is no longer its parent (it exited and
    this process was re-parented)."""
    return pid is not None and os.getppid() != pid
