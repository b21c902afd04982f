"""Run with Forge's Python (tests/webui/test_forge.py): a UNet stored in FP8 in Forge ("Diffusion in Low Bits":
float8-e4m3fn; computed in fp32 on this CPU), lora_ext loaded by Forge's script loader. Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_fp8_probe.py OUT DATA MODELS

The reference is the LoRA's effect on the same checkpoint in full precision: for each handler, the image with the
LoRA on the FP8 UNet minus the FP8 base image, against the fp32 image with the LoRA minus the fp32 base image. Ours
takes FP8 layers as bypass (the weights stay as stored: the base image afterwards is the FP8 base image bit for bit);
Forge's built-in merges into the FP8 weights (rounded to 3 mantissa bits) and restores its backups."""

from __future__ import annotations

from forge_inprocess import load_model, probe_main, start_forge, txt2img

PROMPT, LORA = "a photo of a cat", "a photo of a cat <lora:full_lora:0.8>"


def run(data: str, models: str) -> dict:
    start_forge(data, models)
    import numpy as np
    import torch
    from modules import shared

    def generate(prompt: str) -> np.ndarray:
        return txt2img(prompt)[0]

    def unet_weights() -> dict:
        unet = shared.sd_model.forge_objects.unet.model.diffusion_model
        return {k: v.detach().clone() for k, v in unet.state_dict().items()}

    load_model("Automatic")
    base32, lora32 = generate(PROMPT), generate(LORA)
    load_model("float8-e4m3fn")
    storage = str(shared.sd_model.forge_objects.unet.model.storage_dtype)
    before = unet_weights()
    shared.opts.set("lora_ext_handle_lora_tags", True)
    base8 = generate(PROMPT)
    ours = generate(LORA)
    ours_after = generate(PROMPT)
    after = unet_weights()
    shared.opts.set("lora_ext_handle_lora_tags", False)
    builtin = generate(LORA)
    builtin_after = generate(PROMPT)
    shared.opts.set("lora_ext_handle_lora_tags", True)
    effect32 = lora32 - base32

    def error(image: np.ndarray) -> float:
        return float(np.abs((image - base8) - effect32).mean())

    return {"storage": storage, "fp8_weights": sum(1 for v in before.values() if v.dtype == torch.float8_e4m3fn),
            "effect32": float(np.abs(effect32).mean()), "ours_error": error(ours),
            "builtin_error": error(builtin), "ours_effect": float(np.abs(ours - base8).mean()),
            "weights_unchanged": all(torch.equal(before[k].view(torch.uint8) if before[k].element_size() == 1
                                                 else before[k],
                                                 after[k].view(torch.uint8) if after[k].element_size() == 1
                                                 else after[k]) for k in before),
            "ours_base_again": float(np.abs(ours_after - base8).max()),
            "builtin_base_again": float(np.abs(builtin_after - base8).max())}


if __name__ == "__main__":
    probe_main(run)
