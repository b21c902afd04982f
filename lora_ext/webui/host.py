"""The WebUI as lora_ext sees it: which WebUI it is (`detect`), and the only accessors of the WebUI's `modules.*` state
that the rest of `lora_ext.webui` uses (loaded model, LoRA folders, settings, console lines). Registration with the
WebUI (callbacks, extra networks, pages, routes) stays in the glue.

Two WebUIs share the extension API; what differs is the model runtime, and every difference lives here:

- AUTOMATIC1111 v1.10 (`a1111`): the ldm/sgm model tree (`sd_model.model.diffusion_model`, `cond_stage_model` or
  SDXL's `conditioner`); the weights stay where A1111 put them.
- Stable Diffusion WebUI Forge (`forge`): its own runtime (`backend/`): the UNet and text encoders live in
  `sd_model.forge_objects` (`lora_ext.patch.forge`), its memory manager moves weights between devices by replacing
  Parameter objects (the session follows them and keeps backups on the CPU, as Forge's built-in does), and what an
  extra network applies must be published in `sd_model.forge_objects_after_applying_lora`, which Forge's
  `processing.py` takes right after `activate()` (`publish`).

The glue asks the model object, not the WebUI, which tree it has (`is_forge_model`): the answer cannot go stale.
Detection of the WebUI itself looks for Forge's own top-level package on the import path (`modules_forge`, which
Forge's `webui.py` imports before any extension loads); nothing is imported to find out.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from lora_ext.patch.keymap import ModelAdapter

A1111 = "a1111"
FORGE = "forge"


def detect() -> str:
    """`forge` when Forge's `modules_forge` package is loaded or importable, else `a1111`."""
    if "modules_forge" in sys.modules:
        return FORGE
    try:
        found = importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        found = False
    return FORGE if found else A1111


# ------------------------------------------------------------------------------- A1111 accessors (the only ones)


def opt(name: str, default: Any) -> Any:
    """The WebUI setting `name`, or `default` when it is not set (or settings are not loaded yet)."""
    from modules import shared

    return getattr(shared.opts, name, default) if shared.opts is not None else default


def loaded_model() -> Any:
    """The WebUI's current model if one is loaded, else None; never starts loading one (`shared.sd_model` would)."""
    from modules import sd_models

    return getattr(getattr(sd_models, "model_data", None), "sd_model", None)


def current_model() -> Any:
    """`shared.sd_model`: the WebUI's model, loaded first if none is (use inside generations)."""
    from modules import shared

    return shared.sd_model


def processing_model(p: Any) -> Any:
    """The model a processing object generates with (`p.sd_model`, else the WebUI's current one)."""
    model = getattr(p, "sd_model", None)
    return model if model is not None else current_model()


def tag_handler() -> Any:
    """The extra network that handles `<lora:...>` now (ours, the built-in's, or None)."""
    from modules import extra_networks

    return extra_networks.extra_network_registry.get("lora")


def is_forge_model(model: Any) -> bool:
    """True for a model object of Forge's runtime (it holds `forge_objects`)."""
    return model is not None and getattr(model, "forge_objects", None) is not None


def unet_and_text_encoder(model: Any) -> tuple[Any, Any]:
    """(UNet, the module the prompts go into) of a model: A1111's `model.model.diffusion_model`, and SDXL's
    `conditioner` or SD1/SD2's `cond_stage_model`; Forge's `forge_objects.unet.model.diffusion_model` and
    `forge_objects.clip.cond_stage_model`; None for a part the object lacks."""
    if is_forge_model(model):
        objects = model.forge_objects
        unet = getattr(getattr(getattr(objects, "unet", None), "model", None), "diffusion_model", None)
        return unet, getattr(getattr(objects, "clip", None), "cond_stage_model", None)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    encoder = getattr(model, "conditioner", None)
    if encoder is None:
        encoder = getattr(model, "cond_stage_model", None)
    return unet, encoder


def lora_dirs() -> list[Path]:
    """The WebUI's LoRA folders: --lora-dir (default models/Lora) and the LyCORIS back-compat folder."""
    from modules import paths, shared

    opts = shared.cmd_opts
    main = getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    lyco = getattr(opts, "lyco_dir_backcompat", None) or os.path.join(paths.models_path, "LyCORIS")
    dirs = [Path(main)]
    if Path(lyco) != Path(main):
        dirs.append(Path(lyco))
    return dirs


def index_cache_file() -> Path:
    """Where the catalogue keeps its header and hash cache (the WebUI's data dir; Forge's hashes are another kind, see
    `addnet_hashes`, so it has a file of its own)."""
    from modules import paths

    name = "lora_ext_index_forge.json" if detect() == FORGE else "lora_ext_index.json"
    return Path(paths.data_path) / "cache" / name


def addnet_hashes() -> bool:
    """Which hash "Lora hashes" holds, as the WebUI's built-in writes it: A1111's "addnet" hash of a safetensors'
    tensor data, or (Forge, whose `hashes.sha256` ignores `use_addnet_hash`) the sha256 of the whole file. Either way
    a `sshs_model_hash` in the file's metadata wins. Writing the built-in's keeps a WebUI's infotexts consistent
    (pasting, image browsers, Civitai, which reads both kinds)."""
    return detect() != FORGE


def say(message: str) -> None:
    """A start-up or state line for the console. A1111 prints extension messages (its log level hides INFO), so
    these go to stdout, flushed; problems during generations go through `logging` instead."""
    print(message, flush=True)


def model_adapter(sd_model: Any) -> ModelAdapter:
    """The adapter factory of this host (`lora_ext.session.AdapterFactory`): A1111's ldm (SD1/SD2) and sgm (SDXL)
    model trees, or Forge's."""
    if is_forge_model(sd_model):
        from lora_ext.patch.forge import adapter_for_forge

        return adapter_for_forge(sd_model)
    from lora_ext.patch.ldm import adapter_for_ldm

    return adapter_for_ldm(sd_model)


def session_options() -> dict[str, Any]:
    """How the session keeps backups in this WebUI (`lora_ext.session.LoraSession` keywords). Forge: backups on the
    CPU (Forge budgets GPU memory for its own tensors only, and backs its own LoRA weights up on the CPU too), and
    merged weights followed when its memory manager moves them (new Parameter objects)."""
    if detect() == FORGE:
        return {"backup_device": "cpu", "follow_moves": True}
    return {}


def publish(model: Any) -> None:
    """Make what was just applied the model Forge samples with: Forge's `processing.py` replaces
    `sd_model.forge_objects` by `forge_objects_after_applying_lora` right after `activate()` (also for the hires
    pass). Our weights are in place in the modules every copy shares, so the published objects are the current
    (unpatched by Forge) ones; without this, Forge would sample with whatever its built-in published last. A1111:
    nothing to do."""
    if is_forge_model(model):
        model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()


# ------------------------------------------------------------------------------------------ training (the tab)


def checkpoint_file() -> str | None:
    """The file of the WebUI's loaded checkpoint, or None when no model is loaded. Forge loads its model at the first
    generation, not at start: there the checkpoint selected in its UI counts (what the next generation loads)."""
    model = loaded_model()
    info = getattr(model, "sd_checkpoint_info", None)
    if info is None and detect() == FORGE:
        from modules import sd_models

        params = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None) or {}
        info = params.get("checkpoint_info")
    return getattr(info, "filename", None)


def model_dirs() -> list[Path]:
    """Where the WebUI finds checkpoints and VAEs (--ckpt-dir, models/Stable-diffusion, --vae-dir, models/VAE)."""
    from modules import paths, shared

    opts = shared.cmd_opts
    ckpt = getattr(opts, "ckpt_dir", None) or os.path.join(paths.models_path, "Stable-diffusion")
    vae = getattr(opts, "vae_dir", None) or os.path.join(paths.models_path, "VAE")
    return [Path(ckpt), Path(vae)]


def refresh_checkpoints() -> None:
    """Rescan the checkpoint folder (a merged checkpoint shows in the checkpoint list; the dropdown picks it up on its
    refresh button, as for any file added by hand)."""
    from modules import sd_models

    sd_models.list_models()


def data_dir() -> Path:
    """The WebUI's data folder (--data-dir; its own folder by default)."""
    from modules import paths

    return Path(paths.data_path)


def api_credentials() -> str | None:
    """--api-auth ("user:pass,user2:pass2") or None."""
    from modules import shared

    return getattr(shared.cmd_opts, "api_auth", None) or None


def api_enabled() -> bool:
    """True when the WebUI serves its API (--api or --nowebui): our REST routes follow the same switch."""
    from modules import shared

    return bool(getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False))


def release_model() -> Any:
    """Move the WebUI's model off the GPU for a training job (between generations: the WebUI's queue lock is held).
    Returns the model that was moved (None when none is loaded). Forge: its memory manager unloads every model from
    the GPU (it loads them again by itself at the next generation)."""
    from modules import call_queue, sd_models

    with call_queue.queue_lock:
        model = loaded_model()
        if model is not None and is_forge_model(model):
            from backend import memory_management

            memory_management.unload_all_models()
            memory_management.soft_empty_cache(force=True)
        elif model is not None:
            sd_models.send_model_to_cpu(model)
        return model


def restore_model(model: Any) -> None:
    """Bring a model moved by `release_model` back to the WebUI's device (if it is still the loaded one; Forge loads
    it at its next generation by itself)."""
    from modules import call_queue, sd_models

    if model is None or is_forge_model(model):
        return
    with call_queue.queue_lock:
        if loaded_model() is model:
            sd_models.send_model_to_device(model)


def send_to_txt2img(button: Any, text: Any) -> None:
    """Clicking `button` pastes `text`'s value into txt2img's prompt and shows txt2img (A1111's paste buttons)."""
    from modules import infotext_utils

    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
        paste_button=button, tabname="txt2img", source_text_component=text))
