"""LoRAs on a GGUF (Q8_0) UNet inside Stable Diffusion WebUI Forge: lora_ext (bypass on the packed layers) vs Forge's
built-in in its two modes: "Automatic" (dequantize, merge, re-quantize into the packed weights at model load) and
"Automatic (fp16 LoRA)" (dequantize and merge the delta inside every forward). Run with a Forge harness'
$SD_WEBUI_PYTHON; the GGUF file is written from the harness checkpoint as tests/webui/forge_gguf_probe.py does (its
transformer blocks' linear weights in Q8_0), with the same shim for Forge's GGUF shapes.

Each mode runs in its own in-process Forge. Timed per generation (`--steps` steps at `--size` px, Euler), wall time
minus the median base generation: first (LoRA A first used), switch (B after A), again (A after A), and `per_step`:
(a generation with A at 4x the steps minus one at `--steps`) / 3x steps - the same for the base model, i.e. what the
LoRA adds to each sampling step once applied. Prints one JSON object; ratios are ours / built-in.

usage: $SD_WEBUI_PYTHON bench/bench_forge_gguf.py [--steps 4] [--size 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"ours": ("Automatic", True), "baked": ("Automatic", False), "online": ("Automatic (fp16 LoRA)", False)}
KEYS = ["first", "switch", "again", "per_step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # Forge leaves threads behind: leave without waiting for them, after flushing the result
        print("\nBENCH_RESULT " + json.dumps(phase(args)), flush=True)
        os._exit(0)
    models = Path(tempfile.mkdtemp(prefix="lora_ext_bench_gguf_"))
    (models / "Stable-diffusion").mkdir()
    (models / "Lora").symlink_to(Path(os.environ["SD_WEBUI_DIR"], "models", "Lora"), target_is_directory=True)
    ckpt = Path(os.environ["SD_WEBUI_CKPT"])
    (models / "Stable-diffusion" / ckpt.name).symlink_to(ckpt)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "steps": args.steps,
              "size": args.size, "modes": {}}
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--phase", mode, "--models", str(models), "--steps",
                               str(args.steps), "--size", str(args.size)], capture_output=True, text=True,
                              timeout=3600)
        line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        if not line:
            raise SystemExit(f"{mode} phase failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result["modes"][mode] = json.loads(line[-1].removeprefix("BENCH_RESULT "))
    ours = result["modes"]["ours"]["seconds"]
    result["ratios"] = {other: {k: (ours[k] / v if v > 0.005 else None)
                                for k, v in result["modes"][other]["seconds"].items()} for other in ("baked", "online")}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def phase(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "webui"))
    from forge_gguf_probe import int_shapes, write_gguf
    from forge_inprocess import load_model, start_forge, txt2img

    data = Path(tempfile.mkdtemp(prefix="lora_ext_bench_gguf_data_"))
    (data / "extensions").mkdir()
    (data / "extensions" / "lora_ext").symlink_to(REPO, target_is_directory=True)
    start_forge(str(data), args.models)
    from modules import shared

    int_shapes()
    unet_file = Path(args.models, "Stable-diffusion", "sd15-unet-q8_0.gguf")
    rest_file = Path(args.models, "VAE", "sd15-te-vae.safetensors")
    if not unet_file.exists():
        write_gguf(os.environ["SD_WEBUI_CKPT"], args.models)
    storage, ours = MODES[args.phase]
    load_model(storage, unet_file, [rest_file])
    shared.opts.set("lora_ext_handle_lora_tags", ours)

    def generate(prompt: str, steps: int) -> float:
        t0 = time.perf_counter()
        txt2img(prompt, steps=steps, size=args.size, forget=False)  # conditionings cached as in normal use
        return time.perf_counter() - t0

    cat = "a photo of a cat"
    a, b = f"{cat} <lora:full_lora:0.8>", f"{cat} <lora:full_lora_compvis:0.8>"
    long = 4 * args.steps
    generate(cat, args.steps)
    base = statistics.median(generate(cat, args.steps) for _ in range(3))
    seconds = {"first": generate(a, args.steps) - base, "switch": generate(b, args.steps) - base}
    seconds["again"] = generate(a, args.steps) - base
    base_long = statistics.median(generate(cat, long) for _ in range(2))
    lora_long = statistics.median(generate(a, long) for _ in range(2))
    lora_short = statistics.median(generate(a, args.steps) for _ in range(2))
    seconds["per_step"] = ((lora_long - lora_short) - (base_long - base)) / (long - args.steps)
    return {"seconds": seconds, "base_s": base, "base_per_step_s": (base_long - base) / (long - args.steps),
            "storage": str(shared.sd_model.forge_objects.unet.model.storage_dtype)}


if __name__ == "__main__":
    main()
