"""Caches of a training run: VAE posteriors of the training images (in memory and on disk) and text-encoder outputs
by caption (frozen text encoders). Both return exactly what the uncached path would compute."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_ext.errors import LoraExtError

logger = logging.getLogger(__name__)


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
