"""Image generation for the CLI and app (implemented in `lora_ext.models.sampling`, which training uses too)."""

from lora_ext.models.sampling import generate_image, generate_latents

__all__ = ["generate_image", "generate_latents"]
