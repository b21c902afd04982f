"""Loading SD1.x / SD2.x / SDXL base models as diffusers pipelines, offline.

Two sources:
- a diffusers folder (model_index.json, unet/, vae/, ...): `from_pretrained(local_files_only=True)`;
- a single-file checkpoint in the original LDM/SGM layout (`.safetensors`, or `.ckpt`/`.pt` read with
  `torch.load(weights_only=True)`, never executing pickled code): converted by `lora_ext.models.convert`, the modules
  are built from the configs and the weights assigned; tokenizers and scheduler configs come from the shipped files
  (`lora_ext.models.assets`). Nothing touches the Hugging Face hub.

Configs of a single file are inferred from tensor shapes by `convert`; head counts, which shapes do not show, come
from the `lora_ext.single_file_hints` metadata our tiny files carry, else from a same-named `.yaml` next to the file
(the AUTOMATIC1111 convention), else the real models' values (see `conversion_hints`).

Prediction type (epsilon vs v) of a single file, first that applies: the `prediction_type` argument; file metadata
(`modelspec.prediction_type`); the sidecar yaml's `parameterization`; a `v_pred` marker tensor (reported by
`convert`, which also says epsilon for SD1/SDXL); for SD2 only, the probe AUTOMATIC1111 uses (the UNet output on a
constant input at t=999 is far below the input for v models); otherwise epsilon. SD2 v models get the shipped
`sd21-v` scheduler config (DDIM), epsilon ones `sd2-base` (PNDM).

SDXL's VAE overflows in fp16: its config keeps `force_upcast=True`, so the SDXL pipeline decodes in fp32 when the
model is loaded in fp16 (a VAE known to be fp16-safe may set it False).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_ext import families
from lora_ext.errors import LoraExtError, LoraFileError, ModelLoadError
from lora_ext.models import assets

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}

_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
_SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")


@dataclass
class LoadedPipeline:
    """A loaded base model.

    pipe: StableDiffusionPipeline or StableDiffusionXLPipeline (no safety checker, progress bar off).
    arch: 'sd1' | 'sd2' | 'sdxl'. source: the folder or file loaded. is_single_file: loaded from an LDM/SGM file.
    prediction_type: 'epsilon' | 'v_prediction' (what the scheduler was configured with).
    """

    pipe: Any
    arch: str
    source: Path
    is_single_file: bool
    prediction_type: str = "epsilon"


# --------------------------------------------------------------------------------------------------- schedulers


def scheduler_from_config(config: Mapping[str, Any]):
    """Instantiate the diffusers scheduler class named by `config['_class_name']`."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(f"scheduler config names an unknown class {name!r}")
    return cls.from_config(dict(config))


def make_scheduler(name: str, config: Mapping[str, Any], **overrides: Any):
    """A scheduler by short name, built from an existing scheduler config (betas, prediction type, offsets kept).

    Names: ddim, euler, euler_a, dpmpp_2m, pndm, lms (needs scipy), heun, ddpm. `overrides` are set on top (e.g.
    prediction_type='v_prediction'). Raises ModelLoadError for an unknown name (listing the valid ones) or a
    missing optional package.
    """
    import diffusers

    key = name.strip().lower().replace("-", "_").replace("+", "p")
    if key not in SCHEDULERS:
        raise ModelLoadError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls_name, fixed = SCHEDULERS[key]
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    try:
        return getattr(diffusers, cls_name).from_config({**base, **fixed, **overrides})
    except ImportError as exc:  # diffusers' placeholder classes raise this when an optional backend is missing
        raise ModelLoadError(f"scheduler {name!r} ({cls_name}) needs a package that is not installed: "
                             f"{' '.join(str(exc).split())}") from exc


# ------------------------------------------------------------------------------------------------------ loading


def load_pipeline(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_path: str | os.PathLike | None = None,
    scheduler: str | None = None,
    prediction_type: str | None = None,
) -> LoadedPipeline:
    """Load a diffusers folder or a single-file checkpoint as a pipeline on `device` in `dtype`.

    arch: 'sd1' | 'sd2' | 'sdxl' (or 'sd15', 'sdxl-base', ...); None = detect. A given arch that contradicts the
    model is an error. vae_path: a replacement VAE (diffusers folder, diffusers-layout or LDM-layout file).
    scheduler: short name (see `make_scheduler`); None keeps the model's. prediction_type: 'epsilon' |
    'v_prediction' (also 'v'); None = the model's own / inferred. Every failure is a ModelLoadError naming the path.
    """
    src = Path(assets.resolve_model_name(path))  # the name `shapes` selects the shipped model
    family = _normalise_family(arch) if arch is not None else None
    pred = _normalise_prediction(prediction_type) if prediction_type is not None else None
    try:
        if src.is_dir():
            loaded = _load_folder(src, family, dtype)
        elif src.is_file():
            loaded = _load_single_file(src, family, dtype, pred)
        else:
            raise ModelLoadError(f"{src}: no such file or directory")
        pipe = loaded.pipe
        if vae_path is not None:
            pipe.register_modules(vae=load_vae(vae_path, pipe.vae.config, dtype))
        if scheduler is not None or (pred is not None and pred != pipe.scheduler.config.get("prediction_type")):
            extra = {"prediction_type": pred} if pred is not None else {}
            pipe.register_modules(scheduler=make_scheduler(scheduler, pipe.scheduler.config, **extra) if scheduler
                                  else type(pipe.scheduler).from_config(pipe.scheduler.config, **extra))
        loaded.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        pipe.set_progress_bar_config(disable=True)
        if torch.device(device).type != "cpu":  # built/loaded on CPU already (and diffusers warns on fp16 -> cpu)
            pipe.to(device)
        else:
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                module = getattr(pipe, name, None)
                if module is not None and not loaded.is_single_file:
                    _reread_mapped_(module, src / name)
                if module is not None:
                    realign_cpu_tensors_(module)
    except LoraExtError as exc:
        if isinstance(exc, ModelLoadError) and str(src) in str(exc):
            raise
        raise ModelLoadError(f"{src}: {_reason(exc)}") from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError,
            json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{src}: cannot load the model ({type(exc).__name__}: {_first_line(exc)})") from exc
    logger.info("loaded %s model from %s (%s, %s)", loaded.arch, src, "single file" if loaded.is_single_file
                else "diffusers folder", loaded.prediction_type)
    return loaded


def _load_folder(src: Path, family: str | None, dtype: torch.dtype) -> LoadedPipeline:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index_file = src / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{src}: not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    cls_name = index.get("_class_name")
    unet_cfg = _read_json(src / "unet" / "config.json")
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(f"{src}: UNet takes {unet_cfg.get('in_channels')} input channels (an inpainting or "
                             "other special model); only text-to-image base models are supported")
    if cls_name in _SDXL_CLASSES:
        _check_family(src, family, "sdxl")
        pipe = StableDiffusionXLPipeline.from_pretrained(src, local_files_only=True, add_watermarker=False,
                                                         **_dtype_kwarg(dtype))
        detected = "sdxl"
    elif cls_name in _SD_CLASSES:
        detected = family_from_configs(unet_cfg, _read_json(src / "text_encoder" / "config.json"))
        _check_family(src, family, detected)
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = StableDiffusionPipeline.from_pretrained(src, local_files_only=True, **extra, **_dtype_kwarg(dtype))
    else:
        raise ModelLoadError(f"{src}: pipeline class {cls_name!r} is not supported (expected one of "
                             f"{', '.join(_SD_CLASSES + _SDXL_CLASSES)})")
    return LoadedPipeline(pipe=pipe, arch=detected, source=src, is_single_file=False)


def family_from_configs(unet_config: Mapping[str, Any], text_config: Mapping[str, Any] | None = None) -> str:
    """'sd1' | 'sd2' | 'sdxl' from diffusers configs.

    SDXL: text_time addition embedding. SD2: cross-attention width 1024, or (tiny models) an OpenCLIP-style text
    encoder (`gelu`; OpenAI CLIP uses `quick_gelu`). Otherwise SD1.
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = unet_config.get("cross_attention_dim")
    if cross == 1024:
        return "sd2"
    if cross == 768:
        return "sd1"
    if text_config is not None and text_config.get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


# -------------------------------------------------------------------------------------------------- single file


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, str metadata) of a `.safetensors` or legacy pickle checkpoint, on CPU.

    Pickles are read with `torch.load(weights_only=True)` (nested `state_dict` unwrapped). Raises ModelLoadError.
    """
    from lora_ext.formats.legacy import load_legacy

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{p}: unknown checkpoint extension {p.suffix!r}; expected one of "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder")
    try:
        if suffix == ".safetensors":
            return _read_safetensors(p)
        return load_legacy(p)
    except LoraFileError as exc:
        raise ModelLoadError(f"{p}: cannot read the checkpoint: {_reason(exc)}") from exc


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor read into its own fresh (aligned) memory, one after the other: no memory map stays behind, so the
    model costs its size once (a map's resident pages plus copies of them would cost it twice)."""
    from lora_ext.formats.safetensors_io import read_header
    from lora_ext.formats.safetensors_stream import TensorFile

    header = read_header(p)
    try:
        with TensorFile(p, header) as tf:
            return {k: tf.tensor(k) for k in tf.keys}, dict(header.metadata)
    except (OSError, ValueError) as exc:
        raise LoraFileError(p, f"the tensor data cannot be read: {exc}",
                            hint="the file is damaged or incomplete; download or export it again") from exc


def _reread_mapped_(module: torch.nn.Module, folder: Path) -> int:
    """Parameters/buffers of a model that `from_pretrained` left in its memory map at unaligned offsets: read again
    from the file into fresh aligned memory (the map's pages are never touched, so nothing is held twice); the rest
    stays mapped, as diffusers leaves it (and `realign_cpu_tensors_` clones what the files do not hold). Returns how
    many were read again."""
    from lora_ext.formats.layouts import hf_clip_module_path
    from lora_ext.formats.safetensors_io import read_header
    from lora_ext.formats.safetensors_stream import TORCH_DTYPES, TensorFiles

    where: dict[str, tuple[Path, str]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            header = read_header(f)
        except LoraFileError:
            continue
        for key in header.tensors:
            where.setdefault(hf_clip_module_path(key), (f, key))
    moved = 0
    with TensorFiles() as files, torch.no_grad():
        for tensors in (module.named_parameters(recurse=True), module.named_buffers(recurse=True)):
            for name, t in tensors:
                if t.device.type != "cpu" or not t.numel() or t.data_ptr() % 64 == 0:
                    continue
                hit = where.get(hf_clip_module_path(name))
                if hit is None:
                    continue
                tf = files.get(hit[0])
                info = tf.header.tensors[hit[1]]
                if TORCH_DTYPES.get(info.dtype) == t.dtype and tuple(info.shape) == tuple(t.shape):
                    t.data = tf.tensor(hit[1])
                    moved += 1
    return moved


def _load_single_file(src: Path, family: str | None, dtype: torch.dtype, pred: str | None) -> LoadedPipeline:
    from lora_ext.models import convert

    sd, metadata = read_checkpoint(src)
    yaml_cfg = _read_sidecar_yaml(src)
    hints = conversion_hints(src, metadata, yaml_cfg)
    parts = convert.single_file_to_diffusers(sd, arch=family, **hints)
    detected = parts.arch
    _check_family(src, family, detected)

    unet = _build_diffusers_model("UNet2DConditionModel", parts.unet_config, parts.unet_sd, src, "UNet")
    vae_config = dict(parts.vae_config)
    if detected == "sdxl":
        vae_config.setdefault("force_upcast", True)
    vae = _build_diffusers_model("AutoencoderKL", vae_config, parts.vae_sd, src, "VAE")
    te_models = [_build_text_encoder(cfg, te_sd, src, index=i) for i, (cfg, te_sd)
                 in enumerate(zip(parts.te_configs, parts.te_sds))]
    if pred is None:
        pred = _infer_prediction_type(detected, parts, metadata, yaml_cfg, unet)
    sched_cfg = assets.load_config(_scheduler_config_name(detected, pred), "scheduler")
    sched_cfg["prediction_type"] = pred
    scheduler = scheduler_from_config(sched_cfg)
    pipe = _assemble_pipeline(detected, unet, vae, te_models, scheduler)
    for module in (unet, vae, *te_models):
        cast_floating_(module, dtype)
        module.eval()
    return LoadedPipeline(pipe=pipe, arch=detected, source=src, is_single_file=True, prediction_type=pred)


def _assemble_pipeline(family: str, unet, vae, te_models: list, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizers = [assets.load_tokenizer(k) for k in families.family(family).tokenizers]
    if family == "sdxl":
        if len(te_models) != 2:
            raise ModelLoadError(f"SDXL needs two text encoders, the file gave {len(te_models)}")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te_models[0], text_encoder_2=te_models[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    if len(te_models) != 1:
        raise ModelLoadError(f"{family} needs one text encoder, the file gave {len(te_models)}")
    return StableDiffusionPipeline(vae=vae, text_encoder=te_models[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _scheduler_config_name(family: str, pred: str) -> str:
    return families.family(family).config(pred)


def conversion_hints(src: Path, metadata: Mapping[str, str], yaml_cfg: dict | None) -> dict[str, int]:
    """Keyword hints for `convert.single_file_to_diffusers` that tensor shapes cannot give (head counts, size).

    From, in order: the `lora_ext.single_file_hints` metadata JSON our tiny files carry; the sidecar yaml
    (`num_heads` / `num_head_channels` of the UNet; the text encoders' head width from the FrozenCLIPEmbedder
    `version` folder's config.json or a `<stem>.open_clip.json` next to the file); `modelspec.resolution` metadata.
    Empty when nothing says otherwise (convert then assumes the real models' values).
    """
    hints: dict[str, int] = {}
    raw = metadata.get(SINGLE_FILE_HINTS_KEY)
    if raw:
        try:
            given = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{src}: metadata {SINGLE_FILE_HINTS_KEY} is not valid JSON ({exc})") from exc
        if not isinstance(given, dict):
            raise ModelLoadError(f"{src}: metadata {SINGLE_FILE_HINTS_KEY} is not a JSON object")
        hints.update({k: int(v) for k, v in given.items() if k in _HINT_NAMES and v is not None})
        return hints
    if yaml_cfg is not None:
        hints.update(_hints_from_yaml(src, yaml_cfg))
    resolution = metadata.get("modelspec.resolution", "")
    width = resolution.lower().split("x")[0].strip()
    if width.isdigit() and "image_size" not in hints:
        hints["image_size"] = int(width)
    return hints


SINGLE_FILE_HINTS_KEY = "lora_ext.single_file_hints"
_HINT_NAMES = ("unet_heads", "unet_head_channels", "te_head_channels", "image_size")


def _hints_from_yaml(src: Path, yaml_cfg: dict) -> dict[str, int]:
    hints: dict[str, int] = {}
    params = _yaml_get(yaml_cfg, "model", "params") or {}
    unet_params = _yaml_get(params, "unet_config", "params") or _yaml_get(params, "network_config", "params") or {}
    head_channels = unet_params.get("num_head_channels", -1)
    num_heads = unet_params.get("num_heads", -1)
    if isinstance(head_channels, int) and head_channels > 0:
        hints["unet_head_channels"] = head_channels
    elif isinstance(num_heads, int) and num_heads > 0:
        hints["unet_heads"] = num_heads
    version = _yaml_get(params, "cond_stage_config", "params", "version")
    emb_models = _yaml_get(params, "conditioner_config", "params", "emb_models")
    if isinstance(emb_models, list) and emb_models:
        version = _yaml_get(emb_models[0], "params", "version") or version
    te_widths: set[int] = set()
    if isinstance(version, str) and (Path(version) / "config.json").is_file():
        te_cfg = _read_json(Path(version) / "config.json")
        te_cfg = te_cfg.get("text_config", te_cfg)
        if te_cfg.get("hidden_size") and te_cfg.get("num_attention_heads"):
            te_widths.add(int(te_cfg["hidden_size"]) // int(te_cfg["num_attention_heads"]))
    open_clip_json = src.with_name(src.stem + ".open_clip.json")
    if open_clip_json.is_file():
        text_cfg = _read_json(open_clip_json).get("text_cfg", {})
        if text_cfg.get("width") and text_cfg.get("heads"):
            te_widths.add(int(text_cfg["width"]) // int(text_cfg["heads"]))
    if len(te_widths) == 1:
        hints["te_head_channels"] = te_widths.pop()
    elif te_widths:
        raise ModelLoadError(f"{src}: the text encoders use different head widths {sorted(te_widths)}; "
                             "this loader supports one width for both")
    return hints


def _read_sidecar_yaml(src: Path) -> dict | None:
    yaml_path = src.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{yaml_path}: cannot parse the model config next to {src.name} ({exc})") from exc
    return data if isinstance(data, dict) else None


def _yaml_get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _infer_prediction_type(family: str, parts, metadata: Mapping[str, str], yaml_cfg: dict | None, unet) -> str:
    """Explicit statements first (metadata, yaml), then convert's report (a `v_pred` key), then the SD2 probe."""
    meta = (metadata.get("modelspec.prediction_type") or metadata.get("prediction_type") or "").strip()
    if meta:
        return _normalise_prediction(meta)
    if yaml_cfg is not None:
        parameterization = _yaml_get(yaml_cfg, "model", "params", "parameterization")
        if parameterization is not None:
            return "v_prediction" if str(parameterization).strip().lower() == "v" else "epsilon"
    if parts.prediction_type:
        return _normalise_prediction(parts.prediction_type)
    if family == "sd2":
        return "v_prediction" if probe_v_prediction(unet) else "epsilon"
    return "epsilon"


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """AUTOMATIC1111's SD2 test: mean(UNet(x=0.5, t=999, context=0.5) - x) < -1 means a v-prediction model.

    At t=999 the input is almost pure noise: an epsilon model predicts about the input, a v model about minus the
    clean image. Runs in fp32 (the UNet is cast there and back; fp16/bf16 -> fp32 -> same dtype is exact). Only
    meaningful for trained weights.
    """
    original = next(unet.parameters()).dtype
    cast_floating_(unet, torch.float32)
    try:
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
        context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    finally:
        cast_floating_(unet, original)
    return bool((out - x).mean().item() < -1.0)


def cast_floating_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters/buffers to `dtype` in place; no-op when they already are.

    Uses `torch.nn.Module.to` directly: diffusers' override warns about fp32-pinned modules on every dtype cast, even
    when a model pins none.
    """
    if all(t.dtype == dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()):
        return
    torch.nn.Module.to(module, dtype=dtype)


def empty_diffusers_model(cls_name: str, config: Mapping[str, Any]):
    """A diffusers model (`UNet2DConditionModel`, `AutoencoderKL`) of `config` with its parameters on `meta`."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return getattr(diffusers, cls_name).from_config(dict(config))


def empty_text_encoder(config: Mapping[str, Any]):
    """CLIPTextModel or CLIPTextModelWithProjection (by `config['architectures'][0]`) with its parameters on `meta`."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(config)
    arch_names = cfg.pop("architectures", None) or ["CLIPTextModel"]
    cls = CLIPTextModelWithProjection if arch_names[0] == "CLIPTextModelWithProjection" else CLIPTextModel
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    with init_empty_weights(include_buffers=False):
        return cls(CLIPTextConfig(**cfg))


def _build_diffusers_model(cls_name: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                           src: Path, what: str):
    model = empty_diffusers_model(cls_name, config)
    _assign_state_dict(model, dict(state_dict), src, what)
    return model


def _build_text_encoder(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], src: Path, *, index: int):
    """`empty_text_encoder(config)` holding `state_dict`."""
    from lora_ext.models.convert import hf_clip_keys_for

    model = empty_text_encoder(config)
    renamed = hf_clip_keys_for(state_dict, list(model.state_dict()))
    _assign_state_dict(model, renamed, src, f"text encoder {index + 1}")
    return model


def _assign_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], src: Path, what: str) -> None:
    own = model.state_dict()
    # buffers the model computes itself (transformers < 4.31 keeps CLIP's position_ids as a persistent buffer, and
    # checkpoints often lack it): take the model's own value
    buffers = dict(model.named_buffers())
    state_dict = dict(state_dict)
    for key in set(own) - set(state_dict):
        if key in buffers and not buffers[key].is_meta:
            state_dict[key] = buffers[key]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            problems.append(f"{len(wrong)} with wrong shape (e.g. {k}: file {tuple(state_dict[k].shape)}, "
                            f"model {tuple(own[k].shape)})")
        raise ModelLoadError(f"{src}: {what} weights do not fit the inferred config: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelLoadError(f"{src}: {what} parameters left unset: {still_meta[:3]}")


# ---------------------------------------------------------------------------------------------------------- VAE


def load_vae(path: str | os.PathLike, base_config: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a diffusers folder (or one with a vae/ subfolder) or a single file.

    Single files may use diffusers key names or the LDM layout (with or without `first_stage_model.`); the
    architecture is `base_config` (the VAE it replaces). Raises ModelLoadError.
    """
    from diffusers import AutoencoderKL

    from lora_ext.models import convert

    p = Path(path)
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{p}: not a VAE folder (no config.json)")
        return AutoencoderKL.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(dtype)).eval()
    if not p.is_file():
        raise ModelLoadError(f"{p}: VAE file not found")
    sd, _ = read_checkpoint(p)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    config = dict(base_config)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" not in sd:
        sd = convert.vae_ldm_to_diffusers(sd, config)
    vae = _build_diffusers_model("AutoencoderKL", config, sd, p, "VAE")
    cast_floating_(vae, dtype)
    return vae.eval()


# ------------------------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def realign_cpu_tensors_(module: torch.nn.Module, alignment: int = 64) -> int:
    """Copy CPU parameters/buffers that are not `alignment`-byte aligned into fresh memory; returns how many.

    Tensors read from a file live at the file's 8-byte offsets (or in its memory map); CPU kernels choose code paths
    by alignment, so the same weights would give results that differ in the last bits from weights built in memory.
    Fresh allocations are 64-byte aligned: after this, a loaded model computes bit-identically to the built one.
    """
    moved = 0
    for tensors in (module.named_parameters(recurse=True), module.named_buffers(recurse=True)):
        for _, t in tensors:
            if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
                t.data = t.data.clone()
                moved += 1
    return moved


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained` dtype keyword: diffusers renamed `torch_dtype` to `dtype` (deprecating the old name)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}



def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    return json.loads(path.read_text(encoding="utf-8"))


def _normalise_family(arch: str) -> str:
    try:
        return families.normalise_family(arch)
    except families.UnknownFamilyError as e:
        raise ModelLoadError(str(e)) from None


def _normalise_prediction(value: str) -> str:
    try:
        return families.normalise_prediction(value)
    except families.UnknownFamilyError as e:
        raise ModelLoadError(str(e)) from None


def _check_family(src: Path, wanted: str | None, detected: str) -> None:
    if wanted is not None and wanted != detected:
        raise ModelLoadError(f"{src}: asked to load it as {wanted}, but it is a {detected} model")


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, LoraFileError) else str(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
