"""Prompt tags -> patched weights, the one path every host uses (the WebUI's `lora` extra network and the CLI's
`generate`). A host gives an adapter factory (its model tree's key map) and a resolver (names -> files, short
hashes); the session does the rest with the same rules everywhere.

Contract
- `activate(model, tags)` makes the model's weights reflect exactly `tags` (tag texts such as "<lora:ink:0.8>", or
  `LoraRef`s already parsed), replacing whatever the previous call applied. A tag that cannot be used (bad syntax, file
  not found, unreadable file, wrong model family, bad tensors) is left out and described in `Activation.problems`;
  the others are applied. With `strict=True` the first such problem raises its typed `LoraExtError` instead.
- `start=`/`stop=` (lora-block-weight's step window) and weight schedules (`<lora:x:0@0,1@0.5>`, loractl): the text
  encoder gets the LoRA's weight at step 0 for the whole pass (the conditioning is computed once, before sampling);
  the UNet's multiplier follows the window or schedule, step by step (`LoraRef.unet_weight`). `at_step(step, total)`,
  called by the host before each sampling step, brings the UNet there. Per generation the session decides how
  (`lora_ext.patch.bypass.estimate_seconds` on the `GenerationShape` the host gives): by re-merging the layers whose
  multiplier changes (cheap when it changes at a few steps: a window), or as bypass on the layer outputs with a gain
  per LoRA (no re-merge at all: a schedule that changes every step). `Activation.notes` says which, and why.
- Layers whose weights cannot hold a merge (FP8 storage) take their LoRAs as bypass, always
  (`lora_ext.patch.bypass.needs_bypass`); restoring removes the hooks, the weights were never written.
- `activate(..., hires=True)`: the hires-fix pass, with the tags' `hr=`/`hrte=`/`hrunet=` weights.
- `activate(..., per_image=[tags of image 0, ...])`: a batch whose images have different tags. What every image uses
  the same way is merged; each other use (a *variant*) gets its UNet part as bypass with one weight per row
  (`batch_rows` per step and `unet_call` before each UNet call tell which image each row is) and its text-encoder
  part merged at the weight of the image whose text is being encoded (`text_image`). `negative=` does the same for
  tags taken from the negative prompts, on the unconditional rows and negative encodings only.
- `Activation.hashes` is the infotext's "Lora hashes" (`lora_ext.formats.infotext`): the applied LoRAs only.
- `restore()` puts every weight back bit-exactly; `forget_model()` restores and drops every reference to the model.
- Calls are serialized with a lock (the WebUI's UI and API can both start generations).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from lora_ext.errors import LoraExtError, LoraFileError, LoraNotFoundError
from lora_ext.formats.infotext import infotext_name
from lora_ext.formats.network import LoraNetwork
from lora_ext.patch.bypass import Bypass, GenerationShape, can_bypass, estimate_seconds, needs_bypass
from lora_ext.patch.cache import LoraCache
from lora_ext.patch.keymap import ModelAdapter
from lora_ext.patch.patcher import ActiveLora, Patcher
from lora_ext.patch.quant import quantized
from lora_ext.patch.report import NetworkReport, PatchReport
from lora_ext.prompt import LoraRef, parse_tag

log = logging.getLogger(__name__)

AdapterFactory = Callable[[Any], ModelAdapter]
"""A host's model object -> the key map of its module tree (`adapter_for_pipeline`, `adapter_for_ldm`). Raises
ValueError or LoraExtError for a model it cannot adapt."""

_UNKNOWN_TOTAL = 1 << 30  # "total steps not known yet": a fraction of it is never reached at step 0


class Resolver(Protocol):
    """Finds LoRA files by the name a prompt uses."""

    def resolve(self, name: str) -> Path:
        """The file; raises LoraNotFoundError (naming where it looked and what to do) when there is none."""
        ...

    def shorthash(self, path: Path, metadata: Mapping[str, str]) -> str | None:
        """A1111's 12-character hash of the file ("Lora hashes"), or None to leave it out."""
        ...


@dataclass
class Activation:
    """The outcome of one `activate` call."""

    refs: list[LoraRef] = field(default_factory=list)  # tags that parsed, in prompt order
    applied: list[str] = field(default_factory=list)  # names (as written in the prompt) merged into the weights
    networks: list[LoraNetwork] = field(default_factory=list)  # the applied files, parsed (bundled embeddings)
    hashes: dict[str, str] = field(default_factory=dict)  # "Lora hashes": infotext name -> 12-hex hash
    problems: list[str] = field(default_factory=list)  # one sentence per problem, for the console, UI and comments
    notes: list[str] = field(default_factory=list)  # how LoRAs are applied when not simply merged (console)
    mode: str = "merge"  # "merge", or "bypass" when changing multipliers run as bypass
    report: PatchReport | None = None


@dataclass(frozen=True)
class _Loaded:
    """A tag whose file was found and parsed."""

    ref: LoraRef
    path: Path
    lora: ActiveLora


@dataclass
class _Variant:
    """A LoRA file that the images of one batch use differently (one image has it, another not, or at other
    weights): applied as bypass with one weight per image (`refs[i]`: image i's tag for it, None when absent)."""

    lora: ActiveLora  # the file with unit multipliers (the gains carry each image's weights)
    path: Path
    refs: list[LoraRef | None]
    te: list[float] = field(default_factory=list)  # each image's text-encoder weight now
    unet: list[float] = field(default_factory=list)  # each image's UNet weight at the current step
    negative: bool = False  # from the negative prompts: the unconditional rows and negative encodings only

    @property
    def first(self) -> LoraRef:
        return next(r for r in self.refs if r is not None)


def _uses(loaded: list[_Loaded]) -> list[tuple[tuple, _Loaded]]:
    """Each tag of one prompt with its key across the images of a batch: the file, its dyn and block weights, and
    which use of that file it is in the prompt (the same file twice is two uses)."""
    counts: dict[Path, int] = {}
    out = []
    for x in loaded:
        n = counts[x.path] = counts.get(x.path, -1) + 1
        out.append(((str(x.path), x.ref.dyn, str(x.ref.lbw), n), x))
    return out


def _add_problems(act: Activation, problems: list[str]) -> None:
    """Add sentences not said yet (the same missing file in several prompts of a batch is one problem)."""
    act.problems.extend(p for p in dict.fromkeys(problems) if p not in act.problems)


def _same_use(a: LoraRef, b: LoraRef) -> bool:
    """Do two tags for the same file apply it the same way (names and spellings aside)?"""
    return (a.te, a.unet, a.dyn, a.lbw, a.start, a.stop, a.te_schedule, a.unet_schedule, a.hr_te, a.hr_unet) == (
        b.te, b.unet, b.dyn, b.lbw, b.start, b.stop, b.te_schedule, b.unet_schedule, b.hr_te, b.hr_unet)


def active_lora(network: LoraNetwork, ref: LoraRef) -> ActiveLora:
    """The patcher's entry for a parsed tag: its te/unet multipliers, dyn and block weights."""
    return ActiveLora(network, te=ref.te, unet=ref.unet, dyn=ref.dyn, block_weights=ref.lbw)


def step_of_call(call: int, calls: int, steps: int) -> int:
    """The sampling step (0-based, of `steps`) of the `call`-th denoiser call out of `calls`: exact also for samplers
    that call the model several times per step (Heun, DPM2). Both hosts count steps this way."""
    if calls <= 0 or steps <= 0:
        return max(call, 0)
    return min(steps - 1, call * steps // calls)


def _changes(ref: LoraRef, hires: bool) -> bool:
    """Does the UNet multiplier change within the pass (a step window, or a schedule that is not constant)?"""
    schedule = ref.hr_unet if hires and ref.hr_unet is not None else ref.unet_schedule
    return ref.start is not None or ref.stop is not None or (schedule is not None and not schedule.is_constant)


def unet_multiplier(ref: LoraRef, step: int, total: int | None, hires: bool = False) -> float:
    """The UNet multiplier of a tag at sampling step `step` (0-based) of `total` (None: before sampling, as for step 0
    of an unknown count): its schedule's weight, and 0 outside its start=/stop= window. Both hosts use this rule."""
    steps = total if total is not None else _UNKNOWN_TOTAL
    if (ref.start is not None or ref.stop is not None) and step not in ref.active_steps(steps):
        return 0.0
    return ref.unet_weight(step, max(steps, 1), hires)


class LoraSession:
    """One host model's LoRA state: its patcher (made by the adapter factory), the parsed-file cache and the
    active set between `activate` and `restore`."""

    def __init__(self, adapter_factory: AdapterFactory, resolver: Resolver, *, cache: LoraCache | None = None,
                 retain_bytes: int | None = None, backup_device: str = "auto", follow_moves: bool = False) -> None:
        """`backup_device`, `follow_moves`: the patcher's (`lora_ext.patch.patcher.Patcher`)."""
        self.adapter_factory = adapter_factory
        self.resolver = resolver
        self.cache = cache or LoraCache()
        self.backup_device = backup_device
        self.follow_moves = follow_moves
        self._retain_bytes = retain_bytes
        self._lock = threading.RLock()
        self._patcher: Patcher | None = None
        self._model: Any = None
        self.last: Activation | None = None
        self._step_key: tuple[float, ...] | None = None
        self._bypass = Bypass()
        self.schedule_mode = "auto"  # changing UNet multipliers: "auto" (estimate per generation), "merge", "bypass"
        self._hires = False
        self._actives: list[ActiveLora] = []  # the shared set as last applied
        # the pass's state (`_clear_pass`): active set, how changing multipliers apply, per-image batch layout
        self._loaded: list[_Loaded] = []
        self._changing = False  # some active LoRA's UNet multiplier changes within the pass
        self._mode = "merge"  # how the changing multipliers are applied in this pass: "merge" or "bypass"
        self._variants: list[_Variant] = []  # per-image LoRAs of a mixed batch
        self._row_map: list[int] = []  # the image of each UNet row of this step, and whether it is unconditional
        self._row_uncond: list[bool] = []
        self._row_offset = 0
        self._rows_now: list[int] | None = None  # the rows of the UNet call about to run
        self._uncond_now: list[bool] | None = None
        self._te_image = 0  # whose text-encoder weights are merged now (per-image batches)
        self._te_negative = False  # ... for its negative prompt

    # ---------------------------------------------------------------------------------------------------- state

    @property
    def patcher(self) -> Patcher | None:
        return self._patcher

    @property
    def retain_bytes(self) -> int | None:
        """Bytes of backups of restored layers kept for the next generation (None: all, 0: free on restore)."""
        return self._retain_bytes

    @retain_bytes.setter
    def retain_bytes(self, value: int | None) -> None:
        with self._lock:
            self._retain_bytes = value
            if self._patcher is not None:
                self._patcher.retain_bytes = value

    @property
    def has_windows(self) -> bool:
        """True between `activate` and `restore` when some active LoRA's UNet multiplier changes with the step (a
        start=/stop= window or a schedule): `at_step` has work."""
        return self._changing

    @property
    def model(self) -> Any:
        """The model object the patcher is bound to (None before the first activation or after `forget_model`)."""
        return self._model

    @property
    def bypass_layers(self) -> int:
        """How many layers carry a bypass now."""
        return self._bypass.layers

    @property
    def is_pristine(self) -> bool:
        return self._patcher is None or self._patcher.is_pristine

    def bind(self, model: Any) -> Patcher:
        """The patcher for `model` (made on first use; a different model object restores and forgets the previous
        one first). Raises what the adapter factory raises for a model it cannot adapt."""
        with self._lock:
            if self._patcher is not None and self._model is model:
                return self._patcher
            self.forget_model()
            self._patcher = Patcher(self.adapter_factory(model), backup_device=self.backup_device,
                                    retain_bytes=self._retain_bytes, follow_moves=self.follow_moves)
            self._model = model
            return self._patcher

    def load(self, path: Path, name: str | None = None) -> LoraNetwork:
        """The parsed file, through the shared cache (serialized with generations: the cache is not thread-safe)."""
        with self._lock:
            return self.cache.get(path, name=name)

    # ---------------------------------------------------------------------------------------------------- actions

    def prepare(self, tags: Sequence[str | LoraRef], *, strict: bool = False) -> tuple[list[_Loaded], Activation]:
        """Parse, resolve and read every tag (no model needed: a host can fail fast before loading one)."""
        act = Activation()
        loaded: list[_Loaded] = []
        with self._lock:
            for tag in tags:
                text = tag.tag if isinstance(tag, LoraRef) else tag
                try:
                    ref = tag if isinstance(tag, LoraRef) else parse_tag(tag)
                    act.refs.append(ref)
                    path = self.resolver.resolve(ref.name)
                    net = self._read(path, ref.name)
                except LoraNotFoundError as err:  # the resolver's sentence names the name and where it looked
                    if strict:
                        raise
                    act.problems.append(str(err))
                    continue
                except LoraExtError as err:
                    if strict:
                        raise
                    act.problems.append(f"{text}: {err}")
                    continue
                loaded.append(_Loaded(ref, path, active_lora(net, ref)))
        return loaded, act

    def _read(self, path: Path, name: str) -> LoraNetwork:
        try:
            return self.cache.get(path, name=name)
        except LoraExtError:
            raise
        except OSError as err:
            raise LoraFileError(path, f"cannot read the file: {err}") from None

    def activate(self, model: Any, tags: Sequence[str | LoraRef], *, strict: bool = False, hires: bool = False,
                 shape: GenerationShape | None = None,
                 per_image: Sequence[Sequence[str | LoraRef]] | None = None,
                 negative: Sequence[Sequence[str | LoraRef]] | None = None) -> Activation:
        """Apply the LoRAs of `tags` to `model` (see the module docstring). `shape`: what the host is about to
        generate (steps, size, batch), for choosing between re-merging and bypass; None assumes 20 steps of one
        512x512 image. `per_image`: each image's own tags when a batch mixes prompts (then `tags` is ignored): what
        all images share is merged as usual, each LoRA they use differently runs as bypass with one weight per image;
        the host tells which image each UNet row and each text-encoder call belongs to (`batch_rows`, `unet_call`,
        `text_image`). `negative`: each image's tags from its negative prompt (opt-in in the hosts): applied to the
        unconditional branch only (its UNet rows and the encoding of the negative prompt)."""
        with self._lock:
            variants: list[_Variant] = []
            has_negative = negative is not None and any(negative)
            if has_negative and per_image is None:
                per_image = [list(tags) for _ in negative]
            if per_image is not None and (len(per_image) > 1 or has_negative):
                loaded, act, variants = self._prepare_batch(per_image, strict)
                if has_negative:
                    variants += self._negative_variants(negative, act, strict)
            else:
                loaded, act = self.prepare(tags, strict=strict)
            try:
                patcher = self.bind(model)
            except (ValueError, LoraExtError) as err:
                if strict:
                    raise
                act.problems.append(f"LoRAs not applied: this model is not supported ({err})")
                return self._finish(act)
            self._clear_pass()
            self._hires = hires
            self._loaded = loaded
            self._variants = variants
            self._changing = any(_changes(x.ref, hires) for x in loaded)
            first = self._for_step(0, None)
            self._step_key = self._key(first)
            self._variant_weights(0, None)  # each image's weights; the first image's text-encoder weights merge
            try:
                if self._changing:
                    self._mode = self._choose(patcher, loaded, shape or GenerationShape(), act)
                act.report = self._apply(self._for_step(0, None, unit=self._mode == "bypass"), skip_bad=not strict)
            except LoraExtError:
                self._clear_pass()
                raise
            if self._mode == "bypass":
                self._set_gains(0, None)
            act.mode = self._mode
            stored = {id(c.target.module): c.target for c in patcher.diverted if needs_bypass(c.target)}.values()
            packed = sum(1 for t in stored if quantized(getattr(t.module, t.weight_attr)) is not None)
            fp8 = len(stored) - packed
            if fp8:
                act.notes.append(f"{fp8} layers store their weights in FP8 and take their LoRAs as bypass (merging "
                                 "into FP8 would round the change away)")
            if packed:
                act.notes.append(f"{packed} layers hold quantized (GGUF or 4-bit) weights and take their LoRAs as "
                                 "bypass (such a weight cannot take a merge)")
            accounted = loaded + [_Loaded(v.first, v.path, v.lora) for v in variants]
            for x, rep in zip(accounted, act.report.networks, strict=True):
                self._account(act, x, rep)
            positive = [v for v in variants if not v.negative]
            if positive:
                names = ", ".join(v.first.name for v in positive)
                act.notes.append(f"images of this batch use {names} differently: applied per image as bypass "
                                 f"({len(loaded)} LoRAs shared by every image merged)")
            if len(positive) < len(variants):
                names = ", ".join(v.first.name for v in variants if v.negative)
                act.notes.append(f"{names} from the negative prompt: applied to the negative (unconditional) branch "
                                 "only")
            return self._finish(act)

    def _negative_variants(self, negative: Sequence[Sequence[str | LoraRef]], act: Activation,
                           strict: bool) -> list[_Variant]:
        """One variant per LoRA use in the negative prompts (never merged: it must not reach the positive branch)."""
        out: list[_Variant] = []
        found: dict[tuple, _Variant] = {}
        for image, tags in enumerate(negative):
            loaded, one = self.prepare(tags, strict=strict)
            act.refs.extend(one.refs)
            _add_problems(act, one.problems)
            for k, x in _uses(loaded):
                v = found.get(k)
                if v is None:
                    unit = replace(x.lora, te=1.0, unet=1.0)
                    v = found[k] = _Variant(unit, x.path, [None] * len(negative), negative=True)
                    out.append(v)
                v.refs[image] = x.ref
        return out

    def _prepare_batch(self, per_image: Sequence[Sequence[str | LoraRef]], strict: bool
                       ) -> tuple[list[_Loaded], Activation, list[_Variant]]:
        """Read every image's tags; split them into what all images share and per-image variants."""
        act = Activation()
        keyed: list[dict[tuple, _Loaded]] = []
        order: dict[tuple, None] = {}  # every use, in the order the images first have it
        for tags in per_image:
            loaded, one = self.prepare(tags, strict=strict)
            act.refs.extend(one.refs)
            _add_problems(act, one.problems)
            mine = dict(_uses(loaded))
            keyed.append(mine)
            order.update(dict.fromkeys(mine))
        shared: list[_Loaded] = []
        variants: list[_Variant] = []
        for k in order:
            uses = [m.get(k) for m in keyed]
            first = next(x for x in uses if x is not None)
            if all(x is not None and _same_use(x.ref, first.ref) for x in uses):
                shared.append(first)
                continue
            variants.append(_Variant(replace(first.lora, te=1.0, unet=1.0), first.path,
                                     [x.ref if x is not None else None for x in uses]))
        return shared, act, variants

    def _variant_weights(self, step: int, total: int | None) -> None:
        """Each variant's per-image weights at this step; the gains follow (`_select_rows`)."""
        for v in self._variants:
            v.te = [r.te_weight(self._hires) if r is not None else 0.0 for r in v.refs]
            v.unet = [unet_multiplier(r, step, total, self._hires) if r is not None else 0.0 for r in v.refs]
        self._select_rows(self._rows_now, self._uncond_now)

    # ------------------------------------------------------------------------------------------ per-image batches

    @property
    def per_image(self) -> bool:
        """True between `activate(..., per_image=...)` and `restore` when the images use LoRAs differently."""
        return bool(self._variants)

    def text_signatures(self, negative: bool = False) -> list[tuple[float, ...]]:
        """Per image of the batch: the text-encoder weights of the LoRAs the images use differently, for their
        prompts (or, `negative`, for their negative prompts); images with equal signatures can share one
        conditioning."""
        if not self._variants:
            return []
        used = [v for v in self._variants if negative or not v.negative]
        return [tuple(v.te[i] for v in used) for i in range(len(self._variants[0].refs))]

    def batch_rows(self, row_map: Sequence[int], uncond: Sequence[bool] | None = None) -> None:
        """Before a sampling step: the image of each row the UNet will see in this step, in the order its calls
        take them (for A1111's CFG batch: each image's conditional rows, then each image's unconditional row), and
        which rows are unconditional (negative-prompt LoRAs act there only; None: none is)."""
        with self._lock:
            self._row_map = list(row_map)
            self._row_uncond = list(uncond) if uncond is not None else [False] * len(self._row_map)
            self._row_offset = 0

    def unet_call(self, rows: int) -> None:
        """The host's UNet is about to run on the next `rows` rows of the step's `batch_rows`."""
        with self._lock:
            if not self._variants:
                return
            row_map = self._row_map or list(range(len(self._variants[0].refs)))
            flags = self._row_uncond if len(self._row_uncond) == len(row_map) else [False] * len(row_map)
            if rows == len(row_map):
                index = list(range(rows))
                self._row_offset = 0
            else:
                index = [(self._row_offset + i) % len(row_map) for i in range(rows)]
                self._row_offset = (self._row_offset + rows) % len(row_map)
            self._select_rows([row_map[i] for i in index], [flags[i] for i in index])

    def text_image(self, image: int, negative: bool = False) -> None:
        """The text encoder is about to encode image `image`'s prompt (or, `negative`, its negative prompt): its
        text-encoder weights are merged (each call encodes one image's text, so a merge is exact, also on fused
        attention weights; only the layers whose weights change are rewritten)."""
        with self._lock:
            if not self._variants or self._patcher is None:
                return
            image = image if 0 <= image < len(self._variants[0].refs) else 0
            if (image, negative) != (self._te_image, self._te_negative):
                self._te_image, self._te_negative = image, negative
                self._apply(self._actives, skip_bad=True)

    def _select_rows(self, rows: list[int] | None, uncond: list[bool] | None = None) -> None:
        self._rows_now, self._uncond_now = rows, uncond
        for i, v in enumerate(self._variants):
            if not v.unet:
                continue
            if rows is None:  # no row layout from the host (yet): the first image, conditional
                self._bypass.set_gain(("unet", i), 0.0 if v.negative else v.unet[0])
                continue
            flags = uncond if uncond is not None else [False] * len(rows)
            weights = [v.unet[r] if (flag or not v.negative) else 0.0 for r, flag in zip(rows, flags, strict=True)]
            self._bypass.set_gain(("unet", i), torch.tensor(weights, dtype=torch.float32))

    def _apply(self, actives: list[ActiveLora], skip_bad: bool) -> PatchReport:
        """Merge what merges; hand the rest (FP8 layers; changing UNet multipliers in bypass mode) to the bypass."""
        assert self._patcher is not None
        index = {id(a): i for i, a in enumerate(actives)}  # the gain key of a changing LoRA: its place in the set
        changing_now = set()
        if self._mode == "bypass":
            changing_now = {id(a) for a, x in zip(actives, self._loaded, strict=True) if _changes(x.ref, self._hires)}
        self._actives = list(actives)
        # per-image variants: the text-encoder part merged at the weight of the image being encoded, the UNet part
        # as bypass with one weight per row
        own = [replace(v.lora, te=v.te[self._te_image] if v.te and (self._te_negative or not v.negative) else 0.0)
               for v in self._variants]
        variant = {id(a): i for i, a in enumerate(own)}
        actives = [*actives, *own]

        def divert(c: Any) -> bool:
            if needs_bypass(c.target):
                return True
            if id(c.lora) in variant or id(c.lora) in changing_now:
                return c.target.component == "unet" and can_bypass(c.target)
            return False

        def gain_of(c: Any) -> Any:
            if id(c.lora) in variant:
                return ("unet", variant[id(c.lora)]) if c.target.component == "unet" else None
            return index[id(c.lora)] if id(c.lora) in changing_now else None

        report = self._patcher.apply(actives, skip_bad=skip_bad, divert=divert)
        self._bypass.set(self._patcher.diverted, gain_of=gain_of)
        return report

    def _choose(self, patcher: Patcher, loaded: list[_Loaded], shape: GenerationShape, act: Activation) -> str:
        """Re-merge at every change, or bypass for the pass: whichever the estimate says is cheaper."""
        steps = max(1, shape.steps)
        keys = [self._key(self._for_step(step, steps)) for step in range(steps)]
        changes = sum(1 for a, b in zip(keys, keys[1:]) if a != b)
        changing = [x for x in loaded if _changes(x.ref, self._hires)]
        unit = [replace(x.lora, te=0.0, unet=1.0) for x in changing]
        try:
            _, _, work, _ = patcher.plan(unit, skip_bad=True)
        except LoraExtError:
            return "merge"
        contribs = [c for cs in work.values() for c in cs if can_bypass(c.target) and not needs_bypass(c.target)]
        merge_once, bypass_call = estimate_seconds(contribs, shape)
        remerge, bypass = merge_once * changes, bypass_call * steps
        mode = self.schedule_mode if self.schedule_mode in ("merge", "bypass") else (
            "bypass" if bypass < remerge else "merge")
        names = ", ".join(x.ref.name for x in changing)
        how = (f"as bypass on {len({id(c.target.module) for c in contribs})} layers (estimated {bypass:.2f} s over "
               f"{steps} steps; re-merging at its {changes} changes: {remerge:.2f} s)" if mode == "bypass" else
               f"by re-merging at its {changes} changes (estimated {remerge:.2f} s; bypass over {steps} steps: "
               f"{bypass:.2f} s)")
        act.notes.append(f"{names}: UNet weight changes during sampling; applied {how}")
        return mode

    def _account(self, act: Activation, x: _Loaded, rep: NetworkReport) -> None:
        name = x.ref.name
        if rep.error:
            act.problems.append(f"{name}: not applied: {rep.error}")
            return
        act.applied.append(name)
        act.networks.append(x.lora.network)
        if rep.unmatched or rep.unknown_keys:
            act.problems.append(coverage_problem(name, rep))
        short = self._shorthash(x)
        if short:
            act.hashes[infotext_name(name)] = short

    def _for_step(self, step: int, total: int | None, unit: bool = False) -> list[ActiveLora]:
        """The active set at a sampling step (`total` None: before sampling, as for step 0 of an unknown count): each
        LoRA with its text-encoder weight for the pass and its UNet weight at that step; `unit`: the changing LoRAs
        with UNet multiplier 1 (the bypass gains carry their weight)."""
        out = []
        for x in self._loaded:
            lora, ref = x.lora, x.ref
            if unit and _changes(ref, self._hires):
                unet = 1.0
            else:
                unet = unet_multiplier(ref, step, total, self._hires)
            te = ref.te_weight(self._hires)
            out.append(lora if (te, unet) == (lora.te, lora.unet) else replace(lora, te=te, unet=unet))
        return out

    @staticmethod
    def _key(actives: list[ActiveLora]) -> tuple[float, ...]:
        return tuple(a.unet for a in actives)

    def _set_gains(self, step: int, total: int | None) -> None:
        for i, x in enumerate(self._loaded):
            if _changes(x.ref, self._hires):
                self._bypass.set_gain(i, unet_multiplier(x.ref, step, total, self._hires))

    def at_step(self, step: int, total: int) -> PatchReport | None:
        """Before sampling step `step` (0-based) of `total`: bring the UNet part of changing LoRAs to this step (new
        bypass gains, or a re-merge of the layers whose multiplier changes). No-op (None) when nothing changes."""
        with self._lock:
            if (not self._changing and not self._variants) or self._patcher is None:
                return None
            if self._variants:
                self._variant_weights(step, total)
            if not self._changing:
                return None
            if self._mode == "bypass":
                self._set_gains(step, total)
                return None
            actives = self._for_step(step, total)
            key = self._key(actives)
            if key == self._step_key:
                return None
            self._step_key = key
            return self._apply(actives, skip_bad=True)

    def _shorthash(self, x: _Loaded) -> str | None:
        try:
            return self.resolver.shorthash(x.path, x.lora.network.metadata)
        except (OSError, LoraExtError) as err:
            log.warning("lora_ext: cannot hash %s for the infotext: %s", x.path, err)
            return None

    def _finish(self, act: Activation) -> Activation:
        self.last = act
        return act

    def restore(self) -> PatchReport | None:
        """Put every weight back (bit-exact). Safe to call at any time, also twice."""
        with self._lock:
            self._clear_pass()
            if self._patcher is None:
                return None
            return self._patcher.restore()

    def _clear_pass(self) -> None:
        """Forget the pass's active set, per-image state and bypass hooks (the weights are the patcher's business)."""
        self._bypass.clear()
        self._loaded, self._variants, self._changing, self._mode = [], [], False, "merge"
        self._row_map, self._row_uncond, self._row_offset = [], [], 0
        self._rows_now, self._uncond_now, self._te_image, self._te_negative = None, None, 0, False

    def forget_model(self) -> None:
        """Restore the current model's weights and drop every reference to it and its backups."""
        with self._lock:
            self._clear_pass()
            if self._patcher is not None:
                try:
                    self._patcher.release()
                finally:
                    self._patcher = None
                    self._model = None


def coverage_problem(name: str, rep: NetworkReport) -> str:
    """The sentence for a LoRA that applied only in part."""
    parts = []
    if rep.unmatched:
        shown = ", ".join(rep.unmatched[:3]) + (", ..." if len(rep.unmatched) > 3 else "")
        parts.append(f"{len(rep.unmatched)} of {rep.modules_total} modules match no layer of this model ({shown})")
    if rep.unknown_keys:
        shown = ", ".join(rep.unknown_keys[:3]) + (", ..." if len(rep.unknown_keys) > 3 else "")
        parts.append(f"{len(rep.unknown_keys)} keys are not LoRA tensors ({shown})")
    return (f"{name}: applied {rep.modules_applied} of {rep.modules_total} modules; " + "; ".join(parts) +
            ". The file may be for another model family, or use key names lora_ext does not know")
