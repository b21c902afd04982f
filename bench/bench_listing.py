"""Benchmark: listing a folder of LoRA files with `lora_ext.library.LoraIndex`.

Creates N kohya-style LoRA `.safetensors` files in a temporary folder tree: real kohya module names and shapes
(SD1.5 by default: 72 text-encoder + 192 UNet transformer modules, rank 4, `alpha`, fp16, about 800 keys and a
~110 KB header; `--arch sdxl` for SDXL, ~2,200 keys), sd-scripts-like metadata (about 60 `ss_*`/`sshs_*`/`modelspec.*`
fields with a tag-frequency table, ~6 KB), sidecars for some (`<stem>.json`, `<stem>.preview.png`, `<stem>.png`).
The tensor data is a sparse hole of the right size (listing must never read it), so every file has its real size.

Measured (seconds, median of --repeat runs, OS file cache warm in all cases; the CPU time other processes used
meanwhile is reported per run, as this VM is shared, and --wait-idle waits for idle CPUs before each run):
  cold_s             new LoraIndex, no cache file: walk + read every header + write the cache file
  cold_distinct_s    the same on a second tree where every file has its own tensor layout (worst case: nothing in
                     the scan can be shared between files). In real collections layouts repeat (same trainer and
                     settings); the main tree has --layouts distinct ones (default 500 for 5000 files).
  warm_s             a new Python process with the cache file: LoraIndex(...).refresh() (interpreter start and
                     imports excluded, reported as import_s)
  warm_same_process_s  a new LoraIndex with the cache file in this process
  refresh_s          refresh() again on an index that has listed already
  full_parse_s       for scale: walk + json.loads of every full header (the per-file work A1111's
                     `read_metadata_from_safetensors` does); this is NOT A1111's listing itself

A1111's built-in Lora extension cannot be imported without the WebUI, so it is not run here: its listing is to be
measured inside the WebUI (`networks.list_available_networks()`), see bench/RESULTS.md.

    python bench/bench_listing.py [--n 5000] [--layouts 500] [--arch sd15|sdxl] [--repeat 3] [--wait-idle S]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_ext.library import LoraIndex  # noqa: E402

# ------------------------------------------------------------------------------------------------- file contents


def sd15_modules() -> list[tuple[str, int, int, bool]]:
    """(kohya module name, in features, out features, is 1x1 conv) of kohya's default SD1.5 LoRA targets."""
    mods: list[tuple[str, int, int, bool]] = []
    blocks = [(f"down_blocks_{b}_attentions_{a}", c) for b, c in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    blocks.append(("mid_block_attentions_0", 1280))
    blocks += [(f"up_blocks_{b}_attentions_{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
    for i in range(12):
        p = f"lora_te_text_model_encoder_layers_{i}"
        for proj in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
            mods.append((f"{p}_{proj}", 768, 768, False))
        mods += [(f"{p}_mlp_fc1", 768, 3072, False), (f"{p}_mlp_fc2", 3072, 768, False)]
    for block, c in blocks:
        mods += _transformer(f"lora_unet_{block}", c, 768, depth=1, conv_proj=True)
    return mods


def sdxl_modules() -> list[tuple[str, int, int, bool]]:
    """The same for SDXL (kohya writes ldm names: input_blocks/middle_block/output_blocks, lora_te1_/lora_te2_)."""
    mods: list[tuple[str, int, int, bool]] = []
    for te, width, layers in (("lora_te1", 768, 12), ("lora_te2", 1280, 32)):
        for i in range(layers):
            p = f"{te}_text_model_encoder_layers_{i}"
            for proj in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
                mods.append((f"{p}_{proj}", width, width, False))
            mods += [(f"{p}_mlp_fc1", width, 4 * width, False), (f"{p}_mlp_fc2", 4 * width, width, False)]
    blocks = [(f"input_blocks_{b}_1", c, d) for b, c, d in ((4, 640, 2), (5, 640, 2), (7, 1280, 10), (8, 1280, 10))]
    blocks.append(("middle_block_1", 1280, 10))
    blocks += [(f"output_blocks_{b}_1", 1280, 10) for b in (0, 1, 2)]
    blocks += [(f"output_blocks_{b}_1", 640, 2) for b in (3, 4, 5)]
    for block, c, depth in blocks:
        mods += _transformer(f"lora_unet_{block}", c, 2048, depth=depth, conv_proj=False)
    return mods


def _transformer(prefix: str, c: int, context: int, depth: int, conv_proj: bool) -> list[tuple[str, int, int, bool]]:
    mods = [(f"{prefix}_proj_in", c, c, conv_proj), (f"{prefix}_proj_out", c, c, conv_proj)]
    for d in range(depth):
        t = f"{prefix}_transformer_blocks_{d}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                width = context if attn == "attn2" and proj in ("to_k", "to_v") else c
                mods.append((f"{t}_{attn}_{proj}", width, c, False))
        mods += [(f"{t}_ff_net_0_proj", c, 8 * c, False), (f"{t}_ff_net_2", 4 * c, c, False)]
    return mods


def tensor_entries(modules: list[tuple[str, int, int, bool]], rank: int) -> tuple[list[str], int]:
    """The header's tensor entries as compact JSON fragments, in the safetensors library's order (dtype alignment,
    then name; all fp16 here, so by name), and the data length."""
    entries: list[tuple[str, list[int]]] = []
    for name, fin, fout, conv in modules:
        k = [1, 1] if conv else []
        entries += [(f"{name}.alpha", []), (f"{name}.lora_down.weight", [rank, fin, *k]),
                    (f"{name}.lora_up.weight", [fout, rank, *k])]
    entries.sort()
    out, offset = [], 0
    for key, shape in entries:
        nbytes = 2
        for d in shape:
            nbytes *= d
        out.append(f'{json.dumps(key)}:{{"dtype":"F16","shape":{json.dumps(shape, separators=(",", ":"))},'
                   f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    return out, offset


WORDS = (
    "1girl", "solo", "long_hair", "smile", "looking_at_viewer", "blue_eyes", "short_hair", "brown_hair", "outdoors",
    "simple_background", "sky", "cloud", "tree", "dress", "hat", "jacket", "shirt", "skirt", "standing", "sitting",
    "holding", "flower", "water", "night", "city", "street", "indoors", "window", "upper_body", "full_body",
    "portrait", "masterpiece", "best_quality", "detailed", "lighting",
)


def hexbits(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def metadata(rng: random.Random, name: str, rank: int, arch: str) -> dict[str, str]:
    """sd-scripts-like training metadata (values are strings; structured ones are JSON inside strings)."""
    tags = {f"{rng.choice(WORDS)}_{rng.randrange(400)}": rng.randrange(1, 80) for _ in range(rng.randrange(120, 280))}
    n_img = rng.randrange(10, 200)
    meta = {
        "ss_session_id": str(rng.getrandbits(31)), "ss_training_started_at": str(1.7e9 + rng.random() * 1e7),
        "ss_output_name": name, "ss_learning_rate": "0.0001", "ss_text_encoder_lr": "5e-05", "ss_unet_lr": "0.0001",
        "ss_num_train_images": str(n_img), "ss_num_reg_images": "0", "ss_num_batches_per_epoch": str(n_img // 2),
        "ss_num_epochs": "10", "ss_epoch": "10", "ss_batch_size_per_device": "2", "ss_total_batch_size": "2",
        "ss_gradient_checkpointing": "True", "ss_gradient_accumulation_steps": "1", "ss_max_train_steps": "1000",
        "ss_lr_warmup_steps": "0", "ss_lr_scheduler": "cosine_with_restarts", "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_network_dropout": "None",
        "ss_mixed_precision": "fp16", "ss_full_fp16": "False", "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_clip_skip": "2" if arch == "sd15" else "None", "ss_max_token_length": "225", "ss_cache_latents": "True",
        "ss_seed": str(rng.randrange(2**31)), "ss_lowram": "False", "ss_noise_offset": "0.0357",
        "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3", "ss_adaptive_noise_scale": "None",
        "ss_zero_terminal_snr": "False", "ss_training_comment": "None", "ss_sd_scripts_commit_hash": hexbits(rng, 160),
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)",
        "ss_max_grad_norm": "1.0", "ss_caption_dropout_rate": "0.0", "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.0", "ss_face_crop_aug_range": "None", "ss_prior_loss_weight": "1.0",
        "ss_min_snr_gamma": "5.0", "ss_scale_weight_norms": "None", "ss_ip_noise_gamma": "None",
        "ss_debiased_estimation": "False",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors" if arch == "sd15" else "sd_xl_base_1.0.safetensors",
        "ss_sd_model_hash": hexbits(rng, 32), "ss_new_sd_model_hash": hexbits(rng, 256),
        "ss_vae_name": "None", "ss_resolution": "(512, 512)" if arch == "sd15" else "(1024, 1024)",
        "ss_tag_frequency": json.dumps({f"10_{name}": tags}), "ss_dataset_dirs": json.dumps(
            {f"10_{name}": {"n_repeats": 10, "img_count": n_img}}),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": [512 + 64 * i, 512], "count": 10}
                                                  for i in range(6)}, "mean_img_ar_error": 0.02}),
        "ss_bucket_no_upscale": "True", "ss_enable_bucket": "True", "ss_min_bucket_reso": "256",
        "ss_max_bucket_reso": "1024", "ss_keep_tokens": "1", "ss_flip_aug": "False", "ss_color_aug": "False",
        "ss_random_crop": "False", "ss_shuffle_caption": "True", "ss_steps": "1000",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if arch == "sdxl" else "stable-diffusion-v1/lora",
        "modelspec.title": name, "modelspec.resolution": "512x512" if arch == "sd15" else "1024x1024",
        "modelspec.date": "2024-05-01T12:00:00", "modelspec.prediction_type": "epsilon",
    }  # fmt: skip
    if rng.random() < 0.8:  # sd-scripts writes these since 2023; older files lack them
        meta["sshs_model_hash"] = hexbits(rng, 256)
        meta["sshs_legacy_hash"] = hexbits(rng, 32)
    return meta


def write_lora(path: Path, meta: dict[str, str], entries: list[str], data_len: int) -> None:
    header = ("{" + json.dumps({"__metadata__": meta}, separators=(",", ":"))[1:-1] + "," + ",".join(entries)
              + "}").encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.truncate(8 + len(header) + data_len)  # the tensor data: a sparse hole of the right size


def make_tree(root: Path, n: int, layouts: int, arch: str, seed: int) -> dict[str, float]:
    """N LoRA files in ~n/100 folders (some nested); `layouts` distinct tensor layouts (0: every file its own).

    Layouts differ by the modules they leave out (a tool or setting that skips some blocks), so all stay rank 4 and
    realistic. Returns the mean header and metadata sizes."""
    rng = random.Random(seed)
    modules = sdxl_modules() if arch == "sdxl" else sd15_modules()
    rank = 4
    cache: dict[int, tuple[list[str], int]] = {}

    def layout(variant: int) -> tuple[list[str], int]:  # bit j of `variant` leaves one module out: all distinct
        drop = {(j * 19) % len(modules) for j in range(variant.bit_length()) if variant >> j & 1}
        return tensor_entries([m for j, m in enumerate(modules) if j not in drop], rank)

    n_dirs = max(1, n // 100)
    dirs = [root / (f"group_{i % 7}" if i % 3 else "") / f"set {i}" for i in range(n_dirs)]
    header_bytes = meta_bytes = 0
    for i in range(n):
        if layouts:
            variant = rng.randrange(layouts)
            if variant not in cache:
                cache[variant] = layout(variant)
            entries, data_len = cache[variant]
        else:
            entries, data_len = layout(i)
        d = dirs[i % n_dirs]
        d.mkdir(parents=True, exist_ok=True)
        name = f"lora_{i:05d}_{rng.choice(WORDS)}"
        meta = metadata(rng, name, rank, arch)
        path = d / f"{name}.safetensors"
        write_lora(path, meta, entries, data_len)
        header_bytes += int.from_bytes(path.open("rb").read(8), "little")
        meta_bytes += len(json.dumps(meta))
        if rng.random() < 0.25:
            (d / f"{name}.json").write_text(json.dumps({"description": "a test LoRA", "sd version": "SD1",
                                                        "activation text": name, "preferred weight": 0.8,
                                                        "negative text": "", "notes": ""}, indent=4))
        r = rng.random()
        if r < 0.4:
            (d / f"{name}.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        elif r < 0.5:
            (d / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return {"mean_header_bytes": header_bytes / n, "mean_metadata_bytes": meta_bytes / n}


# ----------------------------------------------------------------------------------------------------- measuring


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Interference:
    """CPU time other processes used while a run was timed, as a share of the machine (this VM is shared)."""

    def __enter__(self) -> Interference:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self.busy(), self.ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        other = (self.busy() - self.busy0) - (self.ours() - self.ours0)
        self.share = max(0.0, other) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def wait_idle(limit_s: float, busy_max: float = 15.0) -> bool:
    """Wait up to limit_s seconds until the machine's CPU use over 2 s is below busy_max percent."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if psutil.cpu_percent(interval=2.0) < busy_max:
            return True
    return limit_s <= 0


class Runs:
    """Timed runs of one measurement: wall seconds, CPU seconds of this process, other processes' CPU share."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.other: list[float] = []

    def run(self, fn) -> object:
        if self.wait_s:
            wait_idle(self.wait_s)
        with Interference() as load:
            c0 = time.process_time()
            wall, out = timed(fn)
            cpu = time.process_time() - c0
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.other.append(load.share)
        return out

    def summary(self) -> dict[str, object]:
        med = statistics.median
        return {"wall_s": round(med(self.wall), 3), "cpu_s": round(med(self.cpu), 3),
                "other_processes_cpu_share": round(med(self.other), 2),
                "runs_wall_s": [round(x, 3) for x in self.wall], "runs_other_share": [round(x, 2) for x in self.other]}


def cold(root: Path, cache: Path, n: int) -> list:
    cache.unlink(missing_ok=True)
    entries = LoraIndex([root], cache_file=cache).refresh()
    if len(entries) != n:
        raise RuntimeError(f"listed {len(entries)} files, expected {n}")
    return entries


WARM_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from lora_ext.library import LoraIndex
t1 = time.perf_counter()
entries = LoraIndex([sys.argv[1]], cache_file=sys.argv[2]).refresh()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "warm_s": t2 - t1, "n": len(entries)}))
"""


def warm_new_process(root: Path, cache: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", WARM_CHILD, str(root), str(cache)], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_parse(root: Path) -> float:
    t0 = time.perf_counter()
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    json.loads(f.read(n))
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--layouts", type=int, default=500,
                    help="distinct tensor layouts in the main tree (0: every file its own)")
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="build the trees here and keep them")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for the machine's CPUs to be idle (< 15%% busy)")
    args = ap.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="lora_ext_bench_listing_"))
    try:
        main_tree, distinct_tree, cache = base / "Lora", base / "Lora-distinct", base / "index.json"
        for tree in (main_tree, distinct_tree):
            shutil.rmtree(tree, ignore_errors=True)
        t_make, sizes = timed(lambda: make_tree(main_tree, args.n, args.layouts, args.arch, seed=1))
        if args.layouts:
            make_tree(distinct_tree, args.n, 0, args.arch, seed=2)
        if hasattr(os, "sync"):
            os.sync()  # the trees' dirty pages would otherwise be flushed by the first cache file's fsync

        runs = {k: Runs(args.wait_idle) for k in ("cold", "cold_distinct", "warm_same_process", "refresh",
                                                    "full_parse")}
        warm: list[dict[str, float]] = []
        for _ in range(args.repeat):
            runs["cold"].run(lambda: cold(main_tree, cache, args.n))
            if args.layouts:
                runs["cold_distinct"].run(lambda: cold(distinct_tree, cache, args.n))
        cold(main_tree, cache, args.n)  # leave the main tree's cache file in place
        cache_bytes = cache.stat().st_size
        index = LoraIndex([main_tree], cache_file=cache)
        index.refresh()
        for _ in range(args.repeat):
            if args.wait_idle:
                wait_idle(args.wait_idle)
            with Interference() as load:
                warm.append({**warm_new_process(main_tree, cache)})
            warm[-1]["other"] = load.share
            runs["warm_same_process"].run(lambda: LoraIndex([main_tree], cache_file=cache).refresh())
            runs["refresh"].run(index.refresh)
            runs["full_parse"].run(lambda: full_parse(main_tree))
        if not args.layouts:
            runs["cold_distinct"] = runs["cold"]
        med = statistics.median
        summary = {k: r.summary() for k, r in runs.items()}
        result = {
            "n_files": args.n,
            "arch": args.arch,
            "rank": 4,
            "layouts": args.layouts or "all distinct",
            **{k: round(v) for k, v in sizes.items()},
            "cold_s": summary["cold"]["wall_s"],
            "cold_distinct_s": summary["cold_distinct"]["wall_s"],
            "warm_s": round(med(w["warm_s"] for w in warm), 3),
            "warm_same_process_s": summary["warm_same_process"]["wall_s"],
            "refresh_s": summary["refresh"]["wall_s"],
            "import_s": round(med(w["import_s"] for w in warm), 3),
            "full_parse_s": summary["full_parse"]["wall_s"],
            "cache_file_bytes": cache_bytes,
            "details": {**summary, "warm": {"runs_wall_s": [round(w["warm_s"], 3) for w in warm],
                                            "runs_other_share": [round(w["other"], 2) for w in warm]}},
            "targets": {"cold_s": 3.0, "warm_s": 0.3},
            "tree_build_s": round(t_make, 1),
            "machine": machine(),
            "os_file_cache": "warm (files just written); a first listing after boot also waits for the disk",
            "reference": ("A1111's built-in Lora extension (networks.list_available_networks) cannot be imported "
                          "without the WebUI; the reference is the built-in's listing measured inside the WebUI. "
                          "full_parse_s is only the per-file header parsing it does, for scale."),
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
