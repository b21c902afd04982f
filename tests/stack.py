"""What the installed stack can do, for tests that use a third-party oracle only some stacks have.

The suite runs on the main stack (transformers 5, diffusers 0.4x) and on A1111 v1.10's (transformers 4.30.2,
accelerate 0.21): checks here name the missing feature, never a version string alone.
"""

from __future__ import annotations

import importlib.metadata

import pytest


def require_diffusers_lora_loader() -> None:
    """Skip the calling test unless diffusers' `load_lora_weights` can run: from diffusers 0.27 on it needs its PEFT
    backend, which diffusers enables only with peft >= 0.6 and transformers > 4.33 (A1111 v1.10 pins 4.30.2)."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        versions = {name: _version(name) for name in ("diffusers", "transformers", "peft")}
        pytest.skip("diffusers' LoRA loader needs its PEFT backend (peft >= 0.6, transformers > 4.33); installed: "
                    + ", ".join(f"{k} {v}" for k, v in versions.items()))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"
