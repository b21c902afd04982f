"""Run with Forge's Python (tests/webui/test_forge.py): in-process Forge, our patcher on Forge's own module tree
against Forge's built-in LoRA for the same files and weight. Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_patch_probe.py OUT

Order matters in Forge: its built-in restores the weights it patched at its next model load, so ours runs first for
each file, and a generation without LoRA follows the built-in's. A1111/Forge cache conditionings by prompt text: the
caches are cleared before every image (our patch is not announced by a tag here)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from forge_inprocess import REPO, probe_main, start_forge, txt2img


def run() -> dict:
    webui = os.path.abspath(os.environ["SD_WEBUI_DIR"])
    start_forge(app_started=False)  # no extension: the built-in handles its tags, ours is called directly
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch
    from modules import shared

    from lora_ext.formats.network import load_lora
    from lora_ext.patch import ActiveLora, Patcher
    from lora_ext.patch.forge import adapter_for_forge

    def generate(prompt: str) -> np.ndarray:
        return txt2img(prompt)[0]

    from backend.patcher.lora import LoraLoader

    refresh_s = {"t": 0.0}
    original_refresh = LoraLoader.refresh
    loaders: set = set()

    def timed_refresh(self, *args, **kwargs):  # Forge's built-in merges (and restores) here, at model load
        loaders.add(self)
        t0 = time.perf_counter()
        try:
            return original_refresh(self, *args, **kwargs)
        finally:
            refresh_s["t"] += time.perf_counter() - t0

    LoraLoader.refresh = timed_refresh
    model = shared.sd_model
    trees = {"unet": model.forge_objects.unet.model.diffusion_model,
             "te": model.forge_objects.clip.cond_stage_model}
    fresh = {name: {k: v.detach().clone() for k, v in tree.state_dict().items()} for name, tree in trees.items()}
    adapter = adapter_for_forge(model)
    base = generate("a photo of a cat")
    rows = []
    for name in ("full_lora", "full_lora_compvis"):
        net = load_lora(Path(webui) / "models" / "Lora" / f"{name}.safetensors")
        patcher = Patcher(adapter)
        t0 = time.perf_counter()
        report = patcher.apply([ActiveLora(net, te=0.8, unet=0.8)])
        apply_s = time.perf_counter() - t0
        ours_backup = patcher.backup_bytes
        ours = generate("a photo of a cat")
        t0 = time.perf_counter()
        patcher.restore()
        restore_s = time.perf_counter() - t0
        changed = [k for name_, tree in trees.items() for k, v in tree.state_dict().items()
                   if not torch.equal(v, fresh[name_][k])]
        again = generate("a photo of a cat")
        refresh_s["t"] = 0.0
        builtin = generate(f"a photo of a cat <lora:{name}:0.8>")
        builtin_apply_s = refresh_s["t"]
        builtin_backup = sum(w.numel() * w.element_size() for loader in loaders for w in loader.backup.values())
        refresh_s["t"] = 0.0
        generate("a photo of a cat")  # the built-in restores its weights at this load
        builtin_restore_s = refresh_s["t"]
        net_report = report.networks[0]
        rows.append({"lora": name, "applied": net_report.modules_applied, "total": net_report.modules_total,
                     "unmatched": net_report.unmatched[:3], "apply_s": apply_s, "restore_s": restore_s,
                     "ours_vs_builtin": int(np.abs(ours - builtin).max()),
                     "effect": float(np.abs(builtin - base).mean()), "base_again": int(np.abs(again - base).max()),
                     "changed_after_restore": changed[:3], "builtin_apply_s": builtin_apply_s,
                     "builtin_restore_s": builtin_restore_s, "backup_mib": {"ours": ours_backup / 2**20,
                                                                             "builtin": builtin_backup / 2**20}})
    # switching between the two files: ours (backups kept) and the built-in (its refresh restores, then merges)
    nets = [load_lora(Path(webui) / "models" / "Lora" / f"{n}.safetensors") for n in ("full_lora", "full_lora_compvis")]
    patcher = Patcher(adapter)
    patcher.apply([ActiveLora(nets[0], te=0.8, unet=0.8)])
    t0 = time.perf_counter()
    patcher.apply([ActiveLora(nets[1], te=0.8, unet=0.8)])
    ours_switch = time.perf_counter() - t0
    patcher.restore()
    generate("a photo of a cat <lora:full_lora:0.8>")
    refresh_s["t"] = 0.0
    generate("a photo of a cat <lora:full_lora_compvis:0.8>")
    builtin_switch = refresh_s["t"]
    generate("a photo of a cat")
    return {"arch": adapter.arch, "targets": len(adapter.targets), "rows": rows,
            "switch_s": {"ours": ours_switch, "builtin": builtin_switch}}


if __name__ == "__main__":
    probe_main(run)
