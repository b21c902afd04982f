"""Run with Forge's Python (tests/webui/test_forge.py): pasting an infotext and the "Add network to prompt" setting
(`sd_lora`) in Forge with lora_ext owning the tag. Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_paste_probe.py OUT DATA MODELS

MODELS/Lora must be a writable folder holding copies of the harness' `full_lora` and `full_lora_compvis`.
- Paste: an image made with `full_lora` names it in its prompt and its "Lora hashes"; the file is then renamed (same
  bytes: Forge's hash is the whole file's sha256). Pasting that infotext (as the UI's paste button does: parse, then
  every `infotext_pasted` hook, Forge's built-in's included) must name the renamed file (with "Lora name in prompt:
  Filename"; with the default "Alias from file" its alias, still "full_lora", which draws the same image).
- `sd_lora`: with it set to `full_lora_compvis`, a prompt without tags gives the image of the same prompt with
  `<lora:full_lora_compvis:DEFAULT>` (DEFAULT: the "default multiplier" setting), and "Lora hashes" name it."""

from __future__ import annotations

import os
import shutil

from forge_inprocess import probe_main, start_forge, txt2img

PROMPT = "a photo of a cat"


def run(data: str, models: str) -> dict:
    start_forge(data, models)
    import numpy as np
    from modules import infotext_utils, script_callbacks, shared

    from lora_ext.webui import glue

    generate = txt2img

    def paste(info: str) -> str:  # what the UI's paste button does (infotext_utils.connect_paste)
        params = infotext_utils.parse_generation_parameters(info)
        script_callbacks.infotext_pasted_callback(info, params)
        return params["Prompt"]

    lora_dir = os.path.join(models, "Lora")
    shared.opts.set("lora_ext_handle_lora_tags", True)
    original, info = generate(f"{PROMPT} <lora:full_lora:0.8>")
    hashes = infotext_utils.parse_generation_parameters(info).get("Lora hashes")
    shutil.copyfile(os.path.join(lora_dir, "full_lora.safetensors"), os.path.join(lora_dir, "renamed_copy.safetensors"))
    os.unlink(os.path.join(lora_dir, "full_lora.safetensors"))
    glue.state().index.refresh()
    pasted_alias = paste(info)  # "Alias from file" (the default): the renamed file's alias, still "full_lora"
    pasted_again = generate(pasted_alias)[0]
    shared.opts.set("lora_preferred_name", "Filename")
    pasted = paste(info)
    shared.opts.set("lora_preferred_name", "Alias from file")

    shared.opts.set("sd_lora", "full_lora_compvis")
    with_default, info_default = generate(PROMPT)
    shared.opts.set("sd_lora", "None")
    explicit, _ = generate(f"{PROMPT} <lora:full_lora_compvis:{shared.opts.extra_networks_default_multiplier}>")
    base, _ = generate(PROMPT)
    return {"info": info, "hashes": hashes, "pasted": pasted, "pasted_alias": pasted_alias,
            "pasted_alias_vs_original": int(np.abs(pasted_again - original).max()),
            "sd_lora_diff": int(np.abs(with_default - explicit).max()),
            "sd_lora_effect": float(np.abs(with_default - base).mean()),
            "sd_lora_hashes": infotext_utils.parse_generation_parameters(info_default).get("Lora hashes")}


if __name__ == "__main__":
    probe_main(run)
