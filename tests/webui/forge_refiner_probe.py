"""Run with Forge's Python (tests/webui/test_forge.py): the refiner taking over mid-generation in Forge (a byte copy
of the harness checkpoint under another name, so that Forge reloads the model at the switch), lora_ext owning the
tag. Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_refiner_probe.py OUT DATA MODELS

MODELS/Stable-diffusion must be a writable folder. Forge's `apply_refiner` loads the refiner, calls the extra
networks' `activate` again and recomputes the conditionings: the LoRA must be in the UNet that samples at every step
(checked in a CFG-denoiser callback on whichever model is loaded), the image must equal the same generation without a
refiner (the copy has the same weights), and the built-in's (which is re-activated the same way); afterwards the base
image is the base image."""

from __future__ import annotations

import os
import shutil

from forge_inprocess import probe_main, start_forge, txt2img

PROMPT, LORA = "a photo of a cat", "a photo of a cat <lora:full_lora:1>"


def run(data: str, models: str) -> dict:
    start_forge(data, models)
    import numpy as np
    import torch
    from modules import infotext_utils, script_callbacks, sd_models, shared

    src = os.environ["SD_WEBUI_CKPT"]
    copy = os.path.join(models, "Stable-diffusion", "refiner-copy.safetensors")
    shutil.copyfile(src, copy)
    sd_models.list_models()
    refiner = sd_models.get_closet_checkpoint_match("refiner-copy").title
    kw = {"refiner_checkpoint": refiner, "refiner_switch_at": 0.5}

    def unet():
        return shared.sd_model.forge_objects.unet.model.diffusion_model

    key = next(k for k, _ in unet().named_parameters() if k.endswith("attn2.to_k.weight"))
    fresh = unet().get_parameter(key).detach().clone()
    merged_at_step: list[bool] = []
    models_at_step: list[str] = []

    def step_probe(params) -> None:  # runs after ours: is the LoRA in the UNet of whichever model samples now?
        merged_at_step.append(not torch.equal(unet().get_parameter(key).detach(), fresh))
        models_at_step.append(shared.sd_model.sd_checkpoint_info.title)

    shared.opts.set("lora_ext_handle_lora_tags", True)
    base_plain = txt2img(PROMPT, steps=4)[0]
    script_callbacks.on_cfg_denoiser(step_probe)
    ours, info = txt2img(LORA, steps=4, **kw)
    script_callbacks.remove_callbacks_for_function(step_probe)
    no_refiner = txt2img(LORA, steps=4)[0]
    base_refiner = txt2img(PROMPT, steps=4, **kw)[0]
    base_again = txt2img(PROMPT, steps=4)[0]
    shared.opts.set("lora_ext_handle_lora_tags", False)
    builtin = txt2img(LORA, steps=4, **kw)[0]
    shared.opts.set("lora_ext_handle_lora_tags", True)
    params = infotext_utils.parse_generation_parameters(info)
    return {"refiner": refiner, "models_at_step": models_at_step, "merged_at_step": merged_at_step,
            "vs_no_refiner": float(np.abs(ours - no_refiner).max()), "vs_builtin": float(np.abs(ours - builtin).max()),
            "effect": float(np.abs(ours - base_refiner).mean()),
            "refiner_itself": float(np.abs(base_refiner - base_plain).max()),
            "base_again": float(np.abs(base_again - base_plain).max()),
            "infotext_refiner": params.get("Refiner"), "hashes": params.get("Lora hashes")}


if __name__ == "__main__":
    probe_main(run)
