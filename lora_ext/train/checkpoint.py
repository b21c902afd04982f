"""Checkpoints of a training run: everything needed to continue it exactly.

Layout of a run folder (the loop owns it; by default `<output_dir>/../lora_ext_runs/<output_name>`, see
lora_ext.runfolder):

    <run_dir>/config.toml                 the run's configuration (a resumed run checks against it)
    <run_dir>/events.jsonl                progress events (see lora_ext.train.events)
    <run_dir>/STOP                        created by a user or the WebUI: save and stop within one step
    <run_dir>/checkpoints/step-00000120/  one checkpoint:
        lora.safetensors                  the LoRA in kohya format, fp32 (loads in every tool; resume reads it)
        state.json                        global step, epoch, position in the epoch, dataset hash, loss average,
                                          the run's id and total steps
        training.pt                       optimizer and lr-scheduler state dicts
        rng-<process>.pt                  python / numpy / torch / CUDA RNG states and the loop's generators
    <run_dir>/samples/                    sample images (step-<step>-<prompt>.png)
    <run_dir>/cache/latents/              the latent cache on disk (cache_latents_to_disk)

A checkpoint is written into a temporary folder next to the others and renamed into place when complete, so a
crash or kill never leaves a half-written `step-*` folder; only the last `keep_last` are kept. `.pt` files are read
with `torch.load(weights_only=True)`: no pickled code is executed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_ext.errors import TrainingError
from lora_ext.formats.safetensors_io import fsync_dir
from lora_ext.runfolder import CHECKPOINT_STATE_FILE as STATE_FILE
from lora_ext.runfolder import CHECKPOINT_TRAINING_FILE as TRAINING_FILE
from lora_ext.runfolder import CHECKPOINTS

_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    """Scalar progress of a run. epoch: 0-based index of the epoch in progress; step_in_epoch: optimizer steps done
    in it (0 = the epoch has not started). A checkpoint taken at the end of an epoch says (epoch + 1, 0)."""

    global_step: int
    epoch: int
    step_in_epoch: int
    dataset_hash: str
    num_processes: int = 1
    loss_avg: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION


@dataclass
class Checkpoint:
    path: Path
    state: CheckpointState
    lora: dict[str, torch.Tensor]
    lora_metadata: dict[str, str]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[int, dict[str, Any]]  # process index -> states

    @property
    def lora_path(self) -> Path:
        return self.path / "lora.safetensors"


# ------------------------------------------------------------------------------------------------------------ RNG


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The process's RNG states (python, numpy, torch CPU, every CUDA device) and those of `generators`."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return out


def restore_rng(states: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng` returned (CUDA states only when the device count matches)."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = states["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved = states.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])


# ----------------------------------------------------------------------------------------------------- save / load


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit() \
                and (p / STATE_FILE).is_file():
            found.append((int(p.name[len(_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _torch_save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, state: CheckpointState, *, lora: Mapping[str, torch.Tensor],
                    lora_metadata: Mapping[str, str], optimizer: Mapping[str, Any], lr_scheduler: Mapping[str, Any],
                    rng: Sequence[Mapping[str, Any]], keep_last: int) -> tuple[Path, list[Path]]:
    """Write checkpoint `step-<global_step>` atomically; prune to the newest `keep_last`.

    rng: one `capture_rng` result per process (index = process). Returns (checkpoint folder, removed folders).
    An existing checkpoint of the same step is replaced.
    """
    from lora_ext.formats.safetensors_io import save_safetensors_atomic

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.global_step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_safetensors_atomic({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora.items()},
                                tmp / "lora.safetensors", dict(lora_metadata))
        _torch_save_synced({"optimizer": dict(optimizer), "lr_scheduler": dict(lr_scheduler)}, tmp / TRAINING_FILE)
        for index, states in enumerate(rng):
            _torch_save_synced(dict(states), tmp / f"rng-{index}.pt")
        text = json.dumps(asdict(state), indent=1, sort_keys=True)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:  # written last: marks the folder complete
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, prune_checkpoints(run_dir, keep_last)


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and leftovers of interrupted saves; returns what went."""
    found = list_checkpoints(run_dir)
    removed = found[:-keep_last] if keep_last > 0 else found
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    root = checkpoint_dir(run_dir)
    for p in root.iterdir() if root.is_dir() else ():
        if p.name.startswith(_TMP_PREFIX) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    return removed


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for damaged files
        raise TrainingError(f"{path}: cannot read the checkpoint file ({type(exc).__name__}: {exc}); resume from "
                            "an older checkpoint (delete this folder) or start a new run") from exc


def read_state(path: Path) -> CheckpointState:
    """The scalar state of a checkpoint folder (state.json only). Raises TrainingError naming the file."""
    state_file = Path(path) / STATE_FILE
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        state = CheckpointState(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise TrainingError(f"{state_file}: not a usable checkpoint ({exc})") from exc
    if state.format != FORMAT_VERSION:
        raise TrainingError(f"{state_file}: checkpoint format {state.format} is not supported (expected "
                            f"{FORMAT_VERSION})")
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (see the module docstring). Raises TrainingError naming the file at fault."""
    from lora_ext.errors import LoraFileError
    from lora_ext.formats.safetensors_io import load_tensors, read_header

    path = Path(path)
    state = read_state(path)
    lora_file = path / "lora.safetensors"
    try:
        header = read_header(lora_file)
        lora = load_tensors(lora_file, header=header)
    except LoraFileError as exc:
        raise TrainingError(f"{lora_file}: cannot read the checkpoint's LoRA ({exc})") from exc
    training = _load_pt(path / TRAINING_FILE)
    rng = {int(p.stem.split("-", 1)[1]): _load_pt(p) for p in sorted(path.glob("rng-*.pt"))}
    return Checkpoint(path=path, state=state, lora=lora, lora_metadata=dict(header.metadata),
                      optimizer=training["optimizer"], lr_scheduler=training["lr_scheduler"], rng=rng)
