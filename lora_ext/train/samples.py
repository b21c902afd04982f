"""Images rendered during training: sample prompts, the card's preview, DreamBooth class images. None of them changes
the training (RNG states are kept)."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_ext.formats.safetensors_io import write_bytes_atomic
from lora_ext.train.config import TrainConfig


def class_image_generator(pipe: Any, config: TrainConfig, resolution: int) -> Callable[[int, str, Path], Iterator[Any]]:
    """The DreamBooth class-image callback of `ensure_class_images`: base-model images (LoRA not yet attached) of the
    class prompt at the training resolution, seeds seed, seed + 1, ... (sample_negative/steps/cfg)."""
    from lora_ext.models.sampling import generate_image

    def generate(count: int, prompt: str, folder: Path) -> Iterator[Any]:
        for i in range(count):
            yield generate_image(pipe, prompt, config.sample_negative, seed=config.seed + i, steps=config.sample_steps,
                                 width=resolution, height=resolution, cfg=config.sample_cfg)

    return generate


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
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
        with rng_untouched(), autocast():
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
