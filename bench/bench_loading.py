"""Host memory of loading a model: ours (`load_pipeline`) against diffusers' `from_pretrained`, side by side.

    python bench/bench_loading.py --work DIR [--arch sd15]

Uses (or builds, with bench_tools.build_checkpoint) a full-size random fp16 single-file checkpoint and a diffusers
folder of the same weights, then in separate processes (peak RSS measured by a small parent of each):
  ours single file     load_pipeline(file, fp16)
  ours folder          load_pipeline(folder, fp16)
  diffusers folder     StableDiffusionPipeline.from_pretrained(folder, fp16), then every weight read once (its
                       pages are mapped lazily: the memory a model costs once it is used)
Each prints its RSS after loading; the JSON has peaks, ends and ratios ours / diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_OURS = """
import sys, torch, psutil
from lora_ext.models.loading import load_pipeline
pipe = load_pipeline(sys.argv[1], dtype=torch.float16).pipe
print("RSS_END", psutil.Process().memory_info().rss)
"""

_DIFFUSERS = """
import sys, torch, psutil
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16, safety_checker=None,
                                               local_files_only=True)
total = 0.0
for m in (pipe.unet, pipe.vae, pipe.text_encoder):
    for p in m.parameters():
        total += float(p.float().sum())
print("RSS_END", psutil.Process().memory_info().rss)
"""


def main() -> int:
    from bench.bench_tools import build_checkpoint, run_child

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--arch", default="sd15", choices=["sd15"])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / f"base_{args.arch}.safetensors"
    folder = args.work / f"base_{args.arch}_folder"
    if not ckpt.exists():
        build_checkpoint("sd1", ckpt)
    if not (folder / "model_index.json").exists():
        import torch

        from lora_ext.models.loading import load_pipeline

        load_pipeline(ckpt, dtype=torch.float16).pipe.save_pretrained(folder, safe_serialization=True)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "checkpoint_mib": round(ckpt.stat().st_size / 2**20, 1)}
    out["ours_single_file"] = run_child([py, "-c", _OURS, str(ckpt)], env)
    out["ours_folder"] = run_child([py, "-c", _OURS, str(folder)], env)
    out["diffusers_folder"] = run_child([py, "-c", _DIFFUSERS, str(folder)], env)
    ref = out["diffusers_folder"]["peak_rss_mib"]
    if ref:
        out["peak_ratio_single_vs_diffusers"] = round(out["ours_single_file"]["peak_rss_mib"] / ref, 3)
        out["peak_ratio_folder_vs_diffusers"] = round(out["ours_folder"]["peak_rss_mib"] / ref, 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
