"""Model tools on a full-size SD1.5-shaped (or SDXL-shaped) random checkpoint: time and peak memory, side by side.

    python bench/bench_tools.py [--arch sd15|sdxl] [--rank 16] [--kohya PATH_TO_SD_SCRIPTS] [--work DIR]

Builds (streamed, never whole in memory) a random fp16 single-file checkpoint with the real layer shapes and a
random rank-`rank` LoRA on every attention and MLP layer of its UNet and text encoder(s), then runs, each in its own
child process (peak RSS from the kernel's rusage of that child):
  merge-model          python -m lora_ext merge-model (streamed)
  load+patch+save      the non-streaming way: load the pipeline, patch it, write every tensor (the reference cost
                       of holding the model)
  import floor         python importing torch, diffusers, transformers and lora_ext's tools (what every run pays)
  resize               python -m lora_ext resize to rank/4
  kohya merge / resize sd-scripts' networks/merge_lora.py and resize_lora.py on the same files (with --kohya; run
                       from its own checkout, outside this project)
Prints one JSON object (seconds, MiB, ratios ours/reference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(arch: str, path: Path) -> None:
    """Random fp16 values in the real single-file layout, written tensor by tensor."""
    import torch

    from lora_ext import families
    from lora_ext.formats.safetensors_stream import Entry, StreamWriter, tensor_bytes
    from lora_ext.models import convert
    from lora_ext.models.assets import load_config
    from lora_ext.models.loading import empty_diffusers_model, empty_text_encoder

    name = families.shipped_config(arch)
    unet = empty_diffusers_model("UNet2DConditionModel", load_config(name, "unet"))
    vae = empty_diffusers_model("AutoencoderKL", load_config(name, "vae"))
    tes = [empty_text_encoder(load_config(name, "text_encoder"))]
    if arch == "sdxl":
        tes.append(empty_text_encoder(load_config(name, "text_encoder_2")))
    from lora_ext.models.tiny import canonical_text_encoder_state_dict

    sd = convert.diffusers_to_single_file(
        arch, dict(unet.state_dict()), dict(unet.config), dict(vae.state_dict()), dict(vae.config),
        [canonical_text_encoder_state_dict(t) for t in tes], [t.config.to_dict() for t in tes])
    entries = [Entry(k, "F16", tuple(v.shape)) for k, v in sd.items()]
    # what real checkpoints also hold (CLIP's position_ids buffer: sd-scripts' loader requires it)
    for prefix in families.FAMILIES[arch].single_file_te_prefixes:
        if prefix.endswith("transformer."):
            entries.append(Entry(f"{prefix}text_model.embeddings.position_ids", "I64", (1, 77)))
    g = torch.Generator().manual_seed(0)

    def produce(fh, entry):
        if entry.dtype == "I64":
            fh.write(tensor_bytes(torch.arange(77, dtype=torch.int64)[None]))
            return
        t = torch.randn(entry.shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.float16)
        fh.write(tensor_bytes(t))

    StreamWriter(path, entries, {"lora_ext.note": f"random full-size {arch} (bench)"}, overwrite=True).write(produce)


def build_lora(arch: str, rank: int, path: Path) -> int:
    import torch

    from lora_ext.formats.safetensors_io import save_safetensors_atomic
    from lora_ext.tools.lora_tools import family_adapter, kohya_name

    adapter = family_adapter(arch)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for t in adapter.targets.values():
        if t.spec.kind != "linear" or not any(p in t.key for p in ("attn", "ff.net", "mlp", "self_attn")):
            continue
        out_f, in_f = t.spec.weight_shape
        name = kohya_name(adapter, t)
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.05).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.05).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_safetensors_atomic(tensors, path, {"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank))})
    return len(tensors) // 3


_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_kib": rss, "rc": p.returncode,
                  "err": (p.stderr or p.stdout)[-600:]}))
"""


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MiB) of one command, measured by a small parent of its own (a child's maximum RSS
    starts from its parent's at fork: measured from this process it would never read below this process's size)."""
    out = subprocess.run([sys.executable, "-S", "-c", _MEASURE, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"seconds": round(m["seconds"], 2), "peak_rss_mib": round(m["rss_kib"] / 1024, 1), "rc": m["rc"]}
    if m["rc"] != 0:
        result["error"] = m["err"]
    return result


_LOAD_PATCH_SAVE = """
import sys, torch
from lora_ext.models.loading import load_pipeline
from lora_ext.formats.network import load_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.models.tiny import pipeline_to_single_file
from lora_ext.formats.safetensors_io import save_safetensors_atomic
loaded = load_pipeline(sys.argv[1], dtype=torch.float16)
Patcher(adapter_for_pipeline(loaded.pipe)).apply([ActiveLora(load_lora(sys.argv[2]), 0.8, 0.8)])
save_safetensors_atomic(pipeline_to_single_file(loaded.pipe, loaded.arch), sys.argv[3])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--kohya", type=Path, help="a checkout of kohya-ss/sd-scripts (with its requirements installed)")
    ap.add_argument("--kohya-python", default=None, help="the Python to run sd-scripts with (default: this one)")
    ap.add_argument("--kohya-pythonpath", default="", help="extra PYTHONPATH entries for sd-scripts (os.pathsep)")
    ap.add_argument("--only-kohya", action="store_true", help="skip our runs (the files must exist from a run)")
    ap.add_argument("--work", type=Path, help="folder for the files (default: a temporary one)")
    args = ap.parse_args()
    arch = {"sd15": "sd1", "sdxl": "sdxl"}[args.arch]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tools_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, lora = work / f"base_{args.arch}.safetensors", work / f"lora_r{args.rank}.safetensors"
    if not ckpt.exists():
        build_checkpoint(arch, ckpt)
    modules = build_lora(arch, args.rank, lora)
    py = sys.executable
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "arch": args.arch,
                     "checkpoint_mib": round(ckpt.stat().st_size / 2**20, 1), "lora_modules": modules,
                     "rank": args.rank}
    if args.only_kohya:
        prev = json.loads((work / f"results_{args.arch}.json").read_text())
        results.update({k: v for k, v in prev.items() if k not in results})
    else:
        results.update(_ours(args, ckpt, lora, work, env, py))
        (work / f"results_{args.arch}.json").write_text(json.dumps(results))
    small = max(1, args.rank // 4)
    if args.kohya:
        kpy = args.kohya_python or py
        kenv = {"PYTHONPATH": os.pathsep.join(p for p in (args.kohya_pythonpath, str(args.kohya),
                                                          str(args.kohya / "networks")) if p)}
        merge_script = "sdxl_merge_lora.py" if args.arch == "sdxl" else "merge_lora.py"
        results["kohya_merge"] = run_child(
            [kpy, str(args.kohya / "networks" / merge_script), "--sd_model", str(ckpt), "--models", str(lora),
             "--ratios", "0.8", "--save_to", str(work / "kohya_merged.safetensors"), "--save_precision", "fp16",
             "--precision", "float"], kenv)
        results["kohya_resize"] = run_child(
            [kpy, str(args.kohya / "networks" / "resize_lora.py"), "--model", str(lora), "--new_rank", str(small),
             "--save_to", str(work / "kohya_resized.safetensors"), "--save_precision", "fp16", "--device", "cpu"],
            kenv)
        for ours, theirs in (("merge_model", "kohya_merge"), ("resize", "kohya_resize")):
            if results[theirs]["rc"] == 0 and results.get(ours, {}).get("rc") == 0:
                results[f"{ours}_vs_kohya"] = {
                    "time_ratio": round(results[ours]["seconds"] / results[theirs]["seconds"], 3),
                    "rss_ratio": round(results[ours]["peak_rss_mib"] / results[theirs]["peak_rss_mib"], 3)}
        if results["kohya_resize"]["rc"] == 0:
            results["resize_error"] = {"ours": lora_error(lora, work / "resized.safetensors"),
                                       "kohya": lora_error(lora, work / "kohya_resized.safetensors")}
    print(json.dumps(results, indent=2))
    return 0


def lora_error(original: Path, resized: Path) -> float:
    """Overall relative Frobenius error of a resized kohya LoRA's deltas against the original's."""
    import torch

    from lora_ext.formats.safetensors_io import load_tensors

    def deltas(path: Path) -> dict[str, torch.Tensor]:
        sd = load_tensors(path)
        out = {}
        for key in sd:
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                down, up = sd[key].float(), sd[f"{base}.lora_up.weight"].float()
                r = down.shape[0]
                alpha = float(sd[f"{base}.alpha"]) if f"{base}.alpha" in sd else r
                out[base] = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * (alpha / r)
        return out

    a, b = deltas(original), deltas(resized)
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return round((num / den) ** 0.5, 6)


def _ours(args, ckpt: Path, lora: Path, work: Path, env: dict, py: str) -> dict:
    results: dict = {}
    results["import_floor"] = run_child([py, "-c", "import torch, diffusers, transformers, lora_ext.tools.merge_model"],
                                        env)
    out = work / "merged.safetensors"
    results["merge_model"] = run_child([py, "-m", "lora_ext", "merge-model", "--model", str(ckpt), "--lora",
                                        f"{lora}:0.8", "--out", str(out), "--force", "--json"], env)
    results["load_patch_save"] = run_child([py, "-c", _LOAD_PATCH_SAVE, str(ckpt), str(lora),
                                            str(work / "merged_ref.safetensors")], env)
    if out.exists() and (work / "merged_ref.safetensors").exists():
        from lora_ext.formats.safetensors_io import read_header
        from lora_ext.formats.safetensors_stream import TensorFile

        with TensorFile(out) as a, TensorFile(work / "merged_ref.safetensors") as b:
            keys = [k for k in a.keys if not k.startswith("first_stage_model.")]
            results["merge_equal_to_load_patch_save"] = all(
                bool((a.tensor(k) == b.tensor(k)).all()) for k in keys if k in read_header(b.path).tensors)
    small = max(1, args.rank // 4)
    results["resize"] = run_child([py, "-m", "lora_ext", "resize", str(lora), "--rank", str(small), "--out",
                                   str(work / "resized.safetensors"), "--force", "--json"], env)
    ref = results["load_patch_save"]
    if ref["rc"] == 0 and results["merge_model"]["rc"] == 0:
        floor = results["import_floor"]["peak_rss_mib"]
        results["merge_vs_load_patch_save"] = {
            "time_ratio": round(results["merge_model"]["seconds"] / ref["seconds"], 3),
            "extra_rss_ratio": round((results["merge_model"]["peak_rss_mib"] - floor)
                                     / max(1.0, ref["peak_rss_mib"] - floor), 3)}
    return results


if __name__ == "__main__":
    raise SystemExit(main())
