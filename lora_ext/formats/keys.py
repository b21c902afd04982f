"""Split the tensor keys of a LoRA file into (module name, normalised suffix).

Files name the same thing many ways. This module only normalises the *suffix* (which tensor of a module a key is) and
a few purely syntactic module-name variants of the diffusers/PEFT formats; which model layer a module name refers to is
decided by the key maps built from the model's own module names (`lora_ext.patch.keymap`), never by string heuristics.

Normalised suffixes are the LyCORIS/kohya names (`lora_up.weight`, `hada_w1_a`, `diff`, ...). Which file suffixes map
to them is declared by each algorithm class (`suffixes`, `guarded_suffixes`) and by `COMMON_SUFFIXES` (alpha, scale,
dora_scale); the table here is built from the registry `lora_ext.formats.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_ext.formats.algorithms import ALGORITHMS
from lora_ext.formats.algorithms.base import COMMON_SUFFIXES

# file suffix -> normalised suffix, from what each registered algorithm declares. Matched longest first, so
# ".lora_A.default.weight" wins over ".weight".
SUFFIXES: dict[str, str] = {**COMMON_SUFFIXES}
for _cls in ALGORITHMS:
    SUFFIXES.update(_cls.suffixes)
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)

# Suffixes too generic to accept after any module name (IA3 stores its vector as "<module>.weight"): only after a
# kohya/LyCORIS prefix, so that a stray full state dict is not mistaken for a LoRA.
GUARDED_SUFFIXES: dict[str, str] = {k: v for _cls in ALGORITHMS for k, v in _cls.guarded_suffixes.items()}
_GUARDED_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_", "oft_unet_")

PLAIN_SUFFIXES = frozenset(s for fs, s in SUFFIXES.items() if fs == f".{s}")
"""Normalised suffixes that `split_key` returns unchanged after a module name without dots (kohya/LyCORIS
"lora_unet_..." names): such keys may be split at their first dot without calling it (the catalogue's fast path)."""

_PEFT_WRAPPERS = ("base_model.model.",)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
# old diffusers text-encoder LoRA (`text_encoder_lora_state_dict` of the pre-PEFT training scripts): CLIP attention
# projections saved under the UNet processor names, "...self_attn.to_q_lora.down.weight" for "...self_attn.q_proj"
_OLD_TE_ATTN = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)$")
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

BUNDLE_PREFIX = "bundle_emb."
# a bundled embedding's name: one word, no dot (bundle keys split on it) and none of the prompt syntax's characters
EMBEDDING_NAME_RE = re.compile(r"^[^\s.<>:,()\[\]{}|\\/*?\"']+$")


@dataclass(frozen=True)
class SplitKey:
    module: str  # normalised module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0..."
    suffix: str  # normalised suffix, e.g. "lora_down.weight"


def split_key(key: str) -> SplitKey | None:
    """Split one tensor key; None when the key is not a LoRA tensor we know (the caller reports it)."""
    for file_suffix in _SUFFIX_ORDER:
        if key.endswith(file_suffix) and len(key) > len(file_suffix):
            module = key[: -len(file_suffix)]
            return SplitKey(normalise_module_name(module), SUFFIXES[file_suffix])
    if key.startswith(_GUARDED_PREFIXES):
        for file_suffix, suffix in GUARDED_SUFFIXES.items():
            if key.endswith(file_suffix):
                return SplitKey(normalise_module_name(key[: -len(file_suffix)]), suffix)
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
