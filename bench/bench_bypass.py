"""Benchmark: the per-step cost of bypass against merged weights, and the merge-or-bypass estimate against both.

On a full-size SD1.5-shaped (or SDXL-shaped) random UNet, for 1..4 LoRAs (rank 16, kohya "attn_mlp" layers), one UNet
call (a CFG batch: 2 rows per image) is timed
  base      no LoRA
  merged    the LoRAs merged into the weights (what the patcher does for constant multipliers)
  bypass    the same LoRAs as forward hooks (`lora_ext.patch.bypass`, what schedules and FP8 layers use)
and one re-merge of the whole set (what a changing multiplier costs per change in merge mode). Next to the
measurements: `estimate_seconds`, the model the session decides with (its ratio is what matters). Prints one JSON
object; `bypass_overhead` = (bypass - merged) / merged per UNet call; `break_even_changes` = how many re-merges per
generation cost as much as running the whole generation in bypass.

    python bench/bench_bypass.py [--device cpu|cuda] [--arch sd15|sdxl] [--size 512] [--steps 20] [--repeat 2]
                                 [--images 2]   (per-row weights: a batch whose images use the LoRAs differently)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_patch import build_pipeline, sync  # noqa: E402
from lora_ext.formats.network import parse_lora  # noqa: E402
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline  # noqa: E402
from lora_ext.patch.bypass import Bypass, GenerationShape, estimate_seconds  # noqa: E402
from lora_ext.patch.synth import SynthSpec, make_lora_tensors  # noqa: E402
from lora_ext.patch.targets import selector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (the latent is size/8)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps, for the break-even figure")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--loras", type=int, default=4, help="measure 1..N LoRAs")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--images", type=int, default=1,
                    help="images per batch (2 rows each); with >1 the bypass runs with one weight per row, as for "
                         "LoRAs that the images of a batch use differently")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = build_pipeline(args.arch, args.device, dtype)
    unet = pipe.unet
    adapter = adapter_for_pipeline(pipe)
    latent = args.size // 8
    g = torch.Generator().manual_seed(0)
    batch_rows = 2 * args.images
    sample = torch.randn(batch_rows, 4, latent, latent, generator=g).to(args.device, dtype)
    context_dim = unet.config.cross_attention_dim
    context = torch.randn(batch_rows, 77, context_dim, generator=g).to(args.device, dtype)
    kwargs = {}
    if args.arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch_rows, 1280).to(args.device, dtype),
                                       "time_ids": torch.randn(batch_rows, 6).to(args.device, dtype)}

    def call() -> float:
        times = []
        for _ in range(args.repeat):
            sync(args.device)
            t0 = time.perf_counter()
            unet(sample, 500, encoder_hidden_states=context, **kwargs)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    call()  # warm-up
    base = call()
    networks = [parse_lora(make_lora_tensors(adapter, SynthSpec(rank=args.rank), select=selector("attn_mlp"),
                                             seed=i, components=("unet",)), name=f"b{i}")
                for i in range(args.loras)]
    patcher = Patcher(adapter)
    bypass = Bypass()
    shape = GenerationShape(steps=args.steps, height=args.size, width=args.size, batch=args.images)
    rows = []
    for n in range(1, args.loras + 1):
        actives = [ActiveLora(net, te=1.0, unet=1.0) for net in networks[:n]]
        patcher.apply(actives)
        merged = call()
        sync(args.device)
        t0 = time.perf_counter()
        patcher.apply([ActiveLora(net, te=1.0, unet=0.9) for net in networks[:n]])  # every layer recomputed
        sync(args.device)
        remerge = time.perf_counter() - t0
        patcher.restore()
        patcher.apply(actives, divert=lambda c: True)
        if args.images > 1:  # one weight per row: image i's rows (conditional, unconditional) get weight (i+1)/images
            per_row = torch.tensor([(i % args.images + 1) / args.images for i in range(batch_rows)])
            bypass.set(patcher.diverted, gain_of=lambda c: "rows")
            bypass.set_gain("rows", per_row)
        else:
            bypass.set(patcher.diverted)
        by = call()
        est_merge, est_bypass = estimate_seconds(patcher.diverted, shape)
        layers = len({id(c.target.module) for c in patcher.diverted})
        bypass.clear()
        patcher.restore()
        overhead = by - merged
        rows.append({
            "loras": n, "layers": layers,
            "merged_call_s": round(merged, 4), "bypass_call_s": round(by, 4), "remerge_s": round(remerge, 4),
            "bypass_overhead": round(overhead / merged, 4),
            "break_even_changes": round(args.steps * max(overhead, 0) / remerge, 2) if remerge else None,
            "estimate": {"remerge_s": round(est_merge, 4), "bypass_overhead_per_call_s": round(est_bypass, 4),
                         "break_even_changes": round(args.steps * est_bypass / est_merge, 2) if est_merge else None},
        })
    print(json.dumps({
        "bench": "bypass", "arch": args.arch, "device": args.device, "dtype": args.dtype, "size": args.size,
        "images": args.images,
        "rank": args.rank, "steps": args.steps, "machine": platform.platform(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "base_call_s": round(base, 4), "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
