"""The WebUI side of lora_ext: the only module that imports A1111's `modules.*` (with `lora_ext.webui.api` and
`lora_ext.webui.cards`). It maps A1111's objects onto `LoraController` calls and holds no LoRA logic.

What it registers (`setup()`, called once by `scripts/lora_ext_glue.py`):
- settings in "LoRA (lora_ext)", and the built-in's `sd_lora` / infotext settings when the built-in Lora is disabled;
- `on_app_started`: our `lora` extra network (alias `lyco`) replaces the built-in's in the registry (app_started runs
  after every before_ui callback, in both UI and API-only mode; see ../shared/webui/README.md), unless the setting
  hands the tag back; REST routes under /lora_ext/ (and /sdapi/v1/loras when the built-in is absent);
- `on_model_loaded`: forget the previous model (restore its weights, drop backups);
- `on_infotext_pasted`: "Lora hashes" -> the local file with that hash;
- `on_script_unloaded`: restore weights and hand the tag back.
Weights are restored after every generation: in `deactivate`, and, when a generation raises before reaching it, when
the WebUI closes the processing object (`with closing(p)` in txt2img/img2img and the API).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.webui.controller import Activation, LoraController

log = logging.getLogger(__name__)

SECTION = ("lora_ext", "LoRA (lora_ext)")
_OWN = "lora_ext_handle_lora_tags"
_re_lora_name = re.compile(r"<(lora|lyco):([^:>]+)(?=[:>])")


class _State:
    """Process-wide glue state, created by `setup()` (never at import)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.index: Any = None
        self.controller: LoraController | None = None
        self.network: Any = None  # our ExtraNetwork
        self.previous: Any = None  # the object that held 'lora' before us (the built-in's), to hand the tag back
        self.routes_app: Any = None  # the FastAPI app our routes were added to (UI mode makes a new one per reload)
        self.bundled: dict[str, Any] = {}  # embedding name -> Embedding registered for the active LoRAs


_state: _State | None = None


def state() -> _State:
    if _state is None:
        raise RuntimeError("lora_ext.webui.glue.setup() has not run")
    return _state


# ------------------------------------------------------------------------------------------------------------ paths


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


def _cache_file() -> Path:
    from modules import paths

    return Path(paths.data_path) / "cache" / "lora_ext_index.json"


class IndexResolver:
    """`Resolver` over the LoRA catalogue: A1111's name/alias rules, a rescan when a name is unknown."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def resolve(self, name: str) -> Path | None:
        entry = self.index.get(name)
        if entry is None:
            self.index.refresh()
            entry = self.index.get(name)
        return None if entry is None else Path(entry.path)

    def shorthash(self, path: Path) -> str | None:
        entry = self.index.entry_for_path(path)
        if entry is None:
            from lora_ext.formats.hashes import lora_short_hash

            return lora_short_hash(path)
        return entry.shorthash or self.index.full_hash(entry)[:12]


# --------------------------------------------------------------------------------------------------------- options


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default) if shared.opts is not None else default


def _register_settings() -> None:
    import gradio as gr
    from modules import shared

    templates = shared.options_templates
    ours = {
        _OWN: shared.OptionInfo(True, "lora_ext handles <lora:...> and <lyco:...> prompt tags").info(
            "off: the built-in Lora extension handles them again (takes effect at once)"),
        "lora_ext_warn_gradio": shared.OptionInfo(True, "Show LoRA problems (not found, unmatched keys, wrong model) "
                                                        "as a popup"),
        "lora_ext_warn_console": shared.OptionInfo(True, "Print LoRA problems in the console"),
        "lora_ext_cache_mb": shared.OptionInfo(2048, "Parsed LoRA files kept in memory (MiB)", gr.Number,
                                               {"precision": 0}),
        "lora_ext_keep_backups": shared.OptionInfo(True, "Keep backups of restored layers for fast switching").info(
            "costs the memory of the layers your LoRAs touch; off: freed after every generation"),
    }
    templates.update(shared.options_section(SECTION, ours))
    # the built-in's settings that our behaviour follows; registered by us only when the built-in is not loaded
    builtin = {
        "sd_lora": shared.OptionInfo("None", "Add network to prompt", gr.Dropdown,
                                     lambda: {"choices": ["None", *_names()]}, refresh=_refresh_index),
        "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by",
                                                 gr.Radio, {"choices": ["Alias from file", "Filename"]}),
        "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
        "lora_bundled_ti_to_infotext": shared.OptionInfo(True, "Add Lora name as TI hashes for bundled Textual "
                                                               "Inversion"),
    }
    missing = {k: v for k, v in builtin.items() if k not in templates}
    if missing:
        templates.update(shared.options_section(("extra_networks", "Extra Networks"), missing))
    shared.opts.onchange(_OWN, _apply_ownership, call=False)
    shared.opts.onchange("lora_ext_cache_mb", _apply_cache_size, call=False)


def _apply_cache_size() -> None:
    st = state()
    if st.controller is not None:
        st.controller.cache.max_bytes = max(0, int(_opt("lora_ext_cache_mb", 2048))) << 20


def _names() -> list[str]:
    st = state()
    if st.index is None:
        return []
    return sorted({e.name for e in st.index.entries()})


def _refresh_index() -> None:
    state().index.refresh()


# ------------------------------------------------------------------------------------------------- extra network


def _make_network() -> Any:
    from modules import extra_networks

    class LoraExtNetwork(extra_networks.ExtraNetwork):
        """`<lora:...>` / `<lyco:...>` handled by lora_ext."""

        def __init__(self) -> None:
            super().__init__("lora")

        def activate(self, p: Any, params_list: list[Any]) -> None:
            _activate(p, params_list)

        def deactivate(self, p: Any) -> None:
            _deactivate(p)

    return LoraExtNetwork()


def _activate(p: Any, params_list: list[Any]) -> None:
    from modules import shared

    st = state()
    assert st.controller is not None
    params = list(params_list)
    extra = _opt("sd_lora", "None")
    mentioned = any(x.items and x.items[0] == extra for x in params)
    if extra not in ("None", "", None) and not mentioned and st.index.get(extra) is not None:
        from modules import extra_networks

        mult = _opt("extra_networks_default_multiplier", 1.0)
        p.all_prompts = [x + f"<lora:{extra}:{mult}>" for x in p.all_prompts]
        params.append(extra_networks.ExtraNetworkParams(items=[extra, str(mult)]))
    st.controller.retain_bytes = None if _opt("lora_ext_keep_backups", True) else 0
    _hook_close(p)
    act = st.controller.activate(p.sd_model if getattr(p, "sd_model", None) is not None else shared.sd_model,
                                 [list(x.items) for x in params])
    _register_bundled_embeddings(act)
    if _opt("lora_add_hashes_to_infotext", True):
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        p.lora_hashes.update(act.hashes)
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())
    _show_problems(p, act)
    if act.report is not None and act.report.layers_recomputed:
        log.info("lora_ext: %s applied (%d layers in %.2f s)", ", ".join(act.applied) or "no LoRA",
                 act.report.layers_recomputed, act.report.seconds)


def _deactivate(p: Any) -> None:
    st = state()
    if st.controller is not None:
        st.controller.restore()
    _unregister_bundled_embeddings()


def _hook_close(p: Any) -> None:
    """Restore the weights when the WebUI closes `p`, also after an exception in the middle of a generation."""
    if getattr(p, "_lora_ext_close_hooked", False):
        return
    original = p.close

    def close(*args: Any, **kwargs: Any) -> Any:
        try:
            _deactivate(p)
        except Exception:
            log.exception("lora_ext: restoring weights after the generation failed")
        return original(*args, **kwargs)

    p.close = close
    p._lora_ext_close_hooked = True


def _show_problems(p: Any, act: Activation) -> None:
    if not act.problems:
        return
    for text in act.problems:
        p.comment(text)
        if _opt("lora_ext_warn_console", True):
            log.warning("lora_ext: %s", text)
    if _opt("lora_ext_warn_gradio", True):
        try:
            import gradio as gr

            gr.Warning("; ".join(act.problems))
        except Exception:  # outside a gradio event (API mode) there is nobody to show it to
            log.debug("lora_ext: no gradio context for the warning popup")


# ----------------------------------------------------------------------------------------- bundled embeddings


def _register_bundled_embeddings(act: Activation) -> None:
    """Bundled textual inversions (`bundle_emb.*`) of the applied LoRAs become embeddings while they are active,
    as the built-in does; one already loaded from the embeddings folder wins."""
    _unregister_bundled_embeddings()
    if not any(n.bundled_embeddings for n in act.networks):
        return
    from modules import sd_hijack, shared
    from modules.textual_inversion import textual_inversion

    db = sd_hijack.model_hijack.embedding_db
    for name, net in zip(act.applied, act.networks, strict=True):
        for emb_name, tensors in net.bundled_embeddings.items():
            if emb_name in db.word_embeddings:
                log.warning('lora_ext: skip bundled embedding "%s" of %s: already loaded from the embeddings folder',
                            emb_name, name)
                continue
            data: dict[str, Any] = {}
            for key, t in tensors.items():
                head, _, rest = key.partition(".")
                if head == "string_to_param":
                    data["string_to_param"] = {rest or "*": t}
                else:
                    data[key] = t
            try:
                emb = textual_inversion.create_embedding_from_data(data, emb_name, filename=f"{net.path}/{emb_name}")
            except Exception as err:
                log.warning("lora_ext: bundled embedding %s of %s is not usable: %s", emb_name, name, err)
                continue
            if db.expected_shape not in (-1, emb.shape):
                log.warning("lora_ext: bundled embedding %s of %s does not fit this model (width %s, model %s)",
                            emb_name, name, emb.shape, db.expected_shape)
                continue
            emb.shorthash = _BundledHash(name)
            db.register_embedding(emb, shared.sd_model)
            state().bundled[emb_name] = emb


def _unregister_bundled_embeddings() -> None:
    bundled = state().bundled
    if not bundled:
        return
    from modules import sd_hijack, shared

    db = sd_hijack.model_hijack.embedding_db
    for emb_name in list(bundled):
        db.register_embedding_by_name(None, shared.sd_model, emb_name)
        del bundled[emb_name]


class _BundledHash(str):
    """"TI hashes" entry of a bundled embedding: the LoRA's name (as the built-in writes it), or nothing when
    "lora_bundled_ti_to_infotext" is off (the WebUI formats it with an f-string, hence `__format__` and `__bool__`)."""

    def _shown(self) -> str:
        return str.__str__(self) if _opt("lora_bundled_ti_to_infotext", True) else ""

    def __str__(self) -> str:
        return self._shown()

    def __format__(self, spec: str) -> str:
        return format(self._shown(), spec)

    def __bool__(self) -> bool:
        return bool(self._shown())


# ------------------------------------------------------------------------------------------------------ callbacks


def loaded_model() -> Any:
    """The WebUI's current model if one is loaded, else None; never starts loading one (`shared.sd_model` would)."""
    from modules import sd_models

    return getattr(getattr(sd_models, "model_data", None), "sd_model", None)


def _builtin_restore() -> int:
    """Undo what the built-in Lora merged (it restores lazily, in each layer's next forward, which would otherwise
    overwrite our merged weights later and leave its LoRA in our backups). Returns the number of layers restored."""
    import sys

    import torch

    networks = sys.modules.get("networks")
    model = loaded_model()
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


def _clear_cond_cache() -> None:
    """The WebUI reuses conditionings for an identical prompt + tags; after the tag changes hands they may have been
    computed with the other handler's text-encoder weights."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if isinstance(cls.__dict__.get(attr), list):
                setattr(cls, attr, [None, None])


def _apply_ownership(*_: Any) -> None:
    from modules import extra_networks

    st = state()
    _clear_cond_cache()
    with st.lock:
        current = extra_networks.extra_network_registry.get("lora")
        if _opt(_OWN, True):
            if current is not st.network:
                restored = _builtin_restore()
                if restored:
                    log.info("lora_ext: restored %d layers the built-in Lora had merged", restored)
                st.previous = current
                extra_networks.register_extra_network(st.network)
                extra_networks.register_extra_network_alias(st.network, "lyco")
            owner = "lora_ext"
        else:
            if current is st.network:
                if st.controller is not None:
                    st.controller.restore()
                if st.previous is not None:
                    extra_networks.register_extra_network(st.previous)
                    extra_networks.register_extra_network_alias(st.previous, "lyco")
                else:
                    extra_networks.extra_network_registry.pop("lora", None)
                    extra_networks.extra_network_aliases.pop("lyco", None)
            owner = type(st.previous).__module__ if st.previous is not None else "nobody (built-in Lora not loaded)"
    print(f"lora_ext: <lora:...> and <lyco:...> tags are handled by {owner} (setting '{_OWN}' in {SECTION[1]})")


def _on_app_started(demo: Any, app: Any) -> None:
    _apply_ownership()
    st = state()
    if app is not None and st.routes_app is not app:
        try:
            from lora_ext.webui import api

            api.add_routes(app, st)
            st.routes_app = app
        except ImportError:
            log.debug("lora_ext: REST routes not available")


def _on_cfg_denoiser(params: Any) -> None:
    """Before each sampling step: LoRAs with start=/stop= switch their UNet part on or off."""
    st = state()
    if st.controller is None:
        return
    steps = int(params.total_sampling_steps)
    step = int(params.sampling_step)  # lags by one after the first call (set by the sampler's per-step callback)
    denoiser = getattr(params, "denoiser", None)
    try:  # the denoiser counts its own calls: exact, also for samplers that call it twice per step
        calls, call = int(denoiser.total_steps), int(denoiser.step)
        if calls > 0 and steps > 0:
            step = min(steps - 1, call * steps // calls)
    except (AttributeError, TypeError, ValueError):
        pass
    st.controller.at_step(step, max(steps, 1))


def _on_model_loaded(sd_model: Any) -> None:
    st = state()
    if st.controller is not None:
        st.controller.forget_model()


def _on_infotext_pasted(infotext: str, d: dict) -> None:
    """Rewrite `<lora:NAME:` in a pasted prompt to the local file whose hash the infotext names."""
    hashes_text = d.get("Lora hashes")
    prompt = d.get("Prompt")
    if not hashes_text or not isinstance(prompt, str):
        return
    hashes: dict[str, str] = {}
    for part in str(hashes_text).split(","):
        name, sep, h = part.strip().partition(":")
        if sep:
            hashes[name.strip()] = h.strip()
    st = state()
    preferred = _opt("lora_preferred_name", "Alias from file")

    def replace(m: re.Match[str]) -> str:
        h = hashes.get(m.group(2))
        if not h:
            return m.group(0)
        entry = _find_by_hash(st.index, h)
        if entry is None:
            return m.group(0)
        return f"<{m.group(1)}:{st.index.display_name(entry, preferred)}"

    d["Prompt"] = _re_lora_name.sub(replace, prompt)


_PASTE_HASH_BUDGET = 4 << 30  # bytes of not-yet-hashed LoRA files we are willing to read to resolve a pasted hash


def _find_by_hash(index: Any, short: str) -> Any:
    """The entry with this hash. Files never hashed (listing does not hash) are hashed on demand, smallest first,
    up to `_PASTE_HASH_BUDGET` bytes, so a LoRA downloaded under another name is still found."""
    entry = index.by_hash(short)
    if entry is not None:
        return entry
    budget = _PASTE_HASH_BUDGET
    try:
        for candidate in sorted((e for e in index.entries() if not e.shorthash), key=lambda e: e.size):
            if candidate.size > budget:
                break
            budget -= candidate.size
            try:
                if index.full_hash(candidate, persist=False).lower().startswith(short.lower()):
                    return index.entry_for_path(candidate.path) or candidate
            except LoraExtError as err:
                log.debug("lora_ext: cannot hash %s: %s", candidate.path, err)
    finally:
        index.save()  # the hashes learnt on the way, written once
    return None


def _on_script_unloaded() -> None:
    st = state()
    if st.controller is not None:
        st.controller.forget_model()
    # hand the tag back until the scripts are loaded again (Reload UI registers ours again in app_started)
    from modules import extra_networks

    if extra_networks.extra_network_registry.get("lora") is st.network and st.previous is not None:
        extra_networks.register_extra_network(st.previous)
        extra_networks.register_extra_network_alias(st.previous, "lyco")


FORGE_NOTICE = ("lora_ext: Stable Diffusion WebUI Forge detected: <lora:...> tags are left to Forge's built-in Lora; "
                "lora_ext takes over nothing here until it supports Forge's model runtime")


def _on_app_started_forge(demo: Any, app: Any) -> None:
    print(FORGE_NOTICE, flush=True)


def setup() -> None:
    """Register settings and callbacks with the WebUI. Called at every load of the scripts (start-up and "Reload
    UI", which clears all callbacks first); the catalogue, parsed-file cache and patcher survive reloads. In Forge
    (lora_ext.webui.host) only the start-up notice is registered: the tag, the model and the routes stay Forge's."""
    global _state
    from modules import script_callbacks

    from lora_ext.webui import host

    if host.detect() == host.FORGE:
        script_callbacks.on_app_started(_on_app_started_forge, name="lora_ext_forge_notice")
        return

    from lora_ext.library.index import LoraIndex
    from lora_ext.patch.cache import LoraCache

    if _state is None:
        st = _State()
        st.index = LoraIndex(lora_dirs(), cache_file=_cache_file())
        st.controller = LoraController(IndexResolver(st.index), cache=LoraCache())
        st.network = _make_network()
        _state = st
    st = _state
    _register_settings()
    _apply_cache_size()
    script_callbacks.on_app_started(_on_app_started, name="lora_ext_take_over_lora_tag")
    script_callbacks.on_model_loaded(_on_model_loaded, name="lora_ext_model_loaded")
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser, name="lora_ext_step_windows")
    script_callbacks.on_infotext_pasted(_on_infotext_pasted, name="lora_ext_infotext_pasted")
    script_callbacks.on_script_unloaded(_on_script_unloaded, name="lora_ext_unloaded")
    try:
        from lora_ext.webui import cards

        cards.setup(st)
    except ImportError:
        log.debug("lora_ext: cards page not available")
