"""Module-name tables between diffusers and the original single-file layouts (LDM/SGM UNet and VAE, OpenCLIP).

Pure naming data built from configs: nothing here instantiates a model or touches a tensor. The tables are the
single source of truth for both the state-dict converters (`lora_ext.models.convert`) and the LoRA key maps.

Conventions:
- UNet paths are relative to the UNet (no `model.diffusion_model.` prefix); VAE paths relative to the VAE (no
  `first_stage_model.` prefix); OpenCLIP paths relative to the OpenCLIP model that holds the text tower
  (`cond_stage_model.model.` in SD2, `conditioner.embedders.1.model.` in SDXL).
- A table maps the path of every module that directly owns parameters; parameter names inside a module are the same on
  both sides (`weight`, `bias`) except where an `OpenClipSlot` says otherwise.
- HF CLIP paths use the transformers-4 spelling with the `text_model.` prefix; `hf_clip_module_path` normalises the
  transformers >= 5.6 spelling of `CLIPTextModel` (which dropped that prefix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora_ext.errors import ModelLoadError

# diffusers ResnetBlock2D child -> LDM ResBlock child (UNet)
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
_UNET_RESNET_SHORTCUT = ("conv_shortcut", "skip_connection")

# Children of a BasicTransformerBlock that own parameters; the names are identical in diffusers and LDM/SGM.
_TRANSFORMER_BLOCK_CHILDREN = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "norm1",
    "norm2",
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
)

# diffusers ResnetBlock2D child -> LDM ResnetBlock child (VAE)
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_VAE_RESNET_SHORTCUT = ("conv_shortcut", "nin_shortcut")
# diffusers Attention child -> LDM AttnBlock child (VAE mid block). LDM's q/k/v/proj_out are 1x1 Conv2d, diffusers'
# are Linear: the weights differ by two trailing singleton dims, see `vae_conv_linear_modules`.
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

_UNET_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "addition_embed_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_embedding_type": "positional",
    "dual_cross_attention": False,
    "time_cond_proj_dim": None,
}

# block paths with "." or "_" between the parts (module paths, kohya's underscored file names)
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)[._](\d+)([._]|$)|^middle_block([._]|$)")
_DIFFUSERS_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)[._](\d+)[._](resnets|attentions|downsamplers|upsamplers)[._](\d+)([._]|$)"
    r"|^mid_block([._]|$)|^conv_in([._]|$)")


# --------------------------------------------------------------------------------------------------------------- UNet


def _cfg(config: Mapping[str, Any], key: str) -> Any:
    """A config value, or UNet2DConditionModel's default when the key is absent (a present None stays None)."""
    return config[key] if key in config else _UNET_DEFAULTS[key]


def _per_level(value: Any, levels: int, name: str) -> list[Any]:
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise ModelLoadError(f"UNet config: {name} has {len(values)} entries for {levels} levels")
    return values


def _depth(level_value: Any, layer: int) -> int:
    """Transformer depth of one layer from a per-level entry (an int, or a per-layer list)."""
    return int(level_value if isinstance(level_value, int) else level_value[layer])


def _add_resnet(table: dict[str, str], dpath: str, lpath: str, shortcut: bool) -> None:
    for d, ld in _UNET_RESNET:
        table[f"{dpath}.{d}"] = f"{lpath}.{ld}"
    if shortcut:
        table[f"{dpath}.{_UNET_RESNET_SHORTCUT[0]}"] = f"{lpath}.{_UNET_RESNET_SHORTCUT[1]}"


def _add_transformer(table: dict[str, str], dpath: str, lpath: str, depth: int) -> None:
    for child in ("norm", "proj_in", "proj_out"):
        table[f"{dpath}.{child}"] = f"{lpath}.{child}"
    for k in range(depth):
        for child in _TRANSFORMER_BLOCK_CHILDREN:
            table[f"{dpath}.transformer_blocks.{k}.{child}"] = f"{lpath}.transformer_blocks.{k}.{child}"


def unet_module_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet2DConditionModel module path -> LDM/SGM UNetModel module path, both relative to the UNet.

    Covers every module that directly owns parameters, for the configs of SD1.x, SD2.x (linear projections) and SDXL
    (no attention at level 0, per-level transformer depth, `label_emb` for the `text_time` addition embedding).
    Block index arithmetic: `input_blocks.0` is `conv_in`; each down level contributes `layers_per_block` blocks plus
    one downsampler (not the last level); each up level contributes `layers_per_block + 1` blocks, the last of which
    also holds the upsampler (child 1 without attention, 2 with). Raises ModelLoadError for configs the LDM/SGM
    UNetModel cannot express (other block types, `encoder_hid_dim`, dual cross-attention, ...).
    """
    down_types = list(_cfg(unet_config, "down_block_types"))
    up_types = list(_cfg(unet_config, "up_block_types"))
    channels = [int(c) for c in _cfg(unet_config, "block_out_channels")]
    levels = len(channels)
    if len(down_types) != levels or len(up_types) != levels:
        raise ModelLoadError(
            f"UNet config: {len(down_types)} down and {len(up_types)} up block types for {levels} channel levels"
        )
    for kind, types, known in (("down", down_types, _DOWN_TYPES), ("up", up_types, _UP_TYPES)):
        unknown = [t for t in types if t not in known]
        if unknown:
            raise ModelLoadError(f"UNet config: {kind} block type(s) {unknown} have no LDM/SGM equivalent")
    if _cfg(unet_config, "mid_block_type") != "UNetMidBlock2DCrossAttn":
        raise ModelLoadError(
            f"UNet config: mid_block_type {_cfg(unet_config, 'mid_block_type')!r} has no LDM/SGM equivalent"
        )
    for key in ("encoder_hid_dim", "time_cond_proj_dim"):
        if _cfg(unet_config, key) is not None:
            raise ModelLoadError(f"UNet config: {key} is set; the LDM/SGM UNetModel has no such layer")
    if _cfg(unet_config, "dual_cross_attention") or _cfg(unet_config, "time_embedding_type") != "positional":
        raise ModelLoadError("UNet config: dual cross-attention / non-positional time embedding is not LDM/SGM")

    layers = [int(n) for n in _per_level(_cfg(unet_config, "layers_per_block"), levels, "layers_per_block")]
    depths = _per_level(_cfg(unet_config, "transformer_layers_per_block"), levels, "transformer_layers_per_block")
    reverse = _cfg(unet_config, "reverse_transformer_layers_per_block")
    up_depths = list(reversed(depths)) if reverse is None else _per_level(reverse, levels, "reverse_transformer_...")

    table: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    addition = _cfg(unet_config, "addition_embed_type")
    class_embed = _cfg(unet_config, "class_embed_type")
    if addition == "text_time":
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"
    elif addition is not None:
        raise ModelLoadError(f"UNet config: addition_embed_type {addition!r} has no LDM/SGM equivalent")
    if class_embed == "projection":
        table["class_embedding.linear_1"] = "label_emb.0.0"
        table["class_embedding.linear_2"] = "label_emb.0.2"
    elif class_embed is None and _cfg(unet_config, "num_class_embeds") is not None:
        table["class_embedding"] = "label_emb"
    elif class_embed is not None:
        raise ModelLoadError(f"UNet config: class_embed_type {class_embed!r} has no LDM/SGM equivalent")

    index = 1
    for level in range(levels):
        has_attn = _DOWN_TYPES[down_types[level]]
        in_ch = channels[max(level - 1, 0)]
        for j in range(layers[level]):
            _add_resnet(table, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", in_ch != channels[level])
            if has_attn:
                _add_transformer(
                    table, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", _depth(depths[level], j)
                )
            in_ch = channels[level]
            index += 1
        if level != levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    _add_resnet(table, "mid_block.resnets.0", "middle_block.0", False)
    _add_transformer(table, "mid_block.attentions.0", "middle_block.1", _depth(depths[-1], 0))
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2", False)

    index = 0
    rev_layers = list(reversed(layers))
    for block in range(levels):
        has_attn = _UP_TYPES[up_types[block]]
        count = rev_layers[block] + 1
        for j in range(count):
            lpath = f"output_blocks.{index}"
            _add_resnet(table, f"up_blocks.{block}.resnets.{j}", f"{lpath}.0", True)  # input is concat: always wider
            if has_attn:
                _add_transformer(table, f"up_blocks.{block}.attentions.{j}", f"{lpath}.1", _depth(up_depths[block], j))
            if j == count - 1 and block != levels - 1:
                table[f"up_blocks.{block}.upsamplers.0.conv"] = f"{lpath}.{2 if has_attn else 1}.conv"
            index += 1
    return table


def ldm_unet_block(ldm_module_path: str) -> str:
    """Block label of an LDM/SGM UNet module path: 'IN00'.. for input_blocks.N, 'M00' for middle_block, 'OUT00'.. for
    output_blocks.N, 'BASE' for everything else (time_embed, label_emb, out.*). A leading '...diffusion_model.' is
    ignored."""
    path = ldm_module_path
    cut = path.find("diffusion_model.")
    if cut >= 0:
        path = path[cut + len("diffusion_model.") :]
    m = _LDM_BLOCK.match(path)
    if m is None:
        return "BASE"
    if m.group(1) is None:
        return "M00"
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"


def diffusers_unet_block(diffusers_module_path: str, layers_per_block: int = 2) -> str:
    """The same block label for a diffusers UNet path (with "." or "_" between parts): `conv_in` IN00;
    down_blocks.b.{resnets,attentions}.j IN(3b+1+j), down_blocks.b.downsamplers IN(3b+3); mid_block M00;
    up_blocks.b.{resnets,attentions}.j OUT(3b+j), up_blocks.b.upsamplers OUT(3b+2); 'BASE' for everything else.
    (3 = layers_per_block + 1: the index arithmetic of `unet_module_map`, which tests hold this to for SD1/SD2/SDXL.)"""
    m = _DIFFUSERS_BLOCK.match(diffusers_module_path)
    if m is None:
        return "BASE"
    if m.group(1) is None:
        return "M00" if diffusers_module_path.startswith("mid_block") else "IN00"
    b, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
    per = layers_per_block + 1
    if m.group(1) == "down_blocks":
        return f"IN{per * b + (layers_per_block + 1 if kind == 'downsamplers' else 1 + j):02d}"
    return f"OUT{per * b + (layers_per_block if kind == 'upsamplers' else j):02d}"


def unet_block(module_path: str) -> str | None:
    """Block label of a UNet module path in either layout (diffusers or LDM/SGM, "." or "_" between parts, relative to
    the UNet): "IN00".."IN11", "M00", "OUT00".."OUT11", or None when the path names no numbered block."""
    if _LDM_BLOCK.match(module_path):
        return ldm_unet_block(module_path)
    block = diffusers_unet_block(module_path)
    return None if block == "BASE" else block


# ---------------------------------------------------------------------------------------------------------------- VAE


def vae_module_map(vae_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> LDM AutoencoderKL (`first_stage_model`) module path.

    Decoder levels are reversed: diffusers `decoder.up_blocks.k` is LDM `decoder.up.{n-1-k}`. The mid-block attention
    projections are Linear in diffusers and 1x1 Conv2d in LDM (see `vae_conv_linear_modules`).
    """
    channels = [int(c) for c in vae_config.get("block_out_channels", (64,))]
    levels = len(channels)
    layers = int(vae_config.get("layers_per_block", 1))
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(vae_config.get(key) or [allowed] * levels)
        if len(types) != levels or any(t != allowed for t in types):
            raise ModelLoadError(f"VAE config: {key} {types} is not {levels} x {allowed} (no LDM equivalent)")
    mid_attn = bool(vae_config.get("mid_block_add_attention", True))

    table: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        for child in ("conv_in", "conv_out"):
            table[f"{part}.{child}"] = f"{part}.{child}"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for i, ldm_block in ((0, "block_1"), (1, "block_2")):
            for d, ld in _VAE_RESNET:
                table[f"{part}.mid_block.resnets.{i}.{d}"] = f"{part}.mid.{ldm_block}.{ld}"
        if mid_attn:
            for d, ld in _VAE_ATTN:
                table[f"{part}.mid_block.attentions.0.{d}"] = f"{part}.mid.attn_1.{ld}"

    for level in range(levels):
        in_ch = channels[max(level - 1, 0)]
        for j in range(layers):
            _add_vae_resnet(table, f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}",
                            in_ch != channels[level])
            in_ch = channels[level]
        if level != levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"

    rev = list(reversed(channels))
    for block in range(levels):
        ldm_level = levels - 1 - block
        in_ch = rev[max(block - 1, 0)]
        for j in range(layers + 1):
            _add_vae_resnet(table, f"decoder.up_blocks.{block}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}",
                            in_ch != rev[block])
            in_ch = rev[block]
        if block != levels - 1:
            table[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    return table


def _add_vae_resnet(table: dict[str, str], dpath: str, lpath: str, shortcut: bool) -> None:
    for d, ld in _VAE_RESNET:
        table[f"{dpath}.{d}"] = f"{lpath}.{ld}"
    if shortcut:
        table[f"{dpath}.{_VAE_RESNET_SHORTCUT[0]}"] = f"{lpath}.{_VAE_RESNET_SHORTCUT[1]}"


def vae_conv_linear_modules(vae_config: Mapping[str, Any]) -> frozenset[str]:
    """diffusers VAE module paths that are Linear in diffusers but 1x1 Conv2d in LDM: weight [C, C] <-> [C, C, 1, 1]."""
    if not vae_config.get("mid_block_add_attention", True):
        return frozenset()
    names = ("to_q", "to_k", "to_v", "to_out.0")
    return frozenset(f"{part}.mid_block.attentions.0.{name}" for part in ("encoder", "decoder") for name in names)


# Pre-0.14 diffusers spelling of the VAE mid-block attention (still found in old diffusers folders).
LEGACY_VAE_ATTENTION_NAMES: Mapping[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


# ----------------------------------------------------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class OpenClipSlot:
    """Where the parameters of one HF CLIP module live in an OpenCLIP text tower.

    module: OpenCLIP module path owning the parameter ('' for the model's own parameters, e.g. positional_embedding).
    param: the parameter holding the HF module's weight ('weight', 'in_proj_weight', 'positional_embedding', ...).
    chunk: for the fused attention input projection, which third of dim 0 (0=q, 1=k, 2=v); None = the whole parameter.
    transposed: OpenCLIP stores the transpose of the HF weight (text_projection: HF [proj, width], OpenCLIP [width,
        proj]).
    bias: the parameter holding the HF module's bias (chunked like the weight), None when the HF module has no bias.
    """

    module: str
    param: str
    chunk: int | None
    transposed: bool = False
    bias: str | None = None

    @property
    def weight_key(self) -> str:
        """State-dict key of the weight inside the OpenCLIP model."""
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def bias_key(self) -> str | None:
        """State-dict key of the bias inside the OpenCLIP model, or None."""
        if self.bias is None:
            return None
        return f"{self.module}.{self.bias}" if self.module else self.bias


def clip_hf_to_openclip(num_layers: int) -> dict[str, OpenClipSlot]:
    """HF CLIPTextModel(WithProjection) module path (transformers-4 spelling, 'text_model.' prefix) -> OpenCLIP slot,
    for a text tower with `num_layers` residual blocks. Also maps `text_projection` (CLIPTextModelWithProjection)."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    table = {
        "text_model.embeddings.token_embedding": OpenClipSlot("token_embedding", "weight", None),
        "text_model.embeddings.position_embedding": OpenClipSlot("", "positional_embedding", None),
        "text_model.final_layer_norm": OpenClipSlot("ln_final", "weight", None, bias="bias"),
        "text_projection": OpenClipSlot("", "text_projection", None, transposed=True),
    }
    for n in range(num_layers):
        hf = f"text_model.encoder.layers.{n}"
        oc = f"transformer.resblocks.{n}"
        for chunk, name in enumerate(("q_proj", "k_proj", "v_proj")):
            table[f"{hf}.self_attn.{name}"] = OpenClipSlot(f"{oc}.attn", "in_proj_weight", chunk, bias="in_proj_bias")
        for hf_child, oc_child in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            table[f"{hf}.{hf_child}"] = OpenClipSlot(f"{oc}.{oc_child}", "weight", None, bias="bias")
    return table


_HF_TEXT_TRANSFORMER_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def hf_clip_module_path(path: str) -> str:
    """Normalise a CLIPTextModel module (or parameter) path to the transformers-4 spelling with 'text_model.'.

    transformers >= 5.6 flattened CLIPTextModel ('encoder.layers.0.self_attn.q_proj'); CLIPTextModelWithProjection
    and transformers 4 keep 'text_model.encoder...'. Idempotent; 'text_projection' and paths that are not part of the
    text transformer are returned unchanged; the empty path (the flattened model itself) becomes 'text_model'.
    """
    if path == "":
        return "text_model"
    head = path.split(".", 1)[0]
    if head in _HF_TEXT_TRANSFORMER_CHILDREN:
        return f"text_model.{path}"
    return path


def hf_clip_num_layers(paths: Sequence[str]) -> int:
    """Number of encoder layers named in a collection of HF CLIP paths (either spelling); 0 if none."""
    found = [int(m.group(1)) for p in paths if (m := re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", p))]
    return max(found) + 1 if found else 0
