"""The training loop: `train(config)` turns a TrainConfig into a LoRA file, with events, checkpoints and samples.

`train` reads like a numbered recipe (as diffusers' example training scripts do): checks that create nothing (1),
then a `TrainingRun` that loads the model (2), the dataset (3), builds the network (4), creates the run folder,
the optimizer (5), caches (6), lets accelerate wrap them (7), restores a checkpoint when resuming (8), trains (9) and
exports (10). The pieces live in their own modules and are tested on their own: the loss (`loss`), the model side
(`denoiser`), the caches (`caches`), the run folder and output decisions (`rundir`), images (`samples`), checkpoints
(`checkpoint`), events (`events`). Accelerate provides mixed precision, gradient accumulation and multi-process (DDP)
training: `accelerate launch -m lora_ext.train ...` runs the same code on several processes.

Programmatic use (what a UI job runner does; the CLI and the WebUI run it in a child process, see
lora_ext.train.process, and talk to it through the same means):
- start: `train(config, on_event=callback)` in-process, or `process.start_training(args)` as a child;
- progress: events (`lora_ext.train.events`: start, step, epoch, checkpoint, sample, warning, error, done), to the
  callback, on stdout as JSON lines, and always in <run_dir>/events.jsonl;
- cancel: a file named STOP in the run folder, or SIGTERM/SIGINT: the step in progress finishes, a checkpoint is
  written, the result's status is "cancelled";
- save now: a file named SAVE in the run folder: a checkpoint after the step in progress, training goes on;
- result: the returned `TrainResult` (status, step, epoch, output file, last checkpoint), also the "done" event;
  failures raise LoraExtError subclasses after an "error" event (exit status 2 of the child).

Randomness: noise, timesteps and the VAE posterior come from one torch.Generator per process; augmentation and
caption shuffling come from the dataset (a function of seed, epoch, index); LoRA dropout uses the global torch RNG.
All of them are in the checkpoints, so a resumed run continues bit-exactly on CPU.

Cancel also happens when a child started through lora_ext.train.process loses its runner; a closed stdout does not
stop a run (events go on in events.jsonl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from lora_ext.errors import ConfigError, DatasetError, LoraExtError, TrainingError
from lora_ext.runfolder import EVENTS_FILE, SAMPLES, SAVE_FILE, STOP_AFTER_CHECKPOINT_FILE, STOP_FILE
from lora_ext.train import checkpoint as ckpt
from lora_ext.train.caches import CachedItems, LatentSource, TextCache, collate_cached
from lora_ext.train.config import DEFAULT_EPOCHS, TrainConfig
from lora_ext.train.denoiser import Denoiser, enable_text_encoder_checkpointing, tokenize
from lora_ext.train.events import ConsoleProgress, EventLog, LossAverage, Throughput, peak_memory
from lora_ext.train.loss import LossContext, micro_step_loss
from lora_ext.train.optim import build_lr_scheduler, build_optimizer, check_optimizer_available, optimizer_warnings
from lora_ext.train.process import runner_gone, runner_pid
from lora_ext.train.rundir import (
    RUN_ID_METADATA,
    OutputPlan,
    beyond_total,
    check_fresh_run_dir,
    dataset_preview,
    dataset_spec,
    no_images_error,
    plan_output,
    preflight,
    prepare_run_dir,
    resolve_resume,
)
from lora_ext.train.samples import class_image_generator, preview_prompt, render_samples, rng_untouched

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainResult:
    """How a run ended. status: "finished" | "cancelled". output: the exported LoRA (None when cancelled)."""

    status: str
    run_dir: Path
    global_step: int
    epoch: int
    output: Path | None
    checkpoint: Path | None


# ======================================================================================================== small pieces


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from `seed` and labels (stable across runs and Python versions)."""
    text = json.dumps([seed, *[str(p) for p in parts]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def dataset_hash(records: Sequence[Any]) -> str:
    """sha256 over the records (path, caption, repeats, class flag, file size and mtime): changes when the data does."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: (str(r.path), bool(r.is_class))):
        try:
            st = Path(r.path).stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        h.update(json.dumps([str(r.path), r.caption, r.repeats, bool(r.is_class), *stamp]).encode())
    return h.hexdigest()


class EpochBatches:
    """One process's batches of one epoch (a batch sampler for torch's DataLoader).

    The bucket sampler's batches are padded cyclically to steps_per_epoch * num_processes * accum, so every process
    runs the same number of optimizer steps of whole accumulation groups; process p takes batches p, p + n, ...;
    the first `skip_steps` optimizer steps' batches are left out (resume mid-epoch).
    """

    def __init__(self, batches: Sequence[Sequence[int]], *, steps_per_epoch: int, num_processes: int = 1,
                 process_index: int = 0, accum: int = 1, skip_steps: int = 0) -> None:
        if not batches:
            raise DatasetError("the dataset has no batch to train on")
        needed = steps_per_epoch * num_processes * accum
        full = [list(batches[i % len(batches)]) for i in range(max(needed, len(batches)))][:needed]
        mine = full[process_index::num_processes]
        self.batches = mine[skip_steps * accum:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def steps_per_epoch(num_batches: int, num_processes: int, accum: int) -> int:
    """Optimizer steps per epoch: ceil(batches / (processes * accumulation))."""
    return max(1, math.ceil(num_batches / (num_processes * accum)))


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count > 0 and count % int(every) == 0


# ----------------------------------------------------------------------------------------------------- control


class RunControl:
    """Requests from outside a running training. Stop: SIGINT/SIGTERM/SIGHUP (while `signals()` is active), a file
    named STOP in the run folder, or the runner that started this process through `lora_ext.train.process` having gone
    away (see that module). Save now: a file named SAVE in the run folder (removed once the checkpoint is written).
    Stop after the next checkpoint: a file named STOP_AFTER_CHECKPOINT (the next scheduled checkpoint, or the end of
    the epoch when none is scheduled, ends the run as a stop would)."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self, run_dir: Path, runner: int | None = None) -> None:
        self.stop_file = run_dir / STOP_FILE
        self.save_file = run_dir / SAVE_FILE
        self.stop_after_file = run_dir / STOP_AFTER_CHECKPOINT_FILE
        self.signum: int | None = None
        self.runner = runner  # the runner's pid, when it is this process's parent

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("signal %s received: saving a checkpoint and stopping after this step", signum)

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Catch SIGINT/SIGTERM/SIGHUP while active (main thread only; elsewhere only the STOP file works)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop_requested(self) -> bool:
        return self.signum is not None or self.stop_file.exists() or runner_gone(self.runner)

    def save_requested(self) -> bool:
        return self.save_file.exists()

    def save_done(self) -> None:
        self.save_file.unlink(missing_ok=True)

    def stop_after_checkpoint_requested(self) -> bool:
        return self.stop_after_file.exists()

    @property
    def reason(self) -> str:
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        if self.stop_after_file.exists() and not self.stop_file.exists():
            return f"stop after checkpoint ({self.stop_after_file})"
        if runner_gone(self.runner):
            return f"the process that started the training (pid {self.runner}) exited"
        return f"stop file {self.stop_file}"


def _own_runner() -> int | None:
    """The runner's pid when this process was started by it through lora_ext.train.process (a process that got the
    variable from further up, e.g. through `accelerate launch`, is not its child: it ignores it)."""
    pid = runner_pid()
    return pid if pid == os.getppid() else None


# =============================================================================================================== train


def check_machine(config: TrainConfig) -> None:
    """What this machine must have for `config`: CUDA for fp16, the optimizer's package (ConfigError otherwise)."""
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine",
                          field="mixed_precision")
    check_optimizer_available(config.optimizer)


def train(config: TrainConfig, *, echo: IO[str] | None = None,
          on_event: Callable[[dict[str, Any]], None] | None = None, console: IO[str] | None = None) -> TrainResult:
    """Run a training (or continue one: `config.resume`). Events go to <run_dir>/events.jsonl, `echo` (a stream for
    JSON lines) and `on_event`; the console progress line to `console` (default stderr). Raises LoraExtError
    subclasses for every expected failure (ConfigError, DatasetError, ModelLoadError, TrainingError), after an
    "error" event.

    Nothing is created before the inputs are known to be good (configuration, model, dataset): the run folder is made
    once the model is loaded and the dataset scanned. Resuming a run that already reached its last step exports its
    LoRA if that was not done (a run killed between its last checkpoint and the export), else does nothing."""
    main = int(os.environ.get("RANK", "0")) == 0  # before accelerate: the launcher's rank (0 when not launched)
    events = EventLog(None, echo=echo, callback=on_event, enabled=main)
    progress = ConsoleProgress(console, enabled=main)
    state = _RunState()
    t_start = time.time()
    try:
        # -- 1. everything that can be checked before anything is created or loaded --------------------------------
        config.validate()
        config, resume_from = resolve_resume(config)
        if resume_from is not None:
            events.open(config.run_path / EVENTS_FILE)
            state.last_checkpoint = resume_from
        check_machine(config)
        if resume_from is None:
            check_fresh_run_dir(config)
        plan = plan_output(config, resume_from)
        if plan.already_exported:
            return _already_exported(config, plan, events, progress)
        preflight(config)
        # -- 2-10. the run ---------------------------------------------------------------------------------------------
        accelerator = _make_accelerator(config)
        events.enabled = progress.enabled = accelerator.is_main_process
        control = RunControl(config.run_path, runner=_own_runner())
        with control.signals():
            run = TrainingRun(config, accelerator, plan, resume_from, events, progress, control, state, t_start)
            run.prepare()
            return run.finish(run.epochs())
    except (Exception, KeyboardInterrupt) as exc:  # the caller prints the message (once)
        message = str(exc) if isinstance(exc, LoraExtError) else f"{type(exc).__name__}: {exc}"
        events.emit("error", message=message, error=type(exc).__name__, step=state.global_step or None,
                    checkpoint=str(state.last_checkpoint) if state.last_checkpoint else None)
        raise
    finally:
        events.close()


def _already_exported(config: TrainConfig, plan: OutputPlan, events: EventLog, progress: ConsoleProgress
                      ) -> TrainResult:
    state = plan.state
    assert state is not None
    epoch = state.epoch + (1 if state.step_in_epoch else 0)
    progress.message(f"finished: the run in {config.run_path} reached its last step ({state.global_step}) and "
                     f"{config.output_path} is already exported; nothing to do")
    checkpoint = ckpt.latest_checkpoint(config.run_path)
    events.emit("done", status="finished", step=state.global_step, epoch=epoch, output=str(config.output_path),
                checkpoint=str(checkpoint) if checkpoint else None, reason=None, elapsed_s=0.0, already_exported=True)
    return TrainResult(status="finished", run_dir=config.run_path, global_step=state.global_step, epoch=epoch,
                       output=config.output_path, checkpoint=checkpoint)


def _make_accelerator(config: TrainConfig) -> Any:
    """The run's Accelerator. accelerate keeps one process-wide state that refuses another mixed precision; a second
    in-process run (tests, notebooks) clears it first (the distributed set-up, PartialState, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != config.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation_steps)


@dataclass
class _RunState:
    global_step: int = 0
    epoch: int = 0
    last_checkpoint: Path | None = None


class TrainingRun:
    """One run in progress, built by `train`: the pieces of the recipe's steps 2-8 as attributes, and what happens at
    step boundaries as methods (`save`, `sample`, `epochs`, `finish`). Every process of a multi-process run has one;
    only the main process writes files and events."""

    def __init__(self, config: TrainConfig, accelerator: Any, plan: OutputPlan, resume_from: Path | None,
                 events: EventLog, progress: ConsoleProgress, control: RunControl, state: _RunState,
                 t_start: float) -> None:
        from accelerate.utils import set_seed

        self.config, self.accelerator, self.plan, self.resume_from = config, accelerator, plan, resume_from
        self.events, self.emit, self.progress, self.control = events, events.emit, progress, control
        self.state, self.t_start = state, t_start
        self.main = accelerator.is_main_process
        self.n_proc, self.rank, self.device = accelerator.num_processes, accelerator.process_index, accelerator.device
        self.run_dir = config.run_path
        set_seed(config.seed, device_specific=True)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, "noise", self.rank))
        self.loader_gen = torch.Generator().manual_seed(derive_seed(config.seed, "loader", self.rank))
        self.global_step, self.first_epoch, self.skip_steps = 0, 0, 0
        self.position = (0, 0)  # (epoch, optimizer steps done in it) of the next step
        self.loss_avg = LossAverage()
        self.saved_at, self.sampled_at = -1, -1  # the steps of the last checkpoint / samples
        self.preview: Any = None  # the last sample image (the card's preview)
        self.best: tuple[float, int, int] | None = None  # (validation loss, step, epoch) of the best state so far
        self.exported_state: tuple[int, int] | None = None  # keep_best: (step, epoch) of the state that is exported

    # ------------------------------------------------------------------------------------------------ steps 2-8
    def prepare(self) -> None:
        """Model, dataset, network, run folder, optimizer, caches, resumed state: the run is ready to train."""
        self.load_model()
        self.load_dataset()
        self.build_network()
        if self.main:  # the inputs are good: the run folder is created (or continued) now
            prepare_run_dir(self.config, self.resume_from is not None)
            self.events.open(self.run_dir / EVENTS_FILE)
        self.accelerator.wait_for_everyone()
        self.build_optimizer()
        self.build_caches()
        if self.resume_from is not None:
            self.restore(self.resume_from)
        self.announce()

    def load_model(self) -> None:
        """2. Base model: frozen, in the mixed-precision dtype; training noise schedule from the model's scheduler."""
        from diffusers import DDPMScheduler

        from lora_ext.models.loading import load_pipeline

        config = self.config
        weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        loaded = load_pipeline(config.pretrained_model, dtype=weight_dtype, device=self.device, vae_path=config.vae,
                               prediction_type=config.prediction_type)
        pipe = self.pipe = loaded.pipe
        self.arch = loaded.arch
        self.text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        for module in (pipe.unet, pipe.vae, *self.text_encoders):
            module.requires_grad_(False)
        if weight_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainingError(f"{config.pretrained_model}: prediction type {self.prediction_type!r} is not "
                                "supported")
        self.resolution = config.resolved_resolution(self.arch, self.prediction_type)
        if config.clip_skip > 1 and self.arch == "sdxl":
            self.emit("warning", message="clip_skip with SDXL moves both encoders' layer back from the penultimate "
                                         "one; SDXL models are trained with clip_skip 1")

    def load_dataset(self) -> None:
        """3. Dataset (DreamBooth class images generated first when asked), bucket batches, the step counts."""
        from lora_ext.train.dataset import BucketBatchSampler, TrainDataset, scan_dataset, summarize
        from lora_ext.train.dataset.class_images import ensure_class_images, missing_class_images

        config = self.config
        spec = self.spec = dataset_spec(config, self.resolution)
        if self.main and missing_class_images(spec):
            self.emit("warning", message=f"generating {missing_class_images(spec)} class images in {spec.class_dir}")
            with rng_untouched():
                ensure_class_images(spec, class_image_generator(self.pipe, config, self.resolution))
        self.accelerator.wait_for_everyone()
        records, scanned = scan_dataset(spec, decode=True)
        if not records:
            raise no_images_error(scanned)
        records, self.validation_records = validation_records(config, spec, records)
        if config.validation_split:  # the counts are of the images that are trained on
            scanned = dataclasses.replace(scanned, images=sum(1 for r in records if not r.is_class),
                                          repeats_total=sum(r.repeats for r in records))
        self.records = records
        self.data_hash = dataset_hash(records)
        self.dataset = TrainDataset(records, spec)
        self.sampler = BucketBatchSampler(self.dataset, config.train_batch_size, config.seed)
        self.per_epoch = steps_per_epoch(len(self.sampler), self.n_proc, config.gradient_accumulation_steps)
        self.total_steps = config.max_train_steps or self.per_epoch * (config.max_train_epochs or DEFAULT_EPOCHS)
        self.num_epochs = math.ceil(self.total_steps / self.per_epoch)
        self.report = summarize(records, spec, config.train_batch_size,
                                None if config.max_train_steps else self.num_epochs, config.max_train_steps,
                                config.gradient_accumulation_steps, self.n_proc, scan=scanned)
        for problem in scanned.problems:
            self.emit("warning", message=problem)
        if config.pivotal_token:
            check_pivotal_captions(config.pivotal_token, records, spec.trigger_word)
        if self.plan.state is not None and self.plan.state.global_step > self.total_steps:
            raise beyond_total(config, self.plan.state.global_step, self.total_steps)

    def build_network(self) -> None:
        """4. The trainable LoRA network (fp32 parameters, engine math, hooks on the frozen layers)."""
        from lora_ext.train.network import LoraTrainingNetwork, PivotalSpec

        config = self.config
        pivotal = (PivotalSpec(config.pivotal_token, config.pivotal_init, config.pivotal_vectors)
                   if config.pivotal_token else None)
        self.network = LoraTrainingNetwork(
            self.pipe, rank=config.network_dim, alpha=config.network_alpha, targets=config.network_targets,
            conv_rank=config.conv_dim, conv_alpha=config.conv_alpha, train_text_encoder=config.train_text_encoder,
            dora=config.dora, dropout=config.network_dropout, dtype=torch.float32,
            blocks=config.network_blocks or None, seed=config.seed, pivotal=pivotal)
        if config.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                for te in self.text_encoders:
                    enable_text_encoder_checkpointing(te)
        self.model = Denoiser(self.arch, self.pipe.unet, self.text_encoders, self.network,
                              clip_skip=config.clip_skip,
                              train_text_encoder=config.train_text_encoder or pivotal is not None)

    def build_optimizer(self) -> None:
        """5. Optimizer and learning-rate schedule (one scheduler step per process and optimizer step)."""
        config, n_proc = self.config, self.n_proc
        groups = self.network.param_groups(config.learning_rate, config.effective_text_encoder_lr,
                                           config.pivotal_lr)
        self.optimizer = build_optimizer(config.optimizer, groups, learning_rate=config.learning_rate,
                                         optimizer_args=config.optimizer_args)
        self.lr_scheduler = build_lr_scheduler(
            config.lr_scheduler, self.optimizer, warmup_steps=config.lr_warmup_steps * n_proc,
            total_steps=self.total_steps * n_proc, num_cycles=config.lr_num_cycles, power=config.lr_power)
        for message in optimizer_warnings(config.optimizer, config.learning_rate, config.lr_scheduler,
                                          config.lr_warmup_steps):
            self.emit("warning", message=message)

    def build_caches(self) -> None:
        """6. Caches (VAE posteriors, text-encoder outputs); 7. accelerate wraps model (DDP), optimizer, schedule."""
        from lora_ext.train.dataset import collate_batch

        config, pipe = self.config, self.pipe
        vae_id = json.dumps([str(config.pretrained_model), str(config.vae), str(pipe.vae.dtype), self.resolution])
        latents = LatentSource(pipe.vae, vae_id=vae_id,
                               disk_dir=self.run_dir / "cache" / "latents" if config.cache_latents_to_disk else None)
        self.items, self.collate = self.dataset, collate_batch
        if config.cache_latents or config.cache_latents_to_disk:
            encoded = latents.fill(self.dataset)
            logger.info("latent cache: %d of %d images encoded", encoded, len(self.dataset.records))
            self.items, self.collate = CachedItems(self.dataset, latents), collate_cached
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, self.optimizer,
                                                                                 self.lr_scheduler)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        self.unwrapped = unwrapped = self.accelerator.unwrap_model(self.model)
        text_cache = None
        if config.cache_text_encoder_outputs and not config.train_text_encoder and not config.pivotal_token:
            text_cache = TextCache(lambda captions: unwrapped.encode([tokenize(t, captions) for t in self.tokenizers]))
        self.loss_ctx = LossContext(
            arch=self.arch, prediction_type=self.prediction_type, noise_scheduler=self.noise_scheduler,
            tokenizers=self.tokenizers, latents=latents, generator=self.noise_gen, device=self.device,
            noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma,
            prior_loss_weight=config.prior_loss_weight, text_cache=text_cache)
        self.validator = None
        if self.validation_records:
            from lora_ext.train.validation import Validator

            self.validator = Validator(
                self.validation_records, self.spec, vae_latents=latents, noise_scheduler=self.noise_scheduler,
                prediction_type=self.prediction_type, arch=self.arch, tokenizers=self.tokenizers,
                seed=derive_seed(config.seed, "validation"), device=self.device)

    def restore(self, checkpoint: Path) -> None:
        """8. Resume: LoRA, optimizer, schedule, RNG, position, loss average."""
        saved = ckpt.load_checkpoint(checkpoint)
        self.network.load_state_dict_kohya(saved.lora)
        self.optimizer.load_state_dict(saved.optimizer)
        self.lr_scheduler.load_state_dict(saved.lr_scheduler)
        if self.rank in saved.rng and saved.state.num_processes == self.n_proc:
            ckpt.restore_rng(saved.rng[self.rank], {"noise": self.noise_gen})
        else:
            self.emit("warning", message=f"the checkpoint was written by {saved.state.num_processes} processes, this "
                                         f"run has {self.n_proc}: random streams restart (the run is not "
                                         "bit-identical)")
        st = saved.state
        self.global_step, self.first_epoch, self.skip_steps = st.global_step, st.epoch, st.step_in_epoch
        self.position = (st.epoch, st.step_in_epoch)
        self.saved_at = st.global_step
        self.loss_avg.load_state_dict(st.loss_avg or self.loss_avg.state_dict())
        best = st.extra.get("validation_best")
        self.best = (float(best[0]), int(best[1]), int(best[2])) if best else None
        saved_layout = st.extra.get("sampler", {}).get("fingerprint")
        if saved_layout not in (None, self.sampler.fingerprint):
            self.emit("warning", message="the bucket layout or batch size changed since the checkpoint: batches "
                                         "differ from those of an uninterrupted run")
        if st.dataset_hash != self.data_hash:
            self.emit("warning", message="the dataset changed since the checkpoint (files, captions or repeats): the "
                                         "run goes on with the new data")
        self.state.last_checkpoint = checkpoint
        self.state.global_step, self.state.epoch = self.global_step, self.first_epoch

    def announce(self) -> None:
        self.emit("start", run_dir=str(self.run_dir), pid=os.getpid(), arch=self.arch,
                  prediction_type=self.prediction_type, resolution=self.resolution, total_steps=self.total_steps,
                  total_epochs=self.num_epochs, steps_per_epoch=self.per_epoch, global_step=self.global_step,
                  num_processes=self.n_proc, resumed_from=str(self.resume_from) if self.resume_from else None,
                  trainable_parameters=sum(p.numel() for p in self.trainable),
                  modules=self.network.module_counts(), dataset=self.report.to_dict(),
                  config=self.config.to_dict())
        self.progress.message(f"training {self.arch} LoRA: {self.total_steps} steps ({self.num_epochs} epochs x "
                              f"{self.per_epoch}), run folder {self.run_dir}"
                              + (f", resumed at step {self.global_step}" if self.global_step else ""))

    # ------------------------------------------------------------------------------------------ step boundaries
    def save(self) -> None:
        """Write a checkpoint of the current step at `self.position` (all processes take part)."""
        from accelerate.utils import gather_object

        rng_all = gather_object([ckpt.capture_rng({"noise": self.noise_gen})])
        if self.n_proc > 1:  # DDP keeps every process's copy identical; a difference means the sync is broken
            sums = gather_object([float(sum(p.detach().double().sum() for p in self.trainable))])
            if len(set(sums)) > 1:
                raise TrainingError(f"the {self.n_proc} processes hold different LoRA weights at step "
                                    f"{self.global_step} (checksums {sums}): gradient synchronisation failed; report "
                                    "this")
        if self.main:
            self._write_checkpoint(rng_all)
        self.saved_at = self.global_step
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, rng_all: list[Any]) -> None:
        from lora_ext.train.export import base_model_version

        config, (epoch, in_epoch) = self.config, self.position
        batches_done = in_epoch * self.n_proc * config.gradient_accumulation_steps
        self.sampler.set_epoch(epoch)
        st = ckpt.CheckpointState(
            global_step=self.global_step, epoch=epoch, step_in_epoch=in_epoch, dataset_hash=self.data_hash,
            num_processes=self.n_proc, loss_avg=self.loss_avg.state_dict(),
            extra={"sampler": self.sampler.state_dict(batches_consumed=batches_done), "total_steps": self.total_steps,
                   "run_id": self.plan.run_id, "validation_best": list(self.best) if self.best else None})
        meta = {**self.network.metadata_fields(), "lora_ext.checkpoint_step": str(self.global_step),
                "ss_output_name": str(config.output_name), "ss_v2": str(self.arch == "sd2"),
                "ss_base_model_version": base_model_version(self.arch, self.prediction_type)}
        path, removed = ckpt.save_checkpoint(
            self.run_dir, st, lora=self.network.state_dict_kohya(dtype=torch.float32), lora_metadata=meta,
            optimizer=self.optimizer.state_dict(), lr_scheduler=self.lr_scheduler.state_dict(), rng=rng_all,
            keep_last=config.save_last_n)
        self.state.last_checkpoint = path
        self.emit("checkpoint", step=self.global_step, epoch=epoch + (1 if in_epoch else 0), path=str(path),
                  lora_path=str(path / "lora.safetensors"), removed=[str(p) for p in removed])

    def sample(self, epoch_number: int, prompts: Sequence[str] | None = None, label: str = "") -> None:
        """Render `prompts` (default: sample_prompts) with the current LoRA into <run_dir>/samples (main process)."""
        prompts = list(self.config.sample_prompts if prompts is None else prompts)
        if self.main and prompts:
            rendered = render_samples(self.pipe, self.unwrapped, self.config, self.resolution,
                                      self.run_dir / SAMPLES, self.global_step, self.accelerator.autocast,
                                      prompts=prompts, label=label)
            self.preview = rendered[-1][1] if rendered else self.preview
            self.emit("sample", step=self.global_step, epoch=epoch_number, paths=[str(p) for p, _ in rendered],
                      prompts=prompts)
        self.sampled_at = self.global_step
        self.accelerator.wait_for_everyone()

    def validate(self, epoch_number: int) -> None:
        """The validation loss now (every process computes the same value); a new best is kept for keep_best."""
        from lora_ext.formats.safetensors_io import save_safetensors_atomic
        from lora_ext.train.validation import BEST_FILE, best_metadata

        loss = self.validator.loss(self.unwrapped)
        step = self.global_step
        if self.best is None or loss < self.best[0]:
            self.best = (loss, step, epoch_number)
            if self.main and self.config.keep_best:
                save_safetensors_atomic(self.network.state_dict_kohya(dtype=torch.float32), self.run_dir / BEST_FILE,
                                        metadata=best_metadata(loss, step, epoch_number))
        self.emit("validation", step=step, epoch=epoch_number, loss=loss, images=len(self.validator),
                  best_loss=self.best[0], best_step=self.best[1], best_epoch=self.best[2])

    def use_best(self) -> tuple[int, int] | None:
        """keep_best: load the best state into the network; its (step, epoch), or None (the last state stays)."""
        from lora_ext.formats.safetensors_io import load_tensors
        from lora_ext.train.validation import BEST_FILE

        path = self.run_dir / BEST_FILE
        if not self.config.keep_best or self.best is None or not path.is_file():
            return None
        self.network.load_state_dict_kohya(load_tensors(path))
        return self.best[1], self.best[2]

    def any_process(self, flag: bool) -> bool:
        """True when `flag` is true on any process (all processes must call it at the same point)."""
        if self.n_proc == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([int(flag)], device=self.device), reduction="sum").item())

    # ------------------------------------------------------------------------------------------------ step 9
    def epochs(self) -> str:
        """9. The loop: "finished" after total_steps, "cancelled" when a stop was requested (after a checkpoint)."""
        config = self.config
        throughput = Throughput(total_steps=self.total_steps, start_step=self.global_step)
        self.model.train()
        for epoch in range(self.first_epoch, self.num_epochs):
            if self.global_step >= self.total_steps:
                break
            self.state.epoch = epoch
            self.dataset.set_epoch(epoch)
            in_epoch = self.skip_steps if epoch == self.first_epoch else 0
            batches = EpochBatches(self.sampler.batches(epoch), steps_per_epoch=self.per_epoch,
                                   num_processes=self.n_proc, process_index=self.rank,
                                   accum=config.gradient_accumulation_steps, skip_steps=in_epoch)
            loader = torch.utils.data.DataLoader(self.items, batch_sampler=batches, collate_fn=self.collate,
                                                 num_workers=config.dataloader_workers, generator=self.loader_gen)
            losses: list[Tensor] = []
            for batch in loader:
                losses.append(self._micro_step(batch, epoch))
                if not self.accelerator.sync_gradients:
                    continue
                in_epoch += 1
                outcome = self._after_step(epoch, in_epoch, losses, throughput)
                losses = []
                if outcome is not None:
                    return outcome
        return "finished"

    def _micro_step(self, batch: Mapping[str, Any], epoch: int) -> Tensor:
        """Forward, backward and (on a sync step) the optimizer step of one micro-batch; its loss (detached)."""
        with self.accelerator.accumulate(self.model):
            loss = micro_step_loss(batch, self.model, self.loss_ctx)
            if self.any_process(not bool(torch.isfinite(loss.detach()))):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {self.global_step + 1} (epoch {epoch + 1}); the LoRA was "
                    f"not updated with it. Last good checkpoint: {self.state.last_checkpoint or 'none yet'}. Lower "
                    "learning_rate, keep max_grad_norm > 0, or use mixed_precision bf16/no instead of fp16")
            self.accelerator.backward(loss)
            if self.embedding_frozen():  # after pivotal_fraction of the steps only the LoRA goes on
                for param in self.network.pivotal.parameters():
                    param.grad = None
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def embedding_frozen(self) -> bool:
        """Pivotal tuning's embedding no longer learns (its step share is used up); False without pivotal tuning."""
        return (self.network.pivotal is not None
                and self.global_step >= math.ceil(self.config.pivotal_fraction * self.total_steps))

    def _after_step(self, epoch: int, in_epoch: int, losses: list[Tensor], throughput: Throughput) -> str | None:
        """One optimizer step is done: events, samples, checkpoints, stop and save-now requests. Returns "finished"
        or "cancelled" to end the loop, None to go on."""
        config = self.config
        self.global_step += 1
        step = self.state.global_step = self.global_step
        end_of_epoch = in_epoch >= self.per_epoch
        self.position = (epoch + 1, 0) if end_of_epoch else (epoch, in_epoch)
        raw = self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        rate, eta = throughput.update(step)
        mem, mem_kind = peak_memory(self.device)
        lrs = self.lr_scheduler.get_last_lr()
        event = self.emit("step", step=step, total_steps=self.total_steps, epoch=epoch + 1, loss=raw,
                          loss_avg=self.loss_avg.update(raw), lr=float(lrs[0]),
                          lr_te=float(lrs[1]) if len(lrs) > 1 else None, it_s=rate, eta_s=eta,
                          peak_memory_bytes=mem, memory_kind=mem_kind)
        self.progress.update(event, force=step == self.total_steps)
        if end_of_epoch:
            self.emit("epoch", epoch=epoch + 1, step=step, loss_avg=self.loss_avg.average)
        finished = step >= self.total_steps
        if _due(config.sample_every_n_steps, step) or (end_of_epoch and _due(config.sample_every_n_epochs, epoch + 1)):
            self.sample(epoch + 1)
        if self.validator is not None and (_due(config.validation_every_n_steps, step)
                                           if config.validation_every_n_steps else end_of_epoch):
            self.validate(epoch + 1)
        scheduled = _due(config.save_every_n_steps, step) or (end_of_epoch and _due(config.save_every_n_epochs,
                                                                                        epoch + 1))
        if not finished and (scheduled or self.any_process(self.control.save_requested())):
            self.save()
            self.control.save_done()
        if finished:
            return "finished"
        no_schedule = not (config.save_every_n_steps or config.save_every_n_epochs)
        if self.any_process(self.control.stop_after_checkpoint_requested()) and (
                scheduled or (no_schedule and end_of_epoch)):
            if self.saved_at != step:
                self.save()
            return "cancelled"
        if self.any_process(self.control.stop_requested()):
            if self.saved_at != step:
                self.save()
            return "cancelled"
        return None

    # ----------------------------------------------------------------------------------------------- step 10
    def finish(self, status: str) -> TrainResult:
        """10. The end: last samples (the preview), final checkpoint, export, done."""
        config, step = self.config, self.global_step
        output = None
        done_epoch = self.position[0] + (1 if self.position[1] else 0)
        if status == "finished":
            if config.sample_prompts and self.sampled_at != step:
                self.sample(done_epoch)
            if self.saved_at != step:
                self.save()
            self.exported_state = self.use_best()
            if config.preview and not config.sample_prompts:  # the same decision on every process
                self.sample(done_epoch, prompts=[preview_prompt(self.records, config)], label="preview")
            if self.main:
                output = _export(self, done_epoch)
            self.accelerator.wait_for_everyone()
        self.progress.message(f"{status}: step {step}/{self.total_steps}" + (f", wrote {output}" if output else "")
                              + (f"; continue with --resume {self.run_dir}" if status == "cancelled" else ""))
        self.emit("done", status=status, step=step, epoch=done_epoch, output=str(output) if output else None,
                  checkpoint=str(self.state.last_checkpoint) if self.state.last_checkpoint else None,
                  reason=self.control.reason if status == "cancelled" else None,
                  elapsed_s=round(time.time() - self.t_start, 3))
        self.network.remove()
        if hasattr(self.accelerator, "trackers"):  # accelerate < 0.22 creates the list only in init_trackers
            self.accelerator.end_training()
        return TrainResult(status=status, run_dir=self.run_dir, global_step=step, epoch=done_epoch, output=output,
                           checkpoint=self.state.last_checkpoint)


def validation_records(config: TrainConfig, spec: Any, records: list[Any]) -> tuple[list[Any], list[Any]]:
    """(training records, validation records) from validation_split or validation_dir ([] without validation)."""
    if config.validation_split:
        from lora_ext.train.validation import split_records

        return split_records(records, config.validation_split, config.seed)
    if not config.validation_dir:
        return records, []
    from lora_ext.train.dataset import scan_dataset

    held, _ = scan_dataset(dataclasses.replace(spec, train_data_dir=config.validation_dir, metadata_file=None,
                                               instance_dir=None, class_dir=None, num_class_images=0), decode=True)
    if not held:
        raise DatasetError(f"validation_dir {config.validation_dir}: no usable image (with a caption file) there; "
                           "add images or leave validation_dir empty")
    return records, held


def check_pivotal_captions(token: str, records: Sequence[Any], trigger_word: str = "") -> None:
    """Pivotal tuning learns the word only where captions contain it: refuse a dataset in which none does (the
    trigger word is put in front of every training caption)."""
    import re

    word = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])", re.IGNORECASE)
    if word.search(trigger_word):
        return
    if not any(word.search(r.caption or "") for r in records if not r.is_class):
        raise ConfigError(f"pivotal_token: {token!r} appears in no caption of the training images, so its embedding "
                          "would learn nothing; set trigger_word to it or write it into the captions",
                          field="pivotal_token")


def _export(run: TrainingRun, epoch: int) -> Path:
    """Write the final LoRA with the exporter (kohya keys, sd-scripts metadata with this run's id, sidecars with the
    preview, read-back check)."""
    from lora_ext.train.export import build_metadata, export_lora, model_file_hashes

    config, spec, report = run.config, run.spec, run.report
    cfg = {**config.to_dict(), "resolution": spec.resolution, "min_bucket_reso": spec.effective_min_bucket_reso,
           "max_bucket_reso": spec.effective_max_bucket_reso}
    dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in report.sources if s.kind != "class"}
    reg_dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in report.sources if s.kind == "class"}
    steps = run.global_step
    if run.exported_state is not None:  # keep_best: the best state by validation loss
        steps, epoch = run.exported_state
    metadata = build_metadata(cfg, report, run.arch, prediction_type=run.prediction_type, steps=steps,
                              epoch=epoch, num_epochs=run.num_epochs, started_at=run.t_start,
                              finished_at=time.time(), tag_frequency=report.tag_frequency, dataset_dirs=dirs,
                              reg_dataset_dirs=reg_dirs, bucket_info=report.bucket_info(),
                              model_hashes=model_file_hashes(str(config.pretrained_model)),
                              network_fields=run.network.metadata_fields(), num_processes=run.n_proc)
    if run.plan.run_id:
        metadata[RUN_ID_METADATA] = run.plan.run_id
    if run.best is not None:
        from lora_ext.train.validation import best_metadata

        metadata.update(best_metadata(*run.best))
    sidecar: dict[str, Any] = {"preferred weight": config.preferred_weight}
    if config.trigger_word:
        sidecar["activation text"] = config.trigger_word
    if config.description:
        sidecar["description"] = config.description
    return export_lora(run.network, config.output_path, metadata=metadata, pipe_arch=run.arch,
                       overwrite=run.plan.replace, sidecar=sidecar, preview=run.preview if config.preview else None,
                       dtype=SAVE_DTYPES[config.save_precision])


def dry_run(config: TrainConfig, out: IO[str]) -> Any:
    """Print the dataset summary (images, repeats, buckets, steps and the formula, problems) without loading the
    model's weights where its family can be read from configs or headers; returns the DatasetReport."""
    config.validate()
    found = dataset_preview(config)
    out.write(f"model: {config.pretrained_model} ({found.arch}, {found.prediction_type}), resolution "
              f"{found.resolution}\n")
    for line in found.report.lines():
        out.write(line + "\n")
    out.flush()
    return found.report
