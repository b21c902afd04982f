"""State-dict conversion between diffusers components and the original single-file checkpoint layouts.

Layouts (keys of a full original checkpoint):
    model.diffusion_model.*                  LDM (SD1/SD2) or SGM (SDXL) UNetModel
    first_stage_model.*                      LDM AutoencoderKL
    cond_stage_model.transformer.text_model.*   SD1: HF CLIPTextModel (transformers-4 spelling)
    cond_stage_model.model.*                    SD2: OpenCLIP ViT-H text tower
    conditioner.embedders.0.transformer.text_model.*   SDXL: HF CLIPTextModel (CLIP ViT-L)
    conditioner.embedders.1.model.*                    SDXL: OpenCLIP ViT-bigG text tower (with text_projection)

Renaming comes from the tables in `lora_ext.formats.layouts`; the only value changes are the VAE mid-attention
reshape (Linear [C, C] <-> 1x1 Conv2d [C, C, 1, 1]), the OpenCLIP fused q/k/v split/concat and the text_projection
transpose. Tensors keep their dtype and device; renamed tensors are the caller's objects (not copies). Conversions work
on `meta` tensors, so real-size layouts can be checked without memory.

Unknown keys are errors (ModelLoadError naming them), never silently dropped, except the documented ignorable ones
(buffers such as `position_ids`/`attn_mask`, OpenCLIP `logit_scale`, EMA copies and scheduler buffers of a full
checkpoint).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_ext import families
from lora_ext.errors import ModelLoadError
from lora_ext.formats.layouts import (
    LEGACY_VAE_ATTENTION_NAMES,
    clip_hf_to_openclip,
    hf_clip_module_path,
    hf_clip_num_layers,
    unet_module_map,
    vae_conv_linear_modules,
    vae_module_map,
)

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# per family (lora_ext.families): where its text encoders live in the original checkpoint
TE_PREFIXES: Mapping[str, tuple[str, ...]] = {f.id: f.single_file_te_prefixes for f in families.FAMILIES.values()}
_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."

# Real models (head counts per family: lora_ext.families): SD1 UNet has 8 heads everywhere; SD2/SDXL UNets and every
# CLIP text tower use 64-channel heads.
DEFAULT_UNET_HEAD_CHANNELS = 64
DEFAULT_TE_HEAD_CHANNELS = 64

_HF_IGNORED_PARAMS = ("position_ids",)  # a buffer some checkpoints carry
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


# -------------------------------------------------------------------------------------------------------- helpers


def _split_key(key: str) -> tuple[str, str]:
    module, dot, param = key.rpartition(".")
    return (module, param) if dot else ("", key)


def _raise_unknown(what: str, keys: Sequence[str]) -> None:
    shown = ", ".join(repr(k) for k in list(keys)[:5])
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    raise ModelLoadError(f"{what}: {len(keys)} key(s) do not belong to this layout: {shown}{more}")


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, str], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = _split_key(key)
        target = table.get(module)
        if target is None:
            unknown.append(key)
        else:
            out[f"{target}.{param}"] = tensor
    if unknown:
        _raise_unknown(what, unknown)
    return out


def _config_value(config: Any, name: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------- UNet


def unet_diffusers_to_ldm(sd: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM/SGM UNetModel state dict (keys relative to the UNet)."""
    return _rename(sd, unet_module_map(unet_config), "UNet (diffusers layout)")


def unet_ldm_to_diffusers(sd: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """LDM/SGM UNetModel state dict (keys relative to the UNet) -> diffusers UNet2DConditionModel state dict."""
    inverse = {v: k for k, v in unet_module_map(unet_config).items()}
    return _rename(sd, inverse, "UNet (LDM/SGM layout)")


# ----------------------------------------------------------------------------------------------------------- VAE


def _modernise_vae_key(key: str) -> str:
    """Old diffusers spelling of the mid-block attention (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    module, param = _split_key(key)
    parent, _, leaf = module.rpartition(".")
    if parent.endswith("mid_block.attentions.0") and leaf in LEGACY_VAE_ATTENTION_NAMES:
        return f"{parent}.{LEGACY_VAE_ATTENTION_NAMES[leaf]}.{param}"
    return key


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> LDM first_stage_model state dict (keys relative to the VAE).

    Mid-attention q/k/v/out weights [C, C] become 1x1 conv weights [C, C, 1, 1] (views, no copy).
    """
    table = vae_module_map(vae_config)
    reshape = vae_conv_linear_modules(vae_config)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = _split_key(_modernise_vae_key(key))
        target = table.get(module)
        if target is None:
            unknown.append(key)
            continue
        if module in reshape and param == "weight" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[f"{target}.{param}"] = tensor
    if unknown:
        _raise_unknown("VAE (diffusers layout)", unknown)
    return out


def vae_ldm_to_diffusers(sd: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """LDM first_stage_model state dict (keys relative to the VAE) -> diffusers AutoencoderKL state dict.

    Mid-attention 1x1 conv weights [C, C, 1, 1] (or conv1d [C, C, 1]) become Linear weights [C, C].
    """
    table = vae_module_map(vae_config)
    inverse = {v: k for k, v in table.items()}
    reshape = vae_conv_linear_modules(vae_config)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = _split_key(key)
        target = inverse.get(module)
        if target is None:
            unknown.append(key)
            continue
        if target in reshape and param == "weight" and tensor.ndim > 2:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[f"{target}.{param}"] = tensor
    if unknown:
        _raise_unknown("VAE (LDM layout)", unknown)
    return out


# ---------------------------------------------------------------------------------------------------------- CLIP


def normalise_hf_clip_sd(sd: Mapping[str, Tensor], num_layers: int | None = None) -> dict[str, Tensor]:
    """HF CLIP text state dict in either transformers spelling -> transformers-4 keys ('text_model.*',
    'text_projection.weight'); drops the `position_ids` buffer; unknown keys raise ModelLoadError."""
    keys = [hf_clip_module_path(k) for k in sd]
    n = hf_clip_num_layers(keys) if num_layers is None else num_layers
    modules = clip_hf_to_openclip(n)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, new_key in zip(sd, keys):
        module, param = _split_key(new_key)
        if param in _HF_IGNORED_PARAMS:
            continue
        if module not in modules or param not in ("weight", "bias"):
            unknown.append(key)
            continue
        out[new_key] = sd[key]
    if unknown:
        _raise_unknown(f"HF CLIP text encoder ({n} layers)", unknown)
    return out


def hf_clip_keys_for(sd: Mapping[str, Tensor], target_keys: Sequence[str] | Mapping[str, Any]) -> dict[str, Tensor]:
    """Re-spell HF CLIP keys ('text_model.*') the way a concrete model names them (`target_keys`, e.g. its
    state_dict()): transformers >= 5.6 CLIPTextModel drops 'text_model.', CLIPTextModelWithProjection keeps it."""
    flat = not any(k.startswith("text_model.") for k in target_keys)
    if not flat:
        return {hf_clip_module_path(k): v for k, v in sd.items()}
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_hf_to_openclip_sd(sd: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """HF CLIPTextModel(WithProjection) state dict (either transformers spelling) -> OpenCLIP text tower state dict.

    q/k/v projections are concatenated into `attn.in_proj_weight`/`in_proj_bias` [3W, W]/[3W]; `text_projection.weight`
    [P, W] becomes `text_projection` [W, P]. Keys are relative to the OpenCLIP model.
    """
    table = clip_hf_to_openclip(num_layers)
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Tensor | None]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        module, param = _split_key(hf_clip_module_path(key))
        if param in _HF_IGNORED_PARAMS:
            continue
        slot = table.get(module)
        name = None if slot is None else (slot.param if param == "weight" else slot.bias if param == "bias" else None)
        if slot is None or name is None:
            unknown.append(key)
            continue
        target = f"{slot.module}.{name}" if slot.module else name
        if slot.transposed:
            tensor = tensor.T.contiguous()
        if slot.chunk is None:
            out[target] = tensor
        else:
            fused.setdefault(target, [None, None, None])[slot.chunk] = tensor
    if unknown:
        _raise_unknown(f"HF CLIP text encoder ({num_layers} layers)", unknown)
    for target, parts in fused.items():
        if any(p is None for p in parts):
            missing = [("q", "k", "v")[i] for i, p in enumerate(parts) if p is None]
            raise ModelLoadError(f"HF CLIP text encoder: {target} lacks the {'/'.join(missing)} projection(s)")
        out[target] = torch.cat([p for p in parts if p is not None], dim=0)
    return out


def clip_openclip_to_hf_sd(
    sd: Mapping[str, Tensor], num_layers: int, *, with_projection: bool | None = None
) -> dict[str, Tensor]:
    """OpenCLIP text tower state dict -> HF CLIPTextModel(WithProjection) state dict with transformers-4 keys
    ('text_model.*', 'text_projection.weight').

    Residual blocks at index >= num_layers are dropped (SD2 keeps a 24th block that its diffusers encoder, which runs
    23 layers, does not have). with_projection: keep `text_projection` (True), drop it (False), or keep it when present
    (None). `logit_scale` and the `attn_mask` buffer are ignored. Fused in_proj tensors are split into copies.
    """
    # OpenCLIP key -> [(HF module, HF param, chunk, transposed)]: a fused in_proj feeds three HF modules
    slots: dict[str, list[tuple[str, str, int | None, bool]]] = {}
    for hf_module, slot in clip_hf_to_openclip(num_layers).items():
        slots.setdefault(slot.weight_key, []).append((hf_module, "weight", slot.chunk, slot.transposed))
        if slot.bias_key is not None:
            slots.setdefault(slot.bias_key, []).append((hf_module, "bias", slot.chunk, False))
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    dropped = 0
    for key, tensor in sd.items():
        if key in _OPENCLIP_IGNORED:
            continue
        m = _RESBLOCK.match(key)
        if m is not None and int(m.group(1)) >= num_layers:
            dropped += 1
            continue
        if key == "text_projection" and with_projection is False:
            continue
        targets = slots.get(key)
        if targets is None:
            unknown.append(key)
            continue
        for hf_module, param, chunk, transposed in targets:
            value = tensor
            if chunk is not None:
                if tensor.shape[0] % 3:
                    raise ModelLoadError(f"OpenCLIP text tower: {key} has {tensor.shape[0]} rows, not 3 x width")
                value = tensor.chunk(3, dim=0)[chunk].clone()
            if transposed:
                value = value.T.contiguous()
            out[f"{hf_module}.{param}"] = value
    if unknown:
        _raise_unknown(f"OpenCLIP text tower ({num_layers} layers)", unknown)
    if with_projection and "text_projection.weight" not in out:
        raise ModelLoadError("OpenCLIP text tower: no text_projection, but a CLIPTextModelWithProjection needs one")
    if dropped:
        logger.debug("OpenCLIP -> HF: dropped %d tensors of residual blocks >= %d", dropped, num_layers)
    return out


def _identity_resblock(openclip_sd: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    """An all-zero residual block shaped like block 0: with zero out_proj/c_proj it is exactly the identity."""
    prefix = "transformer.resblocks.0."
    return {
        f"transformer.resblocks.{index}.{k[len(prefix):]}": torch.zeros_like(v)
        for k, v in openclip_sd.items()
        if k.startswith(prefix)
    }


# ---------------------------------------------------------------------------------------------- whole checkpoints


def _te_num_layers(sd: Mapping[str, Tensor], config: Any) -> int:
    n = _config_value(config, "num_hidden_layers")
    return int(n) if n is not None else hf_clip_num_layers([hf_clip_module_path(k) for k in sd])


def diffusers_to_single_file(
    arch: str,
    unet_sd: Mapping[str, Tensor],
    unet_config: Mapping[str, Any],
    vae_sd: Mapping[str, Tensor],
    vae_config: Mapping[str, Any],
    te_sds: Sequence[Mapping[str, Tensor]],
    te_configs: Sequence[Any],
) -> dict[str, Tensor]:
    """diffusers components -> one original checkpoint state dict (A1111 / ldm / sgm key layout).

    arch: 'sd1' (te_sds = [CLIPTextModel]), 'sd2' ([CLIPTextModel]) or 'sdxl' ([CLIPTextModel,
    CLIPTextModelWithProjection]). te_configs: CLIPTextConfig objects or dicts (only num_hidden_layers is read; None
    infers it from the keys). HF keys may use either transformers spelling.
    SD2: the written OpenCLIP tower gets one extra all-zero residual block after the encoder's layers, so its shape
    matches the real checkpoints (24 blocks, of which SD2 runs 23); a zero block is the identity, and
    `single_file_to_diffusers` drops it again.
    """
    if arch not in families.FAMILIES:
        raise ModelLoadError(f"unknown architecture {arch!r}; valid: {families.valid_names()}")
    expected = len(TE_PREFIXES[arch])
    if len(te_sds) != expected or len(te_configs) != expected:
        raise ModelLoadError(
            f"{arch} needs {expected} text encoder(s); got {len(te_sds)} state dicts and {len(te_configs)} configs"
        )
    out: dict[str, Tensor] = {}
    out.update({UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(unet_sd, unet_config).items()})
    out.update({VAE_PREFIX + k: v for k, v in vae_diffusers_to_ldm(vae_sd, vae_config).items()})
    if arch == "sd1":
        te = normalise_hf_clip_sd(te_sds[0], _te_num_layers(te_sds[0], te_configs[0]))
        out.update({TE_PREFIXES["sd1"][0] + k: v for k, v in te.items()})
    elif arch == "sd2":
        n = _te_num_layers(te_sds[0], te_configs[0])
        te = clip_hf_to_openclip_sd(te_sds[0], n)
        te.update(_identity_resblock(te, n))
        out.update({TE_PREFIXES["sd2"][0] + k: v for k, v in te.items()})
    else:
        te1 = normalise_hf_clip_sd(te_sds[0], _te_num_layers(te_sds[0], te_configs[0]))
        te2 = clip_hf_to_openclip_sd(te_sds[1], _te_num_layers(te_sds[1], te_configs[1]))
        if "text_projection" not in te2:
            raise ModelLoadError("SDXL: text encoder 2 has no text_projection (use CLIPTextModelWithProjection)")
        out.update({TE_PREFIXES["sdxl"][0] + k: v for k, v in te1.items()})
        out.update({TE_PREFIXES["sdxl"][1] + k: v for k, v in te2.items()})
    return out


@dataclass
class SingleFileParts:
    """Everything needed to build diffusers components from an original checkpoint.

    unet_config/vae_config: kwargs for UNet2DConditionModel / AutoencoderKL (`Cls(**config)` or `from_config`).
    te_configs: kwargs for CLIPTextConfig, one per encoder; `architectures[0]` names the model class
    ('CLIPTextModel' or 'CLIPTextModelWithProjection'). te_sds use transformers-4 keys ('text_model.*'): see
    `hf_clip_keys_for` for transformers >= 5.6 CLIPTextModel. prediction_type: 'epsilon', 'v_prediction' or None when
    the checkpoint does not say (SD2: 768-v models are v_prediction, 512-base ones epsilon).
    """

    arch: str
    unet_config: dict
    unet_sd: dict
    vae_config: dict
    vae_sd: dict
    te_configs: list[dict]
    te_sds: list[dict]
    prediction_type: str | None


def detect_single_file_arch(sd: Mapping[str, Tensor]) -> str:
    """'sd1' | 'sd2' | 'sdxl' from the text-encoder key prefixes of an original checkpoint; ModelLoadError otherwise."""
    keys = list(sd)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in sd:
        raise ModelLoadError(
            f"not a Stable Diffusion checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight "
            "(expected an SD1.x/SD2.x/SDXL single-file model with the original key layout)"
        )

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(TE_PREFIXES["sdxl"][1]) and has(TE_PREFIXES["sdxl"][0]):
        return "sdxl"
    if has(_SDXL_REFINER_PREFIX):
        raise ModelLoadError("this is an SDXL refiner checkpoint (one OpenCLIP encoder only); it is not supported")
    if has(TE_PREFIXES["sd2"][0]):
        return "sd2"
    if has(TE_PREFIXES["sd1"][0]):
        return "sd1"
    raise ModelLoadError(
        "unrecognised checkpoint: it has a UNet but no text encoder under cond_stage_model.transformer. (SD1), "
        "cond_stage_model.model. (SD2) or conditioner.embedders.0/1 (SDXL)"
    )


def single_file_to_diffusers(
    sd: Mapping[str, Tensor],
    arch: str | None = None,
    *,
    unet_heads: int | None = None,
    unet_head_channels: int | None = None,
    te_head_channels: int | None = None,
    image_size: int | None = None,
) -> SingleFileParts:
    """Original single-file checkpoint -> diffusers configs and state dicts (see SingleFileParts).

    The architecture is detected from the key prefixes (or checked against `arch`); every config value is inferred
    from tensor shapes (channels, levels, blocks per level, transformer depth, context width, linear projections,
    addition embedding, CLIP width/layers/MLP width/vocab/positions/projection), so real-size and tiny models both load.
    Head counts cannot be read from shapes:
    - UNet: `unet_heads` (a fixed count per attention layer) or `unet_head_channels` (fixed width per head); default
      8 heads for sd1 and 64-channel heads for sd2/sdxl, as in the real models.
    - text encoders: `te_head_channels`, default 64 (CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG all use 64).
    image_size: the default generation size in pixels (sd1 512, sd2 768, sdxl 1024); sets the sample_size fields.
    Fixed, not inferable, values: norm_num_groups 32, VAE scaling factor 0.18215 (0.13025 for sdxl), SD2 upcast
    attention. A `state_dict` wrapper (.ckpt) is unwrapped; EMA weights (`model_ema.*`) and scheduler buffers are
    ignored. Raises ModelLoadError for unrecognised or unsupported checkpoints.
    """
    inner = sd.get("state_dict")
    if isinstance(inner, Mapping):
        sd = inner
    detected = detect_single_file_arch(sd)
    if arch is not None and arch != detected:
        raise ModelLoadError(f"the checkpoint looks like {detected} (text-encoder keys), not the requested {arch}")
    arch = detected
    if unet_heads is not None and unet_head_channels is not None:
        raise ModelLoadError("give either unet_heads or unet_head_channels, not both")
    if unet_heads is None and unet_head_channels is None:
        unet_heads = families.FAMILIES[arch].unet_heads
        unet_head_channels = None if unet_heads is not None else DEFAULT_UNET_HEAD_CHANNELS
    te_head_channels = te_head_channels or DEFAULT_TE_HEAD_CHANNELS
    image_size = image_size or families.FAMILIES[arch].image_size

    used = (UNET_PREFIX, VAE_PREFIX, *TE_PREFIXES[arch])
    ignored = [k for k in sd if not k.startswith(used)]
    if ignored:
        logger.debug("single file: ignoring %d keys outside the model parts, e.g. %s", len(ignored), ignored[:3])
    unet_ldm = _strip_prefix(sd, UNET_PREFIX)
    vae_ldm = {k: v for k, v in _strip_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    if not vae_ldm:
        raise ModelLoadError(f"the checkpoint has no VAE ({VAE_PREFIX}* keys); this loader needs a full checkpoint")

    te_configs: list[dict] = []
    te_sds: list[dict] = []
    if arch == "sd1":
        hf = normalise_hf_clip_sd(_strip_prefix(sd, TE_PREFIXES["sd1"][0]))
        te_configs.append(clip_config_from_hf(hf, te_head_channels))
        te_sds.append(hf)
    elif arch == "sd2":
        oc = _strip_prefix(sd, TE_PREFIXES["sd2"][0])
        cfg = clip_config_from_openclip(oc, te_head_channels, skip_last_block=True)
        te_configs.append(cfg)
        te_sds.append(clip_openclip_to_hf_sd(oc, cfg["num_hidden_layers"], with_projection=False))
    else:
        hf = normalise_hf_clip_sd(_strip_prefix(sd, TE_PREFIXES["sdxl"][0]))
        te_configs.append(clip_config_from_hf(hf, te_head_channels))
        te_sds.append(hf)
        oc = _strip_prefix(sd, TE_PREFIXES["sdxl"][1])
        cfg = clip_config_from_openclip(oc, te_head_channels, skip_last_block=False)
        if "text_projection" not in oc:
            raise ModelLoadError("SDXL checkpoint: conditioner.embedders.1.model.text_projection is missing")
        cfg["architectures"] = ["CLIPTextModelWithProjection"]
        te_configs.append(cfg)
        te_sds.append(clip_openclip_to_hf_sd(oc, cfg["num_hidden_layers"], with_projection=True))

    vae_config = vae_config_from_ldm(vae_ldm, arch=arch, image_size=image_size)
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_config = unet_config_from_ldm(
        unet_ldm,
        heads=unet_heads,
        head_channels=unet_head_channels,
        addition_pooled_dim=te_configs[1]["projection_dim"] if arch == "sdxl" else None,
        sample_size=image_size // vae_factor,
    )
    if arch == "sd2":
        unet_config["upcast_attention"] = True  # as diffusers' SD2.1 config: no effect in fp32, avoids fp16 overflow
    if "v_pred" in sd:
        prediction_type: str | None = "v_prediction"
    else:
        prediction_type = None if arch == "sd2" else "epsilon"
    return SingleFileParts(
        arch=arch,
        unet_config=unet_config,
        unet_sd=unet_ldm_to_diffusers(unet_ldm, unet_config),
        vae_config=vae_config,
        vae_sd=vae_ldm_to_diffusers(vae_ldm, vae_config),
        te_configs=te_configs,
        te_sds=te_sds,
        prediction_type=prediction_type,
    )


# ------------------------------------------------------------------------------------------- config inference


def _need(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    tensor = sd.get(key)
    if tensor is None:
        raise ModelLoadError(f"{what}: expected tensor {key!r} is missing")
    return tensor


def _check_modules(sd: Mapping[str, Tensor], expected_modules: Sequence[str], what: str) -> None:
    """The checkpoint's modules must be exactly those the inferred config builds."""
    present = {_split_key(k)[0] for k in sd}
    expected = set(expected_modules)
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise ModelLoadError(
            f"{what}: the layers do not form a supported model (inferred config would need {missing[:3]} "
            f"({len(missing)} missing); unexpected {extra[:3]} ({len(extra)} extra))"
        )


def _transformer_depths(sd: Mapping[str, Tensor]) -> dict[str, int]:
    """LDM block path ('input_blocks.4', 'middle_block', ...) -> number of transformer blocks in its child 1."""
    pattern = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")
    depths: dict[str, int] = {}
    for key in sd:
        m = pattern.match(key)
        if m is not None:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def _uniform(values: Sequence[Any], what: str) -> Any:
    if len(set(values)) != 1:
        raise ModelLoadError(f"UNet: {what} differs inside one level ({list(values)}); not expressible in diffusers")
    return values[0]


def unet_config_from_ldm(
    sd: Mapping[str, Tensor],
    *,
    heads: int | None = None,
    head_channels: int | None = None,
    addition_pooled_dim: int | None = None,
    sample_size: int = 64,
) -> dict[str, Any]:
    """UNet2DConditionModel config inferred from an LDM/SGM UNet state dict (keys relative to the UNet).

    heads (fixed count) or head_channels (fixed width per head) give the attention heads, which shapes cannot.
    addition_pooled_dim: width of the pooled text embedding in SDXL's `label_emb` input (the second encoder's
    projection_dim); the rest of that input is 6 Fourier-embedded size/crop values, giving addition_time_embed_dim.
    None assumes SDXL's 256-wide time embeddings. For module names only (key maps), any heads value will do, e.g. 1.
    """
    what = "UNet (LDM/SGM layout)"
    if (heads is None) == (head_channels is None):
        raise ModelLoadError("UNet config inference needs exactly one of heads / head_channels")
    conv_in = _need(sd, "input_blocks.0.0.weight", what)
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(_need(sd, "out.2.weight", what).shape[0])
    depths_of = _transformer_depths(sd)
    n_in = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    n_out = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k))), default=-1)

    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth) of each block
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
            continue
        conv1 = _need(sd, f"input_blocks.{i}.0.in_layers.2.weight", what)
        levels[-1].append((int(conv1.shape[0]), depths_of.get(f"input_blocks.{i}", 0)))
    if any(not level for level in levels):
        raise ModelLoadError(f"{what}: a level without residual blocks; not a supported UNet")
    channels = [_uniform([c for c, _ in level], "channel count") for level in levels]
    layers = [len(level) for level in levels]
    down_depths = [_uniform([d for _, d in level], "transformer depth") for level in levels]

    up_depths: list[int] = []
    index = 0
    for count in reversed(layers):
        up_depths.append(_uniform([depths_of.get(f"output_blocks.{index + j}", 0) for j in range(count + 1)],
                                  "transformer depth"))
        index += count + 1
    if index != n_out:
        raise ModelLoadError(f"{what}: {n_out} output blocks do not match {layers} input blocks per level")
    mid_depth = depths_of.get("middle_block", 0)
    if mid_depth == 0:
        raise ModelLoadError(f"{what}: the middle block has no transformer; not a supported UNet")

    attn_keys = [k for k in sd if k.endswith(".attn2.to_k.weight")]
    proj_in = [sd[k] for k in sd if k.endswith(".1.proj_in.weight")]
    context_dims = {int(sd[k].shape[1]) for k in attn_keys}
    if len(context_dims) != 1 or not proj_in:
        raise ModelLoadError(f"{what}: cannot determine one cross-attention width (found {sorted(context_dims)})")
    linear = {t.ndim == 2 for t in proj_in}
    if len(linear) != 1:
        raise ModelLoadError(f"{what}: mixes linear and 1x1-conv transformer projections")

    last = len(channels) - 1
    if down_depths[last] and down_depths[last] != mid_depth:
        raise ModelLoadError(f"{what}: middle-block depth {mid_depth} is not the last level's {down_depths[last]}")
    # diffusers reads the mid block's depth and heads from the last level's entries: fill them in where no attention
    tl = [d if d else 1 for d in down_depths]
    tl[last] = mid_depth
    rev = [d if d else 1 for d in up_depths]
    if up_depths[0] == 0:
        rev[0] = mid_depth

    attention_levels = [i for i, d in enumerate(down_depths) if d] + [last]
    head_dim = _attention_head_dim(channels, attention_levels, heads, head_channels, what)

    time_dim = int(_need(sd, "time_embed.0.weight", what).shape[0])
    if time_dim != 4 * model_channels:
        raise ModelLoadError(f"{what}: time embedding width {time_dim} is not 4 x {model_channels}")
    config: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "transformer_layers_per_block": tl[0] if len(set(tl)) == 1 else tl,
        "cross_attention_dim": context_dims.pop(),
        "attention_head_dim": head_dim,
        "use_linear_projection": linear.pop(),
        "norm_num_groups": 32,
    }
    if rev != list(reversed(tl)):
        config["reverse_transformer_layers_per_block"] = rev
    config.update(_addition_embedding(sd, addition_pooled_dim, what))
    _check_modules(sd, list(unet_module_map(config).values()), what)
    return config


def _attention_head_dim(channels: list[int], attention_levels: list[int], heads: int | None,
                        head_channels: int | None, what: str) -> int | list[int]:
    """diffusers' attention_head_dim: a fixed head count, or heads per level from a fixed head width."""
    if heads is not None:
        bad = [channels[i] for i in attention_levels if channels[i] % heads]
        if bad:
            raise ModelLoadError(f"{what}: channel counts {bad} are not divisible by {heads} heads; pass unet_heads")
        return heads
    assert head_channels is not None
    bad = [channels[i] for i in attention_levels if channels[i] % head_channels]
    if bad:
        raise ModelLoadError(
            f"{what}: channel counts {bad} are not multiples of {head_channels}-channel heads; pass "
            "unet_heads or unet_head_channels"
        )
    return [max(c // head_channels, 1) for c in channels]


def _addition_embedding(sd: Mapping[str, Tensor], addition_pooled_dim: int | None, what: str) -> dict[str, Any]:
    """SDXL's size/crop + pooled-text input (`label_emb.0.0`) as diffusers config fields; {} when there is none."""
    if "label_emb.weight" in sd:
        raise ModelLoadError(f"{what}: class-conditional UNet (label_emb.weight) is not supported")
    if "label_emb.0.0.weight" not in sd:
        return {}
    adm_in = int(sd["label_emb.0.0.weight"].shape[1])
    if addition_pooled_dim is None:  # not known: assume SDXL's 256-wide time embeddings
        addition_pooled_dim = adm_in - 6 * 256
    if addition_pooled_dim <= 0 or (adm_in - addition_pooled_dim) <= 0 or (adm_in - addition_pooled_dim) % 6:
        raise ModelLoadError(
            f"{what}: label_emb input width {adm_in} is not pooled text ({addition_pooled_dim}) + 6 time embeds"
        )
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": (adm_in - addition_pooled_dim) // 6,
            "projection_class_embeddings_input_dim": adm_in}


def vae_config_from_ldm(sd: Mapping[str, Tensor], *, arch: str, image_size: int) -> dict[str, Any]:
    """AutoencoderKL config inferred from an LDM first_stage_model state dict (keys relative to the VAE)."""
    what = "VAE (LDM layout)"
    conv_in = _need(sd, "encoder.conv_in.weight", what)
    levels = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
    if levels == 0:
        raise ModelLoadError(f"{what}: no encoder.down.* blocks")
    channels = [int(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", what).shape[0]) for i in range(levels)]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    latent = int(_need(sd, "post_quant_conv.weight", what).shape[0])
    embed = int(_need(sd, "quant_conv.weight", what).shape[0]) // 2
    if latent != embed:
        raise ModelLoadError(f"{what}: embed_dim {embed} differs from z_channels {latent}; not an AutoencoderKL")
    config: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(_need(sd, "decoder.conv_out.weight", what).shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": image_size,
        "scaling_factor": families.FAMILIES[arch].vae_scaling_factor,
    }
    if "encoder.mid.attn_1.q.weight" not in sd:
        # only when off: diffusers < 0.28's AutoencoderKL has no such argument (its mid block always has attention)
        config["mid_block_add_attention"] = False
    _check_modules(sd, list(vae_module_map(config).values()), what)
    return config


def _clip_config(
    *, vocab: int, width: int, positions: int, layers: int, mlp: int, projection: int, act: str, head_channels: int,
    architecture: str,
) -> dict[str, Any]:
    if width % head_channels:
        raise ModelLoadError(f"text encoder width {width} is not a multiple of {head_channels}; pass te_head_channels")
    return {
        "architectures": [architecture],
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": mlp,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": width // head_channels,
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        # The original CLIP configs' ids: with eos_token_id 2 transformers pools at argmax(input_ids), as OpenCLIP does.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def clip_config_from_hf(sd: Mapping[str, Tensor], head_channels: int = DEFAULT_TE_HEAD_CHANNELS) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an HF CLIP text state dict ('text_model.*' keys): CLIP ViT-L style, quick_gelu."""
    what = "HF CLIP text encoder"
    tok = _need(sd, "text_model.embeddings.token_embedding.weight", what)
    return _clip_config(
        vocab=int(tok.shape[0]),
        width=int(tok.shape[1]),
        positions=int(_need(sd, "text_model.embeddings.position_embedding.weight", what).shape[0]),
        layers=hf_clip_num_layers(list(sd)),
        mlp=int(_need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what).shape[0]),
        projection=int(sd["text_projection.weight"].shape[0]) if "text_projection.weight" in sd else int(tok.shape[1]),
        act="quick_gelu",
        head_channels=head_channels,
        architecture="CLIPTextModelWithProjection" if "text_projection.weight" in sd else "CLIPTextModel",
    )


def clip_config_from_openclip(
    sd: Mapping[str, Tensor], head_channels: int = DEFAULT_TE_HEAD_CHANNELS, *, skip_last_block: bool = False
) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an OpenCLIP text tower state dict (GELU). skip_last_block: SD2 runs all but the last
    residual block, so its diffusers encoder has one layer less."""
    what = "OpenCLIP text tower"
    tok = _need(sd, "token_embedding.weight", what)
    blocks = {int(m.group(1)) for k in sd if (m := _RESBLOCK.match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ModelLoadError(f"{what}: residual blocks are missing or not numbered 0..n-1")
    layers = len(blocks) - (1 if skip_last_block else 0)
    if layers < 1:
        raise ModelLoadError(f"{what}: {len(blocks)} residual block(s) is too few")
    proj = sd.get("text_projection")
    return _clip_config(
        vocab=int(tok.shape[0]),
        width=int(tok.shape[1]),
        positions=int(_need(sd, "positional_embedding", what).shape[0]),
        layers=layers,
        mlp=int(_need(sd, "transformer.resblocks.0.mlp.c_fc.weight", what).shape[0]),
        projection=int(proj.shape[1]) if proj is not None else int(tok.shape[1]),
        act="gelu",
        head_channels=head_channels,
        architecture="CLIPTextModel",
    )
