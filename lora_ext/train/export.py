"""Writing a trained LoRA the way the ecosystem expects it: a kohya-format `.safetensors` with sd-scripts metadata,
an AUTOMATIC1111 user-metadata sidecar and a preview image, then reading it back through the engine.

    meta = build_metadata(config_dict, dataset_report_dict, "sd1", steps=1000, epoch=10, started_at=t0)
    path = export_lora(network, out_dir / "my_lora.safetensors", metadata=meta,
                       sidecar={"activation text": "sks dog", "preferred weight": 0.8}, preview=last_sample)

Files (written atomically, never over an existing file unless overwrite=True):
    <name>.safetensors    kohya keys (`lora_unet_*`, `lora_te_*` or `lora_te1_*`/`lora_te2_*`), `.alpha` scalars,
                          fp16 by default; metadata as sd-scripts writes it: every value a string, `ss_*` training
                          fields (JSON inside the string for structured ones), `sshs_model_hash`/`sshs_legacy_hash`,
                          and Stability's `modelspec.*` 1.0.1 fields
    <name>.json           A1111's user metadata for the card: description, "sd version" ("SD1"/"SD2"/"SDXL"),
                          "activation text" (trigger words), "preferred weight", "negative text", notes
    <name>.preview.png    the card's preview image (when given)

The metadata follows sd-scripts `train_network.py` (the `ss_*` dict, `str()` of each value), `library/train_util.py`
(tag frequency, bucket info, model hashes) and `library/sai_model_spec.py` (architecture ids, implementation,
resolution "WxH", date, prediction type). `modelspec.hash_sha256` is "0x" + the sha256 of the tensor data (the
ModelSpec definition: all tensor content, header excluded).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_ext import __version__, families
from lora_ext.errors import LoraExtError, TrainingError
from lora_ext.formats.hashes import legacy_hash, sha256_file, sshs_hashes_for
from lora_ext.formats.keys import BUNDLE_PREFIX
from lora_ext.formats.metadata import a1111_sd_version, base_model_from_metadata
from lora_ext.formats.network import LoraNetwork, load_lora, parse_lora
from lora_ext.formats.safetensors_io import save_safetensors_atomic, write_bytes_atomic
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline

log = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
# the optimizer class path sd-scripts writes as ss_optimizer, per our optimizer names
OPTIMIZER_CLASS = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
    "sgd": "torch.optim.sgd.SGD",
}


# ------------------------------------------------------------------------------------------------- small vocabularies


def _arch(arch: str) -> str:
    """The family id of `arch` (an id or alias, lora_ext.families); ValueError listing the valid names."""
    return families.normalise_family(arch)


def base_model_version(arch: str, prediction_type: str | None = "epsilon") -> str:
    """ss_base_model_version as sd-scripts writes it: "sd_v1", "sd_v2", "sd_v2_v" (v-prediction), "sdxl_base_v1-0".

    (sd-scripts builds "sd" + "_v2"/"_v1" + "_v" for SD1/SD2, so an SD1 v-prediction model gives "sd_v1_v".)"""
    return families.family(arch).ss_base_model_version[families.normalise_prediction(prediction_type or "epsilon")]


def modelspec_architecture(arch: str, prediction_type: str | None = "epsilon") -> str:
    """modelspec.architecture of a LoRA (sai_model_spec): "stable-diffusion-v1/lora", "stable-diffusion-v2-512/lora",
    "stable-diffusion-v2-768-v/lora" or "stable-diffusion-xl-v1-base/lora"."""
    fam = families.family(arch)
    return f"{fam.modelspec_architecture[families.normalise_prediction(prediction_type or 'epsilon')]}/lora"


def _implementation(arch: str) -> str:
    return IMPL_SGM if families.family(arch).sgm else IMPL_DIFFUSERS


# ------------------------------------------------------------------------------------------------ dataset statistics


def compute_tag_frequency(captions_by_dir: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """sd-scripts' ss_tag_frequency: per dataset folder (its base name), how many captions hold each tag.

    A caption is split on ",", each tag stripped and lower-cased, empty tags dropped (sd-scripts
    `set_tag_frequency`). A tag that appears twice in one caption counts twice, as there."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_dir.items():
        counts = out.setdefault(os.path.basename(str(folder).rstrip("/\\")) or str(folder), {})
        for caption in captions:
            for tag in str(caption).split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return out


def compute_bucket_info(buckets: Mapping[Any, int] | Iterable[Any] | None, mean_ar_error: float | None = None
                        ) -> dict[str, Any] | None:
    """sd-scripts' ss_bucket_info: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error"}.

    `buckets` maps (w, h) (or "WxH" / "W,H") to an image count (repeats included), or is a list of [w, h, count]
    or of {"resolution": [w, h], "count": n}; buckets are numbered in order of (w, h). None -> None (sd-scripts
    writes null when bucketing is off)."""
    if buckets is None:
        return None
    items: list[tuple[int, int, int]] = []
    if isinstance(buckets, Mapping):
        pairs: Iterable[tuple[Any, Any]] = buckets.items()
    else:  # [w, h, count] rows or {"resolution": [w, h], "count": n} entries (DatasetReport.to_dict)
        pairs = [(b["resolution"], b["count"]) if isinstance(b, Mapping) else (b[:2], b[2]) for b in buckets]
    for reso, count in pairs:
        if isinstance(reso, str):
            parts = reso.replace("x", ",").replace("X", ",").split(",")
            w, h = int(parts[0]), int(parts[1])
        else:
            w, h = (int(v) for v in reso)
        items.append((w, h, int(count)))
    items.sort()
    info: dict[str, Any] = {"buckets": {str(i): {"resolution": [w, h], "count": n}
                                        for i, (w, h, n) in enumerate(items) if n > 0}}
    info["mean_img_ar_error"] = float(mean_ar_error or 0.0)
    return info


def model_file_hashes(path: str | os.PathLike[str]) -> dict[str, str]:
    """ss_sd_model_hash (legacy 8-digit hash) and ss_new_sd_model_hash (sha256) of a single-file checkpoint, as
    sd-scripts writes them; {} for a diffusers folder or a missing path. Reads the whole file (seconds per GB)."""
    p = Path(path)
    if not p.is_file():
        return {}
    return {"ss_sd_model_hash": legacy_hash(p), "ss_new_sd_model_hash": sha256_file(p)}


# ---------------------------------------------------------------------------------------------------------- metadata


def _s(value: Any) -> str:
    """sd-scripts' str(): True/False/None/numbers as Python prints them."""
    return str(value)


def _opt(value: Any) -> str:
    """sd-scripts writes None for features left off: 0 / 0.0 / None -> "None"."""
    return "None" if value is None or value == 0 else str(value)


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        out = dict(obj.to_dict())
        if "tag_frequency" not in out and isinstance(getattr(obj, "tag_frequency", None), Mapping):
            out["tag_frequency"] = obj.tag_frequency
        return out
    raise TypeError(f"expected a dict (or an object with to_dict()), got {type(obj).__name__}")


def build_metadata(config: Mapping[str, Any], dataset_report: Mapping[str, Any] | Any | None, arch: str, *,
                   prediction_type: str | None = "epsilon", steps: int | None = None, epoch: int | None = None,
                   num_epochs: int | None = None, started_at: float | None = None,
                   finished_at: float | None = None, session_id: int | None = None,
                   tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
                   dataset_dirs: Mapping[str, Mapping[str, int]] | None = None,
                   reg_dataset_dirs: Mapping[str, Mapping[str, int]] | None = None,
                   bucket_info: Mapping[str, Any] | None = None, model_hashes: Mapping[str, str] | None = None,
                   network_fields: Mapping[str, str] | None = None, num_processes: int = 1,
                   optimizer_name: str | None = None) -> dict[str, str]:
    """sd-scripts-compatible metadata (every value a str) from plain dicts.

    config: the training config as a dict (TrainConfig field names: pretrained_model, vae, output_name,
    network_dim, network_alpha, learning_rate, text_encoder_lr, resolution, ...; missing keys take the TrainConfig
    defaults; optional metadata_title/metadata_author/metadata_description/metadata_license/metadata_tags and
    training_comment). dataset_report: a DatasetReport or its to_dict() (images, class_images, train_samples /
    class_samples or repeats_total, buckets, steps_per_epoch, total_steps; optional tag_frequency, dataset_dirs,
    reg_dataset_dirs, bucket_info, batches_per_epoch, mean_ar_error), or None. arch: "sd1" | "sd2" | "sdxl".
    steps/epoch: the state at save time (ss_steps, ss_epoch). started_at/finished_at: Unix times.
    model_hashes: `model_file_hashes(...)` of the base checkpoint.
    network_fields: `LoraTrainingNetwork.metadata_fields()` (otherwise derived from the config).
    The keyword arguments override the same information in `dataset_report`. `export_lora` adds ss_output_name,
    the hashes and modelspec.hash_sha256.
    """
    a = _arch(arch)
    cfg = _as_dict(config)
    rep = _as_dict(dataset_report)
    started = float(started_at if started_at is not None else time.time())
    c = _Getter(cfg)
    reso = c("resolution", families.default_resolution(a, prediction_type))
    reso_wh = tuple(int(v) for v in reso) if isinstance(reso, (list, tuple)) else (int(reso), int(reso))
    if len(reso_wh) == 1:
        reso_wh = (reso_wh[0], reso_wh[0])
    clip_skip = c("clip_skip")
    clip_skip = int(clip_skip) if clip_skip is not None and int(clip_skip) > 1 else None

    meta: dict[str, Any] = {
        "ss_session_id": session_id if session_id is not None else secrets.randbelow(2**32),
        "ss_training_started_at": started,
        "ss_output_name": c("output_name", ""),
        "ss_v2": a == "sd2",
        "ss_base_model_version": base_model_version(a, prediction_type),
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": None,
        "ss_seed": c("seed", 42),
        "ss_lowram": False,
        "ss_training_comment": c("training_comment"),
        **_optimisation_fields(c, rep, num_epochs, num_processes, optimizer_name),
        **_dataset_fields(c, rep, reso_wh, tag_frequency=tag_frequency, dataset_dirs=dataset_dirs,
                          reg_dataset_dirs=reg_dataset_dirs, bucket_info=bucket_info),
    }
    if steps is not None:
        meta["ss_steps"] = int(steps)
    if epoch is not None:
        meta["ss_epoch"] = int(epoch)
    if finished_at is not None:
        meta["ss_training_finished_at"] = float(finished_at)
    meta.update(network_fields if network_fields is not None else _network_fields_from_config(c))
    model = c("pretrained_model")
    if model is not None:
        meta["ss_sd_model_name"] = os.path.basename(str(model).rstrip("/\\")) or str(model)
    if model_hashes:
        meta.update(model_hashes)
    vae = c("vae")
    if vae is not None:
        meta["ss_vae_name"] = os.path.basename(str(vae).rstrip("/\\")) or str(vae)
    out = {k: _s(v) for k, v in meta.items()}
    out.update(_modelspec(cfg, a, families.is_v_prediction(prediction_type), reso_wh, started, clip_skip))
    return out


class _Getter:
    """c(key, default): the config's value, or `default` when the key is missing or None."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg

    def __call__(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value


def _optimisation_fields(c: _Getter, rep: Mapping[str, Any], num_epochs: int | None, num_processes: int,
                         optimizer_name: str | None) -> dict[str, Any]:
    """ss_* fields of the optimisation: learning rates, steps, epochs, batch sizes, schedule, loss options."""
    lr = float(c("learning_rate", 1e-4))
    train_te = bool(c("train_text_encoder", False))
    batch = int(c("train_batch_size", 1))
    accum = int(c("gradient_accumulation_steps", 1))
    steps_per_epoch = rep.get("steps_per_epoch")
    total_steps = c("max_train_steps", rep.get("total_steps"))
    if num_epochs is None:
        num_epochs = c("max_train_epochs")
        if num_epochs is None and total_steps and steps_per_epoch:
            num_epochs = math.ceil(int(total_steps) / int(steps_per_epoch))
    optimizer = optimizer_name or OPTIMIZER_CLASS.get(str(c("optimizer", "adamw")).lower(), str(c("optimizer", "")))
    return {
        "ss_learning_rate": lr,
        "ss_text_encoder_lr": c("text_encoder_lr", 0.5 * lr) if train_te else None,
        "ss_unet_lr": lr,
        "ss_num_batches_per_epoch": rep.get("batches_per_epoch", steps_per_epoch),
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": bool(c("gradient_checkpointing", False)),
        "ss_gradient_accumulation_steps": accum,
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": int(c("lr_warmup_steps", 0)),
        "ss_lr_scheduler": c("lr_scheduler", "constant"),
        "ss_mixed_precision": c("mixed_precision", "no"),
        "ss_full_fp16": False,
        "ss_noise_offset": _opt(c("noise_offset")),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": c("max_grad_norm", 1.0),
        "ss_prior_loss_weight": c("prior_loss_weight", 1.0),
        "ss_min_snr_gamma": _opt(c("min_snr_gamma")),
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * accum * int(num_processes),
    }


def _dataset_fields(c: _Getter, rep: Mapping[str, Any], reso_wh: tuple[int, ...], *,
                    tag_frequency: Mapping[str, Mapping[str, int]] | None,
                    dataset_dirs: Mapping[str, Mapping[str, int]] | None,
                    reg_dataset_dirs: Mapping[str, Mapping[str, int]] | None,
                    bucket_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """ss_* fields of the dataset: image counts, resolution and buckets, augmentation, captions, folders, tags.
    Unset bucket limits are the ones training used (lora_ext.train.dataset.spec: min = resolution / 2 up to 256 on
    the step grid, max = 2 x resolution)."""
    tags = tag_frequency if tag_frequency is not None else rep.get("tag_frequency", {})
    dirs = dataset_dirs if dataset_dirs is not None else rep.get("dataset_dirs", {})
    reg_dirs = reg_dataset_dirs if reg_dataset_dirs is not None else rep.get("reg_dataset_dirs", {})
    buckets = bucket_info if bucket_info is not None else rep.get("bucket_info")
    if buckets is None and bool(c("enable_bucket", True)) and rep.get("buckets") is not None:
        buckets = compute_bucket_info(rep["buckets"], rep.get("mean_ar_error"))
    step = int(c("bucket_reso_steps", 64))
    min_bucket = c("min_bucket_reso", max(step, min(256, max(reso_wh) // 2) // step * step))
    return {
        "ss_num_train_images": rep.get("train_samples", rep.get("repeats_total", rep.get("images"))),  # repeats in
        "ss_num_reg_images": rep.get("class_samples", rep.get("class_images", 0)),
        "ss_cache_latents": bool(c("cache_latents", False)),
        "ss_caption_dropout_rate": c("caption_dropout", 0.0),
        "ss_resolution": reso_wh,
        "ss_color_aug": bool(c("color_jitter", 0.0)),
        "ss_flip_aug": bool(c("flip_aug", False)),
        "ss_random_crop": bool(c("random_crop", False)),
        "ss_shuffle_caption": bool(c("shuffle_caption", False)),
        "ss_enable_bucket": bool(c("enable_bucket", True)),
        "ss_bucket_no_upscale": bool(c("bucket_no_upscale", True)),
        "ss_min_bucket_reso": int(min_bucket),
        "ss_max_bucket_reso": int(c("max_bucket_reso", 2 * max(reso_wh))),
        "ss_keep_tokens": int(c("keep_tokens", 0)),
        "ss_dataset_dirs": json.dumps(dict(dirs)),
        "ss_reg_dataset_dirs": json.dumps(dict(reg_dirs)),
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in dict(tags).items()}),
        "ss_bucket_info": json.dumps(buckets),
    }


def _network_fields_from_config(c: _Getter) -> dict[str, Any]:
    """ss_network_* from the config when the network's own `metadata_fields()` are not given."""
    dim = int(c("network_dim", 4))
    args: dict[str, str] = {"targets": str(c("network_targets", "attn"))}
    if c("conv_dim") is not None:
        args["conv_dim"] = str(c("conv_dim"))
        args["conv_alpha"] = str(c("conv_alpha", c("conv_dim")))
    if c("dora", False):
        args["dora_wd"] = "True"
    return {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": float(c("network_alpha",
            dim)), "ss_network_dropout": None, "ss_network_args": json.dumps(args)}


def _modelspec(cfg: Mapping[str, Any], arch: str, v_pred: bool, reso: tuple[int, int], timestamp: float,
               clip_skip: int | None) -> dict[str, str]:
    """modelspec.* as sd-scripts' sai_model_spec.build_metadata writes them for a LoRA (hash added at export)."""
    spec: dict[str, str | None] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(arch, "v" if v_pred else "epsilon"),
        "modelspec.implementation": _implementation(arch),
        "modelspec.title": cfg.get("metadata_title") or cfg.get("output_name") or f"LoRA@{timestamp}",
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.description": cfg.get("metadata_description"),
        "modelspec.author": cfg.get("metadata_author"),
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": cfg.get("metadata_license"),
        "modelspec.tags": cfg.get("metadata_tags"),
        "modelspec.implementation_version": f"lora_ext/{__version__}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.encoder_layer": str(clip_skip) if clip_skip is not None else None,
        "modelspec.trigger_phrase": cfg.get("trigger_word") or None,
    }
    return {k: str(v) for k, v in spec.items() if v is not None}


# -------------------------------------------------------------------------------------------------------------- sidecar


def sidecar_json(arch: str, sidecar: Mapping[str, Any] | None, metadata: Mapping[str, str]) -> dict[str, Any]:
    """A1111's `<name>.json` user metadata: description, "sd version", "activation text", "preferred weight",
    "negative text", notes (plus any other keys given). Underscore spellings ("activation_text") are accepted.
    Defaults: activation text = modelspec.trigger_phrase, preferred weight 1.0, a description naming the base model."""
    given = {str(k).replace("_", " "): v for k, v in (sidecar or {}).items()}
    base = metadata.get("ss_sd_model_name")
    description = f"LoRA for {families.sd_version(arch)}" + (f", trained on {base}" if base else "") + " with lora_ext"
    out: dict[str, Any] = {
        "description": str(given.pop("description", description)),
        "sd version": families.sd_version(arch),
        "activation text": str(given.pop("activation text", metadata.get("modelspec.trigger_phrase", ""))),
        "preferred weight": float(given.pop("preferred weight", 1.0)),
        "negative text": str(given.pop("negative text", "")),
        "notes": str(given.pop("notes", _notes(metadata))),
    }
    given.pop("sd version", None)
    out.update(given)
    return out


def _notes(metadata: Mapping[str, str]) -> str:
    parts = []
    for key, label in (("ss_steps", "steps"), ("ss_epoch", "epochs"), ("ss_network_dim", "rank"),
                       ("ss_network_alpha", "alpha"), ("ss_learning_rate", "learning rate")):
        if metadata.get(key) not in (None, "", "None"):
            parts.append(f"{label} {metadata[key]}")
    return ("Trained with lora_ext: " + ", ".join(parts)) if parts else "Trained with lora_ext"


# --------------------------------------------------------------------------------------------------------------- export


def sidecar_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(<name>.json, <name>.preview.png) beside a LoRA file."""
    p = Path(path)
    return p.with_suffix(".json"), p.with_name(p.stem + ".preview.png")


def export_lora(network: Any, path: str | os.PathLike[str], *, metadata: Mapping[str, str],
                pipe_arch: str | None = None, overwrite: bool = False, sidecar: Mapping[str, Any] | None = None,
                preview: Any | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write `network` (a LoraTrainingNetwork) as `path` (.safetensors) with its sidecars; return the path.

    metadata: `build_metadata(...)` output (all str); this adds/overrides ss_output_name (= file stem), the
    network's ss_network_* fields, ss_training_finished_at (now, unless given), sshs_model_hash, sshs_legacy_hash and
    modelspec.hash_sha256, and checks that the family the metadata claims (A1111's rule and modelspec) is the
    network's. pipe_arch: the loaded model's family, checked against the network's. sidecar: A1111 user metadata
    (see `sidecar_json`); preview: a PIL image for `<name>.preview.png`. dtype: of the factors (fp16 default).

    Nothing is written when a file exists and overwrite is False (TrainingError naming it). After writing, the file
    is read back with `load_lora` and checked with `Patcher(adapter_for_pipeline(pipe)).check(...)`: its tensors must
    be the ones written and every module must match a layer, with no unknown key; otherwise the written files are
    removed and TrainingError is raised.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise TrainingError(f"{p}: the LoRA file name must end in .safetensors")
    arch = _arch(network.arch)
    if pipe_arch is not None and _arch(pipe_arch) != arch:
        raise TrainingError(f"{p}: the network was built on a {arch} model but pipe_arch says {_arch(pipe_arch)}")
    json_path, preview_path = sidecar_paths(p)
    outputs = [p, json_path] + ([preview_path] if preview is not None else [])
    if not overwrite:
        existing = [str(o) for o in outputs if o.exists() or o.is_symlink()]
        if existing:
            also = f" (also exists: {', '.join(existing[1:])})" if existing[1:] else ""
            raise TrainingError(f"{existing[0]} already exists; choose another output name or allow overwriting "
                                f"(--overwrite){also}")

    tensors = network.state_dict_kohya(dtype)
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(f"{p}: the trained LoRA has NaN/inf values (e.g. {bad[0]}) in {dtype}; the run diverged "
                            f"(lower the learning rate) or the values overflow {dtype} (save in float32)")
    meta = _final_metadata(metadata, network, p, arch)
    model_hash, legacy = sshs_hashes_for(tensors, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy
    meta["modelspec.hash_sha256"] = "0x" + model_hash

    # in-memory check first: a file the engine would not fully apply is never written
    _check_network(parse_lora(tensors, meta, path=p, name=p.stem), network, p, len(network.loras))

    p.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        written.append(save_safetensors_atomic(tensors, p, meta, overwrite=overwrite))
        card = sidecar_json(arch, sidecar, meta)
        data = (json.dumps(card, indent=4, ensure_ascii=False) + "\n").encode("utf-8")
        written.append(write_bytes_atomic(json_path, data, overwrite=overwrite))
        if preview is not None:
            written.append(write_bytes_atomic(preview_path, _png_bytes(preview), overwrite=overwrite))
        _read_back(p, tensors, meta, network)
    except LoraExtError as err:
        for w in written:
            w.unlink(missing_ok=True)
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"{p}: exporting the LoRA failed: {err}") from err
    log.info("wrote %s (%d modules, %s)", p, len(network.loras), str(dtype).replace("torch.", ""))
    return p


def _final_metadata(metadata: Mapping[str, str], network: Any, path: Path, arch: str) -> dict[str, str]:
    meta: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TrainingError(f"{path}: metadata {k!r} is {type(v).__name__}; safetensors metadata values must be "
                                f"strings (use build_metadata)")
        meta[k] = v
    meta["ss_output_name"] = path.stem
    meta.update(network.metadata_fields())
    meta.setdefault("ss_training_finished_at", str(time.time()))
    meta.setdefault("ss_v2", str(arch == "sd2"))
    meta.setdefault("ss_base_model_version", base_model_version(arch))
    meta.setdefault("modelspec.sai_model_spec", MODELSPEC_VERSION)
    meta.setdefault("modelspec.architecture", modelspec_architecture(arch))
    meta.setdefault("modelspec.implementation", _implementation(arch))
    meta.setdefault("modelspec.title", path.stem)
    a1111 = a1111_sd_version(meta)
    claimed = base_model_from_metadata(meta)
    if a1111 != arch or claimed != arch:
        raise TrainingError(f"{path}: the metadata describes a {claimed or a1111} model (ss_base_model_version="
                            f"{meta.get('ss_base_model_version')!r}, ss_v2={meta.get('ss_v2')!r}, "
                            f"modelspec.architecture={meta.get('modelspec.architecture')!r}) but the network was "
                            f"trained on {arch}; build the metadata with arch={arch!r}")
    return meta


def _check_network(net: LoraNetwork, network: Any, path: Path, expected_modules: int) -> None:
    report = Patcher(adapter_for_pipeline(network.pipe)).check([ActiveLora(net)]).networks[0]
    problems = []
    if report.error:
        problems.append(report.error)
    if report.unmatched:
        problems.append(f"{len(report.unmatched)} modules match no layer (e.g. {report.unmatched[0]})")
    if report.unknown_keys:
        problems.append(f"{len(report.unknown_keys)} unknown keys (e.g. {report.unknown_keys[0]})")
    if not problems and report.modules_applied != expected_modules:
        problems.append(f"{report.modules_applied} of {expected_modules} modules would be applied")
    if problems:
        raise TrainingError(f"{path}: the exported LoRA does not read back cleanly against the base model: "
                            + "; ".join(problems))


def _read_back(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str], network: Any) -> None:
    net = load_lora(path)
    if net.metadata != dict(meta):
        raise TrainingError(f"{path}: the metadata read back differs from what was written")
    read = {f"{m.name}.{suffix}": t for m in net.modules.values() for suffix, t in m.algorithm.tensors().items()}
    read.update({f"{BUNDLE_PREFIX}{name}.{rest}": t for name, parts in net.bundled_embeddings.items()
                 for rest, t in parts.items()})
    for key, t in tensors.items():
        got = read.get(key)
        if got is None or got.dtype != t.dtype or not torch.equal(got, t):
            raise TrainingError(f"{path}: tensor {key} read back differs from what was written")
    if len(read) != len(tensors):
        raise TrainingError(f"{path}: {len(read)} tensors read back, {len(tensors)} written")
    _check_network(net, network, path, len(network.loras))


def _png_bytes(image: Any) -> bytes:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with diffusers
        raise TrainingError("writing the preview needs Pillow") from exc
    if not isinstance(image, Image.Image):
        raise TrainingError(f"the preview must be a PIL image, got {type(image).__name__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
