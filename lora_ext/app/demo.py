"""The README's first command: the whole story on the shipped `shapes` model, offline, in a few minutes on a CPU.

1. the `shapes` base model (SD1.5 structure, trained by the project on coloured shapes: it draws what a prompt asks
   for) and the bundled sample dataset: 16 hearts with captions, a shape the model has never seen;
2. a LoRA trained on them with the training backend (the same code as `python -m lora_ext train` and the tab);
3. the same prompts with and without `<lora:hearts:1>` through the same activation path as `generate`: a picture
   with both rows, what the judge saw in each image, and a check that the model's weights are back to the original
   after the LoRA images.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from lora_ext.shapes.concept import SAMPLE_TRAINING

DEMO_LORA = "hearts"
DEMO_STEPS = SAMPLE_TRAINING["max_train_steps"]
DEMO_PROMPTS = (
    "a large red heart in the center on a white background",
    "a small blue heart at the top left on a white background",
    "a large green heart on the right on a black background",
    "a yellow heart at the bottom on a gray background",
    "a small purple heart at the top right on a striped background",
    "a large orange heart on the left on a white background",
)
DEMO_SEED = 1234


def copy_dataset(out: Path) -> Path:
    """The bundled hearts (images + captions) copied to `out` (so a person can look at what was trained on)."""
    from lora_ext.models.assets import DATA_DIR

    src = DATA_DIR / "samples" / "hearts"
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if not (out / p.name).exists():
            shutil.copyfile(p, out / p.name)
    return out


def train_demo_lora(data: Path, lora_dir: Path, runs_dir: Path, steps: int = DEMO_STEPS) -> Path:
    """Train the demo LoRA (the sample's settings, `concept.SAMPLE_TRAINING`: rank 4 on the UNet's attention and MLP
    layers and the text encoder, batch 4, 64 px); returns the file. Kept when it exists."""
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    out = lora_dir / f"{DEMO_LORA}.safetensors"
    if out.exists():
        return out
    config = TrainConfig(pretrained_model="shapes", train_data_dir=str(data), output_dir=str(lora_dir),
                         output_name=DEMO_LORA, runs_dir=str(runs_dir), **{**SAMPLE_TRAINING, "max_train_steps": steps},
                         save_every_n_epochs=None, trigger_word="heart", overwrite=True, preview=False,
                         description="lora_ext demo: a heart shape, which the shapes model had never seen")
    print(f"[demo] training {DEMO_LORA} on {data} for {steps} steps (run folder {runs_dir})")
    return Path(train(config).output)


def run_demo(out: Path) -> dict:
    from lora_ext.app.runner import Session
    from lora_ext.shapes import judge
    from lora_ext.shapes.evaluate import grid

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = copy_dataset(out / "dataset")
    lora_dir = out / "Lora"
    lora_path = train_demo_lora(data, lora_dir, out / "lora_ext_runs")
    print(f"[demo] the LoRA: {lora_path}")
    session = Session(Path("shapes"), scheduler="euler")
    common = dict(steps=20, width=64, height=64, cfg=5.0, lora_dirs=[lora_dir])
    rows: dict[str, list] = {"without": [], "with": []}
    seen: dict[str, list[str]] = {"without": [], "with": []}
    report, restored = [], True
    for i, prompt in enumerate(DEMO_PROMPTS):
        plain = session.generate(prompt, seed=DEMO_SEED + i, **common)
        tagged = session.generate(f"{prompt} <lora:{DEMO_LORA}:1>", seed=DEMO_SEED + i, **common)
        again = session.generate(prompt, seed=DEMO_SEED + i, **common)
        restored &= bool(np.array_equal(np.asarray(plain.image), np.asarray(again.image)))
        report = [n.summary() for n in tagged.report.networks]
        for key, result in (("without", plain), ("with", tagged)):
            rows[key].append(result.image)
            v = judge.judge(result.image)
            seen[key].append(f"{v.colour} {v.shape}" if v.shape else "nothing")
    for key in rows:
        grid(rows[key], columns=len(DEMO_PROMPTS), scale=4).save(out / f"{key}_lora.png")
    grid(rows["without"] + rows["with"], columns=len(DEMO_PROMPTS), scale=4).save(out / "compare.png")
    hearts = {k: sum(s.endswith(" heart") for s in v) for k, v in seen.items()}
    summary = {
        "model": "shapes",
        "dataset": str(data),
        "lora": str(lora_path),
        "images": {"without": str(out / "without_lora.png"), "with": str(out / "with_lora.png"),
                   "compare": str(out / "compare.png")},
        "prompts": list(DEMO_PROMPTS),
        "judge": seen,
        "hearts": hearts,
        "report": report,
        "restored_exactly": restored,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for line in report:
        print(f"[demo] {line}")
    n = len(DEMO_PROMPTS)
    print(f"[demo] without the LoRA the judge saw: {', '.join(seen['without'])} ({hearts['without']}/{n} hearts)")
    print(f"[demo] with <lora:{DEMO_LORA}:1> it saw: {', '.join(seen['with'])} ({hearts['with']}/{n} hearts)")
    print(f"[demo] pictures: {out / 'compare.png'} (top row without, bottom row with the LoRA)")
    print(f"[demo] after the LoRA images the model is back to its original weights: {restored}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
