"""Living beside the WebUI's built-in Lora extension (A1111's `networks`, Forge's `sd_forge_lora`): undo what it merged,
and drop conditionings it computed, when the `<lora:...>` tag changes hands."""

from __future__ import annotations

import sys
from typing import Any

from lora_ext.webui import host


def restore_builtin() -> int:
    """Undo what the built-in Lora merged (it restores lazily, in each layer's next forward, which would otherwise
    overwrite our merged weights later and leave its LoRA in our backups). Returns the number of layers restored."""
    import torch

    networks = sys.modules.get("networks")
    model = host.loaded_model()
    if host.is_forge_model(model):
        return restore_forge_builtin(model)
    if model is None or networks is None or not hasattr(networks, "network_restore_weights_from_backup"):
        return 0
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    for net in networks.loaded_networks:  # its bundled embeddings, registered while its LoRAs were active
        for emb_name, emb in getattr(net, "bundle_embeddings", {}).items():
            if getattr(emb, "loaded", None):
                db.register_embedding_by_name(None, model, emb_name)
                emb.loaded = None
    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()
                restored += 1
    return restored


FORGE_UNAPPLIED = "lora_ext"  # a `current_lora_hash` no set of LoRAs of Forge's built-in has


def restore_forge_builtin(model: Any) -> int:
    """Forge's built-in merges its LoRAs when Forge loads the model for sampling (`LoraLoader.refresh`, which also
    restores, by putting its backed-up Parameters back) and skips `activate()` when its "already applied" hash
    matches. When the tag changes hands: make its loaders restore now (their next refresh would otherwise put back
    weights over ours and leave its LoRAs in our backups), and clear the hash so that it applies its LoRAs afresh when
    it has the tag again (we publish Forge's unpatched objects while we hold it). Returns the weights restored."""
    restored = 0
    objects = getattr(model, "forge_objects_original", None) or model.forge_objects
    for patcher in (getattr(objects, "unet", None), getattr(getattr(objects, "clip", None), "patcher", None)):
        loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
        if loader is None or loader.loaded_hash == str([]):
            continue
        restored += len(loader.backup) + len(set(loader.online_backup))
        loader.refresh({}, offload_device=patcher.offload_device)
    model.current_lora_hash = FORGE_UNAPPLIED
    return restored


def forget_applied() -> None:
    """The tag goes back to the built-in: Forge's must apply its LoRAs afresh (we published Forge's unpatched model
    objects while we held the tag, so its "already applied" hash no longer says what the model samples with)."""
    model = host.loaded_model()
    if host.is_forge_model(model):
        model.current_lora_hash = FORGE_UNAPPLIED


def refresh_builtin() -> None:
    """Let the built-in Lora rescan its folders when it is loaded: its cards page and its /sdapi/v1/loras list a file
    that appeared (a LoRA finished by the training tab) without the user pressing refresh."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def clear_cond_cache() -> None:
    """The WebUI reuses conditionings for an identical prompt + tags; after the tag changes hands they may have been
    computed with the other handler's text-encoder weights."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = cls.__dict__.get(attr)
            if isinstance(cache, list):  # [params, conds] in A1111, [params, conds, extra] in Forge
                setattr(cls, attr, [None] * len(cache))
