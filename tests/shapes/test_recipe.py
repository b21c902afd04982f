"""tools/make_shapes_model.py re-creates a model exactly: the same recipe gives the same bytes (a scaled-down recipe
run twice from scratch), a different seed gives different ones, the work-folder cache resumes to the same result, and
the decoder fine-tune (stage 4) run from a shipped folder's stages gives the bytes of a run from scratch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"train_images": 48, "unet_images": 64, "vae_steps": 3, "unet_steps": 3, "warmup": 2, "vae_batch": 4,
         "unet_batch": 8, "dec_steps": 3, "dec_batch": 4, "dec_warmup": 1}


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


@pytest.mark.slow
def test_decoder_finetune_keeps_the_encoder_and_stages_from_gives_the_same_bytes(tmp_path):
    """Stage 4 changes the decoder only (the latent space the UNet learned stays: the encoder is the fp16-rounded
    stage-1 encoder, bit for bit), and `--stages-from` a shipped folder gives the bytes of a run from scratch."""
    import torch
    from safetensors.torch import load_file

    a = _build(tmp_path, "a", dec_steps=4, dec_warmup=2)
    _build(tmp_path, "nf", dec_steps=0)
    vae_a = load_file(str(tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_0 = load_file(str(tmp_path / "nf" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert vae_a.keys() == vae_0.keys()
    enc = [k for k in vae_a if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in vae_a if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec and len(enc) + len(dec) == len(vae_a)
    assert all(torch.equal(vae_a[k], vae_0[k]) for k in enc)
    assert sum(not torch.equal(vae_a[k], vae_0[k]) for k in dec) > len(dec) // 2  # the decoder learned
    for part in ("unet", "text_encoder"):  # stage 4 touches nothing else
        (f,) = (tmp_path / "a" / part).glob("*.safetensors")
        assert f.read_bytes() == next((tmp_path / "nf" / part).glob("*.safetensors")).read_bytes()
    # stage 4 again from the shipped (fp16) results of stages 1-3 of the run without it: the same bytes as `a`
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_shapes_model
    finally:
        sys.path.pop(0)
    recipe = json.dumps({**SMALL, "dec_steps": 4, "dec_warmup": 2})
    assert make_shapes_model.main(["--out", str(tmp_path / "s"), "--work", str(tmp_path / "s-work"), "--threads",
                                   "1", "--recipe", recipe, "--no-eval", "--stages-from", str(tmp_path / "nf")]) == 0
    assert json.loads((tmp_path / "s" / "recipe.json").read_text())["digest"] == a["digest"]
    with pytest.raises(SystemExit, match="differs"):  # a folder of another recipe is refused
        make_shapes_model.main(["--out", str(tmp_path / "t"), "--work", str(tmp_path / "t-work"), "--threads", "1",
                                "--recipe", json.dumps({**SMALL, "seed": 3}), "--no-eval", "--stages-from",
                                str(tmp_path / "nf")])
