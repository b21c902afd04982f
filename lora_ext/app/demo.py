"""The README's first command: a tiny default model and a LoRA, images with and without it.

Everything is local and deterministic: the tiny model has random weights (so the images are colourful noise), the
LoRA is random too (named as kohya sd-scripts names its files' keys, with sd-scripts metadata). What the demo shows
is the whole path: tag parsing, file reading, key matching, patching, generation, bit-exact restore.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_PROMPT = "a photo of a cat"
DEMO_LORA = "demo_style"


def _demo_metadata(arch: str, rank: int, alpha: float) -> dict[str, str]:
    return {
        "ss_output_name": DEMO_LORA,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_v2": "False",
        "modelspec.title": "lora_ext demo (random weights)",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base/lora" if arch == "sdxl"
                                   else "stable-diffusion-v1/lora"),
    }


def run_demo(out: Path, arch: str = "sd15", seed: int = 1234) -> dict:
    from lora_ext.app.runner import Session
    from lora_ext.formats.safetensors_io import save_safetensors_atomic
    from lora_ext.models.tiny import save_tiny_model
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors
    from lora_ext.patch.targets import selector

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / f"tiny-{arch}"
    if not (model_dir / "model_index.json").exists():
        print(f"[demo] building the tiny {arch} model in {model_dir}")
        save_tiny_model(arch, model_dir, fmt="diffusers")
    session = Session(model_dir, scheduler="euler")
    lora_dir = out / "Lora"
    lora_path = lora_dir / f"{DEMO_LORA}.safetensors"
    if not lora_path.exists():
        spec = SynthSpec(rank=4, alpha=4.0, naming="kohya", std=0.5)
        tensors = make_lora_tensors(session.patcher.adapter, spec, selector("attn"), seed=7)
        lora_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(tensors, lora_path, metadata=_demo_metadata(session.arch or arch, 4, 4.0))
        print(f"[demo] wrote a random rank-4 LoRA ({len(tensors)} tensors) to {lora_path}")
    common = dict(seed=seed, steps=8, width=64, height=64, cfg=7.0, lora_dirs=[lora_dir])
    plain = session.generate(DEMO_PROMPT, out=out / "without_lora.png", **common)
    tagged = session.generate(f"{DEMO_PROMPT} <lora:{DEMO_LORA}:0.8>", out=out / "with_lora.png", **common)
    again = session.generate(DEMO_PROMPT, **common)
    a = np.asarray(plain.image, dtype=np.float32)
    b = np.asarray(tagged.image, dtype=np.float32)
    c = np.asarray(again.image, dtype=np.float32)
    summary = {
        "model": str(model_dir),
        "lora": str(lora_path),
        "images": {"without": str(plain.out), "with": str(tagged.out)},
        "report": [n.summary() for n in tagged.report.networks],
        "patch_ms": round(tagged.report.seconds * 1000, 1),
        "mean_abs_pixel_change": round(float(np.abs(a - b).mean()), 3),
        "restored_exactly": bool(np.array_equal(a, c)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for line in tagged.report_lines():
        print(f"[demo] {line}")
    print(f"[demo] without LoRA: {plain.out}")
    print(f"[demo] with <lora:{DEMO_LORA}:0.8>: {tagged.out} (mean |pixel change| {summary['mean_abs_pixel_change']})")
    print(f"[demo] after the LoRA image the model is back to its original weights: {summary['restored_exactly']}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
