"""Text-to-image with a diffusers SD/SDXL pipeline, reproducible for a fixed seed.

The initial noise (and any noise an ancestral scheduler adds) comes from a CPU `torch.Generator` seeded with `seed`,
so the same seed starts from the same noise on any device; on CPU the image is bit-identical for the same seed and
thread count (a different `torch.get_num_threads()` changes float summation order, hence the last bits). Prompts are
plain text: `<lora:...>` tags must already be stripped and the LoRAs applied by the caller. An empty negative prompt
is passed as "none", which is what diffusers does by default (SDXL then uses zero embeddings, as its
`force_zeros_for_empty_prompt` says).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


StepHook = Callable[[int, int], None]
"""Called before every sampling step but the first with (denoiser calls done, calls in all): what a host needs to
switch windowed LoRAs (`lora_ext.session.step_of_call`)."""


def _call(pipe: Any, prompt: str, negative: str, *, seed: int, steps: int, width: int, height: int, cfg: float,
          output_type: str, on_step: StepHook | None = None):
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scale = getattr(pipe, "vae_scale_factor", 8)
    if width <= 0 or height <= 0 or width % scale or height % scale:
        raise ValueError(f"width and height must be positive multiples of {scale}, got {width}x{height}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    extra: dict[str, Any] = {}
    if on_step is not None:
        def step_end(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
            on_step(i + 1, len(pipeline.scheduler.timesteps))
            return kwargs

        extra["callback_on_step_end"] = step_end
    with torch.inference_mode():
        out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, width=width,
                   height=height, guidance_scale=cfg, generator=generator, output_type=output_type, **extra)
    return out.images


def generate_latents(pipe: Any, prompt: str, negative: str = "", *, seed: int, steps: int, width: int, height: int,
                     cfg: float = 7.0) -> torch.Tensor:
    """Final latents before VAE decoding: float tensor [1, 4, height/8, width/8] on the pipeline's device.

    Unscaled (the VAE's `scaling_factor` not yet divided out), as diffusers returns them for output_type='latent'.
    """
    return _call(pipe, prompt, negative, seed=seed, steps=steps, width=width, height=height, cfg=cfg,
                 output_type="latent")


def generate_image(pipe: Any, prompt: str, negative: str = "", *, seed: int, steps: int, width: int, height: int,
                   cfg: float = 7.0, on_step: StepHook | None = None):
    """One RGB `PIL.Image.Image` of `width` x `height`; no safety checker runs (the loaders build pipelines without).

    cfg <= 1 disables classifier-free guidance. `on_step`: see `StepHook`.
    """
    return _call(pipe, prompt, negative, seed=seed, steps=steps, width=width, height=height, cfg=cfg,
                 output_type="pil", on_step=on_step)[0]
