"""Per-image LoRAs in a mixed batch on A1111: telling the session which image each UNet row and each text-encoder call
belongs to (`lora_ext.session.LoraSession.batch_rows` / `unet_call` / `text_image`).

A1111 hands an extra network the first prompt's tags only; `glue._per_image_tags` reads every image's, and the session
applies what the images share as usual and the rest as bypass with one weight per image. Three things make the
host's side exact:

- **UNet rows.** A1111's CFG denoiser stacks, per step, each image's conditional rows (one per AND-part) and then one
  unconditional row per image, and runs the UNet on all of them at once or in consecutive slices. `on_step` (our
  `on_cfg_denoiser` callback) gives the session that row layout; a forward pre-hook on the UNet instance tells it the
  size of each call, so it takes the next rows in order.
- **Text-encoder calls.** A1111 encodes each distinct prompt text once (and caches conditionings by text), so two
  images with the same words but different LoRAs would share one conditioning. `attach` gives the prompts of images
  whose text-encoder weights differ a different number of leading spaces (CLIP's tokenizers drop them: the tokens and
  the image are unchanged; the infotext shows the prompt as written), one count per set of weights, also after every
  `AND`; a forward pre-hook on the text encoder reads the count and selects that image's weights. SDXL's empty
  negative prompt is left alone (A1111 zeroes its conditioning, whatever the LoRAs). A blank positive prompt loses
  its mark in A1111's AND parser: it gets the first blank-prompt image's weights (several blank prompts with
  different text-encoder LoRAs in one batch share one conditioning, as A1111 encodes that text once).
- A1111's conditioning caches are cleared when such a batch starts (their keys hold only the first image's LoRAs),
  and the marked prompts are put back as A1111 had them when sampling starts (the infotext reads `p.prompts`).

Forge (same `processing.py`, prompts and caches) differs in two places, both handled here:
- its sampler batches the UNet's rows in chunks of one row per image (each AND-part of every image's prompt is a
  conditional chunk, the negative prompts one unconditional chunk), in an order of its own, and tells the UNet which
  chunk is which (`transformer_options["cond_or_uncond"]`, a keyword of every UNet call): the UNet pre-hook reads the
  rows' images and kinds from there (no per-step layout needed);
- its text encoders are called with token ids, not texts: the texts (with their marks) are seen one step earlier, in
  the model object's `get_learned_conditioning(texts)`, which the batch wraps on the instance for its duration
  (A1111's prompt parser calls it once per prompt; the class and every other object are left alone);
- it computes the hires pass' conditionings early, in `setup_conds` before the first pass (A1111 does that only in
  lowvram mode), with the hires tags but without the hires pass' marks, and its `calculate_hr_conds` then keeps them:
  when the hires pass activates, they are dropped so that it computes them with its own marks (unless the user chose
  "use the first pass' conditionings for hires", which the early ones are then).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from lora_ext.webui import builtin, host

log = logging.getLogger(__name__)

_AND = re.compile(r"\s*\bAND\b\s*")


def _mark(text: str, count: int) -> str:
    """`text` with exactly `count` leading spaces before it and after every AND."""
    pad = " " * count
    return pad + _AND.sub(" AND" + pad, text.lstrip())


def _leading_spaces(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


def attach(st: Any, p: Any, model: Any, hires: bool, originals: dict[str, list[str]] | None = None) -> None:
    """After the session activated a batch with per-image LoRAs: mark the prompts, hook the UNet and text encoder.
    `originals`: prompts as they were before the glue took tags out of them (put back with the marks' removal)."""
    detach(st)
    session = st.session
    is_sdxl = bool(getattr(model, "is_sdxl", False))
    st.batch_marked = []
    st.batch_images, st.batch_negative_images = {}, {}
    for attr in ("hr_prompts", "hr_negative_prompts") if hires else ("prompts", "negative_prompts"):
        negative = attr.endswith("negative_prompts")
        signatures = session.text_signatures(negative=negative)
        seen: dict[tuple, int] = getattr(p, f"_lora_ext_text_sets_{attr}", None) or {}
        setattr(p, f"_lora_ext_text_sets_{attr}", seen)  # the same weights keep their count across batches
        counts = [seen.setdefault(sig, len(seen) + 1) for sig in signatures]
        images = st.batch_negative_images if negative else st.batch_images
        images.update({count: counts.index(count) for count in set(counts)})
        texts = getattr(p, attr, None)
        if not texts or len(texts) != len(counts):
            continue
        setattr(p, attr, [t if (negative and is_sdxl and t == "") else _mark(t, c) for t, c in zip(texts, counts)])
        st.batch_marked.append((p, attr, list((originals or {}).get(attr, texts))))
        if not negative:  # A1111's AND parser strips a blank prompt to "": it reaches the encoder without its mark
            blank = [i for i, t in enumerate(texts) if not t.strip()]
            if blank:
                images.setdefault(0, blank[0])
    builtin.clear_cond_cache()
    unet, encoder = host.unet_and_text_encoder(model)
    forge = host.is_forge_model(model)
    if forge and hires and not host.opt("hires_fix_use_firstpass_conds", False):
        p.hr_c = p.hr_uc = None
    hooks: list[Any] = []
    if unet is not None:
        hook = _forge_unet_hook(session) if forge else _unet_hook(session)
        hooks.append(unet.register_forward_pre_hook(hook, with_kwargs=True))
    if forge:
        hooks.append(_ConditioningWrap(model, _text_hook(st)))
    elif encoder is not None and hasattr(encoder, "register_forward_pre_hook"):
        hooks.append(encoder.register_forward_pre_hook(_text_hook(st), with_kwargs=True))
    st.batch_hooks = hooks


def detach(st: Any) -> None:
    _unmark(st)
    for hook in getattr(st, "batch_hooks", None) or []:
        hook.remove()
    st.batch_hooks = []


def _unmark(st: Any) -> None:
    """The prompts as A1111 had them (the conditionings are computed by the time sampling starts; the infotext and
    the scripts after it read `p.prompts`)."""
    for p, attr, texts in getattr(st, "batch_marked", None) or []:
        if getattr(p, attr, None) is not None:
            setattr(p, attr, texts)
    st.batch_marked = []


def _unet_hook(session: Any) -> Any:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if x is not None and hasattr(x, "shape"):
            session.unet_call(int(x.shape[0]))
    return hook


def _forge_unet_hook(session: Any) -> Any:
    warned = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if x is None or not hasattr(x, "shape"):
            return
        rows = int(x.shape[0])
        chunks = list((kwargs.get("transformer_options") or {}).get("cond_or_uncond") or [])
        images = len(session.text_signatures())
        if not chunks or rows != images * len(chunks):
            if not warned:
                warned.append(True)
                log.warning("lora_ext: Forge ran the UNet on %d rows in chunks %s for %d images; per-image LoRAs "
                            "follow the first image's for such calls", rows, chunks, images)
            session.batch_rows([0] * rows)
        else:  # Forge's chunks: 0 = conditional, 1 = unconditional; one row per image in each
            session.batch_rows([i for _ in chunks for i in range(images)],
                               uncond=[kind == 1 for kind in chunks for _ in range(images)])
        session.unet_call(rows)
    return hook


class _ConditioningWrap:
    """`model.get_learned_conditioning` wrapped on the instance (Forge): `before(module, (texts,), {})` runs first.
    `remove()` takes the wrapper away (the class's method shows through again)."""

    def __init__(self, model: Any, before: Any) -> None:
        self.model = model
        original = model.get_learned_conditioning

        def get_learned_conditioning(texts: Any, *args: Any, **kwargs: Any) -> Any:
            before(None, (texts,), {})
            return original(texts, *args, **kwargs)

        self.wrapper = get_learned_conditioning
        model.get_learned_conditioning = get_learned_conditioning

    def remove(self) -> None:
        if self.model.__dict__.get("get_learned_conditioning") is self.wrapper:
            del self.model.get_learned_conditioning


def prompt_texts(args: tuple, kwargs: dict) -> Any:
    """The prompts a text-encoder call (seen by a forward pre-hook) encodes: SD1/SD2's list of texts, or the "txt" of
    SDXL's conditioner batch; A1111 passes an `SdConditioning` (a list that knows `is_negative_prompt`)."""
    batch = args[0] if args else next(iter(kwargs.values()), None)
    return batch.get("txt") if isinstance(batch, dict) else batch


def _text_hook(st: Any) -> Any:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        batch = prompt_texts(args, kwargs)
        if not batch or not isinstance(batch[0], str):
            return
        negative = bool(getattr(batch, "is_negative_prompt", False))  # A1111's SdConditioning says which
        images = st.batch_negative_images if negative else st.batch_images
        st.session.text_image(images.get(_leading_spaces(batch[0]), 0), negative=negative)
    return hook


def on_step(st: Any, params: Any) -> None:
    """Before a sampling step: the image of each row the UNet will see (A1111's CFG layout)."""
    session = st.session
    if not session.per_image:
        return
    _unmark(st)
    if host.is_forge_model(session.model):  # Forge: the UNet hook reads each call's rows (`_forge_unet_hook`)
        return
    images = len(session.text_signatures())
    rows = int(params.x.shape[0])
    cond = params.text_cond
    cond_rows = int((cond["crossattn"] if isinstance(cond, dict) else cond).shape[0])
    if cond_rows == images:
        cond_map = list(range(images))
    else:  # AND: each image's conditional rows, as many as its prompt's AND-parts
        cond_map = _and_layout(params, images, cond_rows)
    session.batch_rows(cond_map + [j % images for j in range(rows - cond_rows)],
                       uncond=[False] * len(cond_map) + [True] * (rows - cond_rows))


def _and_layout(params: Any, images: int, cond_rows: int) -> list[int]:
    from modules import prompt_parser

    p = getattr(getattr(params, "denoiser", None), "p", None)
    prompts = getattr(p, "hr_prompts" if getattr(p, "is_hr_pass", False) else "prompts", None) or []
    if len(prompts) == images:
        indexes, _, _ = prompt_parser.get_multicond_prompt_list(prompts)
        layout = [i for i, parts in enumerate(indexes) for _ in parts]
        if len(layout) == cond_rows:
            return layout
    log.warning("lora_ext: cannot tell which image each conditional row belongs to; per-image LoRAs follow the "
                "first image's for this step")
    return [0] * cond_rows
