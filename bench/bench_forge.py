"""lora_ext vs Forge's built-in Lora inside Stable Diffusion WebUI Forge (run with a Forge harness' $SD_WEBUI_PYTHON).

Each handler runs in its own in-process Forge (`--always-cpu` on a CPU; the harness' full-size SD1.5-shaped random
checkpoint and its rank-4 LoRAs `full_lora` (A) and `full_lora_compvis` (B), 200 modules each): lora_ext linked into a
temporary data dir's extensions and owning the tag, or the same with its setting off (Forge's built-in applies the
tags). Each handler's work is timed where it happens, per generation (`--steps` steps at `--size` px): ours in the
glue's activate + deactivate (read, parse, merge, restore); the built-in in its `networks.load_networks` (read,
parse, patches) + `LoraLoader.refresh` (merge and restore, inside Forge's model load). The whole generation's wall
time is kept beside it (on a busy 2-core machine it varies by more than the LoRA work):
- first: the first generation with A (file read and parsed, backups taken);
- switch: B right after A;
- back: A right after B;
- again: A right after A (Forge's built-in skips all work when the set is unchanged; ours restores after every
  generation and merges again from its kept backups);
- restore: a base generation right after A;
- memory: RSS after the sequence minus RSS after the base generations; backup bytes each holds at the end.
Prints one JSON object; ratios are ours / built-in.

usage: $SD_WEBUI_PYTHON bench/bench_forge.py [--steps 2] [--size 64] [--repeat 2] [--out FILE]
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
SEQUENCE = ["first", "switch", "back", "again", "restore"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # Forge leaves threads behind: leave without waiting for them, after flushing the result
        print("\nBENCH_RESULT " + json.dumps(phase(args)), flush=True)  # Forge's progress bars end without newline
        os._exit(0)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "steps": args.steps, "size": args.size, "repeat": args.repeat, "phases": {}}
    for name in ("ours", "builtin"):
        runs = []
        for _ in range(args.repeat):  # each run in a fresh Forge process: first use means first use
            proc = subprocess.run([sys.executable, __file__, "--phase", name, "--steps", str(args.steps),
                                   "--size", str(args.size)], capture_output=True, text=True, timeout=1800)
            line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
            if not line:
                raise SystemExit(f"{name} phase failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            runs.append(json.loads(line[-1].removeprefix("BENCH_RESULT ")))
        result["phases"][name] = {
            "seconds": {k: statistics.median(r["seconds"][k] for r in runs) for k in SEQUENCE},
            "wall_minus_base_s": {k: statistics.median(r["wall_minus_base_s"][k] for r in runs) for k in SEQUENCE},
            "base_generation_s": statistics.median(r["base_s"] for r in runs),
            "rss_growth_mib": statistics.median(r["rss_growth_mib"] for r in runs),
            "backup_mib": runs[-1]["backup_mib"], "runs": runs}
    ours, builtin = result["phases"]["ours"]["seconds"], result["phases"]["builtin"]["seconds"]
    result["ratios"] = {k: (ours[k] / builtin[k] if builtin[k] > 0.005 else None) for k in SEQUENCE}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def phase(args: argparse.Namespace) -> dict:
    webui = os.path.abspath(os.environ["SD_WEBUI_DIR"])
    data = Path(tempfile.mkdtemp(prefix="lora_ext_bench_forge_"))
    (data / "extensions").mkdir()
    (data / "extensions" / "lora_ext").symlink_to(REPO, target_is_directory=True)
    os.chdir(webui)
    sys.path.insert(0, webui)
    sys.argv = ["webui.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--always-cpu", "--ckpt",
                os.environ["SD_WEBUI_CKPT"], "--nowebui", "--do-not-download-clip", "--no-download-sd-model",
                "--data-dir", str(data), "--models-dir", os.path.join(webui, "models")]
    import webui as _webui  # noqa: F401  (Forge's webui.py initializes Forge, extensions included, on import)
    from modules import processing, script_callbacks, sd_models, shared
    from modules_forge import main_entry

    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, None)
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()
    shared.opts.set("lora_ext_handle_lora_tags", args.phase == "ours")
    work = {"s": 0.0}

    def timed(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: object, **k: object) -> object:
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                work["s"] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    if args.phase == "ours":
        from lora_ext.webui import glue

        timed(glue, "_activate")
        timed(glue, "_deactivate")
    else:
        from backend.patcher.lora import LoraLoader

        timed(sys.modules["networks"], "load_networks")
        timed(LoraLoader, "refresh")

    def generate(prompt: str) -> float:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, negative_prompt="", steps=args.steps, width=args.size,
            height=args.size, sampler_name="Euler", seed=1234, cfg_scale=7, do_not_save_samples=True,
            do_not_save_grid=True)
        work["s"] = 0.0
        t0 = time.perf_counter()
        processing.process_images(p)
        p.close()
        return time.perf_counter() - t0

    cat = "a photo of a cat"
    a, b = f"{cat} <lora:full_lora:0.8>", f"{cat} <lora:full_lora_compvis:0.8>"
    generate(cat)
    base = statistics.median(generate(cat) for _ in range(3))
    rss0 = _rss_mib()
    wall, seconds = {}, {}
    for key, prompt in zip(SEQUENCE, [a, b, a, a, cat], strict=True):
        wall[key] = generate(prompt) - base
        seconds[key] = work["s"]
    if args.phase == "ours":
        from lora_ext.webui import glue

        patcher = glue.state().session.patcher
        backup = patcher.backup_bytes if patcher is not None else 0
    else:
        model = shared.sd_model
        loaders = [model.forge_objects.unet.model.lora_loader, model.forge_objects.clip.cond_stage_model.lora_loader]
        generate(a)  # its backups are held while its LoRA is merged
        backup = sum(w.numel() * w.element_size() for ld in loaders for w in ld.backup.values())
    return {"seconds": seconds, "wall_minus_base_s": wall, "base_s": base, "rss_growth_mib": _rss_mib() - rss0,
            "backup_mib": backup / 2**20}


if __name__ == "__main__":
    main()
