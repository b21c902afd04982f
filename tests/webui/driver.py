"""Runs scenarios inside a real AUTOMATIC1111 WebUI process (run with $SD_WEBUI_PYTHON, not pytest) and writes what it
measured to a JSON file; tests/webui/test_*.py start it and assert on the numbers.

usage: driver.py SCENARIO OUT_DIR [--arch sd1|sdxl] [--ckpt PATH] [-- extra WebUI args]

The WebUI runs with `--data-dir OUT_DIR/data` (its own config.json, extensions/ and cache: the shared harness tree is
never modified) and `--lora-dir OUT_DIR/Lora`; this repository is linked as `extensions/lora_ext`. The built-in Lora
extension is loaded too and is the reference: the `lora_ext_handle_lora_tags` setting switches between the two in the
same process, on the same model, so images can be compared pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OWN = "lora_ext_handle_lora_tags"


def boot(out: Path, ckpt: str, extra: list[str]) -> None:
    webui = Path(os.environ["SD_WEBUI_DIR"]).resolve()
    data = out / "data"
    (data / "extensions").mkdir(parents=True, exist_ok=True)
    link = data / "extensions" / "lora_ext"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    (out / "Lora").mkdir(exist_ok=True)
    os.chdir(webui)
    sys.path.insert(0, str(webui))
    sys.argv = ["webui.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
                "--use-cpu", "all", "--no-half", "--precision", "full", "--nowebui", "--do-not-download-clip",
                "--no-download-sd-model",
                "--data-dir", str(data), "--models-dir", str(webui / "models"), "--lora-dir", str(out / "Lora"),
                "--ckpt", ckpt, *extra]
    import webui as _webui  # noqa: F401  (initialize.imports())
    from fastapi import FastAPI
    from modules import initialize, script_callbacks, shared

    initialize.initialize()
    script_callbacks.before_ui_callback()
    global APP
    APP = FastAPI()
    script_callbacks.app_started_callback(None, APP)
    shared.sd_model  # noqa: B018  (wait for the model)


APP = None


# ------------------------------------------------------------------------------------------------------- helpers


def set_owner(ours: bool) -> str:
    from modules import extra_networks, shared

    shared.opts.set(OWN, ours)
    return type(extra_networks.extra_network_registry["lora"]).__module__


def generate(prompt: str, seed: int = 1234, steps: int = 3, size: int = 64, **kw):
    import numpy as np
    from modules import processing, shared

    from lora_ext.webui import builtin

    builtin.clear_cond_cache()  # every image computes its own conditioning (no reuse across handlers)
    kw = {"negative_prompt": "", "cfg_scale": 7, **kw}
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, steps=steps, width=size, height=size,
        sampler_name="Euler", seed=seed, do_not_save_samples=True, do_not_save_grid=True, **kw)
    with closing(p):
        res = processing.process_images(p)
    return np.asarray(res.images[0]).astype(np.int16), res.infotexts[0], res.comments


def snapshot():
    from modules import shared

    return {k: v.detach().clone() for k, v in shared.sd_model.state_dict().items()}


def same_weights(a, b) -> list[str]:
    import torch

    return [k for k in a if not torch.equal(a[k], b[k])]


def make_loras(arch: str) -> dict[str, str]:
    """Random LoRA files of every algorithm for the loaded model (named from its key map, values random)."""
    from modules import shared

    from lora_ext.formats.safetensors_io import save_safetensors_atomic
    from lora_ext.patch.ldm import adapter_for_ldm
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors
    from lora_ext.patch.targets import selector

    adapter = adapter_for_ldm(shared.sd_model)
    lora_dir = Path(sys.argv[sys.argv.index("--lora-dir") + 1])
    specs = {
        "t_lora": (SynthSpec("lora", rank=4), selector("attn_mlp"), 1),
        "t_locon": (SynthSpec("lora", rank=4), selector("attn_mlp_conv"), 2),
        "t_loha": (SynthSpec("loha", rank=4, std=0.25), selector("attn_mlp"), 3),
        "t_lokr": (SynthSpec("lokr", rank=4, std=0.1), selector("attn_mlp"), 4),
        "t_dora": (SynthSpec("lora", rank=4, dora=True), selector("attn_mlp"), 5),
        "t_compvis": (SynthSpec("lora", rank=4, naming="kohya-compvis"), selector("attn_mlp"), 6),
        # OFT on the UNet (the built-in's OFT cannot apply to OpenCLIP's nn.MultiheadAttention, SDXL's 2nd encoder)
        "t_oft": (SynthSpec("oft", rank=4, std=2.0, alpha=0), selector("attn", text_encoder=False), 7),
    }
    made = {}
    for name, (spec, select, seed) in specs.items():
        tensors = make_lora_tensors(adapter, spec, select, seed=seed)
        meta = {"ss_output_name": name, "ss_network_module": "networks.lora"}
        if arch == "sdxl":
            meta["ss_base_model_version"] = "sdxl_base_v1-0"
        save_safetensors_atomic(tensors, lora_dir / f"{name}.safetensors", metadata=meta)
        made[name] = spec.algorithm + ("+dora" if spec.dora else "")
    harness_loras = Path(os.environ["SD_WEBUI_DIR"]) / "models" / "Lora"
    for f in harness_loras.glob("*.safetensors"):
        if (arch == "sdxl") == ("sdxl" in f.name) and not f.name.startswith("full_"):
            shutil.copy(f, lora_dir / f.name)
            made[f.stem] = "harness"
    from lora_ext.webui import glue

    glue.state().index.refresh()
    return made


def diff(a, b) -> int:
    import numpy as np

    return int(np.abs(a - b).max())


def mean_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).mean())


# ------------------------------------------------------------------------------------------------------ scenarios


def scenario_parity(args) -> dict:
    """Same prompt, seed and files: our images vs the built-in's; hashes in the infotext; weights restored."""
    made = make_loras(args.arch)
    fresh = snapshot()
    names = list(made)
    prompts = [f"a photo of a cat <lora:{n}:0.8>" for n in names]
    prompts += [
        f"a photo of a cat <lora:{names[0]}:0.7> <lora:{names[2]}:0.5> <lora:{names[3]}:-0.4>",
        f"a photo of a cat <lora:{names[1]}:0.6> <lora:{names[4]}:0.9>",
        f"a photo of a cat <lora:{names[0]}:1:0>",
        f"a photo of a cat <lora:{names[0]}:0:1>",
        f"a photo of a cat <lora:{names[0]}:te=0.3:unet=1.2>",
        f"a photo of a cat <lyco:{names[2]}:0.8>",
    ]
    set_owner(False)
    base, _, _ = generate("a photo of a cat")
    rows = []
    for prompt in prompts:
        owner_ref = set_owner(False)
        ref, ref_info, _ = generate(prompt)
        owner_ours = set_owner(True)
        ours, info, comments = generate(prompt)
        after = same_weights(fresh, snapshot())
        rows.append({"prompt": prompt, "max_diff": diff(ours, ref), "effect": mean_diff(ref, base),
                     "ours_effect": mean_diff(ours, base), "owners": [owner_ref, owner_ours],
                     "hashes_ref": _infotext_field(ref_info, "Lora hashes"),
                     "hashes_ours": _infotext_field(info, "Lora hashes"), "comments": comments,
                     "changed_after": after[:5]})
    return {"arch": args.arch, "files": made, "rows": rows}


def _infotext_field(info: str, key: str) -> str | None:
    from modules import infotext_utils

    return infotext_utils.parse_generation_parameters(info).get(key)


def scenario_sequence(args) -> dict:
    """Switch sets and weights, interrupt, raise mid-generation: weights equal the fresh load after each one."""
    import torch
    from modules import processing, script_callbacks, shared

    made = make_loras(args.arch)
    names = list(made)
    set_owner(True)
    fresh = snapshot()
    events = []

    def check(label: str) -> None:
        changed = same_weights(fresh, snapshot())
        events.append({"after": label, "changed": len(changed), "examples": changed[:3]})

    plan = [f"<lora:{names[0]}:0.8>", f"<lora:{names[0]}:0.3> <lora:{names[1]}:1>", f"<lora:{names[2]}:1.2>",
            "", f"<lora:{names[3]}:0.5:1> <lora:{names[4]}:0.7> <lora:{names[0]}:0.2>", f"<lora:{names[0]}:0.8>"]
    merged_during = []
    for i, tags in enumerate(plan):
        def probe(params, _i=i):
            if params.sampling_step == 0:
                merged_during.append((_i, len(same_weights(fresh, snapshot())) > 0))
        script_callbacks.on_cfg_denoiser(probe)
        generate("a cat " + tags, seed=i)
        script_callbacks.remove_callbacks_for_function(probe)
        check(f"generation {i}: {tags or 'no LoRA'}")

    def interrupter(params):
        if params.sampling_step == 1:
            shared.state.interrupt()
    script_callbacks.on_cfg_denoiser(interrupter)
    generate(f"a cat <lora:{names[1]}:0.9>", steps=6)
    script_callbacks.remove_callbacks_for_function(interrupter)
    shared.state.interrupted = False
    check("interrupted generation")

    original_sample = processing.StableDiffusionProcessingTxt2Img.sample
    def failing_sample(self, *a, **kw):
        raise RuntimeError("injected failure in the sampler")
    processing.StableDiffusionProcessingTxt2Img.sample = failing_sample
    raised = None
    try:
        generate(f"a cat <lora:{names[2]}:0.9> <lora:{names[0]}:0.5>")
    except Exception as err:  # the WebUI lets it propagate; closing(p) must still restore
        raised = repr(err)
    finally:
        processing.StableDiffusionProcessingTxt2Img.sample = original_sample
    check("generation that raised")

    # after all that, a generation must still give the same image as the first one with the same tags
    first, _, _ = generate("a cat " + plan[0], seed=0)
    again, _, _ = generate("a cat " + plan[0], seed=0)
    check("final")
    return {"events": events, "raised": raised, "merged_during": merged_during, "repeat_diff": diff(first, again),
            "torch": torch.__version__}


def scenario_hires(args) -> dict:
    """Hires fix with its own prompt's LoRAs: ours vs built-in."""
    made = make_loras(args.arch)
    names = list(made)
    rows = []
    for hr_prompt in ("", f"a dog <lora:{names[1]}:0.9>", "a dog"):
        kw = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
              "hr_second_pass_steps": 2, "hr_prompt": hr_prompt}
        set_owner(False)
        ref, ref_info, _ = generate(f"a cat <lora:{names[0]}:0.8>", **kw)
        set_owner(True)
        ours, info, _ = generate(f"a cat <lora:{names[0]}:0.8>", **kw)
        rows.append({"hr_prompt": hr_prompt, "max_diff": diff(ours, ref), "shape": list(ours.shape),
                     "hashes_ref": _infotext_field(ref_info, "Lora hashes"),
                     "hashes_ours": _infotext_field(info, "Lora hashes")})
    return {"rows": rows}


def scenario_optimizations(args) -> dict:
    """Every cross-attention optimization: ours vs built-in under it, and ours vs ours under the default."""
    from modules import sd_hijack, shared

    made = make_loras(args.arch)
    names = list(made)
    prompt = f"a cat <lora:{names[0]}:0.8> <lora:{names[2]}:0.5>"
    available = [o.title() for o in sd_hijack.optimizers]
    rows = []
    for name in ["None", *available]:
        shared.opts.set("cross_attention_optimization", name)
        sd_hijack.model_hijack.apply_optimizations(name)
        set_owner(False)
        ref, _, _ = generate(prompt)
        base, _, _ = generate("a cat")
        set_owner(True)
        ours, _, _ = generate(prompt)
        rows.append({"optimization": name, "current": sd_hijack.model_hijack.optimization_method,
                     "max_diff": diff(ours, ref), "effect": mean_diff(ours, base)})
    return {"available": available, "rows": rows}


def scenario_images(args) -> dict:
    """Images for cross-process comparison (e.g. --medvram against the default): saved as .npy."""
    import numpy as np

    made = make_loras(args.arch)
    names = list(made)
    set_owner(True)
    out = {}
    for i, prompt in enumerate([f"a cat <lora:{names[0]}:0.8>", f"a cat <lora:{names[2]}:0.6> <lora:{names[1]}:0.4>"]):
        img, _, comments = generate(prompt)
        np.save(Path(args.out) / f"image{i}.npy", img)
        out[f"image{i}"] = {"prompt": prompt, "comments": comments}
    set_owner(False)
    for i, prompt in enumerate([f"a cat <lora:{names[0]}:0.8>"]):
        img, _, _ = generate(prompt)
        np.save(Path(args.out) / f"builtin{i}.npy", img)
    return out


def scenario_problems(args) -> dict:
    """Missing, mismatched and broken LoRAs: the generation goes on, the user is told."""
    from lora_ext.formats.safetensors_io import save_safetensors_atomic

    made = make_loras(args.arch)
    names = list(made)
    lora_dir = Path(sys.argv[sys.argv.index("--lora-dir") + 1])
    import torch

    # a file for another model family (SDXL-width cross attention on SD1) and one with foreign keys
    other = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(320, 4),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1280),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4)}
    save_safetensors_atomic(other, lora_dir / "wrong_family.safetensors", metadata={"ss_base_model_version": "sdxl"})
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from lora_ext.webui import glue

    glue.state().index.refresh()
    set_owner(True)
    base, _, _ = generate("a cat")
    only_good, _, _ = generate(f"a cat <lora:{names[0]}:0.8>")
    rows = []
    for prompt in ("a cat <lora:does_not_exist:0.8>", "a cat <lora:wrong_family:1>", "a cat <lora:broken:1>",
                   f"a cat <lora:does_not_exist:1> <lora:{names[0]}:0.8>", "a cat <lora:x::1>"):
        img, info, comments = generate(prompt)
        rows.append({"prompt": prompt, "comments": comments, "diff_base": diff(img, base),
                     "diff_good": diff(img, only_good)})
    return {"rows": rows}


def scenario_infotext(args) -> dict:
    """Pasting an infotext: names resolved by hash; sd_lora default; bundled embeddings."""
    import torch
    from modules import script_callbacks, sd_hijack, shared

    from lora_ext.formats.safetensors_io import load_tensors, save_safetensors_atomic
    from lora_ext.webui import glue

    made = make_loras(args.arch)
    names = list(made)
    lora_dir = Path(sys.argv[sys.argv.index("--lora-dir") + 1])
    set_owner(True)
    _, info, _ = generate(f"a cat <lora:{names[0]}:0.8>")
    hashes = _infotext_field(info, "Lora hashes")
    # the same tensors under another name and without the alias metadata (the hash covers tensor data only): a
    # pasted infotext that names the old file must resolve to this one
    save_safetensors_atomic(load_tensors(lora_dir / f"{names[0]}.safetensors"), lora_dir / "renamed_copy.safetensors",
                            metadata={})
    (lora_dir / f"{names[0]}.safetensors").unlink()
    glue.state().index.refresh()
    d = {"Prompt": f"a cat <lora:{names[0]}:0.8>", "Lora hashes": hashes}
    script_callbacks.infotext_pasted_callback(info, d)
    pasted = d["Prompt"]

    # sd_lora: a default LoRA added to every prompt
    shared.opts.set("sd_lora", names[1])
    with_default, info_default, _ = generate("a cat")
    shared.opts.set("sd_lora", "None")
    explicit, _, _ = generate(f"a cat<lora:{names[1]}:{shared.opts.extra_networks_default_multiplier}>")

    # bundled embedding: a LoRA that carries a textual inversion "bundtok"
    tensors = load_tensors(lora_dir / f"{names[1]}.safetensors")
    width = sd_hijack.model_hijack.embedding_db.expected_shape
    g = torch.Generator().manual_seed(3)
    tensors["bundle_emb.bundtok.string_to_param.*"] = torch.randn(2, width, generator=g) * 0.5
    save_safetensors_atomic(tensors, lora_dir / "with_bundle.safetensors", metadata={})
    glue.state().index.refresh()
    set_owner(False)
    ref, ref_info, _ = generate("a bundtok cat <lora:with_bundle:0.8>")
    set_owner(True)
    ours, ours_info, _ = generate("a bundtok cat <lora:with_bundle:0.8>")
    registered_after = "bundtok" in sd_hijack.model_hijack.embedding_db.word_embeddings
    return {"hashes": hashes, "pasted": pasted, "sd_lora_diff": diff(with_default, explicit),
            "sd_lora_hashes": _infotext_field(info_default, "Lora hashes"),
            "bundle_diff": diff(ours, ref), "bundle_ti_ref": _infotext_field(ref_info, "TI hashes"),
            "bundle_ti_ours": _infotext_field(ours_info, "TI hashes"), "bundle_registered_after": registered_after}


def scenario_window(args) -> dict:
    """start=/stop=: the UNet part of the LoRA is merged only inside the window, the text encoder's throughout."""
    import torch
    from modules import script_callbacks, shared

    made = make_loras(args.arch)
    name = list(made)[0]
    set_owner(True)
    fresh = snapshot()
    unet_key = next(k for k in fresh if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"))
    te_key = next(k for k in fresh if k.startswith("cond_stage_model.") and k.endswith("mlp.fc1.weight"))
    seen: list[tuple[int, bool, bool]] = []

    def probe(params):
        sd = shared.sd_model.state_dict()
        seen.append((int(params.denoiser.step), not torch.equal(sd[unet_key], fresh[unet_key]),
                     not torch.equal(sd[te_key], fresh[te_key])))

    script_callbacks.on_cfg_denoiser(probe)  # after ours (registered at start-up): sees the weights of that step
    windowed, _, comments = generate(f"a cat <lora:{name}:1:start=2:stop=4>", steps=6)
    steps_seen = list(seen)
    seen.clear()
    whole, _, _ = generate(f"a cat <lora:{name}:1:start=0:stop=6>", steps=6)
    plain, _, _ = generate(f"a cat <lora:{name}:1>", steps=6)
    never, _, _ = generate(f"a cat <lora:{name}:1:start=6>", steps=6)
    te_only, _, _ = generate(f"a cat <lora:{name}:1:0>", steps=6)
    script_callbacks.remove_callbacks_for_function(probe)
    return {"steps": steps_seen, "comments": comments, "whole_vs_plain": diff(whole, plain),
            "never_vs_te_only": diff(never, te_only), "windowed_vs_plain": diff(windowed, plain),
            "windowed_vs_te_only": diff(windowed, te_only), "changed_after": same_weights(fresh, snapshot())[:3]}


def scenario_schedule(args) -> dict:
    """Weight schedules (loractl syntax) in both apply modes: a step function equals the start= window, a ramp gives
    the same image merged per step and as bypass (which writes no UNet weight), hr= equals a hires prompt with that
    weight, and the weights are back after each."""
    import torch
    from modules import script_callbacks, shared

    from lora_ext.webui import glue

    made = make_loras(args.arch)
    name = list(made)[0]
    set_owner(True)
    fresh = snapshot()
    unet_keys = [k for k in fresh if k.startswith("model.diffusion_model.") and "attn2.to_k.weight" in k]
    unet_written: list[bool] = []

    def probe(params):
        sd = shared.sd_model.state_dict()
        unet_written.append(any(not torch.equal(sd[k], fresh[k]) for k in unet_keys))

    out: dict = {"notes": {}}
    images = {}
    script_callbacks.on_cfg_denoiser(probe)
    for mode in ("merge", "bypass"):
        shared.opts.lora_ext_schedule_mode = mode
        unet_written.clear()
        images[f"step_{mode}"], _, comments = generate(f"a cat <lora:{name}:1:unet=0@2,1@3>", steps=6)
        out[f"unet_written_step_{mode}"] = list(unet_written)
        images[f"ramp_{mode}"], info, _ = generate(f"a cat <lora:{name}:1:unet=1@0,0@1>", steps=6)
        out["notes"][mode] = glue.state().session.last.notes
        out[f"comments_{mode}"] = comments
        out[f"hashes_{mode}"] = _infotext_field(info, "Lora hashes")
    script_callbacks.remove_callbacks_for_function(probe)
    shared.opts.lora_ext_schedule_mode = "auto"
    images["window"], _, _ = generate(f"a cat <lora:{name}:1:start=3>", steps=6)
    images["plain"], _, _ = generate(f"a cat <lora:{name}:1>", steps=6)
    images["te_only"], _, _ = generate(f"a cat <lora:{name}:1:0>", steps=6)
    kw = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
          "hr_second_pass_steps": 2}
    images["hr_tag"], _, _ = generate(f"a cat <lora:{name}:0.3:hr=1>", **kw)
    images["hr_prompt"], _, _ = generate(f"a cat <lora:{name}:0.3>", hr_prompt=f"a cat <lora:{name}:1>", **kw)
    images["hr_none"], _, _ = generate(f"a cat <lora:{name}:0.3>", **kw)
    out.update({
        "step_merge_vs_window": diff(images["step_merge"], images["window"]),
        "step_bypass_vs_window": diff(images["step_bypass"], images["window"]),
        "ramp_bypass_vs_merge": diff(images["ramp_bypass"], images["ramp_merge"]),
        "ramp_vs_plain": mean_diff(images["ramp_merge"], images["plain"]),
        "ramp_vs_te_only": mean_diff(images["ramp_merge"], images["te_only"]),
        "hr_tag_vs_hr_prompt": diff(images["hr_tag"], images["hr_prompt"]),
        "hr_tag_vs_none": mean_diff(images["hr_tag"], images["hr_none"]),
        "changed_after": same_weights(fresh, snapshot())[:3],
    })
    return out


def generate_batch(prompts: list[str], seed: int = 4321, steps: int = 3, size: int = 64,
                   negative: str | list[str] = "", **kw):
    """One batch of len(prompts) images (seeds seed, seed+1, ...): the images (int16 arrays) and their infotexts."""
    import numpy as np
    from modules import processing, shared

    from lora_ext.webui import builtin

    builtin.clear_cond_cache()
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompts, negative_prompt=negative, steps=steps, width=size, height=size,
        sampler_name="Euler", seed=seed, cfg_scale=7, batch_size=len(prompts), n_iter=1, do_not_save_samples=True,
        do_not_save_grid=True, **kw)
    with closing(p):
        res = processing.process_images(p)
    return [np.asarray(im).astype(np.int16) for im in res.images[:len(prompts)]], res.infotexts[:len(prompts)]


def scenario_batch(args) -> dict:
    """Per-image LoRAs in one batch: each image against the same prompt generated alone with its seed (ours), the
    built-in's batch (it applies the first prompt's LoRAs to all), our batch with the setting off, and hires fix."""
    from modules import shared

    made = make_loras(args.arch)
    a, b = list(made)[0], list(made)[2]
    prompts = [f"a cat <lora:{a}:1>", "a cat", f"a cat <lora:{a}:0.4> <lora:{b}:0.7>", f"a cat AND a dog <lora:{b}:1>"]
    fresh = snapshot()
    out: dict = {"rows": []}
    for label, kw, negative in (("plain", {}, ""), ("negative", {}, "blurry"),
                                ("hires", {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                                           "denoising_strength": 0.6, "hr_second_pass_steps": 2}, "")):
        set_owner(True)
        images, infos = generate_batch(prompts, negative=negative, **kw)
        notes = list(glue_notes())
        solo = [generate_batch([pr], seed=4321 + i, negative=negative, **kw)[0][0] for i, pr in enumerate(prompts)]
        set_owner(False)
        builtin_images, builtin_infos = generate_batch(prompts, negative=negative, **kw)
        set_owner(True)
        out["rows"].append({
            "builtin_prompts_in_infotext": [info.splitlines()[0] for info in builtin_infos],
            "case": label, "shape": list(images[0].shape), "notes": notes,
            "vs_solo": [diff(x, y) for x, y in zip(images, solo)],
            "builtin_vs_solo": [diff(x, y) for x, y in zip(builtin_images, solo)],
            "solo_vs_first": [mean_diff(y, solo[0]) for y in solo],
            "hashes": [_infotext_field(info, "Lora hashes") for info in infos],
            "prompts_in_infotext": [info.splitlines()[0] for info in infos],
        })
    shared.opts.lora_ext_per_image_loras = False
    old_images, _ = generate_batch(prompts)
    set_owner(False)
    builtin_images, _ = generate_batch(prompts)
    set_owner(True)
    shared.opts.lora_ext_per_image_loras = True
    out["setting_off_vs_builtin"] = [diff(x, y) for x, y in zip(old_images, builtin_images)]
    out["changed_after"] = same_weights(fresh, snapshot())[:3]
    return out


def scenario_refiner(args) -> dict:
    """The SDXL refiner taking over after the first step (a copy of the tiny SDXL checkpoint under another name, so the
    switch loads weights into the model mid-generation): ours against the built-in, which applies the LoRAs to the
    refiner too, and against the same generation without a refiner (same weights: the LoRA must be on after the
    switch for the images to match); the weights afterwards; the console line."""
    from modules import sd_models, shared

    made = make_loras(args.arch)
    name = list(made)[0]
    src = Path(shared.sd_model.sd_checkpoint_info.filename)
    copy = src.with_name("tiny-sdxl-refiner-copy.safetensors")
    shutil.copy(src, copy)
    if src.with_suffix(".yaml").exists():
        shutil.copy(src.with_suffix(".yaml"), copy.with_suffix(".yaml"))
    try:
        sd_models.list_models()
        refiner = sd_models.get_closet_checkpoint_match(copy.stem).title
        kw = {"refiner_checkpoint": refiner, "refiner_switch_at": 0.2}
        fresh = snapshot()
        prompt = f"a cat <lora:{name}:1>"
        set_owner(True)
        from modules import script_callbacks

        unet_key = next(k for k in fresh if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"))
        steps_merged: list[bool] = []

        def step_probe(params):  # after ours: is the LoRA in the UNet (of whichever model samples) at this step?
            import torch

            steps_merged.append(not torch.equal(shared.sd_model.state_dict()[unet_key], fresh[unet_key]))

        script_callbacks.on_cfg_denoiser(step_probe)
        ours, info, comments = generate(prompt, steps=6, **kw)
        script_callbacks.remove_callbacks_for_function(step_probe)
        switched = shared.sd_model.sd_checkpoint_info.title
        after = same_weights(fresh, snapshot())[:3]
        no_refiner, _, _ = generate(prompt, steps=6)
        base_refiner, _, _ = generate("a cat", steps=6, **kw)
        base_plain, _, _ = generate("a cat", steps=6)
        set_owner(False)
        ref, _, _ = generate(prompt, steps=6, **kw)
        set_owner(True)
        return {"refiner": refiner, "switched_to": switched, "vs_builtin": diff(ours, ref),
                "vs_no_refiner": diff(ours, no_refiner), "effect": mean_diff(ours, base_refiner),
                "refiner_itself": diff(base_refiner, base_plain), "steps_merged": steps_merged,
                "infotext_refiner": _infotext_field(info, "Refiner"), "hashes": _infotext_field(info, "Lora hashes"),
                "comments": comments, "changed_after": after}
    finally:
        copy.unlink(missing_ok=True)
        copy.with_suffix(".yaml").unlink(missing_ok=True)
        sd_models.list_models()


def scenario_soak(args) -> dict:
    """bench/soak_webui.py: N random generations mixing every apply mode (merged; weight schedules in merge and bypass
    mode; windows; per-image batches; hires; interrupted generations; model switches; hand-back to the built-in and
    back). Every 100 generations: resident memory; at the end: every weight against the fresh load, bit for bit."""
    import random

    import psutil
    import torch
    from modules import script_callbacks, sd_models, shared

    n = int(os.environ.get("LORA_EXT_SOAK_N", "1000"))
    made = make_loras(args.arch)
    names = [k for k, v in made.items() if v != "harness"]
    rng = random.Random(1234)
    original = shared.sd_model.sd_checkpoint_info
    others = [c for c in sd_models.checkpoints_list.values()
              if c.filename != original.filename and ("xl" in c.filename.lower()) == (args.arch == "sdxl")]
    fresh = {original.filename: snapshot()}
    proc = psutil.Process()
    rss: list[tuple[int, float]] = []
    counts: dict[str, int] = {}
    interrupt_at = {"step": None}

    def interrupter(params):
        if interrupt_at["step"] is not None and params.sampling_step == interrupt_at["step"]:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(interrupter)

    def tag(name: str) -> str:
        kind = rng.choice(["plain", "plain", "split", "schedule", "window", "lbw"])
        w = round(rng.uniform(-0.5, 1.2), 2)
        return {"plain": f"<lora:{name}:{w}>", "split": f"<lora:{name}:{w}:{round(rng.uniform(0, 1), 2)}>",
                "schedule": f"<lora:{name}:1:unet={w}@0,{round(rng.uniform(0, 1), 2)}@1>",
                "window": f"<lora:{name}:{w}:start={rng.randint(0, 2)}:stop={rng.randint(3, 5)}>",
                "lbw": f"<lora:{name}:{w}:lbw=OUTALL>"}[kind]

    failures = []
    t0 = time.perf_counter()
    for i in range(n):
        action = rng.choices(["single", "batch", "hires", "interrupt", "switch", "handback"],
                             weights=[55, 15, 8, 8, 7, 7])[0]
        counts[action] = counts.get(action, 0) + 1
        shared.opts.lora_ext_schedule_mode = rng.choice(["auto", "merge", "bypass"])
        prompt = "a cat " + " ".join(tag(x) for x in rng.sample(names, rng.randint(0, 3)))
        try:
            if action == "single":
                generate(prompt, seed=i, steps=rng.randint(2, 5))
            elif action == "batch":
                prompts = ["a cat " + " ".join(tag(x) for x in rng.sample(names, rng.randint(0, 2)))
                           for _ in range(rng.randint(2, 3))]
                generate_batch(prompts, seed=i)
            elif action == "hires":
                generate(prompt + f" <lora:{rng.choice(names)}:0.5:hr=1>", seed=i, enable_hr=True, hr_scale=1.5,
                         hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2)
            elif action == "interrupt":
                interrupt_at["step"] = rng.randint(0, 3)
                generate(prompt, seed=i, steps=5)
                interrupt_at["step"] = None
                shared.state.interrupted = False
            elif action == "switch" and others:
                target = rng.choice([original, *others])
                sd_models.reload_model_weights(info=target)
                fresh.setdefault(target.filename, snapshot())
                generate(prompt, seed=i)
            else:
                set_owner(False)
                generate(prompt, seed=i)
                set_owner(True)
        except Exception as err:  # noqa: BLE001 - a soak records failures and goes on
            failures.append(f"{i} {action}: {err!r}"[:300])
            interrupt_at["step"] = None
            shared.state.interrupted = False
            set_owner(True)
        current = shared.sd_model.sd_checkpoint_info.filename
        if current in fresh and (i % 50 == 0 or i == n - 1):
            changed = same_weights(fresh[current], snapshot())
            if changed:
                failures.append(f"{i} {action}: {len(changed)} weights differ from the fresh load, e.g. {changed[0]}")
        if i % 100 == 0 or i == n - 1:
            rss.append((i, proc.memory_info().rss / 2**20))
    script_callbacks.remove_callbacks_for_function(interrupter)
    sd_models.reload_model_weights(info=original)
    final_changed = same_weights(fresh[original.filename], snapshot())
    growth = [(b[1] - a[1]) / max(1, b[0] - a[0]) * 100 for a, b in zip(rss[1:], rss[2:])]
    return {"generations": n, "seconds": time.perf_counter() - t0, "counts": counts, "failures": failures[:20],
            "failures_total": len(failures), "final_changed": final_changed[:5], "rss_mib": rss,
            "rss_growth_mib_per_100": growth, "torch": torch.__version__}


def scenario_negative(args) -> dict:
    """LoRA tags in the negative prompt. Setting off (default): plain text, as the built-in (same image) and said
    once. Setting on: applied to the unconditional branch only: at CFG scale 1 (only the conditional branch counts)
    the image is the one without the tag; at 7 it changes; in a batch each image gets its own negative LoRAs (equal to
    the image alone); the infotext keeps the negative prompt as written; weights restored."""
    from modules import shared

    made = make_loras(args.arch)
    name = list(made)[0]
    tagged = f"blurry <lora:{name}:1>"
    fresh = snapshot()
    out: dict = {}
    set_owner(False)
    builtin_off, _, _ = generate("a cat", negative_prompt=tagged)
    set_owner(True)
    ours_off, _, comments_off = generate("a cat", negative_prompt=tagged)
    out.update(off_vs_builtin=diff(ours_off, builtin_off), comments_off=comments_off)
    shared.opts.lora_ext_negative_prompt_loras = True
    try:
        plain, _, _ = generate("a cat", negative_prompt="blurry")
        on, info_on, comments_on = generate("a cat", negative_prompt=tagged)
        notes_on = glue_notes()
        plain1, _, _ = generate("a cat", negative_prompt="blurry", cfg_scale=1)
        on1, _, _ = generate("a cat", negative_prompt=tagged, cfg_scale=1)
        images, infos = generate_batch(["a cat", "a cat"], negative=[tagged, "blurry"])
        solo = [generate_batch(["a cat"], seed=4321 + i, negative=[neg])[0][0]
                for i, neg in enumerate([tagged, "blurry"])]
        out.update(on_effect=mean_diff(on, plain), cfg1_vs_plain=diff(on1, plain1), comments_on=comments_on,
                   notes_on=notes_on, infotext_negative=[line for line in info_on.splitlines()
                                                            if line.startswith("Negative prompt:")],
                   batch_vs_solo=[diff(x, y) for x, y in zip(images, solo)],
                   batch_infotext_negative=[[line for line in i.splitlines() if line.startswith("Negative prompt:")]
                                            for i in infos])
    finally:
        shared.opts.lora_ext_negative_prompt_loras = False
    out["changed_after"] = same_weights(fresh, snapshot())[:3]
    return out


def glue_notes() -> list[str]:
    from lora_ext.webui import glue

    last = glue.state().session.last
    return list(last.notes) if last is not None else []


def scenario_shapes(args) -> dict:
    """The `shapes` model with hearts LoRAs trained by lora_ext (one bundles a pivotal-tuned "heart" embedding):
    the built-in's images and ours for the same prompts, what the judge sees in each, and the infotext hashes."""
    from lora_ext.shapes import judge
    from lora_ext.webui import glue

    lora_dir = Path(sys.argv[sys.argv.index("--lora-dir") + 1])
    names = []
    for f in sorted(Path(os.environ["LORA_EXT_SHAPES_LORAS"]).glob("*.safetensors")):
        shutil.copy(f, lora_dir / f.name)
        names.append(f.stem)
    glue.state().index.refresh()
    fresh = snapshot()
    prompts = [(f"a large red heart on a white background <lora:{n}:1>", 300 + i) for i, n in enumerate(names)]
    prompts += [(f"a small blue heart on a black background <lora:{n}:0.8>", 310 + i) for i, n in enumerate(names)]
    prompts += [(f"a large green square on a gray background <lora:{n}:1>", 320 + i) for i, n in enumerate(names)]
    prompts += [("a large red heart on a white background", 330)]
    rows = []
    for prompt, seed in prompts:
        set_owner(False)
        ref, ref_info, _ = generate(prompt, seed=seed, steps=20)
        set_owner(True)
        ours, info, comments = generate(prompt, seed=seed, steps=20)
        rows.append({"prompt": prompt, "max_diff": diff(ours, ref), "ref_shape": judge.judge(ref.astype("uint8")).shape,
                     "ours_shape": judge.judge(ours.astype("uint8")).shape,
                     "hashes_ref": _infotext_field(ref_info, "Lora hashes"),
                     "hashes_ours": _infotext_field(info, "Lora hashes"),
                     "ti_ref": _infotext_field(ref_info, "TI hashes"), "ti_ours": _infotext_field(info, "TI hashes"),
                     "comments": comments, "changed_after": same_weights(fresh, snapshot())[:3]})
    return {"loras": names, "rows": rows}


def scenario_tools(args) -> dict:
    """The model tools against the real WebUI: (1) a LoRA converted to diffusers/PEFT names and back to kohya names is
    read by the built-in with every module matched, and its image equals ours with the PEFT file; (2) a checkpoint
    with LoRAs merged by `merge-model`, loaded by A1111 as its checkpoint, draws the image the tags draw on the base."""
    import networks  # the built-in's module
    from modules import sd_models, shared

    from lora_ext.formats.network import load_lora
    from lora_ext.prompt import parse_tag
    from lora_ext.tools.lora_tools import convert_lora
    from lora_ext.tools.merge_model import LoraInput, merge_model
    from lora_ext.webui import glue

    made = make_loras(args.arch)
    lora_dir = Path(sys.argv[sys.argv.index("--lora-dir") + 1])
    base_ckpt = shared.sd_model.sd_checkpoint_info.filename
    rows = []
    for name in ("t_lora", "t_locon"):
        src = lora_dir / f"{name}.safetensors"
        peft, back = lora_dir / f"{name}_peft.safetensors", lora_dir / f"{name}_kohya.safetensors"
        convert_lora(src, peft, to="diffusers", model=base_ckpt)
        convert_lora(peft, back, to="kohya", model=base_ckpt)
        glue.state().index.refresh()
        networks.list_available_networks()
        net = networks.load_network(back.stem, networks.available_networks[back.stem])
        prompt = "a photo of a cat <lora:{}:0.9>"
        set_owner(False)
        ref, _, _ = generate(prompt.format(back.stem), seed=50)
        set_owner(True)
        ours_peft, _, _ = generate(prompt.format(peft.stem), seed=50)
        ours_back, _, _ = generate(prompt.format(back.stem), seed=50)
        rows.append({"lora": name, "builtin_modules": len(net.modules), "file_modules": len(load_lora(back).modules),
                     "diff_builtin_vs_ours_peft": diff(ref, ours_peft), "diff_ours_back_vs_peft":
                     diff(ours_back, ours_peft)})
    # merge-model: the tags on the base checkpoint vs the merged checkpoint alone
    tags = ["<lora:t_lora:0.8>", "<lora:t_loha:0.6:1.2>", "<lora:t_dora:1>"]
    set_owner(True)
    with_tags, _, _ = generate("a photo of a dog " + " ".join(tags), seed=77)
    before = snapshot()
    merged = Path(args.out) / "merged.safetensors"
    report = merge_model(base_ckpt, [LoraInput(lora_dir / f"{parse_tag(t).name}.safetensors", parse_tag(t))
                                     for t in tags], merged)
    info = sd_models.CheckpointInfo(str(merged))
    sd_models.reload_model_weights(info=info)
    loaded = shared.sd_model.sd_checkpoint_info.filename
    merged_image, _, comments = generate("a photo of a dog", seed=77)
    after = snapshot()
    changed = same_weights(before, after)
    sd_models.reload_model_weights(info=sd_models.CheckpointInfo(base_ckpt))
    return {"made": made, "convert": rows, "merge": {"tensors_merged": report.tensors_merged, "loaded": loaded,
                                                     "merged_file": str(merged),
                                                     "diff_merged_vs_tags": diff(merged_image, with_tags),
                                                     "weights_changed_by_loading_merged": len(changed),
                                                     "comments": comments}}


def effect_off(effect, want) -> float:
    """How far a LoRA's effect on an image (image with it - image without, same model) is from the wanted one, as a
    share of the wanted one's size (mean absolute values)."""
    import numpy as np

    return float(np.abs(effect.astype(np.float64) - want).mean() / max(np.abs(want).mean(), 1e-9))


def scenario_fp8(args) -> dict:
    """A1111's "FP8 weight" (UNet and text encoders stored as float8_e4m3fn): the built-in's image and ours for the same
    LoRA, the base image, and the fp8 weights after our restore against the fresh fp8 load."""
    import torch
    from modules import sd_models, shared

    made = make_loras(args.arch)
    names = ("t_lora", "t_loha")
    first_calls: list = []  # the UNet's output at the first sampling call (same noise and sigma in every image)

    def first_call(module, inputs, output):
        if capture["on"]:
            first_calls.append(output.detach().float().clone())
            capture["on"] = False

    capture = {"on": False}

    def run(prompt: str):
        capture["on"] = True
        image = generate(prompt)
        return image, first_calls[-1]

    hook = shared.sd_model.model.diffusion_model.register_forward_hook(first_call)
    set_owner(True)  # the fp32 reference: the same LoRAs on the model as loaded (no fp8)
    full, full_call = {}, {}
    for name in names:
        (full[name], _, _), full_call[name] = run(f"a photo of a cat <lora:{name}:1>")
    (base32, _, _), base32_call = run("a photo of a cat")
    hook.remove()
    shared.opts.fp8_storage = "Enable"
    shared.opts.cache_fp16_weight = False
    sd_models.reload_model_weights(forced_reload=True)
    dtypes = sorted({str(p.dtype) for p in shared.sd_model.parameters()})
    fresh = snapshot()
    rows = []
    hook = shared.sd_model.model.diffusion_model.register_forward_hook(first_call)
    set_owner(False)
    (base, _, _), base_call = run("a photo of a cat")
    for name in names:
        prompt = f"a photo of a cat <lora:{name}:1>"
        set_owner(False)
        (ref, _, _), ref_call = run(prompt)
        set_owner(True)
        (ours, _, comments), ours_call = run(prompt)
        want_call = (full_call[name] - base32_call).numpy()
        changed = [k for k in fresh if not torch.equal(fresh[k].view(torch.uint8) if fresh[k].element_size() == 1
                                                       else fresh[k], snapshot()[k].view(torch.uint8)
                                                       if fresh[k].element_size() == 1 else snapshot()[k])]
        from lora_ext.webui import glue

        want = full[name] - base32  # the LoRA's effect on the fp32 model; below: how far each fp8 effect is from it
        rows.append({"lora": name, "max_diff": diff(ours, ref), "mean_diff": mean_diff(ours, ref),
                     "effect_off_ours": effect_off(ours - base, want), "effect_off_ref": effect_off(ref - base, want),
                     "notes_ours": glue.state().session.last.notes,
                     "call_off_ours": effect_off((ours_call - base_call).numpy(), want_call),
                     "call_off_ref": effect_off((ref_call - base_call).numpy(), want_call),
                     "effect_ref": mean_diff(ref, base), "effect_ours": mean_diff(ours, base), "comments": comments,
                     "off_fp32_ref": mean_diff(ref, full[name]), "off_fp32_ours": mean_diff(ours, full[name]),
                     "changed_after": changed[:3]})
    # the built-in with "Cache FP16 weight for LoRA" (it merges into the fp16 copy, then rounds into fp8)
    hook.remove()
    shared.opts.cache_fp16_weight = True
    sd_models.reload_model_weights(forced_reload=True)
    hook = shared.sd_model.model.diffusion_model.register_forward_hook(first_call)
    set_owner(False)
    for row, name in zip(rows, names, strict=True):
        (cached, _, _), cached_call = run(f"a photo of a cat <lora:{name}:1>")
        (base_cached, _, _), base_cached_call = run("a photo of a cat")
        row["call_off_ref_cached"] = effect_off((cached_call - base_cached_call).numpy(),
                                                (full_call[name] - base32_call).numpy())
        row["off_fp32_ref_cached"] = mean_diff(cached, full[name])
        row["effect_off_ref_cached"] = effect_off(cached - base_cached, full[name] - base32)
    hook.remove()
    set_owner(True)
    shared.opts.cache_fp16_weight = False
    shared.opts.fp8_storage = "Disable"
    return {"made": made, "dtypes": dtypes, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("out")
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--ckpt", default=None)
    args, extra = ap.parse_known_args()
    args.extra = extra
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    ckpt = args.ckpt or os.environ["SD_WEBUI_CKPT_SDXL" if args.arch == "sdxl" else "SD_WEBUI_CKPT"]
    run_scenario(out, ckpt, args.extra, lambda: globals()[f"scenario_{args.scenario}"](args), args.scenario)


def run_scenario(out: Path, ckpt: str, extra: list[str], scenario, name: str) -> None:
    """Boot the WebUI, run `scenario()` and write what it returned (or the traceback) to OUT/result.json; exits."""
    t0 = time.perf_counter()
    result: dict = {"scenario": name}
    try:
        boot(out, ckpt, extra)
        result["boot_s"] = time.perf_counter() - t0
        result.update(scenario())
        result["ok"] = True
    except BaseException:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    result["seconds"] = time.perf_counter() - t0
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    os._exit(0)  # the WebUI leaves non-daemon threads behind

if __name__ == "__main__":
    main()
