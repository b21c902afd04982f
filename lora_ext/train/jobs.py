"""The job runner: training jobs started from a UI or REST call, run as child processes, watched through their events.

One job runs at a time (one GPU): a second `submit` while one is queued or running raises `JobConflict` (the REST
layer answers 409 with its message) rather than queueing silently, so nobody waits on a job they cannot see. A job:

    runner = JobRunner(jobs_dir, hooks=GpuHandoff(before=unload_webui_model, after=reload_webui_model))
    job = runner.submit(config)          # validated with TrainConfig's own rules first (ConfigError: nothing starts)
    runner.get(job.id).to_dict()         # id, state, step, total_steps, output, error, run_dir, losses, ...
    runner.cancel(job.id)                # SIGTERM: the step in progress ends, a checkpoint is written ("cancelled")
    runner.save(job.id)                  # a SAVE file in the run folder: a checkpoint after this step, then on
    runner.stop_after_checkpoint(job.id) # stop at the next scheduled checkpoint (end of epoch when none is due)
    runner.resume(run_dir)               # a new job continuing a stopped run (also after a WebUI restart)

The child is `python -m lora_ext.train --config <jobs_dir>/<id>.toml --json-events` started through
lora_ext.train.process with the host's own Python; its rules hold (a closed stdout does not stop it; it stops with a
checkpoint when this process dies). Job state is derived only from the child's events (stdout lines, the same ones
as <run_dir>/events.jsonl) and its exit status: there is no second source of truth. Each job's summary is kept in
<jobs_dir>/<id>.json, written atomically on every state change, so a restarted server lists earlier jobs; a job that
was running when the server died shows as "cancelled" with its run folder to resume (the child stopped with a
checkpoint when it lost its runner).

`GpuHandoff`: `before()` runs before the child starts (move the WebUI's model off the GPU), `after()` when it has
ended, however it ended (finished, failed, cancelled, killed): the model comes back in every case.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_ext.errors import ConfigError, LoraExtError
from lora_ext.formats.safetensors_io import write_bytes_atomic
from lora_ext.runfolder import RUN_CONFIG_FILE, SAVE_FILE, STOP_AFTER_CHECKPOINT_FILE, STOP_FILE
from lora_ext.train.config import TrainConfig, load_config
from lora_ext.train.events import read_events
from lora_ext.train.process import start_child, start_training

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "finished", "failed", "cancelled")
ACTIVE = ("queued", "running")
EXIT_STATES = {0: "finished", 3: "cancelled"}  # any other exit status: "failed"
LOG_TAIL = 200  # lines of the child's stderr kept for the log view
CURVE_POINTS = 5000  # (step, loss) points kept for the loss curve


class JobConflict(LoraExtError):
    """Another job is queued or running."""


class JobNotFound(LoraExtError):
    """No job with that id."""


@dataclass
class GpuHandoff:
    """Callbacks around a job: `before()` frees the GPU for training, `after()` gives it back (always called once
    `before()` succeeded)."""

    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None


@dataclass
class Job:
    """A training job as the UI and REST see it (every field JSON-friendly)."""

    id: str
    state: str
    name: str
    run_dir: str
    output: str | None = None
    error: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    total_epochs: int | None = None
    loss: float | None = None
    loss_avg: float | None = None
    lr: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    peak_memory_bytes: int | None = None
    checkpoint: str | None = None
    samples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [step, raw loss, smoothed loss]
    validation: list[list[float]] = field(default_factory=list)  # [step, validation loss]
    best_step: int | None = None  # the step of the lowest validation loss
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    resume_of: str | None = None
    log_tail: list[str] = field(default_factory=list)
    kind: str = "train"  # "train" | "tool" (a model tool: lora_ext.tools.job)
    tool: str | None = None  # the tool's name for kind "tool"
    report: dict[str, Any] | None = None  # a tool's report (its `to_dict()`)
    report_lines: list[str] = field(default_factory=list)  # and as text lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, event: dict[str, Any]) -> None:
        """Update from one training event (lora_ext.train.events)."""
        kind = event.get("type")
        if kind == "start":
            self.state = "running"
            self.run_dir = str(event.get("run_dir") or self.run_dir)
            self.total_steps, self.total_epochs = event.get("total_steps"), event.get("total_epochs")
            self.step, self.pid = int(event.get("global_step") or 0), event.get("pid")
        elif kind == "step":
            self.step, self.epoch = int(event["step"]), event.get("epoch")
            self.total_steps = event.get("total_steps", self.total_steps)
            for name in ("loss", "loss_avg", "lr", "it_s", "eta_s", "peak_memory_bytes"):
                setattr(self, name, event.get(name))
            if self.loss is not None:
                self.losses.append([self.step, self.loss, self.loss_avg if self.loss_avg is not None else self.loss])
                del self.losses[:-CURVE_POINTS]
        elif kind == "validation":
            self.validation.append([int(event["step"]), float(event["loss"])])
            del self.validation[:-CURVE_POINTS]
            self.best_step = event.get("best_step")
        elif kind == "checkpoint":
            self.checkpoint = event.get("path")
        elif kind == "sample":
            self.samples.extend(event.get("paths") or [])
        elif kind == "warning":
            self.warnings.append(str(event.get("message")))
        elif kind == "error":
            self.error = str(event.get("message"))
            self.checkpoint = event.get("checkpoint") or self.checkpoint
        elif kind == "done":
            self.state = "finished" if event.get("status") == "finished" else "cancelled"
            self.output = event.get("output")
            self.report = event.get("report", self.report)
            self.report_lines = list(event.get("lines") or self.report_lines)
            self.checkpoint = event.get("checkpoint") or self.checkpoint


class JobRunner:
    """Runs training jobs one at a time (see the module docstring). Thread-safe."""

    def __init__(self, jobs_dir: str | Path, *, hooks: GpuHandoff | None = None,
                 on_event: Callable[[Job, dict[str, Any]], None] | None = None,
                 on_end: Callable[[Job], None] | None = None) -> None:
        """`on_event(job, event)` sees every event of the child; `on_end(job)` runs once a job has ended and the GPU
        has been given back (e.g. refresh the LoRA list so a new file shows at once), with the job as it is about to
        be published: the job shows its final state only after that."""
        self.jobs_dir = Path(jobs_dir)
        self.hooks = hooks or GpuHandoff()
        self.on_event = on_event
        self.on_end = on_end
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._load_history()

    # --------------------------------------------------------------------------------------------------- queries
    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no training job {job_id!r}; GET /lora_ext/jobs lists them")
        return job

    def jobs(self) -> list[Job]:
        """Every known job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def active(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.state in ACTIVE), None)

    # -------------------------------------------------------------------------------------------------- actions
    def submit(self, config: TrainConfig) -> Job:
        """Validate `config` (ConfigError names the field; nothing starts) and start it as a new job."""
        config.validate()
        if config.dry_run:
            raise ConfigError("dry_run: a job trains; use the dataset preview for a dry run")
        return self._start(config, resume_of=None)

    def submit_tool(self, tool: str, args: dict[str, Any], *, name: str | None = None) -> Job:
        """Start a model tool (lora_ext.tools.job) as a job: same one-at-a-time rule, state from its events. The
        arguments must already be checked (the service does). Tools run on the CPU: no GPU hand-off."""
        from lora_ext.tools.job import TOOLS

        if tool not in TOOLS:
            raise ConfigError(f"unknown tool {tool!r}; valid: {', '.join(TOOLS)}")
        return self._start(None, resume_of=None, tool=(tool, args, name or tool))

    def resume(self, run_dir: str | Path, **changes: Any) -> Job:
        """A new job continuing the run in `run_dir` with its saved settings (plus `changes` a resumed run may make,
        e.g. max_train_steps)."""
        saved = Path(run_dir) / RUN_CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"resume: {run_dir} is not a run folder (no {RUN_CONFIG_FILE})")
        config = load_config(saved, {**changes, "resume": str(run_dir)}).validate()
        return self._start(config, resume_of=str(run_dir))

    def cancel(self, job_id: str) -> Job:
        """Stop a job: SIGTERM to the child (the step in progress ends, a checkpoint is written)."""
        job = self.get(job_id)
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            elif job.state == "queued":
                job.state = "cancelled"
        return job

    def save(self, job_id: str) -> Job:
        """Ask a running job for a checkpoint after its current step."""
        return self._request(job_id, SAVE_FILE, "save a checkpoint")

    def stop_after_checkpoint(self, job_id: str) -> Job:
        """Ask a running job to stop after its next scheduled checkpoint (end of the epoch when none is scheduled)."""
        return self._request(job_id, STOP_AFTER_CHECKPOINT_FILE, "be stopped")

    def _request(self, job_id: str, file_name: str, what: str) -> Job:
        """A request file in a running job's run folder (lora_ext.train.loop.RunControl reads it)."""
        job = self.get(job_id)
        if job.state != "running":
            raise JobConflict(f"job {job_id} is {job.state}; only a running job can {what}")
        (Path(job.run_dir) / file_name).touch()
        return job

    def stop_file(self, job_id: str) -> Path:
        """The STOP file of a job's run folder (creating it also stops the job)."""
        return Path(self.get(job_id).run_dir) / STOP_FILE

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has ended (tests, scripts)."""
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)

    # ------------------------------------------------------------------------------------------------- internals
    def _start(self, config: TrainConfig | None, resume_of: str | None,
               tool: tuple[str, dict[str, Any], str] | None = None) -> Job:
        with self._lock:
            running = self.active()
            if running is not None:
                what = "tool job" if running.kind == "tool" else "training job"
                raise JobConflict(f"{what} {running.id} ({running.name}) is {running.state}; wait for it or "
                                  "cancel it first (one job at a time)")
            job_id = uuid.uuid4().hex[:12]
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            if tool is not None:
                name, args, label = tool
                run_dir = self.jobs_dir / f"tool-{job_id}"
                job = Job(id=job_id, state="queued", name=label, run_dir=str(run_dir), kind="tool", tool=name)
                config_file = self.jobs_dir / f"{job.id}.tool.json"
                spec = {"tool": name, "args": args, "run_dir": str(run_dir)}
                write_bytes_atomic(config_file, json.dumps(spec, ensure_ascii=False).encode("utf-8"))
            else:
                job = Job(id=job_id, state="queued", name=str(config.output_name),
                          run_dir=str(config.run_path), resume_of=resume_of)
                config_file = self.jobs_dir / f"{job.id}.toml"
                write_bytes_atomic(config_file, config.to_toml().encode("utf-8"))
            self._jobs[job.id] = job
            self._persist(job)
            thread = threading.Thread(target=self._run, args=(job, config_file), name=f"lora_ext-job-{job.id}",
                                      daemon=True)
            self._threads[job.id] = thread
            thread.start()
        return job

    def _run(self, job: Job, config_file: Path) -> None:
        hooks = self.hooks if job.kind == "train" else GpuHandoff()
        try:
            hooks.before()
        except Exception as exc:  # noqa: BLE001 - a failed hand-off fails the job, with its cause
            self._end(job, "failed", f"could not free the GPU for training: {type(exc).__name__}: {exc}")
            return
        # the job stays "running" until the GPU is given back and `on_end` has run: a client that sees "finished"
        # can generate at once (model back, new LoRA listed), and the next job cannot start during the hand-back
        outcome: tuple[str, str | None, int | None] = ("failed", "the job ended without an exit status", None)
        try:
            outcome = self._watch(job, config_file)
        except Exception as exc:  # noqa: BLE001 - the runner must survive anything a child does
            logger.exception("lora_ext: training job %s", job.id)
            outcome = ("failed", f"{type(exc).__name__}: {exc}", None)
        finally:
            try:
                hooks.after()
            except Exception as exc:  # noqa: BLE001 - reported on the job, the server keeps running
                logger.exception("lora_ext: giving the GPU back after job %s", job.id)
                job.warnings.append(f"the WebUI's model could not be brought back: {exc}")
            state, error, code = outcome
            if self.on_end is not None:
                try:  # it sees the job as it is about to be published
                    self.on_end(replace(job, state=state, error=error or job.error, exit_code=code))
                except Exception:  # noqa: BLE001 - a listener's failure must not break the runner
                    logger.exception("lora_ext: after job %s", job.id)
            self._end(job, state, error, code)

    def _watch(self, job: Job, config_file: Path) -> tuple[str, str | None, int | None]:
        """Run the child and follow its events; returns (state, error, exit status), which `_run` publishes."""
        stderr: deque[str] = deque(maxlen=LOG_TAIL)
        with self._lock:
            if job.state == "cancelled":  # cancelled while queued
                return "cancelled", None, None
            if job.kind == "tool":
                proc = _start_tool(config_file)
            else:
                proc = start_training(["--config", str(config_file)], stderr=subprocess.PIPE)
            self._procs[job.id] = proc
            job.started, job.pid = time.time(), proc.pid
        err_thread = threading.Thread(target=_drain, args=(proc.stderr, stderr), daemon=True)
        err_thread.start()
        for line in proc.stdout or ():
            event = _parse(line)
            if event is None:
                continue
            with self._lock:
                job.apply(event)
                job.log_tail = list(stderr)
                if job.state not in ACTIVE:  # "done": the exit status decides, published at the end (`_run`)
                    job.state = "running"
            if event.get("type") in ("start", "checkpoint", "done", "error"):
                self._persist(job)
            if self.on_event is not None:
                self.on_event(job, event)
        code = proc.wait()
        err_thread.join(5)
        job.log_tail = list(stderr)
        state = EXIT_STATES.get(code, "failed")
        error = job.error if state == "failed" else None
        if state == "failed" and not error:
            tail = "\n".join(list(stderr)[-15:])
            what = "tool" if job.kind == "tool" else "training"
            error = f"the {what} process exited with status {code}: {tail or 'no message'}"
        return state, error, code

    def _end(self, job: Job, state: str, error: str | None, code: int | None = None) -> None:
        with self._lock:
            job.state, job.ended, job.exit_code = state, time.time(), code
            if error:
                job.error = error
            self._procs.pop(job.id, None)
        self._persist(job)

    def _persist(self, job: Job) -> None:
        data = json.dumps(job.to_dict(), ensure_ascii=False).encode("utf-8")
        try:
            write_bytes_atomic(self.jobs_dir / f"{job.id}.json", data)
        except LoraExtError as err:
            logger.warning("lora_ext: cannot record job %s: %s", job.id, err)

    def _load_history(self) -> None:
        """Jobs of earlier server runs. One that was active then has ended: its state comes from its run's events."""
        if not self.jobs_dir.is_dir():
            return
        for path in self.jobs_dir.glob("*.json"):
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                job = Job(**{k: v for k, v in raw.items() if k in Job.__dataclass_fields__})
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("lora_ext: ignoring job record %s (%s)", path, exc)
                continue
            if job.state in ACTIVE:
                _settle_from_events(job)
                self._persist(job)
            self._jobs[job.id] = job


def _start_tool(spec_file: Path) -> subprocess.Popen:
    import sys

    return start_child([sys.executable, "-m", "lora_ext.tools.job", str(spec_file)], stderr=subprocess.PIPE)


def _settle_from_events(job: Job) -> None:
    """A job whose server died while it ran: replay its run's events; without a "done" it is "cancelled" (the child
    stopped with a checkpoint when it lost its runner) or "failed" (it never got to write one)."""
    events_file = Path(job.run_dir) / "events.jsonl"
    events = read_events(events_file) if events_file.is_file() else []
    started = next((i for i, e in reversed(list(enumerate(events))) if e.get("type") == "start"), None)
    for event in events[started or 0:] if started is not None else []:
        job.apply(event)
    if job.state in ACTIVE and job.kind == "tool":
        job.state = "failed"
        job.error = job.error or "the server stopped while this tool ran (nothing was written); run it again"
    elif job.state in ACTIVE:
        job.state = "cancelled" if job.checkpoint else "failed"
        job.error = job.error or "the server stopped while this job ran; resume its run folder to continue"
    job.ended = job.ended or time.time()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "type" in event else None


def _drain(stream: Iterable[str] | None, into: deque[str]) -> None:
    for line in stream or ():
        into.append(line.rstrip("\n"))
