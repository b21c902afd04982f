"""The WebUI glue: wires A1111's callbacks and extra-network registry to lora_ext. It holds no LoRA logic, no
infotext format and no WebUI state accessors (those are in `lora_ext.session`, `lora_ext.formats.infotext` and
`lora_ext.webui.host`); imports point from here to the other `lora_ext.webui` modules, never back.

What it registers (`setup()`, called once by `scripts/lora_ext_glue.py`):
- settings (`lora_ext.webui.settings`);
- `on_app_started`: our `lora` extra network (alias `lyco`) replaces the built-in's in the registry (app_started runs
  after every before_ui callback, in both UI and API-only mode; see ../shared/webui/README.md), unless the setting
  hands the tag back; REST routes under /lora_ext/ (and /sdapi/v1/loras when the built-in is absent);
- `on_cfg_denoiser`: LoRAs with start=/stop= or a weight schedule bring their UNet part to each sampling step
  (re-merge or bypass gains, `lora_ext.session`); the hires pass activates with the tags' hr weights;
- `on_model_loaded`: forget the previous model (restore its weights, drop backups); when the model changes while a
  generation samples (the SDXL refiner), apply that generation's LoRAs to the new one;
- `on_infotext_pasted`: "Lora hashes" -> the local file with that hash;
- `on_script_unloaded`: restore weights and hand the tag back;
- the cards page (`lora_ext.webui.cards`) when the built-in Lora is not active;
- `on_ui_tabs`: the "LoRA Training" tab, and with --api the training routes (`lora_ext.webui.training`).
Weights are restored after every generation: in `deactivate`, and, when a generation raises before reaching it, when
the WebUI closes the processing object (`with closing(p)` in txt2img/img2img and the API).
Forge registers the same callbacks; what differs is in `host` (model trees, publishing the applied model, backups,
hashes), `builtin` (Forge's built-in Lora's loaders) and `batch` (how Forge batches the UNet's rows and encodes texts).
"""

from __future__ import annotations

import logging
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.formats import infotext
from lora_ext.library.lookup import find_by_hash
from lora_ext.patch.bypass import GenerationShape
from lora_ext.prompt import LoraRef, parse_prompt, tag_text
from lora_ext.session import Activation, step_of_call
from lora_ext.webui import batch, builtin, embeddings, host, settings
from lora_ext.webui.state import GlueState

log = logging.getLogger(__name__)


_state: GlueState | None = None


def state() -> GlueState:
    if _state is None:
        raise RuntimeError("lora_ext.webui.glue.setup() has not run")
    return _state


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


def _default_tag(p: Any, params: list[Any]) -> None:
    """The "Add network to prompt" setting (`sd_lora`): its LoRA joins every prompt that does not mention it."""
    extra = host.opt("sd_lora", "None")
    if extra in ("None", "", None) or any(x.items and x.items[0] == extra for x in params):
        return
    if state().index.get(extra) is None:
        return
    from modules import extra_networks

    mult = host.opt("extra_networks_default_multiplier", 1.0)
    p.all_prompts = [x + f"<lora:{extra}:{mult}>" for x in p.all_prompts]
    params.append(extra_networks.ExtraNetworkParams(items=[extra, str(mult)]))


def _activate(p: Any, params_list: list[Any]) -> None:
    st = state()
    if st.generation is not None and st.sampling and p is not st.generation[0] and not params_list:
        _aside(st, p)
        return
    params = list(params_list)
    _default_tag(p, params)
    st.session.retain_bytes = None if host.opt("lora_ext_keep_backups", True) else 0
    st.session.schedule_mode = str(host.opt(settings.SCHEDULE_MODE, "auto"))
    _hook_close(p)
    hires = bool(getattr(p, "is_hr_pass", False))
    per_image = _per_image_tags(p, hires) if host.opt(settings.PER_IMAGE, True) else None
    negative, originals = _take_negative_tags(p, hires) if host.opt(settings.NEGATIVE, False) else (None, {})
    # kept for a model switch while sampling (the SDXL refiner): `_reapply`
    st.generation = (p, [tag_text(x.items) for x in params], per_image, hires, negative)
    st.sampling = False
    act = _apply_generation(st, host.processing_model(p), originals, fresh_hashes=not hires)
    if not host.opt(settings.NEGATIVE, False):
        act.problems.extend(_negative_prompt_tags(p, hires))
    _show_problems(p, act)
    for note in act.notes:
        log.info("lora_ext: %s", note)
    if act.report is not None and act.report.layers_recomputed:
        log.info("lora_ext: %s applied (%d layers in %.2f s)", ", ".join(act.applied) or "no LoRA",
                 act.report.layers_recomputed, act.report.seconds)


def _this_batch(p: Any, attr: str) -> list[str]:
    """The current batch's slice of one of A1111's per-generation lists (`all_prompts`, `all_negative_prompts`, ...)."""
    size = int(getattr(p, "batch_size", 1) or 1)
    start = int(getattr(p, "iteration", 0) or 0) * size
    return list((getattr(p, attr, None) or [])[start:start + size])


def _per_image_tags(p: Any, hires: bool) -> list[list[str]] | None:
    """Each image's own LoRA tags when the batch's prompts differ in them (A1111 hands the extra network the first
    prompt's tags only); None when every image has the same ones."""
    from modules import extra_networks

    prompts = _this_batch(p, "all_hr_prompts" if hires else "all_prompts")
    if len(prompts) < 2:
        return None
    tags = []
    for prompt in prompts:
        _, found = extra_networks.parse_prompt(prompt)
        tags.append([tag_text(x.items) for kind in ("lora", "lyco") for x in found.get(kind, [])])
    return tags if any(t != tags[0] for t in tags) else None


def _take_negative_tags(p: Any, hires: bool) -> tuple[list[list[str]] | None, dict[str, list[str]]]:
    """The LoRA tags of each image's negative prompt, taken out of the text the WebUI will encode (the setting that
    applies them to the negative branch); None when there are none. Also the negative prompts as they were."""
    attr = "hr_negative_prompts" if hires else "negative_prompts"
    texts = getattr(p, attr, None)
    if not texts:
        return None, {}
    stripped, tags = [], []
    for text in texts:
        rest, refs = _lora_tags_of(text)
        stripped.append(rest)
        tags.append([r.tag for r in refs])
    if not any(tags):
        return None, {}
    setattr(p, attr, stripped)
    return tags, {attr: list(texts)}


def _lora_tags_of(text: str | None) -> tuple[str | None, list[LoraRef]]:
    """(the text without its LoRA tags, the tags); a text whose tags do not parse stays as it is, without tags."""
    try:
        return parse_prompt(text or "")
    except LoraExtError:
        return text, []


def _negative_prompt_tags(p: Any, hires: bool) -> list[str]:
    """A sentence (once per generation) when a negative prompt of this batch holds LoRA tags: A1111 (built-in
    included) leaves them there as plain text for the text encoder; nothing applies them."""
    if getattr(p, "_lora_ext_negative_warned", False):
        return []
    names = []
    for text in _this_batch(p, "all_hr_negative_prompts" if hires else "all_negative_prompts"):
        names += [r.name for r in _lora_tags_of(text)[1] if r.name not in names]
    if not names:
        return []
    p._lora_ext_negative_warned = True
    return [f"the negative prompt's LoRA tags ({', '.join(names)}) are not applied: like the built-in, the WebUI "
            "passes them to the text encoder as plain text; to weaken a LoRA, give it a lower or negative weight in "
            "the prompt"]


def _shape(p: Any, hires: bool) -> GenerationShape:
    """What this pass will generate (for the merge-or-bypass estimate of changing LoRA weights)."""
    def number(*names: str, default: int) -> int:
        for name in names:
            try:
                value = int(getattr(p, name, 0) or 0)
            except (TypeError, ValueError):
                continue
            if value > 0:
                return value
        return default

    steps = number("steps", default=20)
    if hires:
        return GenerationShape(steps=number("hr_second_pass_steps", default=steps),
                               height=number("hr_upscale_to_y", "height", default=512),
                               width=number("hr_upscale_to_x", "width", default=512),
                               batch=number("batch_size", default=1))
    return GenerationShape(steps=steps, height=number("height", default=512), width=number("width", default=512),
                           batch=number("batch_size", default=1))


def _deactivate(p: Any) -> None:
    st = state()
    _release_pending(st)
    st.generation = None
    st.sampling = False
    batch.detach(st)
    st.session.restore()
    embeddings.unregister(st.bundled)


def _hook_close(p: Any) -> None:
    """Restore the weights when the WebUI closes `p`, also after an exception in the middle of a generation."""
    if getattr(p, "_lora_ext_close_hooked", False):
        return
    original = p.close

    def close(*args: Any, **kwargs: Any) -> Any:
        try:
            _deactivate(p)
        except Exception:  # closing must go on: the WebUI's own close frees the rest
            log.exception("lora_ext: restoring weights after the generation failed")
        return original(*args, **kwargs)

    p.close = close
    p._lora_ext_close_hooked = True


def _show_problems(p: Any, act: Activation) -> None:
    if not act.problems:
        return
    for text in act.problems:
        p.comment(text)
        if host.opt("lora_ext_warn_console", True):
            log.warning("lora_ext: %s", text)
    if host.opt("lora_ext_warn_gradio", True):
        try:
            import gradio as gr

            gr.Warning("; ".join(act.problems))
        except Exception:  # outside a gradio event (API mode) there is nobody to show it to
            log.debug("lora_ext: no gradio context for the warning popup")


# ------------------------------------------------------------------------------------------------ tag ownership


def _register(network: Any) -> None:
    from modules import extra_networks

    extra_networks.register_extra_network(network)
    extra_networks.register_extra_network_alias(network, "lyco")


def _apply_ownership(*_: Any) -> None:
    """Take the tag or hand it back, as the setting says; one console line says who has it."""
    from modules import extra_networks

    st = state()
    builtin.clear_cond_cache()
    with st.lock:
        current = extra_networks.extra_network_registry.get("lora")
        if host.opt(settings.OWN, True):
            if current is not st.network:
                restored = builtin.restore_builtin()
                if restored:
                    log.info("lora_ext: restored %d layers the built-in Lora had merged", restored)
                st.previous = current
                _register(st.network)
            owner = "lora_ext"
        else:
            if current is st.network:
                st.session.restore()
                builtin.forget_applied()
                if st.previous is not None:
                    _register(st.previous)
                else:
                    extra_networks.extra_network_registry.pop("lora", None)
                    extra_networks.extra_network_aliases.pop("lyco", None)
            owner = type(st.previous).__module__ if st.previous is not None else "nobody (built-in Lora not loaded)"
    host.say(f"lora_ext: <lora:...> and <lyco:...> tags are handled by {owner} "
             f"(setting '{settings.OWN}' in {settings.SECTION[1]})")


# ------------------------------------------------------------------------------------------------------ callbacks


def _on_app_started(demo: Any, app: Any) -> None:
    _apply_ownership()
    st = state()
    if app is not None and st.routes_app is not app:
        try:
            from lora_ext.webui import api, training

            api.add_routes(app, st)
            if host.api_enabled():
                training.add_routes(app, _training())
            st.routes_app = app
        except ImportError:  # fastapi: always there in the WebUI
            log.debug("lora_ext: REST routes not available")


def _training() -> Any:
    st = state()
    if st.training is None:
        from lora_ext.webui import training

        st.training = training.make_service(st)
    return st.training


def _on_ui_tabs() -> list[tuple[Any, str, str]]:
    from lora_ext.webui import training

    return training.build_tab(_training())


def _on_cfg_denoiser(params: Any) -> None:
    """Before each sampling step: LoRAs with start=/stop= or a weight schedule bring their UNet part to this step."""
    steps = int(params.total_sampling_steps)
    step = int(params.sampling_step)  # lags by one after the first call (set by the sampler's per-step callback)
    denoiser = getattr(params, "denoiser", None)
    try:  # the denoiser counts its own calls: exact, also for samplers that call it twice per step
        calls, call = int(denoiser.total_steps), int(denoiser.step)
        if calls > 0 and steps > 0:
            step = step_of_call(call, calls, steps)
    except (AttributeError, TypeError, ValueError):
        pass
    st = state()
    if st.generation is not None and getattr(denoiser, "p", None) is st.generation[0]:
        st.sampling = True  # our generation samples (the built-in's generations run this callback too)
    st.session.at_step(step, max(steps, 1))
    batch.on_step(st, params)


def _aside(st: Any, p: Any) -> None:
    """An activation for another processing object while a generation samples: A1111's `get_empty_cond` right after
    a model load (the refiner taking over) activates extra networks with none, to compute the empty prompt's
    conditioning without LoRAs. Restore for it, and put the generation's LoRAs back before the new model's next text
    encoder call that is not that one, or its next UNet call, whichever comes first."""
    _release_pending(st)
    model = st.session.model
    st.session.restore()
    if model is None:
        return

    def again(*_: Any) -> None:
        _release_pending(st)
        if st.generation is not None:
            _reapply(st, model)

    def text_hook(module: Any, args: tuple, kwargs: dict) -> None:
        texts = batch.prompt_texts(args, kwargs)
        if type(texts) is list and texts == [""]:  # get_empty_cond's own call (A1111 passes a plain list there)
            return
        again()

    hooks = []
    unet, encoder = host.unet_and_text_encoder(model)
    if unet is not None:
        hooks.append(unet.register_forward_pre_hook(lambda *a: again()))
    if encoder is not None and hasattr(encoder, "register_forward_pre_hook"):
        hooks.append(encoder.register_forward_pre_hook(text_hook, with_kwargs=True))
    st.pending_hooks = hooks


def _release_pending(st: Any) -> None:
    for hook in st.pending_hooks:
        hook.remove()
    st.pending_hooks = []


def _on_model_loaded(sd_model: Any) -> None:
    """A new model (or new weights in the same object): restore and forget the old one. When that happens while a
    generation samples (A1111's refiner taking over), the generation's LoRAs go on the new model: those that fit are
    applied, those that do not are said once in the console and the image's comments."""
    st = state()
    _release_pending(st)
    batch.detach(st)
    st.session.forget_model()
    if st.generation is not None and st.sampling:
        _reapply(st, sd_model)


def _apply_generation(st: Any, model: Any, originals: dict[str, list[str]] | None = None, *,
                      fresh_hashes: bool) -> Activation:
    """The generation's LoRAs (`st.generation`: processing object, tags, per-image tags, hires, negative tags) on
    `model`: the session, the per-image hooks, bundled embeddings and the infotext's "Lora hashes" (started afresh,
    or, for the hires pass and a model switch, added to)."""
    p, tags, per_image, hires, negative = st.generation
    act = st.session.activate(model, tags, hires=hires, shape=_shape(p, hires), per_image=per_image,
                              negative=negative)
    if st.session.per_image:
        batch.attach(st, p, model, hires, originals)
    else:
        batch.detach(st)
    embeddings.register(st.bundled, act)
    host.publish(model)
    if host.opt("lora_add_hashes_to_infotext", True):
        if fresh_hashes or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        p.lora_hashes.update(act.hashes)
        if p.lora_hashes:
            p.extra_generation_params[infotext.FIELD] = infotext.format_lora_hashes(p.lora_hashes)
    return act


def _reapply(st: Any, sd_model: Any) -> None:
    """The running generation's LoRAs on a model that took over while it samples."""
    p = st.generation[0]
    act = _apply_generation(st, sd_model, fresh_hashes=False)
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "short_title", "the new model")
    act.problems = [f"on {name}: {text}" for text in act.problems]
    _show_problems(p, act)
    log.info("lora_ext: %s applied to %s (model switched while sampling)", ", ".join(act.applied) or "no LoRA", name)


def _on_infotext_pasted(text: str, d: dict) -> None:
    """Rewrite `<lora:NAME:` in a pasted prompt to the local file whose hash the infotext names."""
    hashes_text = d.get(infotext.FIELD)
    prompt = d.get("Prompt")
    if not hashes_text or not isinstance(prompt, str):
        return
    index = state().index
    preferred = host.opt("lora_preferred_name", "Alias from file")

    def name_for_hash(short: str) -> str | None:
        entry = find_by_hash(index, short)
        return None if entry is None else index.display_name(entry, preferred)

    d["Prompt"] = infotext.relink_prompt(prompt, infotext.parse_lora_hashes(hashes_text), name_for_hash)


def _on_script_unloaded() -> None:
    st = state()
    st.session.forget_model()
    # hand the tag back until the scripts are loaded again (Reload UI registers ours again in app_started)
    from modules import extra_networks

    if extra_networks.extra_network_registry.get("lora") is st.network and st.previous is not None:
        _register(st.previous)


def _apply_cache_size() -> None:
    state().session.cache.max_bytes = max(0, int(host.opt(settings.CACHE_MB, 2048))) << 20


def _names() -> list[str]:
    return sorted({e.name for e in state().index.entries()})


def _refresh_index() -> None:
    state().index.refresh()


def setup() -> None:
    """Register settings and callbacks with the WebUI. Called at every load of the scripts (start-up and "Reload
    UI", which clears all callbacks first); the catalogue, parsed-file cache and patcher survive reloads."""
    global _state
    from modules import script_callbacks

    if _state is None:
        _state = GlueState.create(host.lora_dirs(), host.index_cache_file())
        _state.network = _make_network()
    settings.register(_names, _refresh_index, _apply_ownership, _apply_cache_size)
    _apply_cache_size()
    script_callbacks.on_app_started(_on_app_started, name="lora_ext_take_over_lora_tag")
    script_callbacks.on_model_loaded(_on_model_loaded, name="lora_ext_model_loaded")
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser, name="lora_ext_step_windows")
    script_callbacks.on_infotext_pasted(_on_infotext_pasted, name="lora_ext_infotext_pasted")
    script_callbacks.on_script_unloaded(_on_script_unloaded, name="lora_ext_unloaded")
    script_callbacks.on_ui_tabs(_on_ui_tabs, name="lora_ext_training_tab")
    try:
        from lora_ext.webui import cards

        cards.setup(_state)
    except ImportError:
        log.debug("lora_ext: cards page not available")
