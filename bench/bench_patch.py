"""Benchmark: applying, switching and restoring LoRAs on a full-size SD1.5-shaped random model.

Side by side in one run:
  ours      lora_ext Patcher (merge from backup in one pass, restore by copy)
  diffusers load_lora_weights + fuse_lora / unfuse_lora (+ unload) on the same model and files
  floor     one read-and-write pass over exactly the tensors the LoRA touches (dst.copy_(src) from separate buffers)
  addmm floor  the same pass computing W = W0 + U @ D with torch.addmm (the least a switch can do in fp32)
Prints one JSON object (times in seconds, memory in MiB, ratios ours/reference).

    python bench/bench_patch.py [--device cpu|cuda] [--arch sd15|sdxl] [--rank 16] [--repeat 3] [--dtype fp32|fp16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_ext.formats.network import load_lora  # noqa: E402
from lora_ext.formats.safetensors_io import save_safetensors_atomic  # noqa: E402
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline  # noqa: E402
from lora_ext.patch.synth import SynthSpec, make_lora_tensors  # noqa: E402
from lora_ext.patch.targets import selector  # noqa: E402


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_pipeline(arch: str, device: str, dtype: torch.dtype):
    """A full-size random-weight pipeline (real configs, random normal weights; the VAE is tiny: it is not involved)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_ext.models.assets import load_config, tokenizer_dir

    def materialize(model):
        model = model.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
            for b in model.buffers():
                if b.is_floating_point():
                    b.zero_()
        return model.to(dtype)

    key = {"sd15": "sd15", "sdxl": "sdxl-base"}[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config(key, "unet"))
        te = CLIPTextModel(CLIPTextConfig(**load_config(key, "text_encoder")))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**load_config(key, "text_encoder_2")))
               if arch == "sdxl" else None)
    # (no forward pass runs here, so uninitialised integer buffers such as position_ids do not matter)
    unet, te = materialize(unet), materialize(te)
    te2 = materialize(te2) if te2 is not None else None
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32).to(device, dtype)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir("clip")))
    sched = EulerDiscreteScheduler()
    if arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir("openclip")))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                         unet=unet, scheduler=sched)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--skip-diffusers", action="store_true")
    args = ap.parse_args()
    device, dtype = args.device, {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    med = statistics.median

    t0 = time.perf_counter()
    pipe = build_pipeline(args.arch, device, dtype)
    build_s = time.perf_counter() - t0
    adapter = adapter_for_pipeline(pipe)
    tmp = Path(tempfile.mkdtemp(prefix="lora_ext_bench_"))
    files = []
    for seed in (1, 2):
        tensors = make_lora_tensors(adapter, SynthSpec(rank=args.rank, alpha=args.rank / 2, naming="kohya",
                                                       std=0.01), selector("attn"), seed=seed)
        path = tmp / f"bench_{seed}.safetensors"
        save_safetensors_atomic(tensors, path)
        files.append(path)
    nets = [load_lora(f) for f in files]
    n_modules = len(nets[0].modules)
    by_comp = {c: sum(1 for m in nets[0].modules if adapter.lookup(m).component == c) for c in adapter.components}

    # ---------------------------------------------------------------------------------------------------- floor
    touched = [adapter.lookup(m).module.weight for m in nets[0].modules]
    touched_params = sum(w.numel() for w in touched)
    srcs = [w.detach().clone() for w in touched]
    floor = []
    for _ in range(args.repeat):
        floor.append(timed(lambda srcs=srcs: [w.data.copy_(s) for w, s in zip(touched, srcs)], device))
    # compute floor: the same rank-r products written straight into the weights (torch.addmm from a separate
    # source), i.e. the least work a switch can do when the delta must be computed in fp32
    facs = []
    for name, w in zip(nets[0].modules, touched):
        d = nets[1].modules[name].algorithm.weight_delta(w, adapter.lookup(name).spec)
        facs.append((d.up * d.scale, d.down))
    addmm_floor = []
    for _ in range(args.repeat):
        addmm_floor.append(timed(lambda srcs=srcs, facs=facs: [
            torch.addmm(s.reshape(s.shape[0], -1), u, d, out=w.data.view(w.shape[0], -1))
            for w, s, (u, d) in zip(touched, srcs, facs)], device))
    for w, s in zip(touched, srcs):
        w.data.copy_(s)
    del srcs, facs
    gc.collect()

    # ------------------------------------------------------------------------------------------------------ ours
    patcher = Patcher(adapter)
    rss0 = rss_mib()
    gpu0 = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    first = timed(lambda: patcher.apply([ActiveLora(load_lora(files[0]))]), device)  # includes reading the file
    extra_mib = patcher.backup_bytes / 2**20
    rss_after_first = rss_mib() - rss0
    gpu_extra = (torch.cuda.memory_allocated() - gpu0) / 2**20 if device.startswith("cuda") else 0.0
    switches, restores, firsts = [], [], [first]
    for i in range(args.repeat):
        switches.append(timed(lambda i=i: patcher.apply([ActiveLora(nets[(i + 1) % 2])]), device))
    for _ in range(args.repeat):
        restores.append(timed(patcher.restore, device))
        firsts.append(timed(lambda: patcher.apply([ActiveLora(nets[0])]), device))
    weight_change = timed(lambda: patcher.apply([ActiveLora(nets[0], te=0.5, unet=0.5)]), device)
    patcher.restore()
    ours = {"first_use_s": first, "apply_from_clean_s": med(firsts[1:]), "switch_s": med(switches),
            "weight_change_s": weight_change, "restore_s": med(restores), "extra_mib": round(extra_mib, 1),
            "rss_growth_after_first_mib": round(rss_after_first, 1), "gpu_extra_mib": round(gpu_extra, 1)}

    # ------------------------------------------------------------------------------------------------- diffusers
    theirs = None
    if not args.skip_diffusers:
        theirs = {}
        ref = pipe  # the same model object: our patcher restored it bit-exactly
        loads, fuses, unfuses = [], [], []
        for i in range(args.repeat):
            name = f"a{i}"
            loads.append(timed(lambda name=name, i=i: ref.load_lora_weights(
                str(tmp), weight_name=files[i % 2].name, adapter_name=name), device))
            fuses.append(timed(lambda name=name: ref.fuse_lora(lora_scale=1.0, adapter_names=[name]), device))
            unfuses.append(timed(ref.unfuse_lora, device))
            ref.unload_lora_weights()
        theirs = {"load_s": med(loads), "fuse_s": med(fuses), "load_plus_fuse_s": med(a + b for a, b in
                                                                                      zip(loads, fuses)),
                  "unfuse_s": med(unfuses), "switch_s": med(u + a + b for u, a, b in zip(unfuses, loads, fuses))}

    result = {
        "bench": "patch",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "model": {"arch": args.arch, "dtype": args.dtype, "build_s": round(build_s, 1),
                  "unet_params_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
                  "te_params_m": round(sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6, 1)},
        "lora": {"rank": args.rank, "modules": n_modules, "by_component": by_comp,
                 "touched_params_m": round(touched_params / 1e6, 1)},
        "floor_rw_pass_s": med(floor),
        "floor_addmm_s": med(addmm_floor),
        "ours": ours,
        "diffusers": theirs,
        "ratios": {
            "switch_vs_floor": ours["switch_s"] / med(floor),
            "switch_vs_addmm_floor": ours["switch_s"] / med(addmm_floor),
            "restore_vs_floor": ours["restore_s"] / med(floor),
            "first_use_vs_diffusers_load_fuse": (ours["first_use_s"] / theirs["load_plus_fuse_s"]) if theirs else None,
            "switch_vs_diffusers_switch": (ours["switch_s"] / theirs["switch_s"]) if theirs else None,
            "restore_vs_diffusers_unfuse": (ours["restore_s"] / theirs["unfuse_s"]) if theirs else None,
            "extra_memory_vs_touched": ours["extra_mib"] / (touched_params * touched[0].element_size() / 2**20),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
