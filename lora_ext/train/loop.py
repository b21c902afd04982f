"""The training loop: `train(config)` turns a TrainConfig into a LoRA file, with events, checkpoints and samples.

`train` reads like a numbered recipe (as diffusers' example training scripts do); the pieces it calls are small
functions tested on their own. Accelerate provides mixed precision, gradient accumulation and multi-process (DDP)
training: `accelerate launch -m lora_ext.train ...` runs the same code on several processes.

Model of one optimizer step (per process, `gradient_accumulation_steps` micro-batches):
    latents  = (mean + std * N(0, 1)) * vae.scaling_factor     the VAE posterior sampled with the loop's generator
    noise    = N(0, 1) + noise_offset * N(0, 1)[B, C, 1, 1]
    t        ~ U{0 .. num_train_timesteps - 1}
    noisy    = DDPM add_noise(latents, noise, t)               scheduler built from the model's own scheduler config
    target   = noise (epsilon) | get_velocity(latents, noise, t) (v_prediction)
    loss_i   = mean((unet(noisy, t, text(caption_i)) - target)^2) per sample
               * min(SNR(t), gamma) / SNR(t)        (epsilon)     min-SNR-gamma, when min_snr_gamma is set
               * min(SNR(t), gamma) / (SNR(t) + 1)  (v)
               * prior_loss_weight if sample i is a class image (prior preservation)
    loss     = mean_i loss_i
Prior preservation follows kohya sd-scripts: class images are records of the same dataset, so a batch may hold
instance and class images (or only one kind, batches come from aspect buckets); each class sample's loss is scaled by
prior_loss_weight. It matches diffusers' DreamBooth "instance loss + w * prior loss" in expectation when the dataset
holds as many class as instance samples.

Randomness: noise, timesteps and the VAE posterior come from one torch.Generator per process; augmentation and
caption shuffling come from the dataset (a function of seed, epoch, index); LoRA dropout uses the global torch RNG.
All of them are in the checkpoints, so a resumed run continues bit-exactly on CPU.

Cancel: SIGINT/SIGTERM/SIGHUP, a file named STOP in the run folder, or (for a child started through
lora_ext.train.process) its runner exiting; the loop finishes the optimizer step in progress, writes a checkpoint and
returns status "cancelled". A closed stdout does not stop it (events go on in events.jsonl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ext.errors import ConfigError, DatasetError, LoraExtError, TrainingError
from lora_ext.formats.safetensors_io import read_header, write_bytes_atomic
from lora_ext.runfolder import EVENTS_FILE, RUN_CONFIG_FILE, SAMPLES, STOP_FILE
from lora_ext.train import checkpoint as ckpt
from lora_ext.train.config import DEFAULT_EPOCHS, TrainConfig, check_resume_compatible, load_config
from lora_ext.train.events import ConsoleProgress, EventLog, LossAverage, Throughput, peak_memory
from lora_ext.train.export import sidecar_paths
from lora_ext.train.optim import build_lr_scheduler, build_optimizer, check_optimizer_available, optimizer_warnings
from lora_ext.train.process import runner_gone, runner_pid

logger = logging.getLogger(__name__)

RUN_ID_METADATA = "lora_ext.run_id"  # in the exported file: which run wrote it (a resumed run may replace its own)
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


def compute_snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio of each timestep: SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32 [B]."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def diffusion_loss(model_pred: Tensor, target: Tensor, timesteps: Tensor, *, alphas_cumprod: Tensor,
                   prediction_type: str, min_snr_gamma: float | None = None,
                   sample_weights: Tensor | None = None) -> Tensor:
    """Scalar float32 loss: per-sample MSE, min-SNR-gamma weighted (Hang et al. 2023, as diffusers' scripts), times
    `sample_weights` [B] (prior preservation), averaged over the batch. See the module docstring for the formula."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if min_snr_gamma is not None:
        snr = compute_snr(alphas_cumprod, timesteps)
        clipped = torch.clamp(snr, max=float(min_snr_gamma))
        per_sample = per_sample * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


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


# ------------------------------------------------------------------------------------------------------- batches


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


# ------------------------------------------------------------------------------------------------------ stopping


class StopRequest:
    """A cancel request: SIGINT/SIGTERM/SIGHUP (while `signals()` is active), the STOP file in the run folder, or the
    runner that started this process through `lora_ext.train.process` having gone away (see that module)."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self, stop_file: Path, runner: int | None = None) -> None:
        self.stop_file = stop_file
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

    def requested(self) -> bool:
        return self.signum is not None or self.stop_file.exists() or runner_gone(self.runner)

    @property
    def reason(self) -> str:
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        if runner_gone(self.runner):
            return f"the process that started the training (pid {self.runner}) exited"
        return f"stop file {self.stop_file}"


# ======================================================================================================== model pieces


def peek_model_family(path: str | Path, prediction_type: str | None = None) -> tuple[str, str]:
    """(arch, prediction_type) of a base model without loading its weights where possible.

    Diffusers folder: the configs. `.safetensors`: the header's key names and metadata. Other single files (pickles)
    must be read in full. Raises ModelLoadError.
    """
    from lora_ext.errors import ModelLoadError
    from lora_ext.models import convert, loading

    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{p}: not a diffusers model folder (no model_index.json)")
        try:
            unet = json.loads((p / "unet" / "config.json").read_text(encoding="utf-8"))
            te_file = p / "text_encoder" / "config.json"
            te = json.loads(te_file.read_text(encoding="utf-8")) if te_file.is_file() else None
            sched_file = p / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched_file.read_text(encoding="utf-8")) if sched_file.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{p}: cannot read the model configs ({exc})") from exc
        return loading.family_from_configs(unet, te), prediction_type or sched.get("prediction_type", "epsilon")
    if p.suffix.lower() == ".safetensors" and p.is_file():
        from lora_ext.formats.safetensors_io import read_header

        try:
            header = read_header(p)
        except LoraExtError as exc:
            raise ModelLoadError(f"{p}: cannot read the checkpoint header ({exc})") from exc
        arch = convert.detect_single_file_arch(dict.fromkeys(header.tensors))
        meta = header.metadata.get("modelspec.prediction_type") or header.metadata.get("prediction_type") or ""
        if prediction_type is None:
            prediction_type = "v_prediction" if meta.strip().lower() in ("v", "v_prediction") else "epsilon"
        return arch, prediction_type
    loaded = loading.load_pipeline(p, prediction_type=prediction_type)
    return loaded.arch, loaded.prediction_type


def tokenize(tokenizer: Any, captions: Sequence[str]) -> Tensor:
    """Token ids [B, model_max_length] (padded and truncated, as the pipelines do)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests the layers in .text_model
    return inner.final_layer_norm


def encode_text(arch: str, text_encoders: Sequence[nn.Module], input_ids: Sequence[Tensor], clip_skip: int
                ) -> tuple[Tensor, Tensor | None]:
    """(encoder_hidden_states [B, 77, D], pooled [B, P] for SDXL else None).

    SD1/SD2: the last layer's output (clip_skip 1), else the output of the clip_skip-th last layer passed through the
    final layer norm (AUTOMATIC1111 / sd-scripts). SDXL: both encoders' penultimate hidden states (moved back by
    clip_skip - 1), concatenated, and the second encoder's projected pooled output (diffusers' SDXL scripts).
    """
    if arch != "sdxl":
        te = text_encoders[0]
        ids = input_ids[0].to(te.device)
        if clip_skip <= 1:
            return te(ids)[0], None
        out = te(ids, output_hidden_states=True)
        return _final_layer_norm(te)(out.hidden_states[-clip_skip]), None
    hidden, pooled = [], None
    for te, ids in zip(text_encoders, input_ids):
        out = te(ids.to(te.device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-(clip_skip + 1)])
    return torch.cat(hidden, dim=-1), pooled


class Denoiser(nn.Module):
    """What accelerate prepares (and DDP wraps): the UNet, the text encoders and the LoRA network, whose hooks live
    on their layers. forward = text encoding (unless embeddings are given) + the UNet's prediction [B, C, h, w]."""

    def __init__(self, arch: str, unet: nn.Module, text_encoders: Sequence[nn.Module], network: nn.Module, *,
                 clip_skip: int, train_text_encoder: bool) -> None:
        super().__init__()
        self.arch = arch
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.network = network
        self.clip_skip = clip_skip
        self.train_text_encoder = train_text_encoder

    def encode(self, input_ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        ctx = contextlib.nullcontext() if self.train_text_encoder else torch.no_grad()
        with ctx:
            return encode_text(self.arch, list(self.text_encoders), input_ids, self.clip_skip)

    def forward(self, noisy_latents: Tensor, timesteps: Tensor, *, input_ids: Sequence[Tensor] | None = None,
                embeddings: tuple[Tensor, Tensor | None] | None = None, add_time_ids: Tensor | None = None
                ) -> Tensor:
        hidden, pooled = embeddings if embeddings is not None else self.encode(input_ids or [])
        unet_dtype = next(self.unet.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if self.arch == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet_dtype),
                                           "time_ids": add_time_ids.to(device=hidden.device, dtype=unet_dtype)}
        return self.unet(noisy_latents.to(unet_dtype), timesteps, hidden.to(unet_dtype), **kwargs).sample


@dataclass
class CachedLatent:
    """A record's VAE posterior and SDXL size conditioning (all fixed when augmentation is not random)."""

    mean: Tensor  # float32 [C, h, w], CPU
    std: Tensor
    original_size: tuple[int, int]  # (H, W)
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (H, W)


class LatentSource:
    """VAE posteriors (mean, std) of training images, optionally cached per record in memory and on disk.

    Disk entries (<run_dir>/cache/latents/<key>.safetensors) are keyed by the image tensor's bytes and the VAE, so a
    changed image or model never reuses a stale entry. A latent is drawn as (mean + std * N(0, 1)) * scaling_factor
    with the caller's generator, cached or not (diffusers' `DiagonalGaussianDistribution.sample` formula).
    """

    def __init__(self, vae: nn.Module, *, disk_dir: Path | None, vae_id: str) -> None:
        self.vae = vae
        self.disk_dir = disk_dir
        self.vae_id = vae_id
        self.entries: dict[int, CachedLatent] = {}
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def posterior(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) float32 [B, C, h, w] of pixel_values [B, 3, H, W] in [-1, 1]."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(pixel_values.to(device=p.device, dtype=p.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _key(self, pixels: Tensor) -> str:
        h = hashlib.sha256(self.vae_id.encode())
        h.update(str(tuple(pixels.shape)).encode())
        h.update(pixels.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def fill(self, dataset: Any) -> int:
        """Cache every record of a TrainDataset (its first sample: all repeats look the same without random
        augmentation); returns how many had to be encoded (the others came from the disk cache)."""
        from lora_ext.formats.safetensors_io import load_tensors, save_safetensors_atomic

        encoded = 0
        first = 0
        for ri, record in enumerate(dataset.records):
            index, first = first, first + record.repeats
            if ri in self.entries:
                continue
            item = dataset[index]
            pixels = item["pixel_values"]
            sizes = (tuple(item["original_size"]), tuple(item["crop_top_left"]), tuple(item["target_size"]))
            mean = std = None
            path = self.disk_dir / f"{self._key(pixels)}.safetensors" if self.disk_dir is not None else None
            if path is not None and path.is_file():
                with contextlib.suppress(LoraExtError, KeyError):
                    t = load_tensors(path)
                    mean, std = t["mean"], t["std"]
            if mean is None or std is None:
                m, s = self.posterior(pixels[None])
                mean, std = m[0].cpu(), s[0].cpu()
                encoded += 1
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_safetensors_atomic({"mean": mean, "std": std}, path)
            self.entries[ri] = CachedLatent(mean, std, *sizes)
        return encoded

    def latents(self, batch: Mapping[str, Any], generator: torch.Generator, device: torch.device) -> Tensor:
        """Scaled latents float32 [B, C, h, w] of a batch, drawn from the (cached) posteriors."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            mean, std = self.posterior(batch["pixel_values"])
            mean, std = mean.to(device), std.to(device)
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return (sample - self.shift) * self.scaling


class CachedItems(torch.utils.data.Dataset):
    """A TrainDataset's samples with cached latents: no image is decoded; the caption still varies per epoch."""

    def __init__(self, dataset: Any, latents: LatentSource) -> None:
        self.dataset = dataset
        self.latents = latents

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ri = self.dataset.record_index(index)
        entry = self.latents.entries[ri]
        return {"index": index, "record_index": ri, "caption": self.dataset.caption_for(index),
                "is_class": self.dataset.records[ri].is_class, "entry": entry}


def collate_cached(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CachedItems -> a batch with the keys of `collate_batch` except pixel_values, plus latent_mean/latent_std."""
    entries = [it["entry"] for it in items]
    return {
        "latent_mean": torch.stack([e.mean for e in entries]),
        "latent_std": torch.stack([e.std for e in entries]),
        "caption": [it["caption"] for it in items],
        "is_class": torch.tensor([bool(it["is_class"]) for it in items]),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        "record_index": torch.tensor([int(it["record_index"]) for it in items], dtype=torch.long),
        "original_size": torch.tensor([list(e.original_size) for e in entries], dtype=torch.long),
        "crop_top_left": torch.tensor([list(e.crop_top_left) for e in entries], dtype=torch.long),
        "target_size": torch.tensor([list(e.target_size) for e in entries], dtype=torch.long),
    }


class TextCache:
    """Text-encoder outputs by caption, for frozen text encoders. encode(captions) -> (hidden [B, 77, D], pooled)."""

    def __init__(self, encode: Callable[[list[str]], tuple[Tensor, Tensor | None]]) -> None:
        self.encode = encode
        self.entries: dict[str, tuple[Tensor, Tensor | None]] = {}

    def embeddings(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode(missing)
            for j, c in enumerate(missing):
                self.entries[c] = (hidden[j].detach(), None if pooled is None else pooled[j].detach())
        hidden = torch.stack([self.entries[c][0] for c in captions])
        pooled = None if self.entries[captions[0]][1] is None else torch.stack([self.entries[c][1] for c in captions])
        return hidden, pooled


@dataclass
class LossContext:
    """What every micro-step's loss needs besides the batch and the model (fixed for a run)."""

    arch: str
    prediction_type: str
    noise_scheduler: Any  # diffusers DDPMScheduler from the model's scheduler config
    tokenizers: Sequence[Any]
    latents: LatentSource
    generator: torch.Generator  # noise, timesteps and VAE posterior samples
    device: torch.device
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    text_cache: TextCache | None = None

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)


def micro_step_loss(batch: Mapping[str, Any], model: nn.Module, ctx: LossContext) -> Tensor:
    """Loss of one micro-batch (the formula is in the module docstring). `model`: the (prepared) Denoiser."""
    x0 = ctx.latents.latents(batch, ctx.generator, ctx.device)
    bsz, g, dev = x0.shape[0], ctx.generator, ctx.device
    noise = torch.randn(x0.shape, generator=g, device=dev, dtype=x0.dtype)
    if ctx.noise_offset:
        noise = noise + ctx.noise_offset * torch.randn((bsz, x0.shape[1], 1, 1), generator=g, device=dev,
                                                       dtype=x0.dtype)
    sched = ctx.noise_scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=g, device=dev, dtype=torch.long)
    noisy = sched.add_noise(x0, noise, timesteps)
    target = noise if ctx.prediction_type == "epsilon" else sched.get_velocity(x0, noise, timesteps)
    captions = list(batch["caption"])
    add_time_ids = None
    if ctx.arch == "sdxl":  # (original h, w) + (crop top, left) + (target h, w), as diffusers' SDXL scripts
        add_time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    if ctx.text_cache is not None:
        pred = model(noisy, timesteps, embeddings=ctx.text_cache.embeddings(captions), add_time_ids=add_time_ids)
    else:
        pred = model(noisy, timesteps, input_ids=[tokenize(t, captions) for t in ctx.tokenizers],
                     add_time_ids=add_time_ids)
    weights = None
    if bool(batch["is_class"].any()):
        weights = torch.where(batch["is_class"].to(dev), float(ctx.prior_loss_weight), 1.0)
    return diffusion_loss(pred, target, timesteps, alphas_cumprod=ctx.alphas_cumprod,
                          prediction_type=ctx.prediction_type, min_snr_gamma=ctx.min_snr_gamma,
                          sample_weights=weights)


# ========================================================================================================== run folder


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
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop the new run at once
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


def _resume_target(config: TrainConfig, checkpoint: Path) -> tuple[ckpt.CheckpointState, int | None]:
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
    from lora_ext.train.dataset import scan_dataset

    model = Path(str(config.pretrained_model))
    if not model.exists():
        raise ModelLoadError(f"pretrained_model: {model} does not exist; give a diffusers folder or a single-file "
                             "checkpoint (--pretrained_model PATH)")
    if not (model.is_dir() or model.suffix.lower() == ".safetensors"):
        return
    arch, prediction_type = peek_model_family(model, config.prediction_type)
    spec = dataset_spec(config, config.resolved_resolution(arch, prediction_type))
    records, scanned = scan_dataset(spec)
    if not records:
        raise _no_images_error(scanned)


def _no_images_error(scanned: Any) -> DatasetError:
    """The dataset yielded nothing: say why, naming the first files that were skipped and the reason."""
    skipped = "; ".join(f"{path}: {reason}" for path, reason in scanned.skipped[:3])
    more = f" (and {len(scanned.skipped) - 3} more)" if len(scanned.skipped) > 3 else ""
    why = "; ".join(scanned.problems[1:3] if skipped else scanned.problems[:3]) or "nothing found"
    return DatasetError("no usable image in the dataset: " + (f"skipped {skipped}{more}; " if skipped else "") + why
                        + ". Fix or remove those files (or point to another folder); --dry-run shows the full report")


# ==================================================================================================== dataset assembly


def dataset_spec(config: TrainConfig, resolution: int):
    """The dataset's DatasetSpec from the config fields of the same names (resolution resolved for the model)."""
    from lora_ext.train.dataset import DatasetSpec

    names = {f.name for f in dataclasses.fields(DatasetSpec)}
    values = {k: v for k, v in config.to_dict().items() if k in names}
    values["resolution"] = resolution
    return DatasetSpec(**values)


def class_image_generator(pipe: Any, config: TrainConfig, resolution: int) -> Callable[[int, str, Path], Iterator[Any]]:
    """The DreamBooth class-image callback of `ensure_class_images`: base-model images (LoRA not yet attached) of the
    class prompt at the training resolution, seeds seed, seed + 1, ... (sample_negative/steps/cfg)."""
    from lora_ext.models.sampling import generate_image

    def generate(count: int, prompt: str, folder: Path) -> Iterator[Any]:
        for i in range(count):
            yield generate_image(pipe, prompt, config.sample_negative, seed=config.seed + i, steps=config.sample_steps,
                                 width=resolution, height=resolution, cfg=config.sample_cfg)

    return generate


# ============================================================================================================ sampling


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Run a block without changing python/numpy/torch RNG states (samples must not change the training)."""
    py, npst = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


def render_samples(pipe: Any, model: nn.Module, config: TrainConfig, resolution: int, out_dir: Path, step: int,
                   autocast: Callable[[], Any], prompts: Sequence[str] | None = None, label: str = ""
                   ) -> list[tuple[Path, Any]]:
    """Sample images of `prompts` (default `sample_prompts`) with the current LoRA at weight 1 (`model` = the Denoiser
    holding the network, put in eval mode meanwhile: no LoRA dropout); [(png path, PIL image)]. Files are
    step-<step>-<i>[-<label>].png in `out_dir`."""
    from lora_ext.models.sampling import generate_image

    width = config.sample_width or resolution
    height = config.sample_height or resolution
    out: list[tuple[Path, Any]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    model.network.set_enabled(True)
    try:
        with _rng_untouched(), autocast():
            for i, prompt in enumerate(config.sample_prompts if prompts is None else prompts):
                image = generate_image(pipe, prompt, config.sample_negative, seed=config.sample_seed + i,
                                       steps=config.sample_steps, width=width, height=height, cfg=config.sample_cfg)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                name = f"step-{step:08d}-{i:02d}" + (f"-{label}" if label else "")
                path = write_bytes_atomic(out_dir / f"{name}.png", buf.getvalue())
                out.append((path, image))
    finally:
        model.train(was_training)
    return out


def preview_prompt(records: Sequence[Any], config: TrainConfig) -> str:
    """The prompt of the card's preview when no sample prompt gives one: the first training image's caption with the
    trigger word in front (as training saw it, without shuffling or dropout)."""
    from lora_ext.train.dataset import apply_trigger

    caption = next((r.caption for r in records if not r.is_class), "")
    return apply_trigger(caption, config.trigger_word) or config.trigger_word


# =============================================================================================================== train


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count > 0 and count % int(every) == 0


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
        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
        check_optimizer_available(config.optimizer)
        if resume_from is None:
            check_fresh_run_dir(config)
        plan = _plan_output(config, resume_from)
        if plan.already_exported:
            return _already_exported(config, plan, events, progress)
        preflight(config)
        # -- 2. the run ------------------------------------------------------------------------------------------------
        accelerator = _make_accelerator(config)
        events.enabled = progress.enabled = accelerator.is_main_process
        stop = StopRequest(config.run_path / STOP_FILE, runner=_own_runner())
        with stop.signals():
            return _train(config, accelerator, resume_from, plan, events, progress, stop, state, t_start)
    except (Exception, KeyboardInterrupt) as exc:  # the caller prints the message (once)
        message = str(exc) if isinstance(exc, LoraExtError) else f"{type(exc).__name__}: {exc}"
        events.emit("error", message=message, error=type(exc).__name__, step=state.global_step or None,
                    checkpoint=str(state.last_checkpoint) if state.last_checkpoint else None)
        raise
    finally:
        events.close()


def _own_runner() -> int | None:
    """The runner's pid when this process was started by it through lora_ext.train.process (a process that got the
    variable from further up, e.g. through `accelerate launch`, is not its child: it ignores it)."""
    pid = runner_pid()
    return pid if pid == os.getppid() else None


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


def _plan_output(config: TrainConfig, resume_from: Path | None) -> OutputPlan:
    state, total = (None, None) if resume_from is None else _resume_target(config, resume_from)
    run_id = uuid.uuid4().hex if state is None else state.extra.get("run_id")
    found = check_output(config, run_id)
    if found.owner == "other" and not config.overwrite:
        raise TrainingError(f"{config.output_path} already exists; pass --overwrite (it is replaced when the run "
                            "finishes) or choose another output_name")
    if state is not None and total is not None and state.global_step > total:
        raise _beyond_total(config, state.global_step, total)
    done = (state is not None and state.global_step == total and found.owner == "run"
            and found.steps == state.global_step and sidecar_paths(config.output_path)[0].is_file())
    # sidecars (.json, .preview.png) whose LoRA file is gone are replaced with the new LoRA's
    return OutputPlan(run_id, replace=config.overwrite or found.owner in ("run", "none"), already_exported=done,
                      state=state)


def _beyond_total(config: TrainConfig, step: int, total: int) -> ConfigError:
    return ConfigError(f"max_train_steps: the run in {config.run_path} already reached step {step}, beyond the "
                       f"{total} steps asked for now; give max_train_steps {step} or more (or enough "
                       "max_train_epochs) to export or continue it")


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


def _train(config: TrainConfig, accelerator: Any, resume_from: Path | None, plan: OutputPlan, events: EventLog,
           progress: ConsoleProgress, stop: StopRequest, state: _RunState, t_start: float) -> TrainResult:
    from accelerate.utils import gather_object, set_seed
    from diffusers import DDPMScheduler

    from lora_ext.models.loading import load_pipeline
    from lora_ext.train.dataset import BucketBatchSampler, TrainDataset, collate_batch, scan_dataset, summarize
    from lora_ext.train.dataset.class_images import ensure_class_images, missing_class_images
    from lora_ext.train.export import base_model_version
    from lora_ext.train.network import LoraTrainingNetwork

    main = accelerator.is_main_process
    n_proc, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    emit = events.emit
    set_seed(config.seed, device_specific=True)
    noise_gen = torch.Generator(device=device).manual_seed(derive_seed(config.seed, "noise", rank))
    loader_gen = torch.Generator().manual_seed(derive_seed(config.seed, "loader", rank))

    # -- 2. base model: frozen, in the mixed-precision dtype; training noise schedule from the model's scheduler -------
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    loaded = load_pipeline(config.pretrained_model, dtype=weight_dtype, device=device, vae_path=config.vae,
                           prediction_type=config.prediction_type)
    pipe, arch = loaded.pipe, loaded.arch
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
    if weight_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"{config.pretrained_model}: prediction type {prediction_type!r} is not supported")
    resolution = config.resolved_resolution(arch, prediction_type)
    if config.clip_skip > 1 and arch == "sdxl":
        emit("warning", message="clip_skip with SDXL moves both encoders' layer back from the penultimate one; SDXL "
                                "models are trained with clip_skip 1")

    # -- 3. dataset (DreamBooth class images generated first when asked) -----------------------------------------------
    spec = dataset_spec(config, resolution)
    if main and missing_class_images(spec):
        emit("warning", message=f"generating {missing_class_images(spec)} class images in {spec.class_dir}")
        with _rng_untouched():
            ensure_class_images(spec, class_image_generator(pipe, config, resolution))
    accelerator.wait_for_everyone()
    records, scanned = scan_dataset(spec, decode=True)
    if not records:
        raise _no_images_error(scanned)
    data_hash = dataset_hash(records)
    dataset = TrainDataset(records, spec)
    sampler = BucketBatchSampler(dataset, config.train_batch_size, config.seed)
    per_epoch = steps_per_epoch(len(sampler), n_proc, config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or per_epoch * (config.max_train_epochs or DEFAULT_EPOCHS)
    num_epochs = math.ceil(total_steps / per_epoch)
    report = summarize(records, spec, config.train_batch_size, None if config.max_train_steps else num_epochs,
                       config.max_train_steps, config.gradient_accumulation_steps, n_proc, scan=scanned)
    for problem in scanned.problems:
        emit("warning", message=problem)
    if resume_from is not None and plan.state is not None and plan.state.global_step > total_steps:
        raise _beyond_total(config, plan.state.global_step, total_steps)

    # -- 4. the trainable LoRA network (fp32 parameters, engine math, hooks on the frozen layers) ----------------------
    network = LoraTrainingNetwork(
        pipe, rank=config.network_dim, alpha=config.network_alpha, targets=config.network_targets,
        conv_rank=config.conv_dim, conv_alpha=config.conv_alpha, train_text_encoder=config.train_text_encoder,
        dora=config.dora, dropout=config.network_dropout, dtype=torch.float32, blocks=config.network_blocks or None,
        seed=config.seed)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for te in text_encoders:
                _enable_text_encoder_checkpointing(te)
    model = Denoiser(arch, pipe.unet, text_encoders, network, clip_skip=config.clip_skip,
                     train_text_encoder=config.train_text_encoder)

    # -- the inputs are good: the run folder is created (or continued) now ---------------------------------------------
    run_dir = config.run_path
    if main:
        prepare_run_dir(config, resume_from is not None)
        events.open(run_dir / EVENTS_FILE)
    accelerator.wait_for_everyone()

    # -- 5. optimizer and learning-rate schedule -----------------------------------------------------------------------
    groups = network.param_groups(config.learning_rate, config.effective_text_encoder_lr)
    optimizer = build_optimizer(config.optimizer, groups, learning_rate=config.learning_rate,
                                optimizer_args=config.optimizer_args)
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps * n_proc,
                                      total_steps=total_steps * n_proc, num_cycles=config.lr_num_cycles,
                                      power=config.lr_power)
    for message in optimizer_warnings(config.optimizer, config.learning_rate, config.lr_scheduler,
                                      config.lr_warmup_steps):
        emit("warning", message=message)

    # -- 6. caches: VAE posteriors, text-encoder outputs ---------------------------------------------------------------
    cache_latents = config.cache_latents or config.cache_latents_to_disk
    vae_id = json.dumps([str(config.pretrained_model), str(config.vae), str(pipe.vae.dtype), resolution])
    latents = LatentSource(pipe.vae, vae_id=vae_id,
                           disk_dir=run_dir / "cache" / "latents" if config.cache_latents_to_disk else None)
    items, collate = dataset, collate_batch
    if cache_latents:
        encoded = latents.fill(dataset)
        logger.info("latent cache: %d of %d images encoded", encoded, len(dataset.records))
        items, collate = CachedItems(dataset, latents), collate_cached

    # -- 7. accelerate: wrap model (DDP), optimizer, schedule ----------------------------------------------------------
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    trainable = [p for p in network.parameters() if p.requires_grad]
    unwrapped = accelerator.unwrap_model(model)
    text_cache = None
    if config.cache_text_encoder_outputs and not config.train_text_encoder:
        text_cache = TextCache(lambda captions: unwrapped.encode([tokenize(t, captions) for t in tokenizers]))
    loss_ctx = LossContext(arch=arch, prediction_type=prediction_type, noise_scheduler=noise_scheduler,
                           tokenizers=tokenizers, latents=latents, generator=noise_gen, device=device,
                           noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma,
                           prior_loss_weight=config.prior_loss_weight, text_cache=text_cache)

    # -- 8. resume: LoRA, optimizer, schedule, RNG, position -----------------------------------------------------------
    global_step, first_epoch, skip_steps = 0, 0, 0
    loss_avg = LossAverage()
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from)
        network.load_state_dict_kohya(saved.lora)
        optimizer.load_state_dict(saved.optimizer)
        lr_scheduler.load_state_dict(saved.lr_scheduler)
        if rank in saved.rng and saved.state.num_processes == n_proc:
            ckpt.restore_rng(saved.rng[rank], {"noise": noise_gen})
        else:
            emit("warning", message=f"the checkpoint was written by {saved.state.num_processes} processes, this run "
                                    f"has {n_proc}: random streams restart (the run is not bit-identical)")
        global_step, first_epoch, skip_steps = saved.state.global_step, saved.state.epoch, saved.state.step_in_epoch
        loss_avg.load_state_dict(saved.state.loss_avg or loss_avg.state_dict())
        saved_layout = saved.state.extra.get("sampler", {}).get("fingerprint")
        if saved_layout not in (None, sampler.fingerprint):
            emit("warning", message="the bucket layout or batch size changed since the checkpoint: batches differ from "
                                    "those of an uninterrupted run")
        if saved.state.dataset_hash != data_hash:
            emit("warning", message="the dataset changed since the checkpoint (files, captions or repeats): the run "
                                    "goes on with the new data")
        state.last_checkpoint = resume_from
    state.global_step, state.epoch = global_step, first_epoch

    emit("start", run_dir=str(run_dir), pid=os.getpid(), arch=arch, prediction_type=prediction_type,
         resolution=resolution, total_steps=total_steps, total_epochs=num_epochs, steps_per_epoch=per_epoch,
         global_step=global_step, num_processes=n_proc, resumed_from=str(resume_from) if resume_from else None,
         trainable_parameters=sum(p.numel() for p in trainable), modules=network.module_counts(),
         dataset=report.to_dict(), config=config.to_dict())
    progress.message(f"training {arch} LoRA: {total_steps} steps ({num_epochs} epochs x {per_epoch}), run folder "
                     f"{run_dir}" + (f", resumed at step {global_step}" if global_step else ""))

    # -- helpers that close over the run -------------------------------------------------------------------------------
    samples_dir = run_dir / SAMPLES
    marks = {"saved": global_step if resume_from is not None else -1, "sampled": -1}
    last_preview: list[Any] = [None]

    def save(position: tuple[int, int]) -> None:
        rng_all = gather_object([ckpt.capture_rng({"noise": noise_gen})])
        if n_proc > 1:  # DDP keeps every process's copy identical; a difference means the sync is broken
            sums = gather_object([float(sum(p.detach().double().sum() for p in trainable))])
            if len(set(sums)) > 1:
                raise TrainingError(f"the {n_proc} processes hold different LoRA weights at step {global_step} "
                                    f"(checksums {sums}): gradient synchronisation failed; report this")
        if main:
            batches_done = position[1] * n_proc * config.gradient_accumulation_steps
            sampler.set_epoch(position[0])
            st = ckpt.CheckpointState(global_step=global_step, epoch=position[0], step_in_epoch=position[1],
                                      dataset_hash=data_hash, num_processes=n_proc, loss_avg=loss_avg.state_dict(),
                                      extra={"sampler": sampler.state_dict(batches_consumed=batches_done),
                                             "total_steps": total_steps, "run_id": plan.run_id})
            meta = {**network.metadata_fields(), "lora_ext.checkpoint_step": str(global_step),
                    "ss_output_name": str(config.output_name), "ss_v2": str(arch == "sd2"),
                    "ss_base_model_version": base_model_version(arch, prediction_type)}
            path, removed = ckpt.save_checkpoint(
                run_dir, st, lora=network.state_dict_kohya(dtype=torch.float32), lora_metadata=meta,
                optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(), rng=rng_all,
                keep_last=config.save_last_n)
            state.last_checkpoint = path
            emit("checkpoint", step=global_step, epoch=position[0] + (1 if position[1] else 0), path=str(path),
                 lora_path=str(path / "lora.safetensors"), removed=[str(p) for p in removed])
        marks["saved"] = global_step
        accelerator.wait_for_everyone()

    def sample(epoch_number: int) -> None:
        if main and config.sample_prompts:
            rendered = render_samples(pipe, unwrapped, config, resolution, samples_dir, global_step,
                                      accelerator.autocast)
            last_preview[0] = rendered[-1][1] if rendered else last_preview[0]
            emit("sample", step=global_step, epoch=epoch_number, paths=[str(p) for p, _ in rendered],
                 prompts=list(config.sample_prompts))
        marks["sampled"] = global_step
        accelerator.wait_for_everyone()

    def any_process(flag: bool) -> bool:
        if n_proc == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor([int(flag)], device=device), reduction="sum").item())

    # -- 9. the loop ---------------------------------------------------------------------------------------------------
    throughput = Throughput(total_steps=total_steps, start_step=global_step)
    model.train()
    status = "finished"
    position = (first_epoch, skip_steps)
    step_losses: list[Tensor] = []
    for epoch in range(first_epoch, num_epochs):
        if global_step >= total_steps or status == "cancelled":
            break
        state.epoch = epoch
        dataset.set_epoch(epoch)
        step_in_epoch = skip_steps if epoch == first_epoch else 0
        batches = EpochBatches(sampler.batches(epoch), steps_per_epoch=per_epoch, num_processes=n_proc,
                               process_index=rank, accum=config.gradient_accumulation_steps, skip_steps=step_in_epoch)
        loader = torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate,
                                             num_workers=config.dataloader_workers, generator=loader_gen)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = micro_step_loss(batch, model, loss_ctx)
                if any_process(not bool(torch.isfinite(loss.detach()))):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {global_step + 1} (epoch {epoch + 1}); the LoRA was "
                        f"not updated with it. Last good checkpoint: {state.last_checkpoint or 'none yet'}. Lower "
                        "learning_rate, keep max_grad_norm > 0, or use mixed_precision bf16/no instead of fp16")
                step_losses.append(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done
            global_step += 1
            step_in_epoch += 1
            state.global_step = global_step
            end_of_epoch = step_in_epoch >= per_epoch
            position = (epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch)
            raw = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
            step_losses.clear()
            rate, eta = throughput.update(global_step)
            mem, mem_kind = peak_memory(device)
            lrs = lr_scheduler.get_last_lr()
            event = emit("step", step=global_step, total_steps=total_steps, epoch=epoch + 1, loss=raw,
                         loss_avg=loss_avg.update(raw), lr=float(lrs[0]), lr_te=float(lrs[1]) if len(lrs) > 1 else None,
                         it_s=rate, eta_s=eta, peak_memory_bytes=mem, memory_kind=mem_kind)
            progress.update(event, force=global_step == total_steps)
            if end_of_epoch:
                emit("epoch", epoch=epoch + 1, step=global_step, loss_avg=loss_avg.average)
            finished = global_step >= total_steps
            if _due(config.sample_every_n_steps, global_step) or \
                    (end_of_epoch and _due(config.sample_every_n_epochs, epoch + 1)):
                sample(epoch + 1)
            if not finished and (_due(config.save_every_n_steps, global_step)
                                 or (end_of_epoch and _due(config.save_every_n_epochs, epoch + 1))):
                save(position)
            if finished:
                break
            if any_process(stop.requested()):
                status = "cancelled"
                if marks["saved"] != global_step:
                    save(position)
                break

    # -- 10. the end: last samples (the preview), final checkpoint, export, done ---------------------------------------
    output = None
    done_epoch = position[0] + (1 if position[1] else 0)
    if status == "finished":
        if config.sample_prompts and marks["sampled"] != global_step:
            sample(done_epoch)
        if marks["saved"] != global_step:
            save(position)
        if main and config.preview and last_preview[0] is None:
            prompt = preview_prompt(records, config)
            rendered = render_samples(pipe, unwrapped, config, resolution, samples_dir, global_step,
                                      accelerator.autocast, prompts=[prompt], label="preview")
            last_preview[0] = rendered[0][1]
            emit("sample", step=global_step, epoch=done_epoch, paths=[str(rendered[0][0])], prompts=[prompt])
        if main:
            output = _export(network, config, spec, arch, prediction_type, report, global_step, done_epoch,
                             num_epochs, n_proc, last_preview[0] if config.preview else None, t_start, plan)
        accelerator.wait_for_everyone()
    progress.message(f"{status}: step {global_step}/{total_steps}" + (f", wrote {output}" if output else "")
                     + (f"; continue with --resume {run_dir}" if status == "cancelled" else ""))
    emit("done", status=status, step=global_step, epoch=done_epoch, output=str(output) if output else None,
         checkpoint=str(state.last_checkpoint) if state.last_checkpoint else None,
         reason=stop.reason if status == "cancelled" else None, elapsed_s=round(time.time() - t_start, 3))
    network.remove()
    if hasattr(accelerator, "trackers"):  # accelerate < 0.22 creates the list only in init_trackers (never called)
        accelerator.end_training()
    return TrainResult(status=status, run_dir=run_dir, global_step=global_step, epoch=done_epoch, output=output,
                       checkpoint=state.last_checkpoint)


def _enable_text_encoder_checkpointing(text_encoder: Any) -> None:
    """Activation checkpointing for a transformers text encoder, non-reentrant where transformers lets us choose
    (>= 4.35; 5.x renamed the method). Older ones checkpoint re-entrantly, which gives the LoRA weights inside no
    gradient unless the layers' input requires grad: the embeddings' output is made to (their weights stay frozen)."""
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif "gradient_checkpointing_kwargs" in inspect.signature(text_encoder.gradient_checkpointing_enable).parameters:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable()
        text_encoder.enable_input_require_grads()


def _export(network: Any, config: TrainConfig, spec: Any, arch: str, prediction_type: str, report: Any,
            global_step: int, epoch: int, num_epochs: int, num_processes: int, preview: Any, t_start: float,
            plan: OutputPlan) -> Path:
    """Write the final LoRA with the exporter (kohya keys, sd-scripts metadata with this run's id, sidecars,
    read-back check)."""
    from lora_ext.train.export import build_metadata, export_lora, model_file_hashes

    cfg = {**config.to_dict(), "resolution": spec.resolution, "min_bucket_reso": spec.effective_min_bucket_reso,
           "max_bucket_reso": spec.effective_max_bucket_reso}
    dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in report.sources if s.kind != "class"}
    reg_dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in report.sources if s.kind == "class"}
    metadata = build_metadata(cfg, report, arch, prediction_type=prediction_type, steps=global_step, epoch=epoch,
                              num_epochs=num_epochs, started_at=t_start, finished_at=time.time(),
                              tag_frequency=report.tag_frequency, dataset_dirs=dirs, reg_dataset_dirs=reg_dirs,
                              bucket_info=report.bucket_info(),
                              model_hashes=model_file_hashes(str(config.pretrained_model)),
                              network_fields=network.metadata_fields(), num_processes=num_processes)
    if plan.run_id:
        metadata[RUN_ID_METADATA] = plan.run_id
    sidecar: dict[str, Any] = {"preferred weight": config.preferred_weight}
    if config.trigger_word:
        sidecar["activation text"] = config.trigger_word
    if config.description:
        sidecar["description"] = config.description
    return export_lora(network, config.output_path, metadata=metadata, pipe_arch=arch, overwrite=plan.replace,
                       sidecar=sidecar, preview=preview, dtype=SAVE_DTYPES[config.save_precision])


def dry_run(config: TrainConfig, out: IO[str]) -> Any:
    """Print the dataset summary (images, repeats, buckets, steps and the formula, problems) without loading the
    model's weights where its family can be read from configs or headers; returns the DatasetReport."""
    from lora_ext.train.dataset import scan_dataset, summarize

    config.validate()
    arch, prediction_type = peek_model_family(str(config.pretrained_model), config.prediction_type)
    resolution = config.resolved_resolution(arch, prediction_type)
    spec = dataset_spec(config, resolution)
    records, scanned = scan_dataset(spec)
    report = summarize(records, spec, config.train_batch_size,
                       None if config.max_train_steps else (config.max_train_epochs or DEFAULT_EPOCHS),
                       config.max_train_steps, config.gradient_accumulation_steps, scan=scanned)
    out.write(f"model: {config.pretrained_model} ({arch}, {prediction_type}), resolution {resolution}\n")
    for line in report.lines():
        out.write(line + "\n")
    out.flush()
    return report
