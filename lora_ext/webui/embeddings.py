"""Bundled textual inversions (`bundle_emb.*`) of the applied LoRAs become WebUI embeddings while they are active, as
A1111's built-in Lora does; one already loaded from the embeddings folder wins.

A1111 keeps one embedding database (`sd_hijack.model_hijack.embedding_db`); Forge keeps one per text-processing engine
of the model (`sd_model.text_processing_engine`, SDXL's `..._l` and `..._g`, each reading its own part of an SDXL
embedding), with its own loader (`backend.text_processing.textual_inversion`). Forge's built-in ignores bundled
embeddings; with lora_ext they work there as on A1111 (Forge's infotext names used embeddings in its "TI" field)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from lora_ext.session import Activation
from lora_ext.webui import host

log = logging.getLogger(__name__)


def register(bundled: dict[str, Any], act: Activation) -> None:
    """Register the bundled embeddings of `act`'s LoRAs (after unregistering the previous ones, kept in `bundled`)."""
    unregister(bundled)
    if not any(n.bundled_embeddings for n in act.networks):
        return
    model = host.current_model()
    if host.is_forge_model(model):
        from backend.text_processing import textual_inversion

        dbs = _forge_databases(model)
        for name, emb in _created(act, textual_inversion.create_embedding_from_data,
                                  lambda n: any(n in db.word_embeddings for db in dbs)):
            fitting = [db for db in dbs if db.expected_shape in (-1, emb.shape)]
            if not fitting:
                log.warning("lora_ext: bundled embedding %s of %s does not fit this model (width %s)", emb.name,
                            name, emb.shape)
                continue
            for db in fitting:
                db.register_embedding(emb)
            bundled[emb.name] = emb
        return
    from modules import sd_hijack
    from modules.textual_inversion import textual_inversion

    db = sd_hijack.model_hijack.embedding_db
    for name, emb in _created(act, textual_inversion.create_embedding_from_data, db.word_embeddings.__contains__):
        if db.expected_shape not in (-1, emb.shape):
            log.warning("lora_ext: bundled embedding %s of %s does not fit this model (width %s, model %s)",
                        emb.name, name, emb.shape, db.expected_shape)
            continue
        emb.shorthash = BundledHash(name)
        db.register_embedding(emb, model)
        bundled[emb.name] = emb


def _created(act: Activation, create: Any, loaded: Any) -> Iterator[tuple[str, Any]]:
    """(LoRA name, the WebUI's Embedding made by `create` from a bundled embedding) for each bundled embedding of
    `act`'s LoRAs that `loaded(name)` does not already know (one from the embeddings folder wins) and the WebUI's
    loader accepts."""
    for name, net in zip(act.applied, act.networks, strict=True):
        for emb_name, tensors in net.bundled_embeddings.items():
            if loaded(emb_name):
                log.warning('lora_ext: skip bundled embedding "%s" of %s: already loaded from the embeddings folder',
                            emb_name, name)
                continue
            try:
                emb = create(_embedding_data(tensors), emb_name, filename=f"{net.path}/{emb_name}")
            except Exception as err:  # the WebUI's own loader: any error means this embedding is unusable
                log.warning("lora_ext: bundled embedding %s of %s is not usable: %s", emb_name, name, err)
                continue
            yield name, emb


def _embedding_data(tensors: dict[str, Any]) -> dict[str, Any]:
    """A bundled embedding's tensors in the layout of an embedding file (`string_to_param.*` or SDXL's
    `clip_l`/`clip_g`), as the WebUIs' loaders take it."""
    data: dict[str, Any] = {}
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        if head == "string_to_param":
            data["string_to_param"] = {rest or "*": t}
        else:
            data[key] = t
    return data


def _forge_databases(model: Any) -> list[Any]:
    """The embedding databases of a Forge model's text-processing engines."""
    dbs = {}
    for attr, engine in vars(model).items():
        db = getattr(engine, "embeddings", None)
        if attr.startswith("text_processing_engine") and hasattr(db, "word_embeddings"):
            dbs[id(db)] = db
    return list(dbs.values())


def unregister(bundled: dict[str, Any]) -> None:
    if not bundled:
        return
    model = host.current_model()
    if host.is_forge_model(model):
        for db in _forge_databases(model):
            for emb_name in bundled:
                if emb_name in db.word_embeddings:
                    db.register_embedding_by_name(None, emb_name)
        bundled.clear()
        return
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    for emb_name in list(bundled):
        db.register_embedding_by_name(None, model, emb_name)
        del bundled[emb_name]


class BundledHash(str):
    """"TI hashes" entry of a bundled embedding: the LoRA's name (as the built-in writes it), or nothing when
    "lora_bundled_ti_to_infotext" is off (the WebUI formats it with an f-string, hence `__format__` and `__bool__`)."""

    def _shown(self) -> str:
        return str.__str__(self) if host.opt("lora_bundled_ti_to_infotext", True) else ""

    def __str__(self) -> str:
        return self._shown()

    def __format__(self, spec: str) -> str:
        return format(self._shown(), spec)

    def __bool__(self) -> bool:
        return bool(self._shown())
