"""`<lora:...>` prompt tags: parsing and validation (finding the file a name means: `lora_ext.library.lookup`).

Pure Python (stdlib + `lora_ext.errors`); nothing here touches a model or the WebUI.

Grammar (A1111 v1.10 `extra_networks.parse_prompt` + the built-in Lora extension, extended with the
lora-block-weight syntax)::

    tag      = "<" KIND ":" arg (":" arg)* ">"          KIND = "lora" | "lyco"  (lyco is an alias, same meaning)
    arg      = positional | NAME "=" value               an arg containing "=" is named, split at its "="
    position = LORA_NAME [":" TE [":" UNET [":" DYN]]]   positional args are counted without the named ones
    named    = te= | unet= | dyn= | lbw= (alias w=) | start= | stop= | step=START-STOP | hr= | hrte= | hrunet=
               | any other key

* ``te`` defaults to 1.0; ``unet`` defaults to ``te`` (after ``te=`` is applied); a named arg overrides the positional
  one, as in A1111 (`<lora:x:0.5:te=0.8>` gives te = unet = 0.8).
* ``dyn`` (DyLoRA rank) is an integer >= 1.
* ``lbw=`` is a lora-block-weight preset name (case-sensitive: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
  ALL0.5, plus any caller-supplied presets) or a comma list of 17 / 26 (SD1/SD2 LoRA / LyCORIS) or 12 / 20 (SDXL)
  numbers. See `BlockWeights` for what each position means.
* ``start=`` / ``stop=``: an integer is a sampling-step number (``10``); a number written with a decimal point is a
  fraction of the steps in 0.0..1.0 (``0.3``, ``1.0``), the same rule as A1111's prompt editing ``[a:b:0.3]``.
  The LoRA is active for sampling steps ``start <= step < stop`` (lora-block-weight applies at ``start`` and removes
  at ``stop``). ``step=5-10`` (lora-block-weight) is shorthand for ``start=5:stop=10``.
* Weight schedules (sd-webui-loractl's syntax): in place of a TE/UNet multiplier (positional or ``te=``/``unet=``),
  ``weight@step`` points separated by ``,`` or ``;``: ``<lora:x:0@0,1@0.5>``, ``<lora:x:1:unet=0@5,1@6>``. When every
  step is <= 1 they are fractions of the pass (0 = first sampling step, 1 = the last), otherwise step numbers; the
  weight is linear between points and constant outside (`WeightSchedule`). A TE schedule gives the text encoder its
  weight at step 0 (the conditioning is computed once, before sampling). ``hr=`` (both), ``hrte=``, ``hrunet=`` give
  the weights (numbers or schedules) for the hires-fix pass. A changing schedule cannot be combined with
  ``start=``/``stop=``.
* Every other named arg (``neg=``, ``lbwe=``, ``x=``, ...) is kept verbatim in `LoraRef.extra`.

Tolerated (accepted as A1111 accepts them): whitespace around numbers (``<lora:x: 0.8 >``), named args before the
name (``<lora:te=0.5:x>``), signs and exponents in multipliers (``+1``, ``5e-1``), negative and > 1 multipliers and
block weights. Also tolerated, where A1111 would silently fail: whitespace around the name (stripped, so
``<lora: my lora :1>`` names "my lora") and around arg names (`` te =0.5`` is ``te=0.5``; A1111 ignores it).

Malformed (`PromptSyntaxError`, whose message quotes the tag), where A1111 would crash, misread or silently ignore:

* an empty tag or a missing/empty name (``<lora:>``, ``<lora: :1>``, ``<lora:te=1>``), an empty arg (``<lora:x::1>``,
  ``<lora:x:>``), a control character in the name, a tag with no closing ``>`` (``<lora:x:0.8`` or a ``<`` inside);
* a multiplier that is not a plain decimal number, or NaN/inf (``<lora:x:abc>``, ``<lora:x:nan>``);
* more than four positional args (``<lora:x:1:2:3:4:5>``; A1111 silently ignores the fifth and later);
* the pre-v1.5 positional block-weight form ``<lora:x:1:INALL>`` / ``<lora:x:1:1:INALL>``: on A1111 >= 1.5 position 3
  is the UNet multiplier and position 4 the DyLoRA rank, so both A1111 and lora-block-weight fail on it ("could not
  convert string to float"; lora-block-weight's README says to write ``lbw=INALL``). The error says so;
* ``dyn=`` not an integer >= 1; an unknown ``lbw`` preset; an ``lbw`` vector of another length (lora-block-weight
  silently ignores it) or with a non-number (its random ``R``/``U`` and inherited ``X`` values are not supported,
  so a tag always means the same weights); Flux 61-value vectors;
* a ``start``/``stop`` that is negative, a fraction above 1.0 (``start=1.5``), or not a number; ``stop`` not after
  ``start`` when both are the same kind (or ``stop=0`` / ``stop=0.0``, which would leave the LoRA never active);
  ``step=`` together with ``start=``/``stop=``, or ``step=`` not of the form ``START-STOP``;
* the same named arg twice (A1111 silently keeps the last), both ``lbw=`` and ``w=``, an arg with two ``=``, or an arg
  name that is not a word.

Tags of other kinds (``<hypernet:...>``, ``<LoRA:...>``; kinds are case-sensitive as in A1111) are left in the text
untouched. `parse_prompt` removes LoRA tags by replacing each with the empty string, as A1111 does.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType

from lora_ext.errors import PromptSyntaxError

__all__ = [
    "BLOCK_IDS",
    "BLOCK_LAYOUTS",
    "LBW_PRESETS",
    "LORA_KINDS",
    "BlockWeights",
    "LoraRef",
    "StepPoint",
    "WeightSchedule",
    "parse_block_weights",
    "parse_prompt",
    "parse_tag",
    "tag_text",
]


LORA_KINDS: tuple[str, ...] = ("lora", "lyco")

# Block ids of the LDM UNet (A1111 / lora-block-weight naming): BASE is the text encoder(s); INnn, M00, OUTnn are
# `input_blocks.nn`, `middle_block`, `output_blocks.nn`. SD1/SD2 have IN00..IN11 and OUT00..OUT11, SDXL IN00..IN08 and
# OUT00..OUT08 (a subset).
_IN = tuple(f"IN{i:02d}" for i in range(12))
_OUT = tuple(f"OUT{i:02d}" for i in range(12))
BLOCK_IDS: tuple[str, ...] = ("BASE", *_IN, "M00", *_OUT)

# What each position of an lbw vector means, by vector length (lora-block-weight's layouts).
BLOCK_LAYOUTS: Mapping[int, tuple[str, ...]] = MappingProxyType(
    {
        # SD1/SD2 LoRA: only the blocks that hold attention layers (what a kohya LoRA trains).
        17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]),
        # SD1/SD2 LyCORIS / LoCon: every block.
        26: BLOCK_IDS,
        # SDXL LoRA: blocks with transformer layers.
        12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]),
        # SDXL LyCORIS / LoCon: every SDXL block.
        20: ("BASE", *_IN[:9], "M00", *_OUT[:9]),
    }
)


def _preset(on: str, value: float = 1.0) -> tuple[float, ...]:
    """A 17-value vector with `value` at the blocks named in `on` (space separated) and 0 elsewhere."""
    wanted = set(on.split())
    return tuple(value if block in wanted else 0.0 for block in BLOCK_LAYOUTS[17])


_ALL17 = " ".join(BLOCK_LAYOUTS[17])
_OUT_3_11 = " ".join(_OUT[3:])
# lora-block-weight's default presets (17-value SD1 layout).
LBW_PRESETS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "NONE": _preset(""),
        "ALL": _preset(_ALL17),
        "INS": _preset("BASE IN01 IN02 IN04"),
        "IND": _preset("BASE IN05 IN07 IN08"),
        "INALL": _preset("BASE IN01 IN02 IN04 IN05 IN07 IN08"),
        "MIDD": _preset("BASE IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06"),
        "OUTD": _preset("BASE OUT03 OUT04 OUT05 OUT06"),
        "OUTS": _preset("BASE OUT07 OUT08 OUT09 OUT10 OUT11"),
        "OUTALL": _preset("BASE " + _OUT_3_11),
        "ALL0.5": _preset(_ALL17, 0.5),
    }
)

# Named args this module interprets; anything else goes to LoraRef.extra.
_KNOWN_KEYS = frozenset({"te", "unet", "dyn", "lbw", "w", "start", "stop", "step", "hr", "hrte", "hrunet"})

_TAG_RE = re.compile(r"<(\w+):([^<>]*)>")
_UNCLOSED_RE = re.compile(r"<(?:lora|lyco):")
_WHOLE_TAG_RE = re.compile(r"<(\w+):(.*)>", re.DOTALL)
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT_RE = re.compile(r"\+?[0-9]+")
_STEP_INT_RE = re.compile(r"[0-9]+")
_STEP_FRACTION_RE = re.compile(r"[0-9]+\.[0-9]*|\.[0-9]+")
_ARG_NAME_RE = re.compile(r"\w+")


# --------------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPoint:
    """A `start=` / `stop=` value: a sampling-step number, or a fraction of the sampling steps.

    `is_fraction` is True for a value written with a decimal point ("0.3", "1.0"), which must lie in 0.0..1.0;
    False for an integer step number ("10"), which must be >= 0.
    """

    value: float
    is_fraction: bool

    def __post_init__(self) -> None:
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"step point must be finite, got {self.value!r}")
        if self.is_fraction and not 0.0 <= value <= 1.0:
            raise ValueError(f"a fraction of the steps must be in 0.0..1.0, got {value!r}")
        if not self.is_fraction and (value < 0 or value != int(value)):
            raise ValueError(f"a step number must be an integer >= 0, got {value!r}")
        object.__setattr__(self, "value", value)

    def to_step(self, total_steps: int) -> int:
        """The 0-based sampling-step index this point falls on, in 0..total_steps.

        A fraction gives floor(value * total_steps), computed on the decimal value as written (0.29 of 100 is 29, not
        28 through binary rounding). A step number is clamped to `total_steps`, which means "after the last step".
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if self.is_fraction:
            step = math.floor(Fraction(repr(self.value)) * total_steps)
        else:
            step = int(self.value)
        return min(step, total_steps)

    def __str__(self) -> str:
        """The text that parses back to this point ("0.3", "1.0", "10")."""
        if self.is_fraction:
            text = format(Decimal(repr(self.value)), "f")
            return text if "." in text else text + ".0"
        return str(int(self.value))


@dataclass(frozen=True)
class WeightSchedule:
    """A multiplier that changes over the sampling steps (sd-webui-loractl's syntax): ``weight@step`` points, e.g.
    ``0@0,1@0.5`` (commas or semicolons between points).

    `points` are (weight, at) pairs sorted by `at`. When every `at` is <= 1 the points are fractions of the pass
    (`fractions` True: 0 is the first sampling step, 1 the last); otherwise they are step numbers (0-based). Between
    points the weight is linear in the step, outside them it is constant (the first point's weight before it, the
    last's after it). A schedule of one point is a constant.
    """

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        points = tuple((float(w), float(at)) for w, at in self.points)
        if not points:
            raise ValueError("a weight schedule needs at least one weight@step point")
        for w, at in points:
            if not (math.isfinite(w) and math.isfinite(at)) or at < 0:
                raise ValueError(f"{_point_text(w, at)}: weights must be finite and steps >= 0")
        points = tuple(sorted(points, key=lambda p: p[1]))
        ats = [at for _, at in points]
        if len(set(ats)) != len(ats):
            raise ValueError(f"two points at step {next(a for a in ats if ats.count(a) > 1):g}; give each step once")
        object.__setattr__(self, "points", points)

    @property
    def fractions(self) -> bool:
        """True when the steps are fractions of the pass (every point at <= 1), as loractl decides."""
        return self.points[-1][1] <= 1.0

    @property
    def is_constant(self) -> bool:
        return len({w for w, _ in self.points}) == 1

    @property
    def first(self) -> float:
        """The weight at step 0 (what the text encoder gets: it runs once, before sampling)."""
        return self.at(0, 1)

    def position(self, step: int, total_steps: int) -> float:
        """Where sampling step `step` (0-based) of `total_steps` falls on this schedule's axis."""
        if not self.fractions:
            return float(step)
        return step / (total_steps - 1) if total_steps > 1 else 0.0

    def at(self, step: int, total_steps: int) -> float:
        """The weight at sampling step `step` (0-based) of `total_steps`: linear between points, constant outside."""
        x = self.position(step, total_steps)
        pts = self.points
        if x <= pts[0][1]:
            return pts[0][0]
        for (w0, a0), (w1, a1) in zip(pts, pts[1:]):
            if x <= a1:
                return w0 + (w1 - w0) * (x - a0) / (a1 - a0)
        return pts[-1][0]

    def __str__(self) -> str:
        """The text that parses back to this schedule ("0.0@0.0,1.0@0.5"; a constant: its number)."""
        if len(self.points) == 1:
            return repr(self.points[0][0])
        return ",".join(_point_text(w, at) for w, at in self.points)


def _point_text(weight: float, at: float) -> str:
    return f"{weight!r}@{int(at) if at.is_integer() else at!r}"


@dataclass(frozen=True)
class BlockWeights:
    """lora-block-weight per-block multipliers.

    `values` has 17 or 26 entries (SD1/SD2 LoRA / LyCORIS layouts) or 12 or 20 (SDXL); `BLOCK_LAYOUTS[len(values)]`
    names the block of each position. `preset` is the preset name when the weights were given by name.
    """

    preset: str | None
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if len(values) not in BLOCK_LAYOUTS:
            raise ValueError(f"block weights need {_lengths_text()} values, got {len(values)}")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"block weight {bad[0] + 1} is not finite: {values[bad[0]]!r}")
        object.__setattr__(self, "values", values)

    @property
    def is_sdxl(self) -> bool:
        """True for the SDXL layouts (12 or 20 values)."""
        return len(self.values) in (12, 20)

    def block_names(self) -> tuple[str, ...]:
        """The block id of each position of `values`, e.g. ("BASE", "IN01", ...) for 17 values."""
        return BLOCK_LAYOUTS[len(self.values)]

    def multiplier_for(self, block: str) -> float:
        """The weight of `block` ("BASE" = text encoder(s), or an LDM UNet block id "IN00".."IN11", "M00",
        "OUT00".."OUT11").

        A valid block that this layout does not list gets 0.0, as in lora-block-weight ("layers not provided are
        treated as having a weight of 0"): e.g. IN00 (conv_in) under the 17-value layout, or IN09 under an SDXL
        layout. An unknown block id raises ValueError.
        """
        if block not in BLOCK_IDS:
            raise ValueError(f"unknown block {block!r}; expected BASE, IN00..IN11, M00 or OUT00..OUT11")
        names = self.block_names()
        return self.values[names.index(block)] if block in names else 0.0

    def __str__(self) -> str:
        """The `lbw=` value that parses back to these weights."""
        if self.preset is not None:
            return self.preset
        return ",".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class LoraRef:
    """One `<lora:...>` / `<lyco:...>` tag, parsed.

    `te` multiplies the LoRA on the text encoder(s), `unet` on the UNet; `lbw` (if any) further scales each block
    (`lora_ext.session.active_lora` hands them to the patcher, whose `ActiveLora.multiplier` combines them).
    `extra` holds the other named args verbatim; it is excluded from the hash.
    """

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    lbw: BlockWeights | None = None
    start: StepPoint | None = None
    stop: StepPoint | None = None
    tag: str = ""
    kind: str = "lora"
    extra: dict[str, str] = field(default_factory=dict, hash=False)
    te_schedule: WeightSchedule | None = None  # loractl schedules; te/unet then hold their weight at step 0
    unet_schedule: WeightSchedule | None = None
    hr_te: WeightSchedule | None = None  # hrte= (or hr=): the text encoder's weight in the hires pass
    hr_unet: WeightSchedule | None = None  # hrunet= (or hr=): the UNet's weight in the hires pass

    def __post_init__(self) -> None:
        where = self.tag or f"<{self.kind}:{self.name}>"
        if self.kind not in LORA_KINDS:
            raise PromptSyntaxError(where, f"kind must be one of {', '.join(LORA_KINDS)}, got {self.kind!r}")
        problem = _name_problem(self.name)
        if problem:
            raise PromptSyntaxError(where, problem)
        for label in ("te", "unet"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PromptSyntaxError(where, f"{label} multiplier must be a finite number, got {value!r}")
            object.__setattr__(self, label, float(value))
        if self.dyn is not None and (isinstance(self.dyn, bool) or not isinstance(self.dyn, int) or self.dyn < 1):
            raise PromptSyntaxError(where, f"dyn must be an integer >= 1, got {self.dyn!r}")
        problem = _window_problem(self.start, self.stop)
        if problem:
            raise PromptSyntaxError(where, problem)
        for label in ("te_schedule", "unet_schedule", "hr_te", "hr_unet"):
            value = getattr(self, label)
            if value is not None and not isinstance(value, WeightSchedule):
                raise PromptSyntaxError(where, f"{label} must be a WeightSchedule, got {value!r}")
        for label, schedule in (("te", self.te_schedule), ("unet", self.unet_schedule)):
            if schedule is not None and schedule.first != getattr(self, label):
                raise PromptSyntaxError(where, f"{label} must be its schedule's weight at step 0 ({schedule.first})")
        changing = any(x is not None and not x.is_constant
                       for x in (self.te_schedule, self.unet_schedule, self.hr_te, self.hr_unet))
        if changing and (self.start is not None or self.stop is not None):
            raise PromptSyntaxError(where, "a weight schedule (weight@step) cannot be combined with start=/stop=; "
                                    "write the window into the schedule, e.g. unet=0@4,1@5")
        extra = dict(self.extra)
        for key, value in extra.items():
            if not isinstance(key, str) or not _ARG_NAME_RE.fullmatch(key) or key in _KNOWN_KEYS:
                raise PromptSyntaxError(where, f"extra arg name {key!r} must be a word and not one of te/unet/dyn/...")
            if not isinstance(value, str) or any(c in value for c in ":<>="):
                raise PromptSyntaxError(where, f"extra arg {key}= must be text without ':', '<', '>' or '='")
        object.__setattr__(self, "extra", extra)

    @property
    def is_scheduled(self) -> bool:
        """True when a multiplier changes during the generation (a schedule, or hires-pass weights)."""
        changing = any(s is not None and not s.is_constant for s in (self.te_schedule, self.unet_schedule))
        return changing or self.hr_te is not None or self.hr_unet is not None

    def te_weight(self, hires: bool = False) -> float:
        """The text encoder's multiplier: the conditioning is computed once per pass, before its first step, so a
        schedule gives its weight at step 0 (as with loractl)."""
        if hires and self.hr_te is not None:
            return self.hr_te.first
        return self.te

    def unet_weight(self, step: int, total_steps: int, hires: bool = False) -> float:
        """The UNet's multiplier at sampling step `step` (0-based) of the pass's `total_steps`."""
        schedule = self.hr_unet if hires and self.hr_unet is not None else self.unet_schedule
        return schedule.at(step, total_steps) if schedule is not None else self.unet

    def active_steps(self, total_steps: int) -> range:
        """The 0-based sampling steps during which this LoRA is active (start <= step < stop)."""
        begin = self.start.to_step(total_steps) if self.start is not None else 0
        end = self.stop.to_step(total_steps) if self.stop is not None else total_steps
        return range(begin, max(begin, end))

    def to_tag(self) -> str:
        """A canonical tag text that `parse_tag` reads back to an equal LoraRef (apart from `tag`)."""
        te_text = str(self.te_schedule) if self.te_schedule is not None else repr(self.te)
        unet_text = str(self.unet_schedule) if self.unet_schedule is not None else repr(self.unet)
        parts = [self.kind, self.name, te_text]
        if unet_text != te_text:
            parts.append(unet_text)
        if self.dyn is not None:
            parts.append(f"dyn={self.dyn}")
        if self.lbw is not None:
            parts.append(f"lbw={self.lbw}")
        if self.start is not None:
            parts.append(f"start={self.start}")
        if self.stop is not None:
            parts.append(f"stop={self.stop}")
        if self.hr_te is not None:
            parts.append(f"hrte={self.hr_te}")
        if self.hr_unet is not None:
            parts.append(f"hrunet={self.hr_unet}")
        parts.extend(f"{k}={v}" for k, v in self.extra.items())
        return "<" + ":".join(parts) + ">"


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def parse_prompt(
    prompt: str, *, presets: Mapping[str, str | Sequence[float]] | None = None
) -> tuple[str, list[LoraRef]]:
    """Remove the `<lora:...>` / `<lyco:...>` tags from `prompt`; return the remaining text and the tags in order.

    Other extra-network tags stay in the text. `presets` adds or overrides lbw presets (name -> 17/26/12/20 weights,
    as a sequence or a comma string). Raises PromptSyntaxError for the first malformed LoRA tag.
    """
    for opening in _UNCLOSED_RE.finditer(prompt):
        if not _TAG_RE.match(prompt, opening.start()):
            rest = prompt[opening.start() :]
            end = rest.find("<", 1)
            raise PromptSyntaxError(rest[: end if end > 0 else 60], "the tag has no closing '>'")

    refs: list[LoraRef] = []

    def take(match: re.Match[str]) -> str:
        if match.group(1) not in LORA_KINDS:
            return match.group(0)
        refs.append(_parse_args(match.group(1), match.group(2), match.group(0), presets))
        return ""

    return _TAG_RE.sub(take, prompt), refs


def parse_tag(tag: str, *, presets: Mapping[str, str | Sequence[float]] | None = None) -> LoraRef:
    """Parse one tag, e.g. "<lora:name:0.8:lbw=INALL>" (surrounding whitespace ignored). See the module docstring."""
    text = tag.strip()
    match = _WHOLE_TAG_RE.fullmatch(text)
    if not match:
        raise PromptSyntaxError(tag, "not a tag of the form <lora:NAME[:ARGS]>")
    kind, args = match.groups()
    if kind not in LORA_KINDS:
        raise PromptSyntaxError(tag, f"not a LoRA tag (kind {kind!r}); expected <lora:...> or <lyco:...>")
    if "<" in args or ">" in args:
        raise PromptSyntaxError(tag, "'<' or '>' inside the tag (is a tag missing its closing '>'?)")
    return _parse_args(kind, args, text, presets)


def parse_block_weights(
    text: str, *, presets: Mapping[str, str | Sequence[float]] | None = None, tag: str | None = None
) -> BlockWeights:
    """Parse an `lbw=` value: a preset name or a comma list of 17, 26, 12 or 20 numbers.

    Raises PromptSyntaxError quoting `tag` (or the text itself).
    """
    where = tag if tag is not None else text
    value = text.strip()
    table: dict[str, str | Sequence[float]] = dict(LBW_PRESETS)
    if presets:
        table.update(presets)
    if value in table:
        preset = table[value]
        try:
            weights = _weights_from_text(preset) if isinstance(preset, str) else tuple(float(v) for v in preset)
        except ValueError as err:
            raise PromptSyntaxError(where, f"lbw preset {value!r} is invalid: {err}") from None
        return _block_weights(where, value, weights)
    if "," not in value:
        known = ", ".join(table)
        close = [name for name in table if name.lower() == value.lower()]
        hint = f" (preset names are case-sensitive: did you mean {close[0]!r}?)" if close else ""
        raise PromptSyntaxError(where, f"unknown lbw preset {value!r}{hint}; known presets: {known}")
    try:
        weights = _weights_from_text(value)
    except ValueError as err:
        raise PromptSyntaxError(where, f"lbw={value}: {err}") from None
    return _block_weights(where, None, weights)


def _parse_args(kind: str, args: str, tag: str, presets: Mapping[str, str | Sequence[float]] | None) -> LoraRef:
    """Build a LoraRef from the text between "<kind:" and ">"."""
    if not args.strip():
        raise PromptSyntaxError(tag, "empty tag: the LoRA name is missing")
    positional: list[str] = []
    named: dict[str, str] = {}
    for number, item in enumerate(args.split(":"), start=1):
        if "=" not in item:
            if not item.strip():
                raise PromptSyntaxError(tag, f"argument {number} is empty")
            positional.append(item)
            continue
        key, value = item.split("=", 1)
        key = key.strip()
        if "=" in value:
            raise PromptSyntaxError(tag, f"argument {item!r} has more than one '='")
        if not _ARG_NAME_RE.fullmatch(key):
            raise PromptSyntaxError(tag, f"argument {item!r} needs a word before '=' (like te=0.5)")
        if key in named:
            raise PromptSyntaxError(tag, f"{key}= is given twice")
        named[key] = value

    if not positional:
        raise PromptSyntaxError(tag, "the LoRA name is missing (the first argument without '=')")
    if len(positional) > 4:
        raise PromptSyntaxError(
            tag,
            f"{len(positional)} positional arguments; at most 4 (NAME:TE:UNET:DYN) are allowed, "
            "use named arguments for the rest (lbw=..., start=..., stop=...)",
        )
    name = positional[0].strip()
    problem = _name_problem(name)
    if problem:
        raise PromptSyntaxError(tag, problem)

    # A named arg overrides its positional one (both must be valid); unet defaults to the final te (A1111).
    te, te_schedule = 1.0, None
    if len(positional) > 1:
        te, te_schedule = _weight(tag, positional[1], "argument 2 (TE multiplier)", presets)
    if "te" in named:
        te, te_schedule = _weight(tag, named["te"], "te=")
    unet, unet_schedule = te, te_schedule
    if len(positional) > 2:
        unet, unet_schedule = _weight(tag, positional[2], "argument 3 (UNet multiplier)", presets)
    if "unet" in named:
        unet, unet_schedule = _weight(tag, named["unet"], "unet=")
    hr_te = hr_unet = _schedule(tag, named["hr"], "hr=") if "hr" in named else None
    if "hrte" in named:
        hr_te = _schedule(tag, named["hrte"], "hrte=")
    if "hrunet" in named:
        hr_unet = _schedule(tag, named["hrunet"], "hrunet=")
    dyn = _dyn(tag, positional[3], "argument 4 (DyLoRA dim)", presets) if len(positional) > 3 else None
    if "dyn" in named:
        dyn = _dyn(tag, named["dyn"], "dyn=")

    if "lbw" in named and "w" in named:
        raise PromptSyntaxError(tag, "both lbw= and w= are given; they are the same setting")
    lbw_text = named.get("lbw", named.get("w"))
    lbw = parse_block_weights(lbw_text, presets=presets, tag=tag) if lbw_text is not None else None

    start = _step_point(tag, named["start"], "start") if "start" in named else None
    stop = _step_point(tag, named["stop"], "stop") if "stop" in named else None
    if "step" in named:
        if start is not None or stop is not None:
            raise PromptSyntaxError(tag, "step= cannot be combined with start= or stop=")
        start, stop = _step_range(tag, named["step"])
    problem = _window_problem(start, stop)
    if problem:
        raise PromptSyntaxError(tag, problem)

    if (start is not None or stop is not None) and any(
            x is not None and not x.is_constant for x in (te_schedule, unet_schedule, hr_te, hr_unet)):
        raise PromptSyntaxError(tag, "a weight schedule (weight@step) cannot be combined with start=/stop=/step=; "
                                "write the window into the schedule, e.g. unet=0@4,1@5")

    extra = {key: value for key, value in named.items() if key not in _KNOWN_KEYS}
    return LoraRef(
        name=name, te=te, unet=unet, dyn=dyn, lbw=lbw, start=start, stop=stop, tag=tag, kind=kind, extra=extra,
        te_schedule=_keep_schedule(te_schedule), unet_schedule=_keep_schedule(unet_schedule), hr_te=hr_te,
        hr_unet=hr_unet,
    )


def _keep_schedule(schedule: WeightSchedule | None) -> WeightSchedule | None:
    """A constant written as a schedule ("1@0,1@1") is just its number."""
    return None if schedule is None or schedule.is_constant else schedule


def _weight(tag: str, text: str, what: str,
            presets: Mapping[str, object] | None = None) -> tuple[float, WeightSchedule | None]:
    """A multiplier or a loractl schedule: (the weight at step 0, the schedule or None)."""
    if "@" not in text:
        return _multiplier(tag, text, what, presets), None
    schedule = _schedule(tag, text, what)
    return schedule.first, schedule


def _schedule(tag: str, text: str, what: str) -> WeightSchedule:
    """`weight@step` points separated by "," or ";" (loractl); a point without "@step" sits at step 1, as in loractl;
    a plain number is a constant."""
    points = []
    for item in re.split("[,;]", text):
        pieces = item.split("@")
        if len(pieces) > 2:
            raise PromptSyntaxError(tag, f"{what} point {item.strip()!r} has more than one '@' (write weight@step)")
        weight = _multiplier(tag, pieces[0], f"{what} weight in {item.strip()!r}")
        if len(pieces) == 1:
            if "@" not in text:
                return WeightSchedule(((weight, 0.0),))
            at = 1.0
        else:
            at_text = pieces[1].strip()
            if not _FLOAT_RE.fullmatch(at_text) or at_text.startswith(("-", "+")):
                raise PromptSyntaxError(tag, f"{what} step in {item.strip()!r} is {at_text!r}, not a step number "
                                        "(like 10) or a fraction of the steps (like 0.5)")
            at = float(at_text)
        points.append((weight, at))
    try:
        return WeightSchedule(tuple(points))
    except ValueError as err:
        raise PromptSyntaxError(tag, f"{what} {text.strip()!r}: {err}") from None


def _name_problem(name: object) -> str | None:
    """Why `name` cannot be a LoRA name in a tag, or None."""
    if not isinstance(name, str) or not name.strip():
        return "the LoRA name is empty"
    if name != name.strip():
        return f"the LoRA name {name!r} has leading or trailing whitespace"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return f"the LoRA name {name!r} contains a control character"
    if any(c in name for c in ":<>="):
        return f"the LoRA name {name!r} contains one of ':', '<', '>', '='"
    return None


def _looks_like_lbw(text: str, presets: Mapping[str, object] | None) -> bool:
    value = text.strip()
    return "," in value or value in LBW_PRESETS or bool(presets and value in presets)


def _multiplier(tag: str, text: str, what: str, presets: Mapping[str, object] | None = None) -> float:
    """A finite float from a plain decimal literal (no nan/inf/hex/underscores)."""
    value = text.strip()
    if not _FLOAT_RE.fullmatch(value):
        if _looks_like_lbw(value, presets):
            raise PromptSyntaxError(
                tag,
                f"{what} is {value!r}, not a number: the positional block-weight form is not supported "
                f"(A1111 >= 1.5 reads this position as a multiplier); write lbw={value}",
            )
        raise PromptSyntaxError(tag, f"{what} is {value!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise PromptSyntaxError(tag, f"{what} is {value!r}, which is not a finite number")
    return number


def _dyn(tag: str, text: str, what: str, presets: Mapping[str, object] | None = None) -> int:
    value = text.strip()
    if not _INT_RE.fullmatch(value) or int(value) < 1:
        if _looks_like_lbw(value, presets):
            raise PromptSyntaxError(
                tag,
                f"{what} is {value!r}: the positional block-weight form is not supported "
                f"(A1111 >= 1.5 reads this position as the DyLoRA dim); write lbw={value}",
            )
        raise PromptSyntaxError(tag, f"{what} is {value!r}; the DyLoRA dim must be an integer >= 1")
    return int(value)


def _weights_from_text(text: str) -> tuple[float, ...]:
    """Comma-separated numbers -> floats; ValueError naming the bad entry."""
    weights = []
    for index, entry in enumerate(text.split(","), start=1):
        item = entry.strip()
        if not _FLOAT_RE.fullmatch(item):
            if item[:1] in ("R", "U", "X"):
                raise ValueError(
                    f"weight {index} is {item!r}: lora-block-weight's random (R, U) and inherited (X) weights are "
                    "not supported, write numbers"
                )
            raise ValueError(f"weight {index} is {item!r}, not a number")
        number = float(item)
        if not math.isfinite(number):
            raise ValueError(f"weight {index} is {item!r}, which is not a finite number")
        weights.append(number)
    return tuple(weights)


def _lengths_text() -> str:
    return "17 or 26 (SD1/SD2 LoRA / LyCORIS) or 12 or 20 (SDXL)"


def _block_weights(tag: str, preset: str | None, weights: tuple[float, ...]) -> BlockWeights:
    if len(weights) not in BLOCK_LAYOUTS:
        label = f"lbw preset {preset!r}" if preset else "lbw"
        raise PromptSyntaxError(tag, f"{label} has {len(weights)} weights; it needs {_lengths_text()}")
    return BlockWeights(preset=preset, values=weights)


def _step_point(tag: str, text: str, key: str) -> StepPoint:
    value = text.strip()
    if _STEP_INT_RE.fullmatch(value):
        return StepPoint(float(int(value)), is_fraction=False)
    if _STEP_FRACTION_RE.fullmatch(value):
        number = float(value)
        if number > 1.0:
            raise PromptSyntaxError(
                tag,
                f"{key}={value}: a fraction of the steps must be between 0.0 and 1.0 "
                "(write an integer such as 10 for a step number)",
            )
        return StepPoint(number, is_fraction=True)
    raise PromptSyntaxError(
        tag, f"{key}={value!r} is neither a step number (like 10) nor a fraction of the steps (like 0.3)"
    )


def _step_range(tag: str, text: str) -> tuple[StepPoint, StepPoint]:
    pieces = text.split("-")
    if len(pieces) != 2 or not all(p.strip() for p in pieces):
        raise PromptSyntaxError(tag, f"step={text!r} must have the form START-STOP, e.g. step=5-10")
    return _step_point(tag, pieces[0], "step start"), _step_point(tag, pieces[1], "step stop")


def _window_problem(start: StepPoint | None, stop: StepPoint | None) -> str | None:
    """Why start/stop cannot form a non-empty window, or None. A missing start is the first step."""
    if stop is None:
        return None
    if start is None:
        return f"stop={stop} leaves the LoRA inactive for every step" if stop.value <= 0 else None
    if start.is_fraction == stop.is_fraction and stop.value <= start.value:
        return f"stop={stop} must be after start={start}"
    return None


def tag_text(items: Sequence[str], kind: str = "lora") -> str:
    """The tag text of an argument list as the WebUI splits a tag (`ExtraNetworkParams.items`): ["x", "0.5"] ->
    "<lora:x:0.5>"."""
    return "<" + ":".join([kind, *items]) + ">"
