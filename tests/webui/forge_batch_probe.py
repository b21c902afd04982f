"""Run with Forge's Python (tests/webui/test_forge.py): in-process Forge with lora_ext installed in DATA's extensions
(its glue loaded by Forge's script loader, the tag taken as at app start), per-image LoRAs in a mixed batch. Writes
OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_batch_probe.py OUT DATA MODELS

Each prompt of PROMPTS is generated alone (seed 1234 + its index, batch of one) and then all together in one batch
(seed 1234: image i gets 1234 + i): plain, every prompt with an AND-part, and with hires fix; with the per-image
setting on, each batch image must be its solo image; with it off (the built-in's behaviour: every image gets the first
prompt's LoRAs) the mixed images differ from their solo ones. Every prompt of a batch has the same number of
AND-parts: Forge itself keeps only as many parts per image as the batch's shortest prompt has (its
`compile_weighted_conditions` zips them), with or without lora_ext."""

from __future__ import annotations

from forge_inprocess import probe_main, start_forge

CAT = "a photo of a cat"
PROMPTS = [CAT, f"{CAT} <lora:full_lora:0.8>", f"{CAT} <lora:full_lora_compvis:0.5> <lora:full_lora:-0.3>",
           f"{CAT} <lora:full_lora:0.6>"]
RUNS = {"plain": (PROMPTS, False), "and": ([f"{p} AND a dog" for p in PROMPTS], False), "hires": (PROMPTS, True)}


def run(data: str, models: str) -> dict:
    start_forge(data, models)
    import numpy as np
    from modules import extra_networks, processing, shared

    owner = type(extra_networks.extra_network_registry["lora"]).__module__

    def generate(prompts: list[str], seed: int, hires: bool = False) -> list[np.ndarray]:
        kw = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=1,
                  hr_additional_modules=["Use same choices"], hr_cfg=7) if hires else {}
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompts if len(prompts) > 1 else prompts[0], negative_prompt="",
            steps=2, width=64, height=64, sampler_name="Euler", seed=seed, cfg_scale=7, batch_size=len(prompts),
            do_not_save_samples=True, do_not_save_grid=True, **kw)
        processed = processing.process_images(p)
        p.close()
        return [np.asarray(im).astype(np.int16) for im in processed.images[:len(prompts)]], processed.infotexts

    rows = {}
    for kind, (prompts, hires) in RUNS.items():
        solo = [generate([prompt], 1234 + i, hires)[0][0] for i, prompt in enumerate(prompts)]
        shared.opts.set("lora_ext_per_image_loras", True)
        batch, infotexts = generate(prompts, 1234, hires)
        shared.opts.set("lora_ext_per_image_loras", False)
        first_only, infotexts_off = generate(prompts, 1234, hires)
        shared.opts.set("lora_ext_per_image_loras", True)
        base_again = generate([prompts[0]], 1234, hires)[0][0]
        rows[kind] = {
            "batch_vs_solo": [int(np.abs(a - b).max()) for a, b in zip(batch, solo)],
            "off_vs_solo": [int(np.abs(a - b).max()) for a, b in zip(first_only, solo)],
            "effect": [float(np.abs(s - solo[0]).mean()) for s in solo],
            "base_again": int(np.abs(base_again - solo[0]).max()),
            "infotext_prompts": [t.split("\n")[0] for t in infotexts[:len(prompts)]],
            "infotext_prompts_off": [t.split("\n")[0] for t in infotexts_off[:len(prompts)]]}
    return {"owner": owner, "rows": rows}


if __name__ == "__main__":
    probe_main(run)
