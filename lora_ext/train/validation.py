"""Validation: a fixed-noise diffusion loss on images the run does not train on, and the best state by that loss.

Images: `validation_split` holds out a share of the training images (chosen with the run's seed, class images never),
or `validation_dir` gives a folder of images with captions. Each is used once, centre-cropped to its bucket without
random augmentation, with its caption as stored (trigger word in front, no dropout or shuffling).

The loss is the same every time for the same LoRA, so values from different steps compare: every image is encoded
once (the VAE posterior's mean), and noised at `TIMESTEPS` fixed timesteps spread over the schedule, (k + 0.5) / K of
it, with noise drawn once from the run's seed; the value is the mean squared error of the prediction against its
target (noise or velocity), unweighted, averaged over images and timesteps. The LoRA runs in eval mode (no dropout).

`keep_best` exports the state with the lowest value instead of the last (kept in <run_dir>/best.safetensors, which a
resumed run reads back).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_ext.errors import ConfigError
from lora_ext.train.denoiser import tokenize

TIMESTEPS = 4
BEST_FILE = "best.safetensors"
BEST_LOSS, BEST_STEP, BEST_EPOCH = "lora_ext.validation_loss", "lora_ext.best_step", "lora_ext.best_epoch"


def split_records(records: Sequence[Any], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(training records, validation records): round(share x images) of the non-class images (at least one), picked
    with `seed`. Raises ConfigError when no training image would be left."""
    images = [r for r in records if not r.is_class]
    count = max(1, round(share * len(images)))
    if count >= len(images):
        raise ConfigError(f"validation_split: {share} of {len(images)} images leaves none to train on; lower it or "
                          "give validation_dir", field="validation_split")
    picked = set(random.Random(f"{seed}:validation").sample(range(len(images)), count))
    held = {id(images[i]) for i in picked}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


class Validator:
    """The fixed inputs of the validation loss (built once) and `loss(denoiser)`."""

    def __init__(self, records: Sequence[Any], spec: Any, *, vae_latents: Any, noise_scheduler: Any,
                 prediction_type: str, arch: str, tokenizers: Sequence[Any], seed: int, device: torch.device
                 ) -> None:
        from lora_ext.train.dataset import TrainDataset

        plain = dataclasses.replace(spec, flip_aug=False, random_crop=False, crop_zoom=0.0, color_jitter=0.0,
                                    caption_dropout=0.0, shuffle_caption=False)
        dataset = TrainDataset([dataclasses.replace(r, repeats=1) for r in records], plain)
        self.arch, self.prediction_type, self.tokenizers = arch, prediction_type, list(tokenizers)
        self.scheduler, self.device = noise_scheduler, device
        total = noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.tensor([int((k + 0.5) / TIMESTEPS * total) for k in range(TIMESTEPS)],
                                      dtype=torch.long, device=device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        with torch.no_grad():
            for i in range(len(dataset)):
                item = dataset[i]
                mean, _ = vae_latents.posterior(item["pixel_values"][None])
                x0 = ((mean - vae_latents.shift) * vae_latents.scaling).to(device)
                noise = torch.randn((TIMESTEPS, *x0.shape[1:]), generator=gen).to(device=device, dtype=x0.dtype)
                sizes = [item["original_size"], item["crop_top_left"], item["target_size"]]
                self.items.append({"x0": x0, "noise": noise, "caption": item["caption"],
                                   "time_ids": torch.tensor([[*sizes[0], *sizes[1], *sizes[2]]] * TIMESTEPS)})

    def __len__(self) -> int:
        return len(self.items)

    def loss(self, denoiser: nn.Module) -> float:
        """The validation loss of the LoRA as it is now (see the module docstring)."""
        was_training = denoiser.training
        denoiser.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for it in self.items:
                    x0 = it["x0"].expand(TIMESTEPS, *it["x0"].shape[1:])
                    noisy = self.scheduler.add_noise(x0, it["noise"], self.timesteps)
                    target = (it["noise"] if self.prediction_type == "epsilon"
                              else self.scheduler.get_velocity(x0, it["noise"], self.timesteps))
                    ids = [tokenize(t, [it["caption"]] * TIMESTEPS) for t in self.tokenizers]
                    pred = denoiser(noisy, self.timesteps, input_ids=ids,
                                    add_time_ids=it["time_ids"] if self.arch == "sdxl" else None)
                    total += float(F.mse_loss(pred.float(), target.float()))
        finally:
            denoiser.train(was_training)
        return total / max(1, len(self.items))


def best_metadata(loss: float, step: int, epoch: int) -> dict[str, str]:
    return {BEST_LOSS: repr(float(loss)) if math.isfinite(loss) else "nan", BEST_STEP: str(step),
            BEST_EPOCH: str(epoch)}
