"""Run with Forge's Python (tests/webui/test_forge.py) with SD_WEBUI_CKPT naming a full-size SDXL- or SD2-shaped
checkpoint (tests/webui/make_full_ckpt.py): lora_ext loaded by Forge's script loader, against Forge's built-in in the
same process (the setting hands the tag over). Writes OUT/result.json.

    SD_WEBUI_CKPT=CKPT $SD_WEBUI_PYTHON tests/webui/forge_full_probe.py OUT DATA MODELS LORA_NAME

For the LoRA at 0.8, text encoders only and UNet only: ours and the built-in's images (max difference), the effect
(mean difference to the base image), "Lora hashes"; the base image after ours (bit for bit) and after the built-in."""

from __future__ import annotations

from forge_inprocess import probe_main, start_forge, txt2img

PROMPT = "a photo of a cat"


def run(data: str, models: str, name: str) -> dict:
    start_forge(data, models)
    import numpy as np
    from modules import infotext_utils, shared

    def generate(prompt: str) -> tuple[np.ndarray, str]:
        image, info = txt2img(prompt)
        return image, str(infotext_utils.parse_generation_parameters(info).get("Lora hashes", ""))

    shared.opts.set("live_previews_enable", False)  # else SDXL needs vaeapprox-sdxl.pt, downloaded from GitHub
    model = shared.sd_model
    arch = type(model).__name__
    encoders = sorted(dict(model.forge_objects.clip.cond_stage_model.named_children()))
    tags = {"both": f"<lora:{name}:0.8>", "te": f"<lora:{name}:0.8:0>", "unet": f"<lora:{name}:0:0.8>"}
    rows: dict = {}
    shared.opts.set("lora_ext_handle_lora_tags", True)
    base, _ = generate(PROMPT)
    for key, tag in tags.items():
        ours, hashes = generate(f"{PROMPT} {tag}")
        rows[key] = {"ours_hashes": hashes, "ours_effect": float(np.abs(ours - base).mean())}
        rows[key]["_ours"] = ours
    ours_base_again = int(np.abs(generate(PROMPT)[0] - base).max())
    shared.opts.set("lora_ext_handle_lora_tags", False)
    for key, tag in tags.items():
        builtin, hashes = generate(f"{PROMPT} {tag}")
        ours = rows[key].pop("_ours")
        rows[key].update(builtin_hashes=hashes, builtin_effect=float(np.abs(builtin - base).mean()),
                         ours_vs_builtin=int(np.abs(ours - builtin).max()))
    builtin_base_again = int(np.abs(generate(PROMPT)[0] - base).max())
    shared.opts.set("lora_ext_handle_lora_tags", True)
    return {"base_mean": float(base.mean()), "base_std": float(base.std()),
            "base_saturated": float(((base <= 0) | (base >= 255)).mean()), "model_class": arch, "encoders": encoders,
            "rows": rows, "ours_base_again": ours_base_again, "builtin_base_again": builtin_base_again}


if __name__ == "__main__":
    probe_main(run)
