"""Which layers of a model a LoRA targets, and the module names files give them: one rule each, used by training
(`lora_ext.train.network`), the synthetic files of the tests and demo (`lora_ext.patch.synth`) and everything else.

Presets (the rules of kohya sd-scripts' networks.lora, which name modules by class; "cross_kv" is Custom
Diffusion's):
    "cross_kv"       the key and value projections of cross-attention only (attn2.to_k/to_v: the layers that read
                     the text; Kumari et al. 2023, "Custom Diffusion"): the least a concept can be learned with, and
                     the least that changes for prompts without it
    "attn"           UNet attention projections to_q/to_k/to_v/to_out.0 of attn1 and attn2 (the diffusers LoRA
                     training script's default)
    "attn_mlp"       every Linear and conv inside the UNet's transformer blocks (Transformer2DModel: the attention
                     projections, proj_in/proj_out, the feed-forward): kohya's default
    "attn_mlp_conv"  plus every Linear and conv of ResnetBlock2D, Downsample2D and Upsample2D (kohya with conv_dim,
                     "LoCon"); conv_in/conv_out and the time embedding stay out, as there
The text encoders, when included, get q/k/v/out_proj and mlp fc1/fc2 of every layer (kohya's choice).

    select = selector("attn_mlp", text_encoder=False)    # (Target) -> bool
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from lora_ext import families

if TYPE_CHECKING:
    from lora_ext.patch.keymap import ModelAdapter, Target

PRESETS = ("cross_kv", "attn", "attn_mlp", "attn_mlp_conv")
CROSS_KV = ("attn2.to_k", "attn2.to_v")
ATTENTION_PROJ = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TE_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_TRANSFORMER_PART = ".attentions."  # diffusers' container of the Transformer2DModel blocks (mid_block too)
_RESNET_PARTS = (".resnets.", ".downsamplers.", ".upsamplers.")
NAMING_STYLES = ("kohya", "kohya-compvis", "peft")


def module_path(target: Target) -> str:
    """The target's diffusers/transformers module path (its key without the component)."""
    return target.key.split(":", 1)[1]


def trainable_kind(target: Target) -> bool:
    """A whole Linear or conv weight (not a q/k/v third of a fused projection): what a LoRA module can train."""
    return target.spec.kind in ("linear", "conv") and target.chunk is None


def is_attention(target: Target) -> bool:
    """UNet attention projections q/k/v/out of attn1 and attn2 ("attn")."""
    return target.component == "unet" and target.spec.kind == "linear" and module_path(target).endswith(ATTENTION_PROJ)


def is_cross_kv(target: Target) -> bool:
    """UNet cross-attention key and value projections (attn2.to_k/to_v: "cross_kv")."""
    return target.component == "unet" and target.spec.kind == "linear" and module_path(target).endswith(CROSS_KV)


def is_transformer(target: Target) -> bool:
    """Every Linear / conv inside the UNet's transformer blocks ("attn_mlp", kohya's default)."""
    return target.component == "unet" and trainable_kind(target) and _TRANSFORMER_PART in f".{module_path(target)}"


def is_locon(target: Target) -> bool:
    """`is_transformer` plus every Linear / conv of resnets, downsamplers and upsamplers ("attn_mlp_conv")."""
    if is_transformer(target):
        return True
    path = f".{module_path(target)}"
    return target.component == "unet" and trainable_kind(target) and any(p in path for p in _RESNET_PARTS)


def is_text_encoder(target: Target) -> bool:
    """Text-encoder attention q/k/v/out_proj and MLP fc1/fc2 of every layer (kohya)."""
    return target.component != "unet" and target.spec.kind == "linear" and module_path(target).endswith(TE_MODULES)


UNET_RULES: Mapping[str, Callable[[Target], bool]] = MappingProxyType(
    {"cross_kv": is_cross_kv, "attn": is_attention, "attn_mlp": is_transformer, "attn_mlp_conv": is_locon})


def check_preset(preset: str) -> str:
    if preset not in UNET_RULES:
        raise ValueError(f"unknown targets {preset!r}; expected one of {', '.join(PRESETS)}")
    return preset


def selector(preset: str, text_encoder: bool = True) -> Callable[[Target], bool]:
    """The layers of a preset: its UNet rule, and the text encoders' rule when `text_encoder`."""
    unet_rule = UNET_RULES[check_preset(preset)]

    def select(target: Target) -> bool:
        if target.component == "unet":
            return unet_rule(target)
        return text_encoder and is_text_encoder(target)

    select.__name__ = f"select_{preset}" + ("" if text_encoder else "_unet")
    return select


def file_module_name(adapter: ModelAdapter, target: Target, naming: str) -> str:
    """The module name a tool of `naming` style writes for this target:
    "kohya"          what kohya sd-scripts writes: SD1/SD2 `lora_unet_<diffusers path>`, SDXL `lora_unet_<ldm path>`,
                     text encoders `lora_te_` (one encoder) or `lora_te1_`/`lora_te2_`
    "kohya-compvis"  `lora_unet_<ldm path>` for every family (A1111/LyCORIS-style compvis names)
    "peft"           `unet.<path>`, `text_encoder[_2].<path>` (diffusers/PEFT format)"""
    if naming == "peft":
        return target.spellings["peft"]
    # sd-scripts trains SDXL on its own sgm-layout UNet, so its SDXL files carry compvis (ldm) names
    if naming == "kohya-compvis" or (naming == "kohya" and families.family(adapter.arch).sgm):
        return target.spellings["kohya_compvis"]
    if naming == "kohya":
        return target.spellings["kohya_diffusers"]
    raise ValueError(f"unknown naming style {naming!r}; expected one of {', '.join(NAMING_STYLES)}")
