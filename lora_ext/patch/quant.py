"""Quantized weights: layers whose weight is stored packed (blocks of small integers and scales) instead of as floats.

Hosts load such weights with their own Parameter subclasses; the two kinds in use (Stable Diffusion WebUI Forge,
f2.0.1v1.10.1) are recognised by what the parameter object carries, never by importing the host:

- GGUF (`backend.operations_gguf.ParameterGGUF`, llama.cpp's block formats Q8_0, Q4_0, Q5_K, ...): the parameter has a
  `gguf_cls` (the block format, with `bake` and `dequantize_pytorch`) and reports its logical shape as `.shape`
  (`real_shape`); its data are the packed blocks. A GGUF tensor stored as F16/F32 has `gguf_cls` None: float data,
  but Forge replaces such a parameter by a plain one in the input's dtype at the layer's first forward, which a merge
  cannot follow (the new Parameter would carry the merged values and no backup would match it); it counts as "gguf"
  here too.
- bitsandbytes 4-bit (`Params4bit`, Forge's nf4/fp4): the parameter has `bnb_quantized` True and a `quant_state` with
  the logical shape; `bitsandbytes.functional.dequantize_4bit` unpacks it.

A LoRA cannot be merged into such a weight without re-quantizing it (which rounds most of a LoRA's change away and is
not reversible bit for bit), so these layers take their LoRAs as bypass (`lora_ext.patch.bypass`), the weight never
written: the layer's own (dequantizing) forward plus the LoRA's low-rank path, which equals the forward of the
dequantized weight with the delta merged in float. Algorithms that read the weight's values (DoRA, IA3, OFT, GLoRA)
get it dequantized (`dequantize`) in the layer's hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def quantized(weight: Any) -> str | None:
    """"gguf" (a GGUF parameter, packed or not) or "bnb4" for a weight that cannot take a merge, None for a plain
    tensor."""
    if hasattr(weight, "gguf_cls"):
        return "gguf"
    if getattr(weight, "bnb_quantized", False) and getattr(weight, "quant_state", None) is not None:
        return "bnb4"
    return None


def logical_shape(weight: Any) -> tuple[int, ...]:
    """The shape the layer computes with (a packed weight's data has another shape)."""
    if quantized(weight) == "bnb4":
        return tuple(int(n) for n in weight.quant_state.shape)
    return tuple(int(n) for n in weight.shape)  # GGUF parameters report their real shape here


def dequantize(weight: Any, dtype: torch.dtype) -> Tensor:
    """The weight as a float tensor of its logical shape, in `dtype`, on its device, to be read only (it may share
    memory with an unpacked weight already in `dtype`). The weight is not changed, except that a packed GGUF weight is
    first put in the block layout its host computes with ("baked"), as the host does before its first forward."""
    kind = quantized(weight)
    if kind == "gguf" and weight.gguf_cls is None:  # stored as F16/F32
        out = weight.data
    elif kind == "gguf":
        cls = weight.gguf_cls
        if not getattr(weight, "baked", True):
            cls.bake(weight)
        out = cls.dequantize_pytorch(weight)
    elif kind == "bnb4":
        from bitsandbytes.functional import dequantize_4bit  # only reachable where the host loaded such weights

        out = dequantize_4bit(weight.data, weight.quant_state)
    else:
        out = weight
    return torch.as_tensor(out).reshape(logical_shape(weight)).to(dtype)


def shape_view(state: dict[str, Any]) -> dict[str, Tensor]:
    """A state dict's tensors as empty meta tensors of their logical shapes (for shape-only inference such as a UNet
    config), so packed weights read like the layers they are."""
    return {k: torch.empty(logical_shape(v), device="meta") for k, v in state.items() if v is not None}
