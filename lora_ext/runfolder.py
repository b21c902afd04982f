"""Where a training run keeps its state, and how to recognise such a folder (stdlib only: the catalogue uses it).

A run folder holds what a run needs to continue (configuration, events, checkpoints, samples, caches); the finished
LoRA is written elsewhere (`<output_dir>/<output_name>.safetensors`). Run folders never live inside a LoRA folder by
default: the WebUI lists every `.safetensors`/`.pt` file below `models/Lora`, hidden folders included, so checkpoints
there would show up as LoRA cards. The default is a folder beside the LoRA folder:

    models/Lora/my_style.safetensors            the LoRA (+ .json sidecar, .preview.png)
    models/lora_ext_runs/my_style/              its run folder (see lora_ext.train.checkpoint for the layout)

The catalogue (lora_ext.library) skips any folder that looks like a run folder or a checkpoint, wherever it is, so
runs placed inside a LoRA folder by hand (or by older versions, `<output_dir>/.runs/<name>`) are not listed either.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

RUNS_FOLDER = "lora_ext_runs"  # default parent of run folders, beside the output folder
RUN_CONFIG_FILE = "config.toml"  # the configuration a run saves in its run folder
EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"  # create it in the run folder to save a checkpoint and stop within one step
SAVE_FILE = "SAVE"  # create it in the run folder to save a checkpoint after the step in progress (training goes on)
# create it in the run folder to stop after the next scheduled checkpoint (at the end of the epoch when none is due)
STOP_AFTER_CHECKPOINT_FILE = "STOP_AFTER_CHECKPOINT"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_TRAINING_FILE = "training.pt"


def default_runs_dir(output_dir: str | Path) -> Path:
    """The folder run folders go to when none is configured: `lora_ext_runs` beside `output_dir`
    (`models/Lora` -> `models/lora_ext_runs`; an output folder given as `.` keeps them inside it)."""
    out = Path(output_dir)
    base = out.parent if out.name not in ("", ".", "..") else out
    return base / RUNS_FOLDER


def is_run_folder(file_names: Collection[str], dir_names: Collection[str]) -> bool:
    """True for a run folder (its saved config with events or checkpoints) or one checkpoint inside it, from the
    names of the files and subfolders it holds."""
    run = RUN_CONFIG_FILE in file_names and (EVENTS_FILE in file_names or CHECKPOINTS in dir_names)
    checkpoint = CHECKPOINT_STATE_FILE in file_names and CHECKPOINT_TRAINING_FILE in file_names
    return run or checkpoint
