"""The README's first command: the whole story on the embedded tiny model, offline, in about a minute on a CPU.

1. a tiny SD1.5-shaped model (random weights: its images are colourful noise until issue "the model that draws"
   lands) and a small dataset of drawn images with captions (a red disc on a light background);
2. a LoRA trained on them with the training backend (the same code as `python -m lora_ext train` and the tab);
3. images with and without `<lora:demo_trained:1>` through the same activation path as `generate`, and a check that
   the model's weights are back to the original after the LoRA image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_PROMPT = "a photo of a red disc"
DEMO_LORA = "demo_trained"
DEMO_IMAGES = 8
DEMO_STEPS = 60


def write_demo_dataset(folder: Path, n: int = DEMO_IMAGES, side: int = 64) -> Path:
    """`n` drawn images (a red disc, varying in place and size, on a light background) with caption files."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(200, 256, 3)))
        r = int(rng.integers(side // 6, side // 3))
        cx, cy = (int(v) for v in rng.integers(r, side - r, 2))
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200 + int(rng.integers(0, 55)), 20, 30))
        img.save(folder / f"disc_{i:02d}.png")
        (folder / f"disc_{i:02d}.txt").write_text(f"a photo of a red disc, sks, variant {i}", encoding="utf-8")
    return folder


def train_demo_lora(model_dir: Path, data: Path, lora_dir: Path, runs_dir: Path) -> Path:
    """Train the demo LoRA (rank 4, DEMO_STEPS steps at 64 px); returns the file. Kept when it already exists."""
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    out = lora_dir / f"{DEMO_LORA}.safetensors"
    if out.exists():
        return out
    config = TrainConfig(pretrained_model=str(model_dir), train_data_dir=str(data), output_dir=str(lora_dir),
                         output_name=DEMO_LORA, runs_dir=str(runs_dir), resolution=64, min_bucket_reso=64,
                         network_dim=4, network_alpha=4.0, learning_rate=1e-3, max_train_steps=DEMO_STEPS,
                         save_every_n_epochs=None, trigger_word="sks", overwrite=True, preview=False,
                         description="lora_ext demo: trained on drawn red discs")
    print(f"[demo] training {DEMO_LORA} on {DEMO_IMAGES} images for {DEMO_STEPS} steps (run folder {runs_dir})")
    result = train(config)
    return Path(result.output)


def run_demo(out: Path, arch: str = "sd15", seed: int = 1234) -> dict:
    from lora_ext.app.runner import Session
    from lora_ext.models.tiny import save_tiny_model

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / f"tiny-{arch}"
    if not (model_dir / "model_index.json").exists():
        print(f"[demo] building the tiny {arch} model in {model_dir}")
        save_tiny_model(arch, model_dir, fmt="diffusers")
    lora_dir = out / "Lora"
    data = write_demo_dataset(out / "dataset")
    lora_path = train_demo_lora(model_dir, data, lora_dir, out / "lora_ext_runs")
    print(f"[demo] the LoRA: {lora_path}")
    session = Session(model_dir, scheduler="euler")
    common = dict(seed=seed, steps=8, width=64, height=64, cfg=7.0, lora_dirs=[lora_dir])
    plain = session.generate(DEMO_PROMPT, out=out / "without_lora.png", **common)
    tagged = session.generate(f"{DEMO_PROMPT} <lora:{DEMO_LORA}:1>", out=out / "with_lora.png", **common)
    again = session.generate(DEMO_PROMPT, **common)
    a = np.asarray(plain.image, dtype=np.float32)
    b = np.asarray(tagged.image, dtype=np.float32)
    c = np.asarray(again.image, dtype=np.float32)
    summary = {
        "model": str(model_dir),
        "dataset": str(data),
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
    print(f"[demo] with <lora:{DEMO_LORA}:1>: {tagged.out} (mean |pixel change| {summary['mean_abs_pixel_change']})")
    print(f"[demo] after the LoRA image the model is back to its original weights: {summary['restored_exactly']}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
