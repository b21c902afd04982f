"""A run's folder and its output, decided before anything is created: resume or start, what a folder holds that must
be protected, who wrote the file at the output path, and the checks that make a failed start leave nothing behind.
The folder's layout: lora_ext.train.checkpoint; where run folders live: lora_ext.runfolder."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_ext.errors import ConfigError, DatasetError, LoraExtError, TrainingError
from lora_ext.formats.safetensors_io import read_header, write_bytes_atomic
from lora_ext.runfolder import EVENTS_FILE, RUN_CONFIG_FILE, SAMPLES, SAVE_FILE, STOP_AFTER_CHECKPOINT_FILE, STOP_FILE
from lora_ext.train import checkpoint as ckpt
from lora_ext.train.config import TrainConfig, check_resume_compatible, load_config
from lora_ext.train.denoiser import peek_model_family
from lora_ext.train.export import sidecar_paths

RUN_ID_METADATA = "lora_ext.run_id"  # in the exported file: which run wrote it (a resumed run may replace its own)


def _resume_command(run_dir: Path) -> str:
    return f"python -m lora_ext.train --resume {run_dir}"


def resolve_resume(config: TrainConfig) -> tuple[TrainConfig, Path | None]:
    """(config, checkpoint to resume from). With `resume`, the run folder's saved config is the reference: the
    given config must agree on every field a resumed run may not change (ConfigError otherwise)."""
    if not config.resume:
        return config, None
    run_dir = Path(config.resume)
    saved_file = run_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        raise ConfigError(f"resume: {run_dir} is not a run folder (no {RUN_CONFIG_FILE}); give the folder a previous "
                          "run wrote (its start event names it)")
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise TrainingError(f"resume: {run_dir} has no complete checkpoint yet (the run stopped before its first "
                            f"save), so there is nothing to continue; start it again without --resume, e.g. "
                            f"python -m lora_ext.train --config {saved_file}")
    check_resume_compatible(load_config(saved_file), config, run_dir)
    return dataclasses.replace(config, run_dir=str(run_dir)), latest


def check_fresh_run_dir(config: TrainConfig) -> None:
    """A new run may use its run folder unless that holds a run with a checkpoint (something to continue): then
    TrainingError naming a command that continues it, unless `overwrite`. A folder without a checkpoint (a start
    that failed, a run stopped before its first save) holds nothing to protect and is reused."""
    run_dir = config.run_path
    latest = None if config.overwrite else ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return
    state = ckpt.read_state(latest)
    if check_output(config, state.extra.get("run_id")).owner == "run":
        raise TrainingError(f"{run_dir} holds a finished run that wrote {config.output_path}; to train it again from "
                            "the start pass --overwrite (the file and the run's checkpoints are replaced), or choose "
                            "another output_name")
    hint = f"continue it with `{_resume_command(run_dir)}` (its saved settings are used)"
    saved_file = run_dir / RUN_CONFIG_FILE
    with contextlib.suppress(LoraExtError):
        check_resume_compatible(load_config(saved_file), dataclasses.replace(config, resume=str(run_dir)), run_dir)
        saved_file = None
    if saved_file is not None:
        hint = (f"it was started with other settings ({saved_file}), which `{_resume_command(run_dir)}` would "
                "continue")
    raise TrainingError(f"{run_dir} already holds a training run with checkpoints; {hint}. To start over instead, "
                        "pass --overwrite (its checkpoints are deleted) or choose another output_name / run_dir")


def prepare_run_dir(config: TrainConfig, resuming: bool) -> Path:
    """Create the run folder and save the config. A new run first clears what an earlier start left there (only
    reached when `check_fresh_run_dir` allowed it: no checkpoint, or overwrite); the latent cache is kept (its entries
    are keyed by their content)."""
    run_dir = config.run_path
    if not resuming:
        for p in (run_dir / ckpt.CHECKPOINTS, run_dir / SAMPLES):
            shutil.rmtree(p, ignore_errors=True)
        (run_dir / EVENTS_FILE).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(config, resume=None, dry_run=False, run_dir=str(run_dir))
    write_bytes_atomic(run_dir / RUN_CONFIG_FILE, saved.to_toml().encode("utf-8"))
    # a stale request must not stop (or checkpoint) the new run at once
    for stale in (STOP_FILE, SAVE_FILE, STOP_AFTER_CHECKPOINT_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


@dataclass
class OutputCheck:
    """What is at the output path before a run. owner: "none" (nothing there), "run" (exported by this run, at
    `steps`) or "other" (another file: replaced only with overwrite)."""

    owner: str
    steps: int | None = None


def check_output(config: TrainConfig, run_id: str | None) -> OutputCheck:
    """Who wrote `config.output_path`: this run (metadata `lora_ext.run_id`), someone else, or nobody."""
    path = config.output_path
    if not (path.exists() or path.is_symlink()):
        return OutputCheck("none")
    try:
        meta = read_header(path).metadata
    except LoraExtError:
        return OutputCheck("other")
    if run_id is None or meta.get(RUN_ID_METADATA) != run_id:
        return OutputCheck("other")
    steps = meta.get("ss_steps", "")
    return OutputCheck("run", int(steps) if steps.isdigit() else None)


def resume_target(config: TrainConfig, checkpoint: Path) -> tuple[ckpt.CheckpointState, int | None]:
    """(the checkpoint's state, the run's total steps when known without the dataset: max_train_steps, or the
    checkpoint's own total when max_train_steps/max_train_epochs are those the run was started with)."""
    state = ckpt.read_state(checkpoint)
    if config.max_train_steps:
        return state, config.max_train_steps
    saved = load_config(Path(config.run_path) / RUN_CONFIG_FILE)
    same = (saved.max_train_steps, saved.max_train_epochs) == (config.max_train_steps, config.max_train_epochs)
    total = state.extra.get("total_steps")
    return state, int(total) if same and isinstance(total, int) else None


def preflight(config: TrainConfig) -> None:
    """Fail before anything is created or loaded: the base model must exist, and where its family can be read
    without loading it (diffusers folder, .safetensors), the dataset must yield at least one image at the resolved
    resolution and bucket limits. What needs the model (decoding every image, class images) is checked after
    loading it, still before the run folder is created."""
    from lora_ext.errors import ModelLoadError
    from lora_ext.models.assets import resolve_model_name
    from lora_ext.train.dataset import scan_dataset

    model = Path(resolve_model_name(config.pretrained_model))
    if not model.exists():
        raise ModelLoadError(f"pretrained_model: {model} does not exist; give a diffusers folder or a single-file "
                             "checkpoint (--pretrained_model PATH)")
    if not (model.is_dir() or model.suffix.lower() == ".safetensors"):
        return
    arch, prediction_type = peek_model_family(model, config.prediction_type)
    spec = dataset_spec(config, config.resolved_resolution(arch, prediction_type))
    records, scanned = scan_dataset(spec)
    if not records:
        raise no_images_error(scanned)
    check_captions(config, scanned)


def check_captions(config: TrainConfig, scanned: Any) -> None:
    """With `require_captions`, a DatasetError naming the folders whose images lack a caption file."""
    if not config.require_captions:
        return
    missing = [s for s in scanned.sources if s.kind != "class" and s.missing_captions]
    if missing:
        where = "; ".join(f"{s.missing_captions} of {s.images} images in {s.path}" for s in missing)
        raise DatasetError(f"require_captions: images without a caption file ({config.caption_extension}): {where}. "
                           "Write the captions (same name as the image), or turn require_captions off to train them "
                           "with the fallback caption")


@dataclass
class DatasetPreview:
    """What a dry run finds: the model's family, the resolved resolution, the usable images and the report (buckets,
    repeats, steps and their formula, problems, skipped files)."""

    arch: str
    prediction_type: str
    resolution: int
    records: list[Any]
    report: Any  # lora_ext.train.dataset.DatasetReport


def dataset_preview(config: TrainConfig) -> DatasetPreview:
    """Scan the dataset as training will (without loading the model's weights where its family can be read from its
    configs or headers). `config` must be valid (`validate()`)."""
    from lora_ext.train.config import DEFAULT_EPOCHS
    from lora_ext.train.dataset import scan_dataset, summarize

    arch, prediction_type = peek_model_family(str(config.pretrained_model), config.prediction_type)
    resolution = config.resolved_resolution(arch, prediction_type)
    spec = dataset_spec(config, resolution)
    records, scanned = scan_dataset(spec)
    report = summarize(records, spec, config.train_batch_size,
                       None if config.max_train_steps else (config.max_train_epochs or DEFAULT_EPOCHS),
                       config.max_train_steps, config.gradient_accumulation_steps, scan=scanned)
    return DatasetPreview(arch, prediction_type, resolution, records, report)


def no_images_error(scanned: Any) -> DatasetError:
    """The dataset yielded nothing: say why, naming the first files that were skipped and the reason."""
    skipped = "; ".join(f"{path}: {reason}" for path, reason in scanned.skipped[:3])
    more = f" (and {len(scanned.skipped) - 3} more)" if len(scanned.skipped) > 3 else ""
    why = "; ".join(scanned.problems[1:3] if skipped else scanned.problems[:3]) or "nothing found"
    return DatasetError("no usable image in the dataset: " + (f"skipped {skipped}{more}; " if skipped else "") + why
                        + ". Fix or remove those files (or point to another folder); --dry-run shows the full report")


def dataset_spec(config: TrainConfig, resolution: int):
    """The dataset's DatasetSpec from the config fields of the same names (resolution resolved for the model)."""
    from lora_ext.train.dataset import DatasetSpec

    names = {f.name for f in dataclasses.fields(DatasetSpec)}
    values = {k: v for k, v in config.to_dict().items() if k in names}
    values["resolution"] = resolution
    return DatasetSpec(**values)


@dataclass
class OutputPlan:
    """What the run will do with its output. run_id: this run's id (new, or from the checkpoint; None for runs
    written before ids existed); replace: the export may replace the files there (overwrite, this run's own older
    export, or sidecars left without their LoRA file); already_exported: a resumed run that finished and whose file
    is there: nothing to do."""

    run_id: str | None
    replace: bool
    already_exported: bool = False
    state: ckpt.CheckpointState | None = None


def plan_output(config: TrainConfig, resume_from: Path | None) -> OutputPlan:
    state, total = (None, None) if resume_from is None else resume_target(config, resume_from)
    run_id = uuid.uuid4().hex if state is None else state.extra.get("run_id")
    found = check_output(config, run_id)
    if found.owner == "other" and not config.overwrite:
        raise TrainingError(f"{config.output_path} already exists; pass --overwrite (it is replaced when the run "
                            "finishes) or choose another output_name")
    if state is not None and total is not None and state.global_step > total:
        raise beyond_total(config, state.global_step, total)
    done = (state is not None and state.global_step == total and found.owner == "run"
            and found.steps == state.global_step and sidecar_paths(config.output_path)[0].is_file())
    # sidecars (.json, .preview.png) whose LoRA file is gone are replaced with the new LoRA's
    return OutputPlan(run_id, replace=config.overwrite or found.owner in ("run", "none"), already_exported=done,
                      state=state)


def beyond_total(config: TrainConfig, step: int, total: int) -> ConfigError:
    return ConfigError(f"max_train_steps: the run in {config.run_path} already reached step {step}, beyond the "
                       f"{total} steps asked for now; give max_train_steps {step} or more (or enough "
                       "max_train_epochs) to export or continue it")
