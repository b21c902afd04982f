"""Benchmark: LoRA training steps/s and peak memory, lora_ext's trainer vs diffusers' train_text_to_image_lora.py.

Both trainers run as separate processes, one after the other, on the same full-size random-weight model folder (real
SD1.5 configs; built once and cached), the same small image-caption dataset (random-noise images; our folder format
and the `imagefolder` metadata.jsonl format, same pixels) and the same settings: resolution R, batch 1, rank 4
(alpha 4), lr 1e-4 constant, AdamW (weight decay 1e-2), grad-norm clip 1.0, UNet attention LoRA only (to_q/to_k/to_v/
to_out.0), no validation/samples, no checkpoint inside the timed window, fp32 on CPU / fp16 mixed precision on CUDA,
seed 42, N optimizer steps. Our trainer also runs with --cache_latents --cache_text_encoder_outputs (the
"cached" variant; reported apart, never in the like-for-like ratios).

Measured per run:
  steps/s       (N - 2) / (t_N - t_2): from the 2nd to the last optimizer step, so model loading, the first step's
                warm-up and the final export are excluded. Ours: the `step` events' timestamps in events.jsonl.
                Theirs: a small launcher runs the script with `runpy` and timestamps each update of its "Steps" tqdm
                bar (the script calls progress_bar.update(1) once per optimizer step).
  CPU s/step    the process tree's CPU seconds over the same window (polled, interpolated).
  peak memory   CPU: peak RSS of the process tree, polled every 50 ms with psutil (overall, and inside the timed
                window). CUDA: torch.cuda.max_memory_allocated / max_memory_reserved read in the process at exit, and
                the peak of nvidia-smi's per-process used memory when nvidia-smi is there.
Prints one JSON object.

The reference script is not part of this repository (never commit it). Take it from diffusers' repository at the tag
of the installed diffusers (examples/text_to_image/train_text_to_image_lora.py) and pass --script. It imports
`datasets` (install it into a separate folder, e.g. `pip install --no-deps --target /tmp/lora_ext_bench_deps
datasets pyarrow dill pandas xxhash multiprocess python-dateutil six pytz tzdata`, and pass --deps) and
`torchvision.transforms`: when torchvision is not installed (it would replace a CPU-only torch), a PIL-based stand-in
for the few transforms the script uses (Resize, CenterCrop/RandomCrop, RandomHorizontalFlip, Lambda, ToTensor,
Normalize) is put on that process's path; the images are already R x R, so these are copies.

Timings on a shared machine are only as good as its idleness: every run records the CPU time other processes used
meanwhile (`other_processes_cpu_s`; a note flags runs where that exceeds 5% of the machine); --wait-idle waits for idle
CPUs before each run and --repeat alternates the order of the trainers and reports medians.

    python bench/bench_train.py [--device cpu|cuda] [--resolution R] [--steps N] [--repeat K] [--wait-idle S]
        [--keep] [--arch sd15|sdxl] [--script PATH] [--deps DIR] [--cache-dir DIR] [--skip-diffusers] [--skip-cached]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_train")

MIB = 2**20
SEED = 42
RANK = 4
LEARNING_RATE = 1e-4
POLL_S = 0.05
DISTURBED_SHARE = 0.05  # a run is "disturbed" when other processes used more than this share of all CPU time
DEFAULT_SCRIPT = Path(tempfile.gettempdir()) / "train_text_to_image_lora.py"
DEFAULT_DEPS = Path(tempfile.gettempdir()) / "lora_ext_bench_deps"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "lora_ext_bench_train_cache"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CAPTION_WORDS = ("red", "green", "blue", "noise", "pattern", "texture", "grain", "static", "field", "speckle")

# Launcher for both trainers: runs a module (`module NAME ...`) or a script (`script PATH ...`) in this process with
# runpy, timestamps every update of a tqdm bar described "Steps" (the reference script's optimizer-step bar), and at
# exit writes {"step_times": [...], "cuda_max_allocated": ..., "cuda_max_reserved": ...} to $LORA_EXT_BENCH_PROBE.
LAUNCHER = '''\
import atexit, json, os, runpy, sys, time

_times = []


def _dump():
    record = {"step_times": _times}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
        record["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved())
    with open(os.environ["LORA_EXT_BENCH_PROBE"], "w") as f:
        json.dump(record, f)


atexit.register(_dump)
mode, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if mode == "script":
    late = os.environ.get("LORA_EXT_BENCH_LATE_PATH")
    if late:  # put the stand-ins on the path only after the libraries decided what is installed
        import diffusers
        import peft
        import transformers
        from diffusers.utils import is_torchvision_available as _a
        from transformers.utils import is_torchvision_available as _b

        _a(), _b()
        sys.path.insert(0, late)
    import tqdm.std

    _update = tqdm.std.tqdm.update

    def update(self, n=1):
        out = _update(self, n)
        if getattr(self, "desc", "") == "Steps":
            _times.extend([time.time()] * int(n))
        return out

    tqdm.std.tqdm.update = update
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
'''

# Stand-in for the torchvision.transforms the reference script uses (PIL + numpy; same semantics for these calls).
TORCHVISION_SHIM = '''\
"""Minimal PIL-based stand-in for torchvision.transforms (benchmark only; torchvision is not installed)."""
import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.Resampling.NEAREST
    BILINEAR = Image.Resampling.BILINEAR
    BICUBIC = Image.Resampling.BICUBIC
    BOX = Image.Resampling.BOX
    HAMMING = Image.Resampling.HAMMING
    LANCZOS = Image.Resampling.LANCZOS


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            if w <= h:
                new = (self.size, int(self.size * h / w))
            else:
                new = (int(self.size * w / h), self.size)
        else:
            new = (self.size[1], self.size[0])
        return img if new == (w, h) else img.resize(new, self.interpolation.value)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        th, tw = self.size
        w, h = img.size
        left, top = int(round((w - tw) / 2.0)), int(round((h - th) / 2.0))
        return img.crop((left, top, left + tw, top + th))


class RandomCrop(CenterCrop):
    def __call__(self, img):
        th, tw = self.size
        w, h = img.size
        left, top = random.randint(0, w - tw), random.randint(0, h - th)
        return img.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    def __call__(self, img):
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std
'''


# ----------------------------------------------------------------------------------------------------- model, data

def _materialize(model, device: str = "cpu"):
    """Random weights for a meta-built module: N(0, 0.02) for matrices/kernels/embeddings, norms 1/0, biases 0;
    integer buffers (CLIP position_ids) set to their index ranges. Deterministic (seed 0)."""
    import torch

    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, norms):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim >= 2:
                    p.normal_(0, 0.02, generator=g)
                else:
                    p.zero_()
            for b in module.buffers(recurse=False):
                if b.is_floating_point():
                    b.zero_()
                else:  # position_ids [1, n]
                    b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
    return model


def build_model_folder(arch: str, out: Path) -> dict:
    """A diffusers folder with random weights and the real configs of `arch` (sd15 | sdxl). Returns parameter counts."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_ext.models.assets import load_config, tokenizer_dir

    key = {"sd15": "sd15", "sdxl": "sdxl-base"}[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config(key, "unet"))
        vae = AutoencoderKL.from_config(load_config(key, "vae"))
        te = CLIPTextModel(CLIPTextConfig(**load_config(key, "text_encoder")))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**load_config(key, "text_encoder_2")))
               if arch == "sdxl" else None)
    unet, vae, te = _materialize(unet), _materialize(vae), _materialize(te)
    sched_cfg = load_config(key, "scheduler")
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    sched_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}.get(
        sched_cfg.get("_class_name"), DDPMScheduler)
    sched = sched_cls.from_config(sched_cfg)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir("clip")), local_files_only=True)
    if arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        te2 = _materialize(te2)
        tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir("openclip")), local_files_only=True)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=sched)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    counts = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2))
              if m is not None}
    counts["lora_rank4_attention_params"] = sum(
        RANK * (mod.in_features + mod.out_features) for name, mod in unet.named_modules()
        if name.endswith(tuple("." + p for p in ATTENTION_PROJECTIONS)) and isinstance(mod, torch.nn.Linear))
    (tmp / "bench_model.json").write_text(json.dumps(counts), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts


def ensure_model(cache_dir: Path, arch: str) -> tuple[Path, dict, float]:
    """The cached model folder (built when missing): (path, parameter counts, build seconds; 0 when reused)."""
    out = cache_dir / f"model-{arch}"
    marker = out / "bench_model.json"
    if marker.is_file():
        return out, json.loads(marker.read_text(encoding="utf-8")), 0.0
    logger.info("building the %s random-weight model folder in %s (once)", arch, out)
    t0 = time.perf_counter()
    counts = build_model_folder(arch, out)
    return out, counts, time.perf_counter() - t0


def ensure_dataset(cache_dir: Path, resolution: int, n_images: int) -> tuple[Path, Path]:
    """R x R random-noise PNGs with captions, twice: `ours/` (img.png + img.txt) and `hf/` (img.png +
    metadata.jsonl with file_name/text, diffusers' imagefolder layout). Same pixels and captions in both."""
    from PIL import Image

    root = cache_dir / f"data-{resolution}-{n_images}"
    ours, hf = root / "ours", root / "hf"
    if (hf / "metadata.jsonl").is_file():
        return ours, hf
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "ours").mkdir(parents=True)
    (tmp / "hf").mkdir()
    rng = np.random.default_rng(SEED)
    lines = []
    for i in range(n_images):
        pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        words = rng.choice(CAPTION_WORDS, size=4, replace=False)
        caption = f"a photo of {' '.join(words)}, sample {i}"
        name = f"img_{i:03d}.png"
        Image.fromarray(pixels).save(tmp / "ours" / name)
        shutil.copyfile(tmp / "ours" / name, tmp / "hf" / name)
        (tmp / "ours" / f"img_{i:03d}.txt").write_text(caption, encoding="utf-8")
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (tmp / "hf" / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return ours, hf


# ------------------------------------------------------------------------------------------------- running, probing

@dataclass
class RunResult:
    """One trainer process: wall time, memory samples (unix time, bytes), probe output, log file."""

    name: str
    returncode: int
    wall_s: float
    started: float
    rss: list[tuple[float, int]] = field(default_factory=list)
    gpu: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (unix time, CPU seconds of the tree so far)
    probe: dict = field(default_factory=dict)
    log: Path | None = None
    own_cpu_s: float = 0.0  # CPU seconds used by the process tree
    machine_cpu_s: float = 0.0  # CPU seconds used by the whole machine meanwhile (others = machine - own)
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _nvidia_smi_used(pids: set[int]) -> int | None:
    """Sum of nvidia-smi's used GPU memory (bytes) over `pids`; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids and parts[1].isdigit():
            used += int(parts[1]) * MIB
    return used


def wait_idle(limit_s: float, busy_max: float = 15.0) -> bool:
    """Wait up to limit_s seconds until the machine's CPU use over 5 s is below busy_max percent; True if it was."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if psutil.cpu_percent(interval=5.0) < busy_max:
            return True
    return limit_s <= 0


def run_probed(name: str, cmd: list[str], env: dict[str, str], work: Path, device: str) -> RunResult:
    """Run `cmd` (through the launcher) with stdout+stderr to <work>/<name>.log, polling memory until it exits."""
    log = work / f"{name}.log"
    probe = work / f"{name}.probe.json"
    env = {**env, "LORA_EXT_BENCH_PROBE": str(probe)}
    logger.info("running %s: %s", name, " ".join(cmd))
    started = time.time()
    t0 = time.perf_counter()
    result = RunResult(name=name, returncode=-1, wall_s=0.0, started=started, log=log)
    last_gpu_poll = 0.0
    cpu: dict[int, float] = {}
    busy0 = _machine_busy_s()
    load0 = os.getloadavg()[0]
    with open(log, "w", encoding="utf-8") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work))
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            procs = _tree(proc)
            now = time.time()
            result.rss.append((now, _tree_rss(procs)))
            for p in procs:
                try:
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            result.cpu.append((now, sum(cpu.values())))
            if device == "cuda" and now - last_gpu_poll >= 0.5:
                used = _nvidia_smi_used({p.pid for p in procs})
                if used is not None:
                    result.gpu.append((now, used))
                last_gpu_poll = now
            time.sleep(POLL_S)
    result.returncode = popen.returncode
    result.wall_s = time.perf_counter() - t0
    result.own_cpu_s = sum(cpu.values())
    result.machine_cpu_s = _machine_busy_s() - busy0
    result.load_avg = (load0, os.getloadavg()[0])
    if probe.is_file():
        result.probe = json.loads(probe.read_text(encoding="utf-8"))
    return result


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


def _at(series: list[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a (time, value) series at time t (None outside it)."""
    for (t0, v0), (t1, v1) in zip(series, series[1:]):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return None


def summarize_run(run: RunResult, step_times: list[float], device: str) -> dict:
    """steps/s from the 2nd to the last step, and the process tree's CPU seconds per step over the same window (less
    sensitive to other processes than wall time); peak memory overall and inside that window (MiB)."""
    out: dict = {"exit_code": run.returncode, "wall_s": round(run.wall_s, 1), "steps_seen": len(step_times),
                 "other_processes_cpu_s": round(max(run.machine_cpu_s - run.own_cpu_s, 0.0), 1),
                 "load_avg_1m_start_end": [round(x, 2) for x in run.load_avg]}
    if len(step_times) >= 3:
        t2, tn = step_times[1], step_times[-1]
        out["timed_steps"] = len(step_times) - 2
        out["timed_s"] = round(tn - t2, 3)
        out["steps_per_s"] = round((len(step_times) - 2) / (tn - t2), 5) if tn > t2 else None
        out["s_per_step"] = round((tn - t2) / (len(step_times) - 2), 4)
        out["startup_s"] = round(step_times[0] - run.started, 1)  # process start to the end of step 1
        c2, cn = _at(run.cpu, t2), _at(run.cpu, tn)
        out["cpu_s_per_step"] = round((cn - c2) / (len(step_times) - 2), 3) if c2 is not None and cn else None
        window = [b for t, b in run.rss if step_times[0] <= t <= tn]
        out["peak_rss_training_mib"] = round(max(window) / MIB, 1) if window else None
    out["peak_rss_mib"] = round(max((b for _, b in run.rss), default=0) / MIB, 1)
    if device == "cuda":
        for key in ("cuda_max_allocated", "cuda_max_reserved"):
            if key in run.probe:
                out[key + "_mib"] = round(run.probe[key] / MIB, 1)
        if run.gpu:
            out["nvidia_smi_peak_mib"] = round(max(b for _, b in run.gpu) / MIB, 1)
    return out


def _events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ------------------------------------------------------------------------------------------------------ the trainers

def _disturbed(run: dict) -> bool:
    """Other processes used more than DISTURBED_SHARE of the machine's CPU time during the run."""
    return run["other_processes_cpu_s"] > DISTURBED_SHARE * run["wall_s"] * (os.cpu_count() or 1)


def aggregate(runs: list[dict]) -> dict:
    """One trainer's runs: the first run's fields with steps/s and times as medians over the undisturbed runs (all
    runs when every one was disturbed) and memory as maxima over all runs; the per-run numbers under "repeats"."""
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    clean = [r for r in runs if not _disturbed(r)] or runs
    out["timing_runs"] = f"{len(clean)} of {len(runs)} ({'undisturbed' if clean is not runs else 'all'})"
    for key in ("steps_per_s", "s_per_step", "cpu_s_per_step", "timed_s", "wall_s", "startup_s",
                "other_processes_cpu_s"):
        values = [r[key] for r in clean if r.get(key) is not None]
        out[key] = round(statistics.median(values), 5) if values else None
    for key in [k for k in out if k.endswith("_mib")]:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["exit_code"] = max((r["exit_code"] for r in runs), key=abs)
    out["repeats"] = [{k: r.get(k) for k in ("steps_per_s", "cpu_s_per_step", "peak_rss_mib", "peak_rss_training_mib",
                                             "cuda_max_allocated_mib", "other_processes_cpu_s") if k in r}
                      for r in runs]
    return out


def run_ours(name: str, model: Path, data: Path, work: Path, args: argparse.Namespace, launcher: Path,
             env: dict[str, str], extra: list[str]) -> dict:
    run_dir = work / name / "run"
    cmd = [sys.executable, str(launcher), "module", "lora_ext.train",
           "--pretrained_model", str(model), "--train_data_dir", str(data),
           "--output_dir", str(work / name), "--output_name", "bench_lora", "--run_dir", str(run_dir), "--overwrite",
           "--resolution", str(args.resolution), "--no-enable_bucket", "--train_batch_size", "1",
           "--network_dim", str(RANK), "--network_alpha", str(RANK), "--network_targets", "attn",
           "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--optimizer", "adamw",
           "--optimizer_args", "weight_decay=0.01", "--max_grad_norm", "1.0",
           "--max_train_steps", str(args.steps), "--mixed_precision", args.mixed_precision, "--seed", str(SEED),
           "--save_every_n_epochs", "none", "--dataloader_workers", "0", *extra]
    run = run_probed(name, cmd, env, work, args.device)
    events = _events(run_dir / "events.jsonl")
    steps = [e for e in events if e.get("type") == "step"]
    result = summarize_run(run, [float(e["time"]) for e in steps], args.device)
    start = next((e for e in events if e.get("type") == "start"), {})
    result["trainable_params"] = start.get("trainable_parameters")
    result["lora_modules"] = start.get("modules")
    if steps:
        result["event_peak_memory_mib"] = round(steps[-1]["peak_memory_bytes"] / MIB, 1)
        result["event_memory_kind"] = steps[-1].get("memory_kind")
        result["loss_first_last"] = [steps[0].get("loss"), steps[-1].get("loss")]
    if run.returncode != 0:
        result["log_tail"] = _tail(run.log)
    return result


def run_diffusers(name: str, model: Path, data: Path, work: Path, args: argparse.Namespace, launcher: Path,
                  env: dict[str, str]) -> dict:
    out_dir = work / name
    cmd = [sys.executable, str(launcher), "script", str(args.script),
           "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
           "--output_dir", str(out_dir), "--cache_dir", str(work / "hf_cache"),
           "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", "1",
           "--rank", str(RANK), "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant",
           "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--adam_weight_decay", "1e-2",
           "--max_train_steps", str(args.steps), "--mixed_precision", args.mixed_precision, "--seed", str(SEED),
           "--checkpointing_steps", str(args.steps + 1000), "--dataloader_num_workers", "0"]
    run = run_probed(name, cmd, env, work, args.device)
    result = summarize_run(run, [float(t) for t in run.probe.get("step_times", [])], args.device)
    if run.returncode != 0:
        result["log_tail"] = _tail(run.log)
    return result


def _reference_env(base: dict[str, str], args: argparse.Namespace, work: Path) -> tuple[dict[str, str], str]:
    """PYTHONPATH for the reference script: --deps (datasets) and, without torchvision, the transforms stand-in."""
    paths = [str(args.deps)] if args.deps and Path(args.deps).is_dir() else []
    env = {**base, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_cache"),
           "PYTHONPATH": os.pathsep.join([*paths, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if importlib.util.find_spec("torchvision") is not None:
        return env, "installed"
    # the stand-in goes on the path after transformers/diffusers/peft are imported (launcher), so that they still
    # see no torchvision and keep to their PIL code paths
    shim = work / "shim" / "torchvision"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text('"""Benchmark stand-in (see transforms.py)."""\n', encoding="utf-8")
    (shim / "transforms.py").write_text(TORCHVISION_SHIM, encoding="utf-8")
    env["LORA_EXT_BENCH_LATE_PATH"] = str(shim.parent)
    return env, "absent: PIL-based stand-in for the transforms the script uses"


def _versions(deps: Path | None) -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__}
    if deps is not None and Path(deps).is_dir():
        for info in sorted(Path(deps).glob("datasets-*.dist-info")):
            out["datasets"] = info.name[len("datasets-"):-len(".dist-info")]
    return out


def _machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
           "device": device}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"],
                    help="sdxl: our trainer only (the reference is the SD1.5 script)")
    ap.add_argument("--resolution", type=int, default=None, help="default 512 on cuda (1024 sdxl), 256 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (>= 4; default 10 cpu, 40 cuda)")
    ap.add_argument("--images", type=int, default=8, help="dataset size")
    ap.add_argument("--repeat", type=int, default=1, help="runs per trainer, alternating order; medians reported")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for the machine's CPUs to be idle (< 15%% busy)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (logs, outputs) in --work-dir")
    ap.add_argument("--script", type=Path, default=DEFAULT_SCRIPT, help="diffusers' train_text_to_image_lora.py")
    ap.add_argument("--deps", type=Path, default=DEFAULT_DEPS, help="extra PYTHONPATH of the reference (datasets)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="model folder + dataset, reused")
    ap.add_argument("--work-dir", type=Path, default=None, help="run folders (default: a new temporary folder)")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="reference only (to check its set-up)")
    ap.add_argument("--skip-cached", action="store_true", help="skip our cached-latents/text variant")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if args.resolution is None:
        args.resolution = (1024 if args.arch == "sdxl" else 512) if args.device == "cuda" else 256
    if args.steps is None:
        args.steps = 40 if args.device == "cuda" else 10
    if args.steps < 4:
        raise SystemExit("--steps must be >= 4 (the rate is taken from the 2nd to the last step)")
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    run_reference = not args.skip_diffusers and args.arch == "sd15"
    if run_reference and not args.script.is_file():
        raise SystemExit(f"{args.script}: the reference script is missing; copy diffusers' examples/text_to_image/"
                         "train_text_to_image_lora.py (same version as the installed diffusers) there, pass --script, "
                         "or --skip-diffusers")

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model, counts, build_s = ensure_model(args.cache_dir, args.arch)
    ours_data, hf_data = ensure_dataset(args.cache_dir, args.resolution, args.images)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lora_ext_bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    launcher = work / "launch_probed.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    notes: list[str] = []
    jobs: list[tuple[str, Callable[[str], dict]]] = []
    if run_reference:
        ref_env, torchvision = _reference_env(env, args, work)
        notes.append(f"torchvision for the reference script: {torchvision}")
        jobs.append(("diffusers", lambda tag: run_diffusers(tag, model, hf_data, work, args, launcher, ref_env)))
    if not args.skip_ours:
        jobs.append(("ours", lambda tag: run_ours(tag, model, ours_data, work, args, launcher, env, [])))
        if not args.skip_cached:
            jobs.append(("ours_cached", lambda tag: run_ours(tag, model, ours_data, work, args, launcher, env,
                                                             ["--cache_latents", "--cache_text_encoder_outputs"])))
    runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    try:
        for i in range(args.repeat):  # alternate the order so that a slow phase of the machine hits both sides
            for name, job in (jobs if i % 2 == 0 else jobs[::-1]):
                if args.wait_idle and not wait_idle(args.wait_idle):
                    notes.append(f"{name}: the machine was still busy after waiting {args.wait_idle:.0f} s")
                runs[name].append(job(name if args.repeat == 1 else f"{name}-{i + 1}"))
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = {name: aggregate(rs) for name, rs in runs.items()}
    cpus = os.cpu_count() or 1
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            if _disturbed(r):
                share = r["other_processes_cpu_s"] / max(r["wall_s"] * cpus, 1e-9)
                notes.append(f"{name} run {i + 1}: other processes used {share:.0%} of the machine's CPU time "
                             "(timings disturbed)")

    ours, theirs = results.get("ours", {}), results.get("diffusers", {})
    mem_key = "cuda_max_allocated_mib" if args.device == "cuda" else "peak_rss_mib"
    ratios = {
        "steps_per_s_ours_over_diffusers": _ratio(ours.get("steps_per_s"), theirs.get("steps_per_s")),
        "cpu_s_per_step_ours_over_diffusers": _ratio(ours.get("cpu_s_per_step"), theirs.get("cpu_s_per_step")),
        "peak_memory_ours_over_diffusers": _ratio(ours.get(mem_key), theirs.get(mem_key)),
        "peak_memory_training_window_ours_over_diffusers": _ratio(ours.get("peak_rss_training_mib"),
                                                                  theirs.get("peak_rss_training_mib")),
        "cached_steps_per_s_over_diffusers": _ratio(results.get("ours_cached", {}).get("steps_per_s"),
                                                    theirs.get("steps_per_s")),
        "memory_measure": mem_key,
    }
    targets = {"steps_per_s_ratio_min": 1.5, "peak_memory_ratio_max": 0.7, "sd15_lora_gpu_mib_max": 4096,
               "sdxl_lora_gpu_mib_max": 10240,
               "applies": args.device == "cuda" and args.resolution == (512 if args.arch == "sd15" else 1024)}
    if targets["applies"]:
        limit = 4096 if args.arch == "sd15" else 10240
        targets["met"] = {
            "steps_per_s": ratios["steps_per_s_ours_over_diffusers"] is not None
            and ratios["steps_per_s_ours_over_diffusers"] >= 1.5,
            "peak_memory": ratios["peak_memory_ours_over_diffusers"] is not None
            and ratios["peak_memory_ours_over_diffusers"] <= 0.7,
            **{f"absolute_gpu_memory_{name}": results[name].get("cuda_max_allocated_mib") is not None
               and results[name]["cuda_max_allocated_mib"] <= limit for name in ("ours", "ours_cached")
               if name in results},
        }
    else:
        targets["note"] = "the issue's targets are GPU targets at 512 px (SD1.5) / 1024 px (SDXL); not evaluated here"
    failed = [k for k, v in results.items() if v.get("exit_code") != 0]
    report = {
        "bench": "train",
        "date": datetime.date.today().isoformat(),
        "machine": _machine(args.device),
        "versions": _versions(args.deps if run_reference else None),
        "settings": {"arch": args.arch, "resolution": args.resolution, "batch_size": 1, "rank": RANK, "alpha": RANK,
                     "learning_rate": LEARNING_RATE, "lr_scheduler": "constant", "optimizer": "AdamW wd=1e-2",
                     "max_grad_norm": 1.0, "targets": "UNet attention to_q/to_k/to_v/to_out.0",
                     "mixed_precision": args.mixed_precision, "steps": args.steps, "images": args.images,
                     "seed": SEED, "validation": None,
                     "timing": "steps/s from the 2nd to the last optimizer step; memory polled every "
                               f"{int(POLL_S * 1000)} ms (process tree RSS)"},
        "model": {**counts, "build_s": round(build_s, 1), "folder": str(model)},
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "notes": notes,
        "work_dir": str(work) if (args.keep or args.work_dir) else None,
    }
    print(json.dumps(report, indent=2))
    if failed:
        logger.error("run(s) failed: %s (see log_tail in the JSON)", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
