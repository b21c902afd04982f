"""The training configuration: one dataclass, read from TOML and overridden by command-line flags.

    cfg = load_config("run.toml", overrides={"network_dim": 8})     # TOML < overrides
    cfg = config_from_argv(["--config", "run.toml", "--network_dim", "8"])

Every field of `TrainConfig` is a TOML key (top level, or inside any one-level table such as `[network]`, which is
only for grouping) and a flag `--<name>` (also spelled `--<name-with-dashes>`); booleans are `--flag` /
`--no-flag`, optional values accept `none`. Flags override the TOML. `validate` raises `ConfigError` naming the field
and saying what to do; it checks only what can be checked without the model and the images.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext import families
from lora_ext.errors import ConfigError
from lora_ext.formats.keys import EMBEDDING_NAME_RE
from lora_ext.patch.targets import PRESETS
from lora_ext.runfolder import RUN_CONFIG_FILE, default_runs_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the WebUI's): the same parser as the `tomli` package
    import tomli as tomllib

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "fp32")
DEFAULT_EPOCHS = 10
_BLOCK_NAME = re.compile(r"^(IN(0\d|1[01])|M00|OUT(0\d|1[01]))$")

# Fields with a fixed set of values (the form shows a choice; `_validate` checks them).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "network_targets": tuple(PRESETS), "optimizer": OPTIMIZERS, "lr_scheduler": LR_SCHEDULERS,
    "mixed_precision": MIXED_PRECISION, "save_precision": SAVE_PRECISION, "prediction_type": families.PREDICTION_TYPES,
}

# Fields a resumed run may change; every other field must equal the run's saved configuration.
RESUME_MUTABLE = frozenset({
    "output_dir", "output_name", "overwrite", "max_train_steps", "max_train_epochs", "save_every_n_steps",
    "save_every_n_epochs", "save_last_n", "sample_every_n_steps", "sample_every_n_epochs", "sample_prompts",
    "sample_negative", "sample_steps", "sample_cfg", "sample_seed", "sample_width", "sample_height", "save_precision",
    "description", "preferred_weight", "dataloader_workers", "resume", "dry_run", "run_dir", "runs_dir",
    "cache_latents_to_disk", "preview",
})


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help string (shown by --help) kept in the metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are shared with the dataset's `DatasetSpec` and the TOML files."""

    pretrained_model: str | None = _f(None, "base model: diffusers folder or single-file SD1.x/SD2.x/SDXL checkpoint "
                                            "(required)", section="Model and output")
    vae: str | None = _f(None, "replacement VAE (diffusers folder or file)")
    prediction_type: str | None = _f(None, "epsilon | v_prediction; none = the model's own")
    output_dir: str = _f("models/Lora", "folder the finished LoRA is written to")
    output_name: str | None = _f(None, "file stem of the LoRA (<output_dir>/<output_name>.safetensors; required)")
    run_dir: str | None = _f(None, "folder for checkpoints, samples, events; none = <runs_dir>/<output_name>")
    runs_dir: str | None = _f(None, "parent of run folders; none = 'lora_ext_runs' beside output_dir (models/Lora -> "
                                    "models/lora_ext_runs: checkpoints never land among the LoRAs)")
    overwrite: bool = _f(False, "replace an existing output file / start over in a non-empty run folder")
    save_precision: str = _f("fp16", "dtype of the exported file: fp16 | bf16 | fp32")
    description: str = _f("", "description for the <name>.json sidecar")
    preferred_weight: float = _f(1.0, "preferred weight for the <name>.json sidecar")
    train_data_dir: str | None = _f(None, "folder of images + same-name caption files (kohya 'N_name' repeat "
                                          "subfolders allowed)", section="Dataset")
    metadata_file: str | None = _f(None, "metadata.jsonl with file_name/text per image")
    instance_dir: str | None = _f(None, "DreamBooth: folder of instance images")
    instance_prompt: str | None = _f(None, "DreamBooth: caption of every instance image")
    class_dir: str | None = _f(None, "DreamBooth: folder of class (regularisation) images")
    class_prompt: str | None = _f(None, "DreamBooth: caption of every class image (also used to generate them)")
    num_class_images: int = _f(0, "DreamBooth: generate class images with the base model until there are this many")
    prior_loss_weight: float = _f(1.0, "loss weight of class images (prior preservation)")
    caption_extension: str = _f(".txt", "caption file extension (.txt or .caption)")
    require_captions: bool = _f(False, "refuse to start while an image has no caption file (instead of training it "
                                       "with the folder's fallback caption)")
    trigger_word: str = _f("", "text put in front of every caption (kept first when shuffling)")
    shuffle_caption: bool = _f(False, "shuffle comma-separated caption tags every epoch")
    keep_tokens: int = _f(0, "number of leading tags that shuffling keeps in place")
    caption_dropout: float = _f(0.0, "probability of training an image with an empty caption")
    resolution: int | None = _f(None, "training resolution (side of the square area); none = 512 SD1 / 768 SD2-v / "
                                      "1024 SDXL")
    enable_bucket: bool = _f(True, "aspect-ratio buckets")
    min_bucket_reso: int | None = _f(None, "smallest bucket side; none = resolution / 2, at most 256")
    max_bucket_reso: int | None = _f(None, "largest bucket side; none = 2 x resolution")
    bucket_reso_steps: int = _f(64, "bucket side step (multiple of 8)")
    bucket_no_upscale: bool = _f(True, "never upscale small images to fill a bucket")
    flip_aug: bool = _f(False, "random horizontal flips")
    random_crop: bool = _f(False, "random crop instead of centre crop")
    crop_zoom: float = _f(0.0, "random zoom-in up to this fraction before cropping")
    color_jitter: float = _f(0.0, "colour jitter strength in [0, 1) (0.1 = +-10% brightness/contrast/saturation)")
    background: str = _f("white", "colour transparent images are composited on")
    dataloader_workers: int = _f(0, "image-loading worker processes (0 = in the training process)")
    network_dim: int = _f(4, "LoRA rank", section="Network")
    network_alpha: float | None = _f(None, "LoRA alpha; none = rank (scale 1)")
    network_targets: str = _f("attn", "cross_kv | attn | attn_mlp | attn_mlp_conv")
    conv_dim: int | None = _f(None, "rank of 3x3 conv (LoCon) modules with attn_mlp_conv; none = network_dim")
    conv_alpha: float | None = _f(None, "alpha of conv modules; none = conv_dim")
    train_text_encoder: bool = _f(False, "also train LoRA on the text encoder(s)")
    dora: bool = _f(False, "DoRA (weight-decomposed LoRA)")
    network_dropout: float = _f(0.0, "dropout on the LoRA path during training")
    network_blocks: list = _f([], "train only these UNet blocks (IN00..IN11, M00, OUT00..OUT11); empty = all")
    pivotal_token: str = _f("", "pivotal tuning: a word whose token embedding is trained with the LoRA and saved in "
                                "the file (bundle_emb); write it in the captions or as trigger_word, and in prompts "
                                "with the tag; empty = off")
    pivotal_init: str = _f("", "pivotal tuning: words the embedding starts from (mean of their token embeddings); "
                               "empty = the word itself")
    pivotal_vectors: int = _f(1, "pivotal tuning: vectors per text encoder the word stands for")
    pivotal_lr: float | None = _f(None, "pivotal tuning: learning rate of the embedding; none = learning_rate")
    pivotal_fraction: float = _f(1.0, "pivotal tuning: share of the steps the embedding is trained in (then frozen, "
                                      "the LoRA goes on)")
    learning_rate: float = _f(1e-4, "UNet LoRA learning rate", section="Optimisation")
    text_encoder_lr: float | None = _f(None, "text-encoder LoRA learning rate; none = 0.5 x learning_rate")
    optimizer: str = _f("adamw", "adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt) | adafactor | sgd")
    optimizer_args: dict = _f({}, "extra optimizer keyword arguments (TOML table; flag: key=value ...)")
    lr_scheduler: str = _f("constant", "constant | constant_with_warmup | cosine | cosine_with_restarts | linear | "
                                       "polynomial")
    lr_warmup_steps: int = _f(0, "learning-rate warm-up steps")
    lr_num_cycles: int = _f(1, "restarts of cosine_with_restarts")
    lr_power: float = _f(1.0, "power of the polynomial scheduler")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    train_batch_size: int = _f(1, "images per batch and process")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step")
    max_train_steps: int | None = _f(None, "optimizer steps to train (give this or max_train_epochs)")
    max_train_epochs: int | None = _f(None, f"epochs to train (none and no max_train_steps = {DEFAULT_EPOCHS})")
    mixed_precision: str = _f("no", "no | fp16 (CUDA) | bf16; the base weights are stored in this dtype")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, slower)")
    cache_latents: bool = _f(False, "encode every image once (needs no random augmentation)")
    cache_latents_to_disk: bool = _f(False, "keep the latent cache in <run_dir>/cache (implies cache_latents)")
    cache_text_encoder_outputs: bool = _f(False, "encode each caption once (needs a frozen text encoder)")
    noise_offset: float = _f(0.0, "offset noise strength (e.g. 0.05)")
    min_snr_gamma: float | None = _f(None, "min-SNR loss weighting gamma (e.g. 5); none = off")
    clip_skip: int = _f(1, "SD1/SD2: use the output of the N-th last text-encoder layer (2 = penultimate)")
    seed: int = _f(42, "seed of noise, timesteps, augmentation and initialisation")
    save_every_n_steps: int | None = _f(None, "checkpoint every N optimizer steps", section="Checkpoints and samples")
    save_every_n_epochs: int | None = _f(1, "checkpoint every N epochs")
    save_last_n: int = _f(3, "checkpoints to keep")
    sample_every_n_steps: int | None = _f(None, "render sample images every N steps")
    sample_every_n_epochs: int | None = _f(None, "render sample images every N epochs")
    sample_prompts: list = _f([], "prompts of the sample images")
    sample_negative: str = _f("", "negative prompt of the sample images")
    sample_steps: int = _f(20, "sampling steps of the sample images")
    sample_cfg: float = _f(7.0, "CFG scale of the sample images")
    sample_seed: int = _f(1234, "seed of the sample images (prompt i uses seed + i)")
    sample_width: int | None = _f(None, "sample width; none = resolution")
    sample_height: int | None = _f(None, "sample height; none = resolution")
    validation_split: float = _f(0.0, "share of the training images held out to measure a fixed-noise validation "
                                      "loss (0 = none)")
    validation_dir: str | None = _f(None, "folder of validation images + captions (instead of validation_split)")
    validation_every_n_steps: int | None = _f(None, "validation loss every N steps; none = at the end of every "
                                                    "epoch")
    keep_best: bool = _f(False, "export the LoRA of the step with the lowest validation loss instead of the last")
    preview: bool = _f(True, "render <output_name>.preview.png for the LoRA's card at the end: the last sample image, "
                             "else one image of the first caption")
    dry_run: bool = _f(False, "print the dataset summary and exit (the model is not loaded)", section="Run control")
    resume: str | None = _f(None, "run folder to continue (its last checkpoint)")

    # ------------------------------------------------------------------------------------------------- derived
    @property
    def run_path(self) -> Path:
        """The run folder: `run_dir`, else <runs_dir>/<output_name> (see lora_ext.runfolder)."""
        if self.run_dir:
            return Path(self.run_dir)
        return Path(self.runs_dir or default_runs_dir(self.output_dir)) / str(self.output_name)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}.safetensors"

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else 0.5 * self.learning_rate

    @property
    def random_augmentation(self) -> list[str]:
        """Names of the enabled augmentations that change an image from epoch to epoch."""
        on = {"flip_aug": self.flip_aug, "random_crop": self.random_crop, "crop_zoom": self.crop_zoom > 0,
              "color_jitter": self.color_jitter > 0}
        return [k for k, v in on.items() if v]

    def resolved_resolution(self, arch: str, prediction_type: str = "epsilon") -> int:
        """`resolution`, or the family default (arch 'sd1' | 'sd2' | 'sdxl')."""
        if self.resolution is not None:
            return self.resolution
        return families.default_resolution(arch, prediction_type)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON and TOML friendly; None values kept)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        """The configuration as a TOML document. TOML has no null: a None whose default is None is left out, any
        other None is written as "none" (which `config_from_mapping` reads back as None)."""
        defaults = TrainConfig()
        values = {}
        for k, v in self.to_dict().items():
            if v is None:
                if getattr(defaults, k) is None:
                    continue
                v = "none"
            values[k] = v
        return dump_toml(values)

    def validate(self) -> TrainConfig:
        """Raise ConfigError for the first invalid field; return self."""
        _validate(self)
        return self


# ---------------------------------------------------------------------------------------------------- field types


@dataclass(frozen=True)
class _FieldType:
    kind: type  # bool | int | float | str | list | dict
    optional: bool


def field_types() -> dict[str, _FieldType]:
    """Field name -> (base kind, optional) from the annotations of TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, _FieldType] = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            hint = args[0]
        out[f.name] = _FieldType(typing.get_origin(hint) or hint, optional)
    return out


def field_sections() -> list[tuple[str, list[str]]]:
    """The fields in declaration order, grouped by the `section` that starts each group (what `--help` and the
    training tab show): [("Model and output", ["pretrained_model", ...]), ("Dataset", [...]), ...]."""
    out: list[tuple[str, list[str]]] = []
    for f in dataclasses.fields(TrainConfig):
        if "section" in f.metadata or not out:
            out.append((f.metadata.get("section", "Options"), []))
        out[-1][1].append(f.name)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _coerce(name: str, value: Any, ft: _FieldType, source: str) -> Any:
    """Check/convert a TOML or JSON value for field `name`; ConfigError names the field and the expected type."""
    if value is None:
        if ft.optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty; give a {ft.kind.__name__}")
    kind = ft.kind
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
        or (kind is dict and isinstance(value, dict))
    )
    if not ok:
        want = {list: "a list of strings", dict: "a table"}.get(kind, f"a {kind.__name__}")
        raise ConfigError(f"{source}: {name} must be {want}, got {value!r}")
    return float(value) if kind is float else value


def _unknown_key(name: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainConfig)], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see `python -m lora_ext.train --help`"
    return ConfigError(f"{source}: unknown option {name!r}{hint}")


# ------------------------------------------------------------------------------------------------------------ TOML


def read_toml(path: str | Path) -> dict[str, Any]:
    """The option table of a TOML file: top-level keys, and keys of one-level tables (sections only group)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc})") from exc
    return parse_toml(text, str(p))


def parse_toml(text: str, source: str = "config") -> dict[str, Any]:
    """The option table of TOML text (see `read_toml`); `source` names it in errors."""
    p = source
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    types_ = field_types()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and (key not in types_ or types_[key].kind is not dict):
            for sub, v in value.items():
                if sub in flat:
                    raise ConfigError(f"{p}: option {sub!r} is given twice (in [{key}] and elsewhere)")
                flat[sub] = v
        else:
            if key in flat:
                raise ConfigError(f"{p}: option {key!r} is given twice")
            flat[key] = value
    return flat


def config_from_mapping(values: Mapping[str, Any], source: str = "config",
                        base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from `base` (or the defaults) with `values` set; unknown keys and wrong types are errors.

    TOML has no null: the string "none" sets an optional field to None.
    """
    types_ = field_types()
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(key, source)
        ft = types_[key]
        if ft.optional and isinstance(value, str) and value.strip().lower() in ("none", "null") and ft.kind is not str:
            value = None
        setattr(cfg, key, _coerce(key, value, ft, source))
    return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (optional) with `overrides` on top. Not validated (call `.validate()`)."""
    cfg = config_from_mapping(read_toml(path), str(path)) if path is not None else TrainConfig()
    if overrides:
        cfg = config_from_mapping(overrides, "flags", base=cfg)
    return cfg


def dump_toml(values: Mapping[str, Any]) -> str:
    """A flat TOML document of str/int/float/bool/list-of-str/table values (what TrainConfig holds)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


# ------------------------------------------------------------------------------------------------------------ flags


def _flag_value(kind: type, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return None
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"optimizer_args: {item!r} is not key=value (e.g. weight_decay=0.01)")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = [json.loads(v) for v in raw.split(",")] if "," in raw and _all_json(raw) else raw
    return out


def _all_json(raw: str) -> bool:
    try:
        [json.loads(v) for v in raw.split(",")]
    except json.JSONDecodeError:
        return False
    return True


def add_config_arguments(parser: argparse.ArgumentParser | Any, groups: bool = False) -> None:
    """One flag per TrainConfig field (default SUPPRESS: only given flags land in the namespace); with `groups`, one
    argument group per config section (`parser` must then be an ArgumentParser)."""
    types_ = field_types()
    defaults = TrainConfig()
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names_ in field_sections():
        target = parser.add_argument_group(f"training options: {title.lower()}") if groups else parser
        for name in names_:
            _add_flag(target, by_name[name], types_[name], getattr(defaults, name))


def _add_flag(parser: Any, f: dataclasses.Field, ft: _FieldType, default: Any) -> None:
    names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
    shown = "none" if default is None else json.dumps(default) if isinstance(default, (list, dict)) else default
    help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse %-formats help
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if ft.kind is bool:
        parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
    elif ft.kind is list:
        parser.add_argument(*names, nargs="*", metavar="TEXT", **kw)
    elif ft.kind is dict:
        parser.add_argument(*names, nargs="*", metavar="KEY=VALUE", **kw)
    else:
        metavar = {int: "N", float: "X"}.get(ft.kind, "TEXT")
        parser.add_argument(*names, type=_flag_value(ft.kind, ft.optional), metavar=metavar, **kw)


def build_parser(prog: str = "python -m lora_ext.train") -> argparse.ArgumentParser:
    """The parser of `python -m lora_ext.train`: --config, the process options, and one flag per config field."""
    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--config TOML] [--OPTION VALUE ...] [--dry-run] [--resume RUN_DIR]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA (SD1.x / SD2.x / SDXL). Options come from --config TOML; flags override it.",
        epilog="Exit status: 0 finished, 3 cancelled (checkpoint saved; continue with --resume RUN_DIR), 2 error "
               "(the message says what to do), 1 unexpected crash. Events: <run_dir>/events.jsonl.")
    p.add_argument("--config", metavar="TOML", help="TOML file with the options (flags override it)")
    p.add_argument("--json-events", action="store_true", help="also print every event as a JSON line on stdout")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    add_config_arguments(p, groups=True)
    return p


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """Config from a parsed namespace: the --config TOML, then the flags that were given.

    `--resume RUN_DIR` without --config starts from the run's saved configuration (<run_dir>/config.toml), so
    `python -m lora_ext.train --resume RUN_DIR` alone continues a run; flags still override (e.g. more steps).
    """
    types_ = field_types()
    overrides: dict[str, Any] = {}
    for name, ft in types_.items():
        if not hasattr(ns, name):
            continue
        value = getattr(ns, name)
        overrides[name] = _parse_kv(value) if ft.kind is dict else value
    toml_path = getattr(ns, "config", None)
    if toml_path is None and overrides.get("resume"):
        saved = Path(overrides["resume"]) / RUN_CONFIG_FILE
        if saved.is_file():
            toml_path = saved
    return load_config(toml_path, overrides)


def config_from_argv(argv: Sequence[str]) -> TrainConfig:
    """Parse `python -m lora_ext.train` arguments into a (not yet validated) config."""
    return config_from_namespace(build_parser().parse_args(list(argv)))


# -------------------------------------------------------------------------------------------------------- validation


def _need(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {problem}", field=name)


def _validate(c: TrainConfig) -> None:
    _need(bool(c.pretrained_model), "pretrained_model", "required; give a diffusers folder or a .safetensors/.ckpt "
          "checkpoint (--pretrained_model PATH)")
    _need(c.dry_run or bool(c.output_name), "output_name", "required; give the file stem of the LoRA "
          "(--output_name NAME)")
    if c.output_name is not None:
        _need(c.output_name.strip() == c.output_name and c.output_name not in ("", ".", "..")
              and not any(ch in c.output_name for ch in '/\\:*?"<>|'), "output_name",
              f"{c.output_name!r} is not a plain file stem; use letters, digits, '-', '_' or '.'")
    sources = [n for n in ("train_data_dir", "metadata_file", "instance_dir") if getattr(c, n)]
    _need(len(sources) >= 1, "train_data_dir", "no dataset given; set train_data_dir, metadata_file, or instance_dir "
          "+ instance_prompt")
    _need(not c.instance_dir or bool(c.instance_prompt), "instance_prompt", "required with instance_dir")
    _need(not c.class_dir or bool(c.class_prompt) or c.num_class_images == 0, "class_prompt",
          "required to generate class images (num_class_images > 0)")
    _need(c.num_class_images >= 0, "num_class_images", "must be >= 0")
    _need(not c.num_class_images or bool(c.class_dir), "class_dir", "required with num_class_images > 0 (the "
          "generated class images are written there)")
    _need(c.prior_loss_weight >= 0, "prior_loss_weight", "must be >= 0")
    _need(c.caption_extension.startswith("."), "caption_extension", f"{c.caption_extension!r} must start with '.'")
    _need(c.keep_tokens >= 0, "keep_tokens", "must be >= 0")
    _need(0.0 <= c.caption_dropout <= 1.0, "caption_dropout", "must be between 0 and 1")
    for name in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        v = getattr(c, name)
        _need(v is None or (v > 0 and v % 8 == 0), name, f"{v} must be a positive multiple of 8")
    if c.resolution is not None and c.enable_bucket:
        _need(c.min_bucket_reso is None or c.min_bucket_reso <= c.resolution, "min_bucket_reso",
              f"--min_bucket_reso {c.min_bucket_reso} is above --resolution {c.resolution}; lower it or leave it unset "
              "(it then follows the resolution)")
        _need(c.max_bucket_reso is None or c.max_bucket_reso >= c.resolution, "max_bucket_reso",
              f"--max_bucket_reso {c.max_bucket_reso} is below --resolution {c.resolution}; raise it or leave it unset "
              "(2 x resolution)")
    _need(0.0 <= c.crop_zoom < 1.0, "crop_zoom", "must be in [0, 1)")
    _need(0.0 <= c.color_jitter < 1.0, "color_jitter", "must be in [0, 1) (0.1 = +-10% brightness/contrast/saturation)")
    _need(c.dataloader_workers >= 0, "dataloader_workers", "must be >= 0")
    _need(c.network_dim >= 1, "network_dim", "the rank must be >= 1")
    _need(c.network_alpha is None or c.network_alpha > 0, "network_alpha", "must be > 0 (or none = rank)")
    _need(c.network_targets in PRESETS, "network_targets", f"{c.network_targets!r} is not one of {', '.join(PRESETS)}")
    _need(c.conv_dim is None or c.conv_dim >= 1, "conv_dim", "must be >= 1")
    _need(c.conv_alpha is None or c.conv_alpha > 0, "conv_alpha", "must be > 0")
    _need(0.0 <= c.network_dropout < 1.0, "network_dropout", "must be in [0, 1)")
    bad_blocks = [b for b in c.network_blocks if not _BLOCK_NAME.match(b.upper())]
    _need(not bad_blocks, "network_blocks", f"{bad_blocks} are not block names; use IN00..IN11, M00, OUT00..OUT11")
    if c.pivotal_token:
        _need(bool(EMBEDDING_NAME_RE.match(c.pivotal_token)), "pivotal_token",
              f"{c.pivotal_token!r} must be one word without spaces, dots or brackets (e.g. 'hrtz')")
        _need(not c.cache_text_encoder_outputs, "cache_text_encoder_outputs",
              "cannot cache text-encoder outputs while pivotal tuning trains an embedding; turn one of them off")
    _need(c.pivotal_vectors >= 1, "pivotal_vectors", "must be >= 1")
    _need(c.pivotal_lr is None or c.pivotal_lr >= 0, "pivotal_lr", "must be >= 0 (or none = learning_rate)")
    _need(0.0 < c.pivotal_fraction <= 1.0, "pivotal_fraction", "must be in (0, 1]")
    _need(0.0 <= c.validation_split < 1.0, "validation_split", "must be in [0, 1) (0.1 = hold out 10% of the "
          "images)")
    _need(not (c.validation_split and c.validation_dir), "validation_dir", "give validation_dir or "
          "validation_split, not both")
    _need(c.validation_every_n_steps is None or c.validation_every_n_steps >= 1, "validation_every_n_steps",
          "must be >= 1 (or none = every epoch)")
    _need(not c.keep_best or bool(c.validation_split or c.validation_dir), "keep_best", "needs validation images: "
          "set validation_split (e.g. 0.1) or validation_dir")
    _need(c.learning_rate > 0, "learning_rate", "must be > 0")
    _need(c.text_encoder_lr is None or c.text_encoder_lr >= 0, "text_encoder_lr", "must be >= 0")
    _need(c.optimizer in OPTIMIZERS, "optimizer", f"{c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    _need(c.lr_scheduler in LR_SCHEDULERS, "lr_scheduler",
          f"{c.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    _need(c.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
    _need(c.lr_num_cycles >= 1, "lr_num_cycles", "must be >= 1")
    _need(c.lr_power > 0, "lr_power", "must be > 0")
    _need(c.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)")
    _need(c.train_batch_size >= 1, "train_batch_size", "must be >= 1")
    _need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    _need(c.max_train_steps is None or c.max_train_epochs is None, "max_train_steps",
          "give max_train_steps or max_train_epochs, not both")
    _need(c.max_train_steps is None or c.max_train_steps >= 1, "max_train_steps", "must be >= 1")
    _need(c.max_train_epochs is None or c.max_train_epochs >= 1, "max_train_epochs", "must be >= 1")
    _need(c.mixed_precision in MIXED_PRECISION, "mixed_precision",
          f"{c.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    _need(c.save_precision in SAVE_PRECISION, "save_precision",
          f"{c.save_precision!r} is not one of {', '.join(SAVE_PRECISION)}")
    _need(c.prediction_type is None or c.prediction_type in families.PREDICTION_TYPES, "prediction_type",
          f"{c.prediction_type!r} is not one of {', '.join(families.PREDICTION_TYPES)}")
    random_aug = c.random_augmentation
    _need(not (c.cache_latents or c.cache_latents_to_disk) or not random_aug, "cache_latents",
          f"cannot cache latents with random augmentation ({', '.join(random_aug)}); turn those off or do not cache")
    _need(not c.cache_text_encoder_outputs or not c.train_text_encoder, "cache_text_encoder_outputs",
          "cannot cache text-encoder outputs while training the text encoder; turn one of them off")
    _need(c.noise_offset >= 0, "noise_offset", "must be >= 0")
    _need(c.min_snr_gamma is None or c.min_snr_gamma > 0, "min_snr_gamma", "must be > 0 (e.g. 5) or none")
    _need(c.clip_skip >= 1, "clip_skip", "must be >= 1 (1 = last layer, 2 = penultimate)")
    for name in ("save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps", "sample_every_n_epochs"):
        v = getattr(c, name)
        _need(v is None or v >= 1, name, "must be >= 1 (or none = never)")
    _need(c.save_last_n >= 1, "save_last_n", "must be >= 1")
    _need(c.sample_steps >= 1, "sample_steps", "must be >= 1")
    for name in ("sample_width", "sample_height"):
        v = getattr(c, name)
        _need(v is None or (v > 0 and v % 8 == 0), name, f"{v} must be a positive multiple of 8")
    if (c.sample_every_n_steps or c.sample_every_n_epochs) and not c.sample_prompts:
        raise ConfigError("sample_prompts: sampling is switched on (sample_every_n_*) but no prompt is given",
                          field="sample_prompts")


def check_resume_compatible(saved: TrainConfig, new: TrainConfig, run_dir: Path) -> None:
    """A resumed run may change only `RESUME_MUTABLE` fields; anything else would not continue the same training."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if _plain(a) != _plain(b):
            raise ConfigError(f"{f.name}: the run in {run_dir} was started with {a!r}, now {b!r}; a resumed run "
                              "must keep it (start a new run with another output_name/run_dir to change it)")
