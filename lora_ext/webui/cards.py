"""The "Lora" cards page of the WebUI's extra-networks panel, listing lora_ext's catalogue, for when the built-in Lora
extension is disabled or absent. When the built-in is active nothing is registered: its page keeps working and the
`<lora:...>` tags its cards insert reach our extra network.

Behaviour follows the built-in page (A1111 v1.10 `ExtraNetworksPageLora`): the card inserts
`<lora:NAME:WEIGHT>` (NAME per the "When adding to prompt, refer to Lora by" setting; WEIGHT the user metadata's
"preferred weight", else the "default multiplier" setting, evaluated in the browser), followed by the user metadata's
"activation text"; its "negative text" goes to the negative prompt as `(text:1)`. LoRAs detected as made for another
SD version than the loaded model are hidden unless "Always show all networks on the Lora page" is on. The user
metadata editor is the WebUI's default one (description, notes).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from lora_ext import families
from lora_ext.webui import host, settings
from lora_ext.webui.api import lookup_key
from lora_ext.webui.state import GlueState

log = logging.getLogger(__name__)

BUILTIN = "Lora"  # directory name of A1111's built-in Lora extension (extensions-builtin/Lora)
TITLE = "Lora"


def builtin_lora_active() -> bool:
    """True when A1111's built-in Lora extension is enabled and its page module was loaded."""
    from modules import extensions

    enabled = any(ext.is_builtin and ext.name == BUILTIN for ext in extensions.active())
    return enabled and "ui_extra_networks_lora" in sys.modules


def setup(st: GlueState) -> None:
    """Register the page (in on_before_ui) when the built-in Lora extension is not active. Called at every script
    load (start-up and "Reload UI")."""
    from modules import script_callbacks

    if builtin_lora_active():
        return
    settings.register_cards()

    def before_ui() -> None:
        from modules import ui_extra_networks

        if builtin_lora_active():
            return
        if any(getattr(p, "title", None) == TITLE for p in ui_extra_networks.extra_pages):
            log.info("lora_ext: another extension already registered a %s cards page; not adding ours", TITLE)
            return
        ui_extra_networks.register_page(make_page(st))

    script_callbacks.on_before_ui(before_ui, name="lora_ext_cards_page")


def _model_version(model: Any) -> str:
    """A1111's "sd version" of the loaded model, from its is_sdxl / is_sd2 flags (else SD1)."""
    if getattr(model, "is_sdxl", False):
        return families.sd_version("sdxl")
    if getattr(model, "is_sd2", False):
        return families.sd_version("sd2")
    return families.sd_version("sd1")


def hidden_for_model(sd_version: str, model: Any) -> bool:
    """The built-in's filter: hide a LoRA made for another SD version than `model` (None: nothing loaded, show)."""
    if model is None or host.opt("lora_show_all", False):
        return False
    model_version = _model_version(model)
    if sd_version == "Unknown":
        return model_version in (host.opt("lora_hide_unknown_for_versions", []) or [])
    if getattr(model, "is_sdxl", False) or getattr(model, "is_sd2", False) or getattr(model, "is_sd1", False):
        return sd_version != model_version
    return False


def make_page(st: GlueState) -> Any:
    """An `ExtraNetworksPage` titled "Lora" over `st.index`."""
    from modules import ui_extra_networks
    from modules.ui_extra_networks import quote_js

    class LoraExtCardsPage(ui_extra_networks.ExtraNetworksPage):
        def __init__(self) -> None:
            super().__init__(TITLE)

        def refresh(self) -> None:
            st.index.refresh()

        def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict | None:
            entry = st.index.get(name)
            if entry is None:
                return None
            filename = str(entry.path)
            path = os.path.splitext(filename)[0]
            metadata = dict(entry.metadata)
            search_terms = [self.search_terms_from_path(filename)]
            if entry.shorthash:
                search_terms.append(entry.shorthash)
            key = lookup_key(st.index, entry)
            item: dict[str, Any] = {
                "name": key,
                "filename": filename,
                "shorthash": entry.shorthash or "",
                "preview": self.find_preview(path) or self.find_embedded_preview(path, key, metadata),
                "description": self.find_description(path),
                "search_terms": search_terms,
                "local_preview": f"{path}.{host.opt('samples_format', 'png')}",
                "metadata": metadata,
                "sort_keys": {"default": index, **self.get_sort_keys(filename)},
                "sd_version": entry.effective_sd_version,  # the sidecar's "sd version" wins, as in A1111
            }
            self.read_user_metadata(item)
            user = item["user_metadata"]
            alias = st.index.display_name(entry, host.opt("lora_preferred_name", "Alias from file"))
            found = st.index.get(alias)
            if found is None or found.path != entry.path:  # the text must reach this very file
                alias = key
            weight = user.get("preferred weight", 0.0)
            item["prompt"] = (quote_js(f"<lora:{alias}:") + " + "
                              + (str(weight) if weight else "opts.extra_networks_default_multiplier") + " + "
                              + quote_js(">"))
            activation = user.get("activation text")
            if activation:
                item["prompt"] += " + " + quote_js(" " + activation)
            negative = user.get("negative text")
            item["negative_prompt"] = quote_js("(" + negative + ":1)") if negative else quote_js("")
            if enable_filter and hidden_for_model(item["sd_version"], host.loaded_model()):
                return None
            return item

        def list_items(self) -> Any:
            # one card per file: a file whose name another file took is keyed `sub/dir/name` (what reaches it)
            for i, entry in enumerate(st.index.entries()):
                item = self.create_item(lookup_key(st.index, entry), i)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self) -> list[str]:
            return [str(d) for d in host.lora_dirs()]

    return LoraExtCardsPage()


