"""Concept learning on the `shapes` model, as the judge sees it (issue 11): the hearts LoRA trained with plain
captions and with DreamBooth prior preservation, same steps; prints one JSON object.

    python bench/bench_concept.py [--steps 1200] [--rank 4] [--lr 1e-3] [--variants plain,dreambooth] [--seeds 42,1,2]

Every variant starts from the sample's settings (`lora_ext.shapes.concept.SAMPLE_TRAINING`, the tab's preset and the
demo's; --rank/--lr/--steps/--set change them). Variants: plain (captioned folder, UNet + text encoder), unet_only
(the same, text encoder frozen), dreambooth (instance prompt "a heart", class prompt "a circle"), world_prior /
world_prior_unet (the captioned hearts with prior preservation against the base model's own images for varied
captioned world prompts), pivotal / pivotal_unet (plain or UNet-only with pivotal tuning: the word "heart" gets a
trained embedding bundled in the file), world_prior_pivotal
(pivotal + UNet LoRA with the world prior).

Per variant: training seconds, how often a heart is drawn with `<lora:NAME:1>`, at weight 0 and without the tag, and
how often unrelated prompts are still drawn right with and without the LoRA (the leak). Images go to --out.
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


VARIANTS = ("plain", "unet_only", "dreambooth", "world_prior", "world_prior_unet", "pivotal", "pivotal_unet",
            "world_prior_pivotal")


def settings(variant: str, data: Path, out: Path, args) -> dict:
    from lora_ext.shapes.concept import SAMPLE_TRAINING

    common = dict(pretrained_model="shapes", output_dir=str(out / "Lora"), output_name=f"hearts_{variant}",
                  runs_dir=str(out / "runs"), **SAMPLE_TRAINING, save_every_n_epochs=None, overwrite=True,
                  preview=False, seed=42)
    if args.rank is not None:
        common.update(network_dim=args.rank, network_alpha=float(args.rank))
    if args.lr is not None:
        common["learning_rate"] = args.lr
    if args.steps is not None:
        common["max_train_steps"] = args.steps
    steps = common["max_train_steps"]
    if variant == "plain":
        return {**common, "train_data_dir": str(data)}
    if variant.startswith("pivotal"):
        # the word "heart" gets a trained embedding, bundled in the file (bundle_emb.heart)
        return {**common, "train_data_dir": str(data), "pivotal_token": "heart", "pivotal_lr": args.pivotal_lr,
                "train_text_encoder": variant == "pivotal"}
    if variant == "unet_only":
        return {**common, "train_data_dir": str(data), "train_text_encoder": False}
    if variant == "world_prior_pivotal":
        # pivotal tuning + UNet LoRA, with prior preservation against the base model's own images
        return {**common, "instance_dir": str(data), "instance_prompt": "a heart",
                "class_dir": str(out / "world_prior"), "prior_loss_weight": 1.0, "pivotal_token": "heart",
                "pivotal_lr": args.pivotal_lr,
                "train_text_encoder": False}
    if variant.startswith("world_prior"):
        # prior preservation against the base model's own images for varied captioned prompts of the world
        # (kohya's regularisation images with captions), not one class prompt
        return {**common, "instance_dir": str(data), "instance_prompt": "a heart",
                "class_dir": str(out / "world_prior"), "prior_loss_weight": 1.0,
                "train_text_encoder": variant == "world_prior"}
    if variant == "dreambooth":
        return {**common, "instance_dir": str(data), "instance_prompt": "a heart",
                "class_dir": str(out / f"class_{steps}"), "class_prompt": "a circle", "num_class_images": 16,
                "prior_loss_weight": 1.0}
    raise SystemExit(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="none = the sample's (1,200)")
    ap.add_argument("--variants", default="plain,dreambooth")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=None, help="none = the sample's (4)")
    ap.add_argument("--lr", type=float, default=None, help="none = the sample's (1e-3)")
    ap.add_argument("--pivotal-lr", type=float, default=None, help="pivotal: embedding lr (none = --lr)")
    ap.add_argument("--prior-images", type=int, default=16,
                    help="world_prior: base-model images to generate (used up to the instance count)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other training option for every variant (JSON value), e.g. --set min_snr_gamma=5")
    ap.add_argument("--seeds", default="42",
                    help="training seeds, comma-separated: each variant is trained once per seed and the rates are "
                         "also given as the mean over seeds (one image of 24 is 4.2 points; seeds move a rate by more)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "concept")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lora_ext.app.runner import Session
    from lora_ext.models.assets import DATA_DIR
    from lora_ext.shapes import concept
    from lora_ext.shapes.evaluate import grid
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    out = args.out
    shutil.rmtree(out / "Lora", ignore_errors=True)
    data = DATA_DIR / "samples" / "hearts"
    results = {"machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
               "training": {k: v for k, v in settings("plain", data, out, args).items()
                            if k in concept.SAMPLE_TRAINING},
               "pivotal_lr": args.pivotal_lr, "set": args.set,
               "variants": {}}
    session = Session(Path("shapes"), scheduler="euler")
    variants = args.variants.split(",")
    if any(v.startswith("world_prior") for v in variants):
        t0 = time.perf_counter()
        concept.write_prior_images(session, out / "world_prior", args.prior_images)
        results["prior_images"] = {"count": args.prior_images, "seconds": round(time.perf_counter() - t0, 1)}
    seeds = [int(x) for x in args.seeds.split(",")]
    results["seeds"] = seeds
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    for variant in variants:
        runs = []
        for seed in seeds:
            values = {**settings(variant, data, out, args), "seed": seed, **extra}
            if len(seeds) > 1:
                values["output_name"] += f"_s{seed}"
            cfg = TrainConfig(**values)
            t0 = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - t0
            report = concept.concept_report(session, cfg.output_name, [out / "Lora"], n=args.prompts)
            images = report.pop("images")
            grid(images["with"] + images["without"], columns=12).save(out / f"{cfg.output_name}.png")
            runs.append({"seed": seed, "train_s": round(seconds, 1), **report})
            print(f"[bench] {variant} seed {seed}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        rates = [k for k in runs[0] if k.startswith(("concept_", "unrelated_"))]
        results["variants"][variant] = {
            "mean": {k: round(sum(r[k] for r in runs) / len(runs), 4) for k in ["train_s", *rates]},
            "runs": runs}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
