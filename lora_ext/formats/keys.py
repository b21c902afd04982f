"""Split the tensor keys of a LoRA file into (module name, normalised suffix).

Files name the same thing many ways. This module only normalises the *suffix* (which tensor of a module a key is) and
a few purely syntactic module-name variants of the diffusers/PEFT formats; which model layer a module name refers to is
decided by the key maps built from the model's own module names (`lora_ext.patch.keymap`), never by string heuristics.

Normalised suffixes are the LyCORIS/kohya names: `lora_up.weight`, `lora_down.weight`, `lora_mid.weight`, `alpha`,
`scale`, `dora_scale`, `hada_*`, `lokr_*`, `diff`, `diff_b`, `w_norm`, `b_norm`, `weight`/`on_input` (IA3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# file suffix -> normalised suffix. Matched longest first, so ".lora_A.default.weight" wins over ".weight".
_SUFFIXES: dict[str, str] = {
    # kohya / LyCORIS LoRA & LoCon
    ".lora_up.weight": "lora_up.weight",
    ".lora_down.weight": "lora_down.weight",
    ".lora_mid.weight": "lora_mid.weight",
    # PEFT / diffusers
    ".lora_B.weight": "lora_up.weight",
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.default.weight": "lora_up.weight",
    ".lora_A.default.weight": "lora_down.weight",
    ".lora_B.default_0.weight": "lora_up.weight",
    ".lora_A.default_0.weight": "lora_down.weight",
    ".lora.up.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight",
    ".lora_linear_layer.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight",
    "_lora.up.weight": "lora_up.weight",  # old diffusers attention processors: "...processor.to_q_lora.up.weight"
    "_lora.down.weight": "lora_down.weight",
    ".lora_magnitude_vector": "dora_scale",  # PEFT DoRA: per-output-row magnitude
    ".lora_magnitude_vector.default": "dora_scale",
    ".lora_magnitude_vector.default.weight": "dora_scale",
    # shared
    ".alpha": "alpha",
    ".scale": "scale",
    ".dora_scale": "dora_scale",
    # LoHa
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    # LoKr
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    # full / norm / IA3
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".w_norm": "w_norm",
    ".b_norm": "b_norm",
    ".on_input": "on_input",
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# IA3 stores its vector as "<module>.weight"; only accepted for module names with a kohya/LyCORIS prefix so that a
# stray full state dict is not mistaken for a LoRA.
_IA3_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")

_PEFT_WRAPPERS = ("base_model.model.",)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
# old diffusers text-encoder LoRA (`text_encoder_lora_state_dict` of the pre-PEFT training scripts): CLIP attention
# projections saved under the UNet processor names, "...self_attn.to_q_lora.down.weight" for "...self_attn.q_proj"
_OLD_TE_ATTN = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)$")
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

BUNDLE_PREFIX = "bundle_emb."


@dataclass(frozen=True)
class SplitKey:
    module: str  # normalised module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0..."
    suffix: str  # normalised suffix, e.g. "lora_down.weight"


def split_key(key: str) -> SplitKey | None:
    """Split one tensor key; None when the key is not a LoRA tensor we know (the caller reports it)."""
    for file_suffix in _SUFFIX_ORDER:
        if key.endswith(file_suffix) and len(key) > len(file_suffix):
            module = key[: -len(file_suffix)]
            return SplitKey(normalise_module_name(module), _SUFFIXES[file_suffix])
    if key.endswith(".weight") and key.startswith(_IA3_PREFIXES):
        return SplitKey(normalise_module_name(key[: -len(".weight")]), "weight")
    return None


def normalise_module_name(module: str) -> str:
    """Purely syntactic clean-up of diffusers/PEFT module names (the kohya underscore names pass unchanged)."""
    for wrapper in _PEFT_WRAPPERS:
        if module.startswith(wrapper):
            module = module[len(wrapper) :]
    m = _PROCESSOR.search(module)
    if m:  # old diffusers attention-processor LoRA: "...attn1.processor.to_out" -> "...attn1.to_out.0"
        proj = m.group(1)
        module = module[: m.start()] + "." + (proj + ".0" if proj == "to_out" else proj)
    m = _OLD_TE_ATTN.search(module)
    if m:  # old diffusers text-encoder LoRA: "...self_attn.to_q" -> "...self_attn.q_proj"
        module = module[: m.start()] + ".self_attn." + _OLD_TE_PROJ[m.group(1)]
    return module


def split_bundle_key(key: str) -> tuple[str, str] | None:
    """`bundle_emb.<name>.<rest>` -> (name, rest); None for other keys. Split on the first dot after the prefix."""
    if not key.startswith(BUNDLE_PREFIX):
        return None
    rest = key[len(BUNDLE_PREFIX) :]
    name, sep, tail = rest.partition(".")
    if not sep or not name or not tail:
        return None
    return name, tail
