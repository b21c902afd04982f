"""Where the command line looks for things by default."""

from __future__ import annotations

from pathlib import Path


def default_lora_dirs(model: Path | None) -> list[Path]:
    """./models/Lora (the WebUI layout) and a Lora folder next to the model, where they exist."""
    cands = [Path("models/Lora")]
    if model is not None:
        cands.append(model.parent / "Lora")
    return [c for c in cands if c.is_dir()]
