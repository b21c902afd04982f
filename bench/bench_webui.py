"""lora_ext vs the built-in Lora extension inside one real AUTOMATIC1111 WebUI process (run with $SD_WEBUI_PYTHON).

Full-size SD1.5-shaped random checkpoint (harness FULL=1: models-src/full-sd15-random.safetensors), three rank-16
LoRAs on every transformer Linear + text encoder (the harness's full_r16 and two random ones of the same shape).
Measured for each handler, ours first (the built-in keeps its backups for the life of the process):
- first use: a generation with LoRA A (the first ever) minus the median generation without LoRA;
- switch: a generation with LoRA B right after one with A, minus the base median;
- restore: a generation without LoRA right after one with A, minus the base median (the built-in restores lazily,
  in that generation; ours at the end of the previous one, which is part of that one's time: reported separately too);
- per-step with A+B+C active: the median time between sampler steps (on_cfg_denoiser), against the same without LoRA;
- extra memory: RSS growth over the handler's runs, and the bytes its backups hold.
Prints one JSON object; ratios are ours / built-in.

usage: SD_WEBUI_DIR=... $SD_WEBUI_PYTHON bench/bench_webui.py [--ckpt PATH] [--steps 4] [--size 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    harness = Path(os.environ.get("HARNESS_DIR", "")) / "models-src" / "full-sd15-random.safetensors"
    ap.add_argument("--ckpt", default=str(harness))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    webui = Path(os.environ["SD_WEBUI_DIR"]).resolve()
    work = Path(tempfile.mkdtemp(prefix="lora_ext_bench_"))
    (work / "data" / "extensions").mkdir(parents=True)
    (work / "data" / "extensions" / "lora_ext").symlink_to(REPO, target_is_directory=True)
    lora_dir = work / "Lora"
    lora_dir.mkdir()
    os.chdir(webui)
    sys.path.insert(0, str(webui))
    sys.argv = ["webui.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
                "--use-cpu", "all", "--no-half", "--precision", "full", "--nowebui", "--do-not-download-clip",
                "--no-download-sd-model",
                "--data-dir", str(work / "data"), "--models-dir", str(webui / "models"), "--lora-dir", str(lora_dir),
                "--ckpt", str(Path(args.ckpt).resolve())]
    import psutil
    import torch

    proc = psutil.Process()
    import webui as _webui  # noqa: F401
    from modules import initialize, processing, script_callbacks, shared

    initialize.initialize()
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, None)
    model = shared.sd_model

    from lora_ext.formats.safetensors_io import save_safetensors_atomic
    from lora_ext.patch.ldm import adapter_for_ldm
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors, select_transformer
    from lora_ext.webui import glue

    full = webui / "models" / "Lora" / "full_r16.safetensors"
    names = ["bench_a", "bench_b", "bench_c"]
    if full.exists():
        (lora_dir / "bench_a.safetensors").write_bytes(full.read_bytes())
    adapter = adapter_for_ldm(model)
    for i, name in enumerate(names):
        if not (lora_dir / f"{name}.safetensors").exists():
            save_safetensors_atomic(make_lora_tensors(adapter, SynthSpec("lora", rank=16), select_transformer,
                                                      seed=i), lora_dir / f"{name}.safetensors")
    del adapter
    glue.state().index.refresh()

    step_times: list[float] = []

    def on_step(params) -> None:
        step_times.append(time.perf_counter())

    script_callbacks.on_cfg_denoiser(on_step)

    def gen(prompt: str, steps: int = args.steps) -> tuple[float, list[float]]:
        step_times.clear()
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=model, prompt=prompt, negative_prompt="", steps=steps, width=args.size, height=args.size,
            sampler_name="Euler", seed=1234, cfg_scale=7, do_not_save_samples=True, do_not_save_grid=True)
        t = time.perf_counter()
        with closing(p):
            processing.process_images(p)
        dt = time.perf_counter() - t
        gaps = [b - a for a, b in zip(step_times, step_times[1:], strict=False)]
        return dt, gaps

    def base_median(n: int = 3) -> float:
        return statistics.median(gen("a photo of a cat")[0] for _ in range(n))

    tag = {n: f"<lora:{n}:0.8>" for n in names}
    all3 = " ".join(f"<lora:{n}:0.5>" for n in names)

    def measure(owner: str) -> dict:
        shared.opts.set(glue._OWN, owner == "ours")
        gen("a photo of a cat")  # warm-up without LoRA
        base = base_median()
        rss0 = proc.memory_info().rss
        first = gen(f"a photo of a cat {tag['bench_a']}")[0] - base
        switches, restores = [], []
        for _ in range(args.repeat):
            switches.append(gen(f"a photo of a cat {tag['bench_b']}")[0] - base)
            gen(f"a photo of a cat {tag['bench_a']}")
            restores.append(gen("a photo of a cat")[0] - base)
            gen(f"a photo of a cat {tag['bench_a']}")
        _, gaps_base = gen("a photo of a cat", steps=args.steps * 3)
        gen(f"a photo of a cat {all3}")
        _, gaps_lora = gen(f"a photo of a cat {all3}", steps=args.steps * 3)
        rss1 = proc.memory_info().rss
        res = {"base_s": base, "first_use_s": first, "switch_s": statistics.median(switches),
               "restore_s": statistics.median(restores), "step_base_s": statistics.median(gaps_base),
               "step_3loras_s": statistics.median(gaps_lora), "extra_rss_mib": (rss1 - rss0) / 2**20}
        res["step_overhead"] = res["step_3loras_s"] / res["step_base_s"] - 1
        if owner == "ours":
            ctl = glue.state().controller
            res["backup_mib"] = (ctl.patcher.backup_bytes if ctl.patcher else 0) / 2**20
            res["cache_mib"] = ctl.cache.nbytes / 2**20
            t = time.perf_counter()
            ctl.activate(model, [[names[0], "0.8"]])
            t_apply = time.perf_counter()
            ctl.activate(model, [[names[1], "0.8"]])
            t_switch = time.perf_counter()
            ctl.restore()
            t_restore = time.perf_counter()
            res["engine_first_apply_after_restore_s"] = t_apply - t
            res["engine_switch_s"] = t_switch - t_apply
            res["engine_restore_s"] = t_restore - t_switch
            ctl.forget_model()
        else:
            backups = [m.network_weights_backup for m in model.modules()
                       if isinstance(getattr(m, "network_weights_backup", None), torch.Tensor)]
            res["backup_mib"] = sum(b.numel() * b.element_size() for b in backups) / 2**20
            res["layers_backed_up"] = len(backups)
        return res

    ours = measure("ours")
    builtin = measure("builtin")
    ratios = {k: ours[k] / builtin[k] for k in ("first_use_s", "switch_s", "restore_s", "extra_rss_mib", "backup_mib")
              if builtin.get(k)}
    out = {"bench": "webui_lora_handlers", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "ckpt": Path(args.ckpt).name, "steps": args.steps, "size": args.size, "ours": ours, "builtin": builtin,
           "ratios_ours_over_builtin": ratios}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    os._exit(0)


if __name__ == "__main__":
    main()
