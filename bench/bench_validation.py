"""Is the best epoch by validation loss also the best-looking one? (issue 11, section 4)

Trains the hearts LoRA with a held-out split (`validation_split`), a checkpoint and a fixed-noise validation loss every
`--every` steps, then lets the judge score every checkpoint (heart drawn with `<lora:NAME:1>`, unrelated prompts still
right). Prints one JSON object: per step the validation loss and the judge's numbers, and which step each picks.

    python bench/bench_validation.py [--steps 800] [--every 100] [--split 0.25] [--prompts 24]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--split", type=float, default=0.25)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "validation")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lora_ext.app.runner import Session
    from lora_ext.models.assets import DATA_DIR
    from lora_ext.shapes import concept
    from lora_ext.shapes.concept import SAMPLE_TRAINING
    from lora_ext.train.checkpoint import list_checkpoints
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    losses: dict[int, float] = {}

    def on_event(ev: dict) -> None:
        if ev.get("type") == "validation":
            losses[int(ev["step"])] = float(ev["loss"])

    cfg = TrainConfig(pretrained_model="shapes", train_data_dir=str(DATA_DIR / "samples" / "hearts"),
                      output_dir=str(out / "Lora"), output_name="hearts_val", runs_dir=str(out / "runs"),
                      **{**SAMPLE_TRAINING, "network_dim": args.rank, "network_alpha": float(args.rank),
                         "learning_rate": args.lr, "max_train_steps": args.steps}, save_every_n_steps=args.every,
                      save_every_n_epochs=None, save_last_n=1000, validation_split=args.split,
                      validation_every_n_steps=args.every, overwrite=True, preview=False, seed=42)
    t0 = time.perf_counter()
    result = train(cfg, on_event=on_event)
    train_s = time.perf_counter() - t0
    run_dir = Path(result.run_dir)
    session = Session(Path("shapes"), scheduler="euler")
    rows = []
    judge_dir = out / "judge"
    files = {int(p.name.split("-")[-1]): p / "lora.safetensors" for p in list_checkpoints(run_dir)}
    final = Path(result.output) if result.output else None
    if final is not None:
        files[args.steps] = final
    for step in sorted(files):
        folder = judge_dir / f"step{step:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[step], folder / "hearts_val.safetensors")
        rep = concept.concept_report(session, "hearts_val", [folder], n=args.prompts)
        rep.pop("images")
        rows.append({"step": step, "validation_loss": losses.get(step), "concept_with_lora": rep["concept_with_lora"],
                     "unrelated_right_with_lora": rep["unrelated_right_with_lora"],
                     "unrelated_kept": rep["unrelated_kept"]})
        print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    scored = [r for r in rows if r["validation_loss"] is not None]
    best_loss = min(scored, key=lambda r: r["validation_loss"]) if scored else None
    best_judge = max(rows, key=lambda r: (r["concept_with_lora"], r["unrelated_right_with_lora"]))
    print(json.dumps({"machine": {"platform": platform.platform(), "threads": args.threads,
                                  "torch": torch.__version__},
                      "steps": args.steps, "every": args.every, "split": args.split, "rank": args.rank, "lr": args.lr,
                      "train_s": round(train_s, 1), "rows": rows,
                      "best_by_validation_loss": best_loss and best_loss["step"],
                      "best_by_judge": best_judge["step"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
