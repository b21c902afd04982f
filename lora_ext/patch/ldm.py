"""Key maps for the original module trees A1111 holds: ldm `LatentDiffusion` (SD1.x, SD2.x) and sgm `DiffusionEngine`
(SDXL). The UNet's diffusers-equivalent config is inferred from its own tensor shapes, so every ldm module gets its
diffusers name (and with it every alias a file may use)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_ext.patch.keymap import ModelAdapter, TextEncoderPart, build_adapter


def _unwrap(module: Any) -> Any:
    """A1111's prompt hijack wraps text encoders (`FrozenCLIPEmbedderWithCustomWords.wrapped`)."""
    return getattr(module, "wrapped", module)


def ldm_text_encoders(sd_model: Any) -> tuple[str, list[TextEncoderPart]]:
    """(arch, text encoder parts) of an ldm/sgm model object."""
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:  # sgm DiffusionEngine: SDXL base
        embedders = [_unwrap(e) for e in conditioner.embedders]
        hf = [e.transformer for e in embedders if isinstance(getattr(e, "transformer", None), nn.Module)]
        oc = [e.model for e in embedders if isinstance(getattr(e, "model", None), nn.Module)]
        if len(hf) != 1 or len(oc) != 1:
            raise ValueError("unsupported sgm model: expected one CLIP and one OpenCLIP text encoder (SDXL base)")
        return "sdxl", [TextEncoderPart("te1", hf[0], "hf"), TextEncoderPart("te2", oc[0], "openclip")]
    cond = _unwrap(sd_model.cond_stage_model)
    if isinstance(getattr(cond, "transformer", None), nn.Module):
        return "sd1", [TextEncoderPart("te1", cond.transformer, "hf")]
    if isinstance(getattr(cond, "model", None), nn.Module):
        return "sd2", [TextEncoderPart("te1", cond.model, "openclip")]
    raise ValueError(f"unsupported text encoder {type(cond).__name__}: expected FrozenCLIPEmbedder or "
                     "FrozenOpenCLIPEmbedder")


def adapter_for_ldm(sd_model: Any) -> ModelAdapter:
    """Key map for A1111's `shared.sd_model` (or any object with `.model.diffusion_model` and
    `.cond_stage_model` / `.conditioner.embedders`)."""
    from lora_ext.models.convert import unet_config_from_ldm

    unet = sd_model.model.diffusion_model
    arch, parts = ldm_text_encoders(sd_model)
    pooled = None
    if arch == "sdxl":
        proj = getattr(parts[1].module, "text_projection", None)
        pooled = int(proj.shape[1]) if proj is not None else None
    # head counts do not change module names: any valid value works here
    config = unet_config_from_ldm(unet.state_dict(), heads=1, addition_pooled_dim=pooled)
    return build_adapter(arch, unet, config, "ldm", parts)
