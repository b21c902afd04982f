"""Living beside A1111's built-in Lora extension: undo what it merged, and drop conditionings it computed, when the
`<lora:...>` tag changes hands."""

from __future__ import annotations

import sys

from lora_ext.webui import host


def restore_builtin() -> int:
    """Undo what the built-in Lora merged (it restores lazily, in each layer's next forward, which would otherwise
    overwrite our merged weights later and leave its LoRA in our backups). Returns the number of layers restored."""
    import torch

    networks = sys.modules.get("networks")
    model = host.loaded_model()
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
            if isinstance(cls.__dict__.get(attr), list):
                setattr(cls, attr, [None, None])
