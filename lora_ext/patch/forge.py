"""Key maps for the module trees Stable Diffusion WebUI Forge holds (`backend/`, studied at Forge f2.0.1v1.10.1):

- UNet: `sd_model.forge_objects.unet.model.diffusion_model`, an `IntegratedUNet2DConditionModel` with the compvis
  module names of A1111's ldm/sgm UNet (`input_blocks.1.1.transformer_blocks.0.attn2.to_q`, ...), whose linear layers
  are Forge's own `ForgeOperations.Linear` (a plain module with `in_features`/`out_features`/`weight`, see
  `lora_ext.patch.keymap.is_linear`); convs and norms subclass torch's.
- Text encoders: `sd_model.forge_objects.clip.cond_stage_model`, a ModuleDict of `IntegratedCLIP` wrappers whose
  `.transformer` is a transformers CLIP text model: `clip_l` (SD1; SDXL's first encoder), `clip_g` (SDXL's second,
  with projection), `clip_h` (SD2), all in the transformers layout (no fused q/k/v).

Quantized UNets (Forge's GGUF files and its `nf4`/`fp4` storage: packed weights, `lora_ext.patch.quant`) take
their LoRAs as bypass on the layers holding such weights (never written; GGUF parameters stored as F16/F32 included);
layers with plain float Parameters are merged as usual. FP8 storage is a float dtype: those layers take LoRAs as
bypass too (`lora_ext.patch.bypass.needs_bypass`), as on A1111.

The module objects are shared by `forge_objects`, `forge_objects_original` and `forge_objects_after_applying_lora`
(Forge's ModelPatcher clones share the model), so weights patched in place are the ones every copy computes with.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_ext.patch.keymap import ModelAdapter, TextEncoderPart, build_adapter
from lora_ext.patch.quant import shape_view


def forge_text_encoders(sd_model: Any) -> tuple[str, list[TextEncoderPart]]:
    """(arch, text encoder parts) of a Forge model object; ValueError for a tree this does not know."""
    encoders = dict(sd_model.forge_objects.clip.cond_stage_model.named_children())
    names = set(encoders)

    def transformer(name: str) -> nn.Module:
        module = getattr(encoders[name], "transformer", None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"unsupported Forge text encoder {name}: no transformers model at .transformer")
        return module

    if {"clip_l", "clip_g"} <= names:
        return "sdxl", [TextEncoderPart("te1", transformer("clip_l")), TextEncoderPart("te2", transformer("clip_g"))]
    if names == {"clip_l"}:
        return "sd1", [TextEncoderPart("te1", transformer("clip_l"))]
    if names == {"clip_h"}:
        return "sd2", [TextEncoderPart("te1", transformer("clip_h"))]
    raise ValueError(f"unsupported Forge model: text encoders {sorted(names)} (lora_ext knows SD1, SD2 and SDXL)")


def adapter_for_forge(sd_model: Any) -> ModelAdapter:
    """Key map for Forge's `shared.sd_model` (a `ForgeDiffusionEngine` with `forge_objects`)."""
    from lora_ext.models.convert import unet_config_from_ldm

    unet = sd_model.forge_objects.unet.model.diffusion_model
    arch, parts = forge_text_encoders(sd_model)
    pooled = None
    if arch == "sdxl":
        proj = getattr(parts[1].module, "text_projection", None)
        pooled = int(proj.weight.shape[0]) if isinstance(proj, nn.Module) else None
    # shapes only, of the parameters (a quantized UNet's packed weights read as their layers' shapes; the quantization
    # state a 4-bit layer adds to its state dict is left out); head counts do not change module names: any valid value
    # works here
    config = unet_config_from_ldm(shape_view(dict(unet.named_parameters())), heads=1, addition_pooled_dim=pooled)
    return build_adapter(arch, unet, config, "ldm", parts)
