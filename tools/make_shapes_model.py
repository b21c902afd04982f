"""Re-create the shipped `shapes` base model from its recipe (lora_ext/shapes/recipe.py), on the CPU.

    python tools/make_shapes_model.py                 # -> lora_ext/data/shapes (fp16 diffusers folder + recipe.json)
    python tools/make_shapes_model.py --out DIR --work DIR --threads 2

Stages are cached in --work (vae-<digest>.pt, unet_te-<digest>.pt, vae_dec-<digest>.pt, named by the recipe fields
they depend on), so an interrupted run resumes at the stage it was in. `--stages-from DIR` takes the first three
stages' results from a shipped folder instead (its fp16 weights): the last stage starts from fp16-rounded weights
and the UNet and text encoder ship in fp16, so the result is the same bytes as a run from scratch.
The same recipe, torch build and thread count give the same bytes;
the folder digest is printed and stored in recipe.json (the test suite checks the shipped folder against it). Then
the judge measures the model (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "lora_ext" / "data" / "shapes"))
    ap.add_argument("--work", default=str(ROOT / "out" / "shapes-work"))
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (part of what fixes the numbers)")
    ap.add_argument("--recipe", default=None, help="JSON object overriding recipe fields (experiments)")
    ap.add_argument("--no-eval", action="store_true", help="skip the judge's measurement")
    ap.add_argument("--stages-from", default=None,
                    help="a shipped folder whose VAE, UNet and text encoder stand for stages 1-3 (run stage 4 only)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lora_ext.shapes import evaluate, model, recipe

    r = recipe.Recipe(**json.loads(args.recipe)) if args.recipe else recipe.Recipe()
    cfg = recipe.configs(r)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[shapes {time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    # one seeded stream: the VAE learns on its first train_images images, the UNet on its first unet_images
    images, scenes, _ = recipe.training_set(r, max(r.train_images, r.unet_images))
    log(f"training set: {len(images)} images (VAE: the first {r.train_images})")
    if args.stages_from:
        vae, unet, te, earlier = _stages_from(Path(args.stages_from), r)
        timings.update(earlier)
        cfg["vae"]["scaling_factor"] = vae.config.scaling_factor  # (stages 1-3 set it in `cfg` when they run)
        log(f"stages 1-3: from {args.stages_from}")
    else:
        vae, unet, te = _first_stages(r, cfg, images, scenes, work, timings, log)
    dec_file = work / f"vae_dec-{recipe.stage_digest(r, 'decoder')}.pt"
    vae = _cached(dec_file, "decoder fine-tune", "decoder_s", timings, log,
                  run=lambda: recipe.finetune_decoder(r, vae, images[: r.train_images], log=log),
                  save=lambda v: v.state_dict(), load=lambda state: _loaded(vae, state))
    pipe = model.assemble(cfg, unet=unet.eval(), vae=vae.eval(), text_encoder=te.eval())
    info = {"recipe": recipe.recipe_dict(r), "torch": torch.__version__, "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "timings": timings}
    out = model.save_shipped(pipe, Path(args.out), info)
    digest = model.folder_digest(out)
    log(f"wrote {out} (digest {digest})")
    info["digest"] = digest
    import hashlib

    ckpt = model.write_checkpoint(work / "a1111", src=out)
    info["checkpoint_sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    log(f"A1111 single file: {ckpt} (sha256 {info['checkpoint_sha256']})")
    if not args.no_eval:
        from lora_ext.models.loading import load_pipeline

        shipped = load_pipeline(out, scheduler="euler").pipe
        report = evaluate.base_model_report(shipped)
        info["judge"] = report
        log(f"judge: {json.dumps(report)}")
        seen = evaluate.eval_scenes(24)
        _, imgs = evaluate.rates(shipped, seen)
        evaluate.grid(imgs, columns=12).save(work / "base_samples.png")
        log(f"samples: {work / 'base_samples.png'}")
    (out / "recipe.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def _cached(path: Path, label: str, key: str, timings: dict, log, *, run, save, load):
    """A stage's result from the work folder (`load(state)`) or by running it (`run()`, saved as `save(result)` with
    its seconds beside it); the seconds go to `timings[key]`."""
    import torch

    seconds = path.with_suffix(".json")
    if path.is_file():
        result = load(torch.load(path, weights_only=True))
        log(f"{label}: from the work folder")
        if seconds.is_file():
            timings[key] = json.loads(seconds.read_text())["seconds"]
        return result
    t = time.perf_counter()
    result = run()
    timings[key] = round(time.perf_counter() - t, 1)
    torch.save(save(result), path)
    seconds.write_text(json.dumps({"seconds": timings[key]}))
    return result


def _loaded(module, state):
    module.load_state_dict(state)
    return module


def _first_stages(r, cfg, images, scenes, work: Path, timings: dict, log):
    """Stages 1-3 (VAE; latents and scaling_factor; UNet + text encoder), each cached in `work`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.shapes import recipe

    vae_file = work / f"vae-{recipe.stage_digest(r, 'vae')}.pt"
    vae = _cached(vae_file, "VAE", "vae_s", timings, log,
                  run=lambda: recipe.train_vae(r, cfg, images[: r.train_images], log=log),
                  save=lambda v: v.state_dict(),
                  load=lambda state: _loaded(AutoencoderKL.from_config(cfg["vae"]), state).eval())
    images, scenes = images[: r.unet_images], scenes[: r.unet_images]
    means, stds = recipe.encode(vae, images)
    scale = float(f"{1.0 / means.std().item():.5f}")
    cfg["vae"]["scaling_factor"] = scale
    vae.register_to_config(scaling_factor=scale)
    log(f"latents: std {means.std().item():.4f} -> scaling_factor {scale}")
    unet_file = work / f"unet_te-{recipe.stage_digest(r, 'unet')}.pt"
    unet, te = _cached(unet_file, "UNet and text encoder", "unet_s", timings, log,
                       run=lambda: recipe.train_unet(r, cfg, means, stds, scenes, scale, log=log),
                       save=lambda parts: {"unet": parts[0].state_dict(), "text_encoder": parts[1].state_dict()},
                       load=lambda state: (
                           _loaded(UNet2DConditionModel.from_config(cfg["unet"]), state["unet"]),
                           _loaded(CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"])),
                                   state["text_encoder"])))
    return vae, unet.eval(), te.eval()


def _stages_from(folder: Path, r) -> tuple:
    """The VAE, UNet and text encoder of a shipped folder (fp16 on disk) in float32, with its recorded timings."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.shapes import recipe

    info = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    if recipe.stage_digest(recipe.Recipe(**info["recipe"]), "unet") != recipe.stage_digest(r, "unet"):
        raise SystemExit(f"{folder}: its recipe differs from this one in stages 1-3; run from scratch instead")
    cfg = recipe.configs(r)  # built from the recipe's configs (not from_pretrained: no paths in the saved configs)
    cfg["vae"]["scaling_factor"] = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    parts = {"vae": AutoencoderKL.from_config(cfg["vae"]), "unet": UNet2DConditionModel.from_config(cfg["unet"]),
             "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))}
    for name, module in parts.items():
        _loaded(module, type(module).from_pretrained(folder / name, torch_dtype=torch.float32).state_dict()).eval()
    timings = {k: v for k, v in info.get("timings", {}).items() if k in ("vae_s", "unet_s")}
    return parts["vae"], parts["unet"], parts["text_encoder"], timings


if __name__ == "__main__":
    raise SystemExit(main())
