"""The training loss. Model of one optimizer step (per process, `gradient_accumulation_steps` micro-batches):
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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ext.train.caches import LatentSource, TextCache
from lora_ext.train.denoiser import tokenize


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
