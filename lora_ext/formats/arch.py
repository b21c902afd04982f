"""Which base-model family a LoRA file was made for: tensor shapes and key structure first, metadata second.

Evidence used (strongest first):
- keys for a second text encoder (`lora_te2_*`, `text_encoder_2.*`) -> SDXL;
- the context width that cross-attention `to_k`/`to_v` read: 768 SD1.x, 1024 SD2.x, 2048 SDXL;
- the text-encoder width: 1024 (OpenCLIP ViT-H) -> SD2.x; 768 (CLIP ViT-L) -> SD1.x only under kohya's single-encoder
  prefix `lora_te_` (a diffusers `text_encoder.` key 768 wide may as well be SDXL's first encoder: no verdict);
- UNet structure: transformer depth > 1 inside a block (`transformer_blocks_1`) only exists in SDXL;
- metadata (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`), as A1111 reads it. When shapes and metadata
  disagree, the shapes win and the evidence says so.
Tiny test models have other widths: shape rules then say nothing and structure/metadata decide, and the patcher still
refuses files whose tensors do not fit the model's layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lora_ext import families
from lora_ext.formats.algorithms import ALGORITHMS

_CONTEXT_WIDTH = {f.context_dim: f.id for f in families.FAMILIES.values()}
# single-encoder families by their encoder's width (SDXL's first encoder is as wide as SD1's: no verdict from it)
_TE_WIDTH = {f.text_widths[0]: f.id for f in families.FAMILIES.values() if len(f.text_widths) == 1}
_CROSS_KV = re.compile(r"attn2[._](to_k|to_v)$")
_TE_QPROJ = re.compile(r"^(lora_te_|text_encoder\.).*self_attn[._]q_proj$")
_SINGLE_TE = "lora_te_"  # kohya's prefix when the model has one text encoder (SDXL files use lora_te1_/lora_te2_)
_DEEP_TRANSFORMER = re.compile(r"transformer_blocks[._][1-9]")
_TE2 = re.compile(r"^(lora_te2_|text_encoder_2\.)")


@dataclass(frozen=True)
class ArchGuess:
    arch: str | None  # "sd1" | "sd2" | "sdxl" | None (unknown)
    evidence: str  # human-readable reason
    from_metadata: str | None = None  # what the metadata alone says

    @property
    def label(self) -> str:
        return families.label(self.arch, "unknown")


Shapes = Mapping[str, tuple[int, ...]]
"""One module's tensor shapes: normalised suffix -> shape."""


def _in_features(shapes: Shapes) -> int | None:
    """Input width of a module, as the registered algorithms read it from their shapes (`Algorithm.input_width`)."""
    for cls in ALGORITHMS:
        width = cls.input_width(shapes)
        if width is not None:
            return width
    return None


def _from_shapes(arch: str, evidence: str, base_from_metadata: str | None) -> ArchGuess:
    if base_from_metadata and base_from_metadata != arch:
        evidence += (f"; the metadata says {families.label(base_from_metadata)}, but tensor shapes "
                     "and key structure outrank metadata")
    return ArchGuess(arch, evidence, base_from_metadata)


def detect_arch(modules: Mapping[str, Shapes], base_from_metadata: str | None) -> ArchGuess:
    """modules: normalised module name -> {normalised suffix: shape}; base_from_metadata: what metadata says.

    Only shapes are read, so a header alone (no tensor data) is enough."""
    names = list(modules)
    if any(_TE2.match(n) for n in names):
        return _from_shapes("sdxl", "has keys for a second text encoder (lora_te2_/text_encoder_2)", base_from_metadata)
    for name, shapes in modules.items():
        if _CROSS_KV.search(name):
            width = _in_features(shapes)
            if width in _CONTEXT_WIDTH:
                arch = _CONTEXT_WIDTH[width]
                return _from_shapes(arch, f"cross-attention reads {width}-wide text features ({name})",
                                    base_from_metadata)
    unet_prefixes = ("lora_unet_", "unet.", "lycoris_", "oft_unet_")
    if any(_DEEP_TRANSFORMER.search(n) and n.startswith(unet_prefixes) for n in names):
        return _from_shapes("sdxl", "UNet blocks with more than one transformer layer", base_from_metadata)
    for name, shapes in modules.items():
        if _TE_QPROJ.match(name):
            width = _in_features(shapes)
            if width == 768 and not name.startswith(_SINGLE_TE):
                continue  # CLIP ViT-L: SD1.x's encoder, and SDXL's first one
            if width in _TE_WIDTH:
                return _from_shapes(_TE_WIDTH[width], f"text encoder is {width} wide ({name})", base_from_metadata)
    if base_from_metadata:
        return ArchGuess(base_from_metadata, "from metadata only (shapes were not conclusive)", base_from_metadata)
    return ArchGuess(None, "no shape, structure or metadata evidence", None)
