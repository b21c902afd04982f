"""The training form as data, generated from `TrainConfig` (no gradio here): fields with their type, default, help and
choices, the sections, presets, validation with the CLI's own rules, TOML in and out, and the steps/time estimate.

The tab (lora_ext.ui.tab), the REST API (lora_ext.ui.rest) and the CLI all read the same `TrainConfig` fields, so the
form cannot drift from the command line: a new field shows up in the Advanced accordion with its help text.

    fields = form_fields()                       # every TrainConfig field, in sections
    values = apply_preset(values, "8 GB")        # a preset sets a few fields; every value stays editable
    cfg = config_from_values(values)             # ConfigError(field=...) with the message the CLI would print
    text = values_to_toml(values)                # the TOML `python -m lora_ext.train --config` reads
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_ext.errors import ConfigError
from lora_ext.models.assets import DATA_DIR
from lora_ext.shapes.concept import SAMPLE_TRAINING
from lora_ext.train.config import (
    FIELD_CHOICES,
    TrainConfig,
    config_from_mapping,
    dump_toml,
    field_sections,
    field_types,
    parse_toml,
)

# Fields the main form shows above the Advanced accordion (every other field is in it, by section).
BASIC_FIELDS = (
    "pretrained_model", "vae", "train_data_dir", "output_name", "trigger_word", "network_dim", "network_alpha",
    "network_targets", "learning_rate", "max_train_epochs", "train_batch_size", "resolution", "sample_prompts",
    "sample_every_n_epochs",
)
DREAMBOOTH_FIELDS = ("instance_dir", "instance_prompt", "class_dir", "class_prompt", "num_class_images",
                     "prior_loss_weight")
# Fields the host fills (the form does not ask for them).
HOST_FIELDS = ("output_dir", "runs_dir", "run_dir", "resume", "dry_run")


@dataclass(frozen=True)
class FormField:
    """One form input. kind: "bool" | "int" | "float" | "text" | "choice" | "lines" (a list of strings, one per line)
    | "table" (key = value lines)."""

    name: str
    kind: str
    default: Any
    help: str
    section: str
    optional: bool
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


def form_fields() -> list[FormField]:
    """Every TrainConfig field as a FormField, in declaration order (sections as `field_sections()`)."""
    types_ = field_types()
    defaults = TrainConfig()
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    out = []
    for section, names in field_sections():
        for name in names:
            ft = types_[name]
            if name in FIELD_CHOICES:
                kind = "choice"
            else:
                kind = {bool: "bool", int: "int", float: "float", str: "text", list: "lines", dict: "table"}[ft.kind]
            out.append(FormField(name, kind, getattr(defaults, name), helps[name], section, ft.optional,
                                 tuple(FIELD_CHOICES.get(name, ()))))
    return out


def field_map() -> dict[str, FormField]:
    return {f.name: f for f in form_fields()}


# ------------------------------------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    name: str
    summary: str  # one line: what it is for
    values: Mapping[str, Any]

    def describe(self) -> str:
        """The preset's choices, as shown under the preset picker."""
        return f"{self.summary}: " + ", ".join(f"{k} = {_shown(v)}" for k, v in self.values.items())


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return "none" if v is None else str(v)


# By GPU memory. Sources: sd-scripts' and the trainers' low-VRAM guides (SD1.5 LoRA in 6 GB with fp16, gradient
# checkpointing, cached latents and batch 1; SDXL LoRA needs 12 GB+ even so).
MEMORY_PRESETS = (
    Preset("6 GB", "SD1.x/SD2.x on 6 GB (SDXL needs 12 GB or more)",
           {"mixed_precision": "fp16", "gradient_checkpointing": True, "train_batch_size": 1, "cache_latents": True,
            "cache_text_encoder_outputs": False, "network_dim": 8}),
    Preset("8 GB", "SD1.x/SD2.x on 8 GB",
           {"mixed_precision": "fp16", "gradient_checkpointing": True, "train_batch_size": 2, "cache_latents": True,
            "network_dim": 16}),
    Preset("12 GB", "SD1.x comfortably, SDXL at batch 1",
           {"mixed_precision": "fp16", "gradient_checkpointing": True, "train_batch_size": 1, "cache_latents": True,
            "network_dim": 16}),
    Preset("24 GB", "any family, bigger batches",
           {"mixed_precision": "bf16", "gradient_checkpointing": False, "train_batch_size": 4, "cache_latents": False,
            "network_dim": 32}),
)
# By purpose (the dataset sizes the guides recommend).
PURPOSE_PRESETS = (
    Preset("character", "a person or character, 20-40 images",
           {"network_dim": 16, "network_alpha": 8.0, "learning_rate": 1e-4, "train_text_encoder": True,
            "text_encoder_lr": 5e-5, "max_train_epochs": 10, "flip_aug": False, "shuffle_caption": True,
            "keep_tokens": 1, "network_targets": "attn_mlp"}),
    Preset("style", "an art style, 150-200 images",
           {"network_dim": 32, "network_alpha": 16.0, "learning_rate": 1e-4, "train_text_encoder": False,
            "max_train_epochs": 6, "flip_aug": True, "shuffle_caption": True, "keep_tokens": 0,
            "network_targets": "attn_mlp_conv", "conv_dim": 8}),
    Preset("concept", "an object or concept (DreamBooth-style), 5-10 images",
           {"network_dim": 8, "network_alpha": 4.0, "learning_rate": 1e-4, "train_text_encoder": False,
            "max_train_epochs": 20, "flip_aug": True, "crop_zoom": 0.1, "network_targets": "attn_mlp"}),
    # the bundled sample on the built-in `shapes` model, the settings bench/bench_concept.py measures ("plain")
    Preset("shapes sample (CPU)", "the 16 bundled hearts on the built-in shapes model, ~4 minutes on a CPU; measured: "
           "a heart in 88% of images with the LoRA, none without, unrelated prompts still right in 86% "
           "(bench/RESULTS.md)",
           {"pretrained_model": "shapes", "train_data_dir": str(DATA_DIR / "samples" / "hearts"),
            **SAMPLE_TRAINING, "max_train_epochs": None, "mixed_precision": "no", "cache_latents": False}),
)
PRESETS = {p.name: p for p in MEMORY_PRESETS + PURPOSE_PRESETS}


def apply_preset(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`values` with the preset's fields set (latent caching is dropped again when the values use random
    augmentation, which cannot be cached)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}", field="preset")
    out = {**values, **PRESETS[name].values}
    if out.get("cache_latents") and (out.get("flip_aug") or out.get("random_crop") or (out.get("crop_zoom") or 0) > 0
                                     or (out.get("color_jitter") or 0) > 0):
        out["cache_latents"] = False
    return out


# ---------------------------------------------------------------------------------------------------- conversion

def clean_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Form values -> config values: empty text of an optional field is None, a lines field is split into lines
    (empty lines dropped), a table field given as text is parsed as `key = value` lines, integers typed into number
    boxes that return floats become ints. Unknown keys are kept (config_from_values names them)."""
    fields = field_map()
    out: dict[str, Any] = {}
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            out[key] = value
            continue
        if isinstance(value, str) and f.kind not in ("text", "choice", "lines", "table"):
            value = value.strip()
            if value == "" or value.lower() == "none":
                value = None
        blank = value is None or (isinstance(value, str) and value.strip() == "")
        if f.kind in ("text", "choice") and blank and f.optional:
            value = None
        elif f.kind == "lines" and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]
        elif f.kind == "table" and isinstance(value, str):
            value = _parse_table(key, value)
        elif f.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif f.kind in ("int", "float") and isinstance(value, str):
            value = _number(key, value, f.kind)
        if value is None and not f.optional:
            value = f.default
        out[key] = value
    return out


def _number(key: str, text: str, kind: str) -> int | float:
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not {'an integer' if kind == 'int' else 'a number'}",
                          field=key) from None


def _parse_table(key: str, text: str) -> dict[str, Any]:
    """`key = value` lines (values as TOML values: numbers, true/false, "strings") -> dict."""
    body = "\n".join(line for line in text.splitlines() if line.strip())
    if not body:
        return {}
    try:
        return parse_toml(body, key)
    except ConfigError as err:
        raise ConfigError(f"{key}: write one `name = value` per line ({err})", field=key) from None


def config_from_values(values: Mapping[str, Any], *, source: str = "form") -> TrainConfig:
    """A validated TrainConfig from form/JSON values: the same rules as the TOML file and the CLI flags
    (ConfigError, with `field` set, names the field and what to do)."""
    cfg = config_from_mapping(clean_values(values), source)
    return cfg.validate()


def values_of(config: TrainConfig) -> dict[str, Any]:
    """Form values of a config (every field)."""
    return config.to_dict()


def values_to_toml(values: Mapping[str, Any]) -> str:
    """The TOML file of the form (only values that differ from the defaults; readable by the CLI's --config)."""
    cfg = config_from_mapping(clean_values(values), "form")
    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if v != defaults[k] and k not in ("dry_run", "resume")}
    return dump_toml(changed)


def values_from_toml(text: str, source: str = "uploaded TOML") -> dict[str, Any]:
    """Form values from a TOML file's text (unknown keys and wrong types: ConfigError naming them)."""
    return config_from_mapping(parse_toml(text, source), source).to_dict()


# ------------------------------------------------------------------------------------------------------ estimate

def estimate_line(total_steps: int | None, epochs: int | None, seconds_per_step: float | None,
                  basis: str = "") -> str:
    """"total N steps / E epochs / about T" (the time from a measured speed; `basis` says where it comes from)."""
    if not total_steps:
        return "total steps: pick a dataset to count them"
    text = f"total {total_steps} steps / {epochs} epochs"
    if seconds_per_step:
        text += f" / about {format_duration(total_steps * seconds_per_step)}"
        if basis:
            text += f" ({basis})"
    else:
        text += " / time: shown once the first steps have run"
    return text


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
