"""Reading LoRA metadata: the `ss_*` keys sd-scripts writes, `modelspec.*` (Stability's model spec) and friends.

Safetensors metadata is str -> str; structured values (`ss_tag_frequency`, `ss_network_args`, `ss_dataset_dirs`,
`ss_bucket_info`, ...) are JSON inside those strings. Everything here is tolerant: a malformed value is kept as the
string it is, never an error, since metadata is informational and often hand-edited.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping

from lora_ext import families

logger = logging.getLogger(__name__)

BASE_MODELS = families.KNOWN
"""Every value `base_model_from_metadata` can return besides None."""

# modelspec.architecture is "<architecture>/<adapter>"; matched on the architecture part, longest prefix first.
_MODELSPEC_ARCH = (
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v3", "sd3"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)
# ss_base_model_version values sd-scripts writes, other than sdxl_* (handled by A1111's own rule).
_SS_BASE_VERSION = (("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux"))

_SUMMARY_FIELDS = {
    "ss_sd_model_name": "sd_model_name",
    "ss_sd_model_hash": "sd_model_hash",
    "ss_new_sd_model_hash": "sd_model_sha256",
    "ss_vae_name": "vae_name",
    "ss_base_model_version": "base_model_version",
    "ss_v2": "v2",
    "ss_v_parameterization": "v_parameterization",
    "ss_network_module": "network_module",
    "ss_network_dim": "network_dim",
    "ss_network_alpha": "network_alpha",
    "ss_network_dropout": "network_dropout",
    "ss_clip_skip": "clip_skip",
    "ss_resolution": "resolution",
    "ss_num_train_images": "num_train_images",
    "ss_num_reg_images": "num_reg_images",
    "ss_num_epochs": "num_epochs",
    "ss_epoch": "epoch",
    "ss_steps": "steps",
    "ss_max_train_steps": "max_train_steps",
    "ss_batch_size_per_device": "batch_size",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
    "ss_learning_rate": "learning_rate",
    "ss_unet_lr": "unet_lr",
    "ss_text_encoder_lr": "text_encoder_lr",
    "ss_optimizer": "optimizer",
    "ss_lr_scheduler": "lr_scheduler",
    "ss_mixed_precision": "mixed_precision",
    "ss_noise_offset": "noise_offset",
    "ss_min_snr_gamma": "min_snr_gamma",
    "ss_seed": "seed",
    "ss_training_comment": "training_comment",
    "sshs_model_hash": "sshs_model_hash",
    "sshs_legacy_hash": "sshs_legacy_hash",
}
_INT_FIELDS = {
    "network_dim", "clip_skip", "num_train_images", "num_reg_images", "num_epochs", "epoch", "steps",
    "max_train_steps", "batch_size", "gradient_accumulation_steps", "seed",
}  # fmt: skip
_FLOAT_FIELDS = {
    "network_alpha", "network_dropout", "learning_rate", "unet_lr", "text_encoder_lr", "noise_offset",
    "min_snr_gamma",
}  # fmt: skip
_TOP_TAGS = 20


def parse_metadata(meta: Mapping[str, str]) -> dict[str, object]:
    """Decode JSON-valued entries: a value starting with '{' or '[' that parses as a JSON object/array is replaced
    by it; every other value is kept as is. (A1111 decodes only values starting with '{'.)"""
    out: dict[str, object] = {}
    for k, v in meta.items():
        out[k] = _maybe_json(v)
    return out


def base_model_from_metadata(meta: Mapping[str, object]) -> str | None:
    """Base model family the metadata claims: one of `BASE_MODELS`, or None when it says nothing.

    A1111's rules come first (`ss_base_model_version` starting with "sdxl_" -> "sdxl"; `ss_v2 == "True"` -> "sd2"),
    then `modelspec.architecture` ("stable-diffusion-xl-v1-base/lora" -> "sdxl", "stable-diffusion-v2-..." -> "sd2",
    "stable-diffusion-v1/lora" -> "sd1", ...), then the other `ss_base_model_version` values, and finally A1111's
    fallback: any other kohya (`ss_*`) metadata means "sd1". Unlike A1111, metadata without any `ss_*` or
    `modelspec.*` key (e.g. diffusers' `{"format": "pt"}`) gives None rather than "sd1". Use `a1111_sd_version` for
    A1111's exact verdict.
    """
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl"
    if str(meta.get("ss_v2", "")) == "True":
        return "sd2"
    arch = str(meta.get("modelspec.architecture", "")).split("/", 1)[0].strip().lower()
    if arch:
        for prefix, family in _MODELSPEC_ARCH:
            if arch.startswith(prefix):
                return family
    version = str(meta.get("ss_base_model_version", "")).lower()
    for prefix, family in _SS_BASE_VERSION:
        if version.startswith(prefix):
            return family
    if any(k.startswith("ss_") for k in meta):
        return "sd1"
    return None


def a1111_sd_version(meta: Mapping[str, object]) -> str | None:
    """A1111 v1.10 `NetworkOnDisk.detect_version`, verbatim in behaviour: "sdxl", "sd2", "sd1" for any other
    non-empty metadata, None (A1111's Unknown) for none."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl"
    if str(meta.get("ss_v2", "")) == "True":
        return "sd2"
    return "sd1" if len(meta) else None


def tag_frequency(meta: Mapping[str, object]) -> dict[str, int]:
    """Training-caption tag counts from `ss_tag_frequency` (`{dataset_dir: {tag: count}}`), summed over dataset
    directories, tags stripped of surrounding spaces, most frequent first (ties by tag). Malformed -> {}."""
    raw = _maybe_json(meta.get("ss_tag_frequency"))
    if not isinstance(raw, Mapping):
        return {}
    counts: dict[str, int] = {}
    for tags in raw.values():
        if not isinstance(tags, Mapping):
            continue
        for tag, count in tags.items():
            tag = str(tag).strip()
            n = _as_int(count)
            if tag and n is not None:
                counts[tag] = counts.get(tag, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def metadata_summary(meta: Mapping[str, object]) -> dict[str, object]:
    """The fields worth showing for `inspect`, with numbers and JSON decoded; only fields present in `meta`.

    Keys: `output_name`, `base_model` (see `base_model_from_metadata`), the `_SUMMARY_FIELDS` names
    (`network_module`, `network_dim`, `network_alpha`, `learning_rate`, `steps`, ...), `network_args` (dict),
    `trained_at` / `training_finished_at` (UTC ISO 8601), `dataset_dirs` (`{dir: {"n_repeats", "img_count"}}`),
    `top_tags` (`{tag: count}`, at most 20), `tag_count`, `bucket_resolutions` (`{"WxH": images}`),
    `modelspec` (`{field: value}` without the prefix; a thumbnail is reduced to its size), `num_metadata_keys`.
    """
    out: dict[str, object] = {}
    name = meta.get("ss_output_name") or meta.get("modelspec.title")
    if name:
        out["output_name"] = name
    base = base_model_from_metadata(meta)
    if base:
        out["base_model"] = base
    for key, label in _SUMMARY_FIELDS.items():
        value = meta.get(key)
        if value is None or value == "" or value == "None":
            continue
        if label in _INT_FIELDS:
            value = _as_int(value, default=value)
        elif label in _FLOAT_FIELDS:
            value = _as_float(value, default=value)
        out[label] = value
    args = _maybe_json(meta.get("ss_network_args"))
    if isinstance(args, Mapping):
        out["network_args"] = dict(args)
    for key, label in (("ss_training_started_at", "trained_at"), ("ss_training_finished_at", "training_finished_at")):
        when = _timestamp(meta.get(key))
        if when:
            out[label] = when
    dirs = _maybe_json(meta.get("ss_dataset_dirs"))
    if isinstance(dirs, Mapping) and dirs:
        out["dataset_dirs"] = dict(dirs)
    tags = tag_frequency(meta)
    if tags:
        out["tag_count"] = len(tags)
        out["top_tags"] = dict(list(tags.items())[:_TOP_TAGS])
    buckets = _bucket_resolutions(meta.get("ss_bucket_info"))
    if buckets:
        out["bucket_resolutions"] = buckets
    spec = {k[len("modelspec.") :]: v for k, v in meta.items() if k.startswith("modelspec.")}
    if "thumbnail" in spec:
        spec["thumbnail"] = f"<{len(str(spec['thumbnail']))} characters>"
    if spec:
        out["modelspec"] = spec
    if "resolution" not in out and spec.get("resolution"):
        out["resolution"] = spec["resolution"]
    out["num_metadata_keys"] = len(meta)
    return out


def _maybe_json(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, (dict, list)):
            return parsed
    return value


def _as_int(value: object, default: object = None) -> object:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    try:
        f = float(str(value))
    except ValueError:
        return default
    return int(f) if f.is_integer() else default


def _as_float(value: object, default: object = None) -> object:
    if isinstance(value, bool):
        return default
    try:
        return float(str(value))
    except ValueError:
        return default


def _timestamp(value: object) -> str | None:
    seconds = _as_float(value)
    if seconds is None:
        return None
    try:
        when = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="seconds")


def _bucket_resolutions(value: object) -> dict[str, int]:
    info = _maybe_json(value)
    buckets = info.get("buckets") if isinstance(info, Mapping) else None
    if not isinstance(buckets, Mapping):
        return {}
    out: dict[str, int] = {}
    for bucket in buckets.values():
        if not isinstance(bucket, Mapping):
            continue
        reso, count = bucket.get("resolution"), _as_int(bucket.get("count"))
        if not (isinstance(reso, (list, tuple)) and len(reso) == 2) or count is None:
            continue
        key = f"{reso[0]}x{reso[1]}"
        out[key] = out.get(key, 0) + count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
