"""Run with Forge's Python (tests/webui/test_forge.py): a GGUF UNet in Forge (the harness checkpoint's UNet written as a
.gguf file with its transformer blocks' linear weights in Q8_0, the rest in F16, and the text encoder and VAE as a
separate "VAE / Text Encoder" module, as people run quantized checkpoints there), lora_ext loaded by Forge's script
loader. Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_gguf_probe.py OUT DATA MODELS

MODELS/Stable-diffusion must be a writable folder holding the harness checkpoint (the .gguf file is written beside it).
Measured: the LoRA's effect on the GGUF UNet against its effect on the full-precision checkpoint (as in the FP8 probe),
for ours (bypass on the Q8_0 layers, merge elsewhere), Forge's built-in merging into the weights (it re-quantizes the
merged Q8_0 weights) and Forge's built-in in its "fp16 LoRA" mode (dequantize + merge in every forward: the exact
reference); the packed weights before and after ours; the base image again after each."""

from __future__ import annotations

import os

from forge_inprocess import load_model, probe_main, start_forge, txt2img

PROMPT, LORA = "a photo of a cat", "a photo of a cat <lora:full_lora:0.8>"


def write_gguf(ckpt: str, folder: str) -> tuple[str, str, int]:
    """(path of the .gguf UNet, path of the text encoder + VAE module, number of Q8_0 tensors)."""
    import gguf  # Forge's vendored gguf-py (packages_3rdparty)
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    unet_path = os.path.join(folder, "Stable-diffusion", "sd15-unet-q8_0.gguf")
    rest_path = os.path.join(folder, "VAE", "sd15-te-vae.safetensors")
    os.makedirs(os.path.dirname(rest_path), exist_ok=True)
    writer = gguf.GGUFWriter(unet_path, arch="sd1")
    q8 = 0
    for key, value in sd.items():
        if not key.startswith("model.diffusion_model."):
            continue
        name = key[len("model.diffusion_model."):]
        array = value.to(torch.float32).numpy()
        if value.dim() == 2 and ".transformer_blocks." in name and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            q8 += 1
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith(("first_stage_model.", "cond_stage_model."))},
              rest_path)
    return unet_path, rest_path, q8


def int_shapes() -> None:
    """Forge f2.0.1's GGUF reader gives shapes of numpy.uint64 numbers, which its SD1/SDXL UNet constructor cannot take
    on numpy 1.26 (`uint64 // int` is a float64: "empty(): argument 'size' ... got numpy.float64"; the same report:
    city96/ComfyUI-GGUF#260, Haoming02/sd-webui-forge-classic#653), so such files do not load in that Forge at all.
    The probe casts them to ints after Forge reads the file (as later forks do); nothing else of Forge is changed."""
    import torch
    from backend import loader

    read = loader.load_torch_file

    def load_torch_file(*args, **kwargs):
        sd = read(*args, **kwargs)
        for value in sd.values():
            if hasattr(value, "real_shape"):
                value.real_shape = torch.Size(int(n) for n in value.real_shape)
        return sd

    loader.load_torch_file = load_torch_file


def run(data: str, models: str) -> dict:
    start_forge(data, models)
    import numpy as np
    import torch
    from modules import shared

    int_shapes()

    def generate(prompt: str) -> np.ndarray:
        return txt2img(prompt)[0]

    def unet_params() -> dict:
        unet = shared.sd_model.forge_objects.unet.model.diffusion_model
        return {k: v.detach().clone() for k, v in unet.named_parameters()}

    base32, lora32 = generate(PROMPT), generate(LORA)
    unet_file, rest_file, q8 = write_gguf(os.environ["SD_WEBUI_CKPT"], models)

    load_model("Automatic", unet_file, [rest_file])
    unet = shared.sd_model.forge_objects.unet.model
    storage = str(unet.storage_dtype)
    shared.opts.set("lora_ext_handle_lora_tags", True)
    base_q = generate(PROMPT)
    before = unet_params()  # after the first generation: Forge bakes GGUF weights when it first loads them
    packed = sum(1 for p in unet.diffusion_model.parameters() if getattr(p, "gguf_cls", None) is not None)
    ours = generate(LORA)
    ours_after = generate(PROMPT)
    after = unet_params()
    shared.opts.set("lora_ext_handle_lora_tags", False)
    baked = generate(LORA)
    baked_after = generate(PROMPT)
    load_model("Automatic (fp16 LoRA)")
    online = generate(LORA)
    online_base = generate(PROMPT)
    shared.opts.set("lora_ext_handle_lora_tags", True)
    ours_online_setting = generate(LORA)
    effect32 = lora32 - base32

    def error(image: np.ndarray) -> float:
        return float(np.abs((image - base_q) - effect32).mean())

    return {"storage": storage, "q8_tensors_written": q8, "packed_params": packed,
            "effect32": float(np.abs(effect32).mean()), "ours_effect": float(np.abs(ours - base_q).mean()),
            "ours_error": error(ours), "baked_error": error(baked), "online_error": error(online),
            "ours_vs_online_mean": float(np.abs(ours - online).mean()),
            "ours_vs_online_max": float(np.abs(ours - online).max()),
            "ours_same_under_fp16_lora_setting": float(np.abs(ours_online_setting - ours).max()),
            "online_base_vs_base": float(np.abs(online_base - base_q).max()),
            "weights_unchanged": before.keys() == after.keys() and all(torch.equal(v, after[k])
                                                                       for k, v in before.items()),
            "ours_base_again": float(np.abs(ours_after - base_q).max()),
            "baked_base_again": float(np.abs(baked_after - base_q).max())}


if __name__ == "__main__":
    probe_main(run)
