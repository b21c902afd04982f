"""lora_ext vs the built-in Lora extension inside one real AUTOMATIC1111 WebUI process (run with $SD_WEBUI_PYTHON).

Full-size SD1.5-shaped random checkpoint (harness FULL=1: models-src/full-sd15-random.safetensors), three rank-16
LoRAs on the UNet's attention projections (q, k, v, out of attn1/attn2) and the text encoder's attention + MLP: the
harness's full_r16 and two random ones on the same 200 modules (~178M touched parameters, the issue's workload).
Measured for each handler: ours keeping layer backups for fast switching (the default), ours freeing them after each
generation (setting lora_ext_keep_backups off), then the built-in (it keeps its backups for the life of the process,
so it goes last). A handler's work is timed where it happens: ours in activate (merge) + deactivate (restore), the
built-in in load_networks + its lazy per-layer merge/restore inside the forward passes.
- first use: the LoRA work of the first generation with LoRA A (nothing parsed or backed up before; ours: merge +
  restore);
- switch: the generation with B right after one with A: ours merges B (A was restored at the end of its generation;
  `switch_with_restore_s` adds that restore, the like-for-like figure); the built-in restores A and merges B there;
- restore: ours: deactivate; the built-in: its work in a generation without LoRA right after one with A;
- per-step with A+B+C active: median time between sampler steps (on_cfg_denoiser), against the same without LoRA,
  interleaved;
- extra memory: RSS growth over the phase (after, and peak sampled every 10 ms), and the bytes backups hold after.
Prints one JSON object; ratios are ours / built-in.

usage: SD_WEBUI_DIR=... $SD_WEBUI_PYTHON bench/bench_webui.py [--ckpt PATH] [--steps 4] [--size 64] [--repeat 3]
       [--phases ours,ours-free,builtin] [--isolate] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
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
    ap.add_argument("--phases", default="ours,ours-free,builtin",
                    help="comma list of ours-free, ours, builtin, measured in this order")
    ap.add_argument("--isolate", action="store_true",
                    help="measure each phase in its own WebUI process (memory and first use without the other "
                         "phases' allocations) and merge the results")
    args = ap.parse_args()
    if args.isolate:
        return isolated(args)
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
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors
    from lora_ext.patch.targets import selector
    from lora_ext.webui import glue, settings

    full = webui / "models" / "Lora" / "full_r16.safetensors"
    names = ["bench_a", "bench_b", "bench_c"]
    if full.exists():
        (lora_dir / "bench_a.safetensors").write_bytes(full.read_bytes())
    adapter = adapter_for_ldm(model)
    for i, name in enumerate(names):
        if not (lora_dir / f"{name}.safetensors").exists():
            save_safetensors_atomic(make_lora_tensors(adapter, SynthSpec("lora", rank=16), selector("attn"),
                                                      seed=i), lora_dir / f"{name}.safetensors")
    del adapter
    glue.state().index.refresh()

    step_times: list[float] = []

    def on_step(params) -> None:
        step_times.append(time.perf_counter())

    script_callbacks.on_cfg_denoiser(on_step)

    # time spent in each handler's own work, per generation
    import networks  # the built-in Lora extension (on sys.path once the WebUI loaded it)

    work = {"t": 0.0, "activate": 0.0, "deactivate": 0.0}

    def timed(fn, key=None):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                work["t"] += dt
                if key:
                    work[key] += dt
        return wrapper

    networks.load_networks = timed(networks.load_networks)
    networks.network_apply_weights = timed(networks.network_apply_weights)
    glue._activate = timed(glue._activate, "activate")
    glue._deactivate = timed(glue._deactivate, "deactivate")

    def gen(prompt: str, steps: int = args.steps) -> dict:
        step_times.clear()
        for k in work:
            work[k] = 0.0
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=model, prompt=prompt, negative_prompt="", steps=steps, width=args.size, height=args.size,
            sampler_name="Euler", seed=1234, cfg_scale=7, do_not_save_samples=True, do_not_save_grid=True)
        t = time.perf_counter()
        with closing(p):
            processing.process_images(p)
        gaps = [b - a for a, b in zip(step_times, step_times[1:], strict=False)]
        return {"total": time.perf_counter() - t, "handler": work["t"], "activate": work["activate"],
                "deactivate": work["deactivate"], "gaps": gaps}

    tag = {n: f"<lora:{n}:0.8>" for n in names}
    all3 = " ".join(f"<lora:{n}:0.5>" for n in names)
    base_prompt = "a photo of a cat"

    def measure(owner: str, keep_backups: bool = True) -> dict:
        shared.opts.set(settings.OWN, owner != "builtin")
        shared.opts.set("lora_ext_keep_backups", keep_backups)
        glue.state().session.cache.clear()  # every phase starts with nothing parsed: "first use" is first
        gen(base_prompt)  # warm-up without LoRA
        rss0 = proc.memory_info().rss
        peak = [rss0]
        sampling = threading.Event()

        def sample_rss() -> None:  # the peak inside generations (backups may be freed at their end)
            while not sampling.is_set():
                peak.append(proc.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        first = gen(f"{base_prompt} {tag['bench_a']}")
        peak.append(proc.memory_info().rss)
        switches, restores = [], []
        for _ in range(args.repeat):
            switches.append(gen(f"{base_prompt} {tag['bench_b']}"))
            peak.append(proc.memory_info().rss)
            gen(f"{base_prompt} {tag['bench_a']}")
            restores.append(gen(base_prompt))
        gaps_base, gaps_lora = [], []
        gen(f"{base_prompt} {all3}")
        for _ in range(args.repeat):  # interleaved, so that drift hits both alike
            gaps_base += gen(base_prompt, steps=args.steps * 3)["gaps"]
            r = gen(f"{base_prompt} {all3}", steps=args.steps * 3)
            gaps_lora += r["gaps"]
            peak.append(proc.memory_info().rss)
        sampling.set()
        sampler.join()
        rss1 = proc.memory_info().rss
        med = statistics.median
        ours_phase = owner != "builtin"

        def own(r: dict) -> float:
            # ours: activate (merge) + deactivate (restore) of that generation; the built-in's forward patches stay
            # installed whoever owns the tag, and their per-layer early returns are not our work
            return r["activate"] + r["deactivate"] if ours_phase else r["handler"]

        res = {
            "first_use_s": own(first),
            # ours: merging B (A was restored at the end of its own generation); the built-in: restoring A and
            # merging B, both lazily inside B's forward passes
            "switch_s": med(r["activate"] for r in switches) if ours_phase else med(r["handler"] for r in switches),
            "restore_s": med(r["deactivate"] for r in switches) if ours_phase else med(r["handler"] for r in restores),
            "generation_s": med(r["total"] for r in switches),
            "step_base_s": med(gaps_base), "step_3loras_s": med(gaps_lora),
            "extra_rss_after_mib": (rss1 - rss0) / 2**20, "extra_rss_peak_mib": (max(peak) - rss0) / 2**20,
        }
        if ours_phase:  # a switch as the built-in does it: our restore of A (end of A's generation) + merge of B
            res["switch_with_restore_s"] = res["switch_s"] + res["restore_s"]
        res["step_overhead"] = res["step_3loras_s"] / res["step_base_s"] - 1
        if ours_phase:
            ctl = glue.state().session
            res["backup_mib_after"] = (ctl.patcher.backup_bytes if ctl.patcher else 0) / 2**20
            res["cache_mib"] = ctl.cache.nbytes / 2**20
            ctl.forget_model()
        else:
            backups = [m.network_weights_backup for m in model.modules()
                       if isinstance(getattr(m, "network_weights_backup", None), torch.Tensor)]
            res["backup_mib_after"] = sum(b.numel() * b.element_size() for b in backups) / 2**20
            res["layers_backed_up"] = len(backups)
        return res

    phases = {}
    for phase in args.phases.split(","):
        if phase == "ours-free":
            phases["ours_free_backups"] = measure("ours", keep_backups=False)
        elif phase == "ours":
            phases["ours_keep_backups"] = measure("ours", keep_backups=True)
        elif phase == "builtin":
            phases["builtin"] = measure("builtin")
        else:
            raise SystemExit(f"unknown phase {phase!r}")
    out = {"bench": "webui_lora_handlers", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "ckpt": Path(args.ckpt).name, "steps": args.steps, "size": args.size, "isolated": False, **phases}
    emit(add_ratios(out), args.out)
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # data dir and LoRA files; the link to the repo is unlinked, not followed
    os._exit(0)


RATIO_KEYS = ("first_use_s", "switch_s", "restore_s", "extra_rss_after_mib", "extra_rss_peak_mib", "backup_mib_after")


def add_ratios(out: dict) -> dict:
    builtin = out.get("builtin")
    if builtin:
        for ours in ("ours_keep_backups", "ours_free_backups"):
            if ours in out:
                ratios = {k: out[ours][k] / builtin[k] for k in RATIO_KEYS if builtin.get(k)}
                ratios["switch_with_restore_s"] = out[ours]["switch_with_restore_s"] / builtin["switch_s"]
                out[f"ratios_{ours}_over_builtin"] = ratios
    return out


def emit(out: dict, path: str | None) -> None:
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)


def isolated(args: argparse.Namespace) -> None:
    import subprocess

    merged: dict = {}
    for phase in args.phases.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            cmd = [sys.executable, __file__, "--ckpt", args.ckpt, "--steps", str(args.steps), "--size", str(args.size),
                   "--repeat", str(args.repeat), "--phases", phase, "--out", str(part)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            data = json.loads(part.read_text())
        merged.update(data)
    merged["isolated"] = True
    emit(add_ratios(merged), args.out)


if __name__ == "__main__":
    main()
