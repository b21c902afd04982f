"""tools/make_shapes_model.py re-creates a model exactly: the same recipe gives the same bytes (a scaled-down recipe
run twice from scratch), a different seed gives different ones, and the work-folder cache resumes to the same result."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"train_images": 48, "unet_images": 64, "vae_steps": 3, "unet_steps": 3, "warmup": 2, "vae_batch": 4,
         "unet_batch": 8}


def _build(tmp: Path, name: str, **overrides) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_shapes_model
    finally:
        sys.path.pop(0)
    out, work = tmp / name, tmp / f"{name}-work"
    recipe = json.dumps({**SMALL, **overrides})
    assert make_shapes_model.main(["--out", str(out), "--work", str(work), "--threads", "1", "--recipe", recipe,
                                   "--no-eval"]) == 0
    return json.loads((out / "recipe.json").read_text())


@pytest.mark.slow
def test_same_recipe_same_bytes(tmp_path):
    a = _build(tmp_path, "a")
    b = _build(tmp_path, "b")
    assert a["digest"] == b["digest"] and a["checkpoint_sha256"] == b["checkpoint_sha256"]
    c = _build(tmp_path, "c", seed=1)
    assert c["digest"] != a["digest"]
    shutil.rmtree(tmp_path / "a")  # the cached stages give the same model again
    assert _build(tmp_path, "a")["digest"] == a["digest"]
    from safetensors import safe_open

    from lora_ext.models.loading import load_pipeline

    with safe_open(str(tmp_path / "a" / "text_encoder" / "model.safetensors"), "pt") as f:
        # the hub's names, which every transformers version loads (A1111's 4.30 too)
        assert all(k.startswith("text_model.") for k in f.keys())  # noqa: SIM118
    pipe = load_pipeline(tmp_path / "a", scheduler="euler").pipe
    assert pipe.unet.config.block_out_channels == [32, 64, 64, 64] and pipe.vae.config.scaling_factor > 0
