"""Tests for lora_ext.prompt: tag syntax (A1111 + lora-block-weight superset) and LoRA file lookup.

Expected values come from the references, written out here by hand: A1111 v1.10's rules for `<lora:...>`
(te = position 2 or te=, default 1.0; unet = position 3 or unet=, default te; dyn = position 4 or dyn=) and
lora-block-weight's preset strings and block-id tables, typed in literally below.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lora_ext.errors import PromptSyntaxError
from lora_ext.prompt import (
    LBW_PRESETS,
    BlockWeights,
    LoraRef,
    StepPoint,
    WeightSchedule,
    parse_block_weights,
    parse_prompt,
    parse_tag,
    tag_text,
)

# ---------------------------------------------------------------------------------------------------------------------
# Reference data, typed in from hako-mikan/sd-webui-lora-block-weight (scripts/lora_block_weight.py, README.md)
# ---------------------------------------------------------------------------------------------------------------------

REF_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}

REF_LAYOUTS = {
    17: "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    26: "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00 "
    "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    12: "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05",
    20: "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08",
}

ALL_BLOCKS = REF_LAYOUTS[26].split()


def _vec(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ones(n: int) -> str:
    return ",".join(["1"] * n)


# ---------------------------------------------------------------------------------------------------------------------
# Valid tags, table-driven
# ---------------------------------------------------------------------------------------------------------------------

VALID = [
    # tag, expected fields (anything not given: te=1, unet=te, dyn/lbw/start/stop None, kind lora, extra {})
    ("<lora:x>", dict(name="x")),
    ("<lora:x:0.8>", dict(name="x", te=0.8, unet=0.8)),
    ("<lora:x:0.8:0.3>", dict(name="x", te=0.8, unet=0.3)),
    ("<lora:x:0.8:0.3:8>", dict(name="x", te=0.8, unet=0.3, dyn=8)),
    ("<lora:x:te=0.5>", dict(name="x", te=0.5, unet=0.5)),
    ("<lora:x:unet=0.5>", dict(name="x", te=1.0, unet=0.5)),
    ("<lora:x:0.8:te=0.5>", dict(name="x", te=0.5, unet=0.5)),
    ("<lora:x:0.8:0.3:unet=0.1>", dict(name="x", te=0.8, unet=0.1)),
    ("<lora:x:te=0.2:unet=0.9:dyn=16>", dict(name="x", te=0.2, unet=0.9, dyn=16)),
    ("<lora:x:1:1:4:dyn=16>", dict(name="x", dyn=16)),
    ("<lora:te=0.5:x>", dict(name="x", te=0.5, unet=0.5)),
    ("<lyco:x:0.8>", dict(name="x", te=0.8, unet=0.8, kind="lyco")),
    ("<lora: my lora : 0.8 >", dict(name="my lora", te=0.8, unet=0.8)),
    ("<lora:キャラ_v2 (é):1>", dict(name="キャラ_v2 (é)")),
    ("<lora:styles/ink:0.7>", dict(name="styles/ink", te=0.7, unet=0.7)),
    ("<lora:styles\\ink:0.7>", dict(name="styles\\ink", te=0.7, unet=0.7)),
    ("<lora:x.v2:1>", dict(name="x.v2")),
    ("<lora:../../x>", dict(name="../../x")),  # syntax is fine; resolve_lora_path refuses it
    ("<lora:x:-1.5>", dict(name="x", te=-1.5, unet=-1.5)),
    ("<lora:x:+1>", dict(name="x")),
    ("<lora:x:5e-1>", dict(name="x", te=0.5, unet=0.5)),
    ("<lora:x:.5:1.>", dict(name="x", te=0.5, unet=1.0)),
    ("<lora:x:1: te = 0.25 >", dict(name="x", te=0.25, unet=0.25)),
    ("<lora:x:1:lbw=INALL>", dict(name="x", lbw=BlockWeights("INALL", _vec(REF_PRESETS["INALL"])))),
    ("<lora:x:1:w=OUTS>", dict(name="x", lbw=BlockWeights("OUTS", _vec(REF_PRESETS["OUTS"])))),
    ("<lora:x:lbw=ALL0.5>", dict(name="x", lbw=BlockWeights("ALL0.5", (0.5,) * 17))),
    (
        "<lora:x:1:1:lbw=1, 0,0.5 ,0,0,0,0,0,0,0,0,0,-1,0,0,0,2>",
        dict(name="x", lbw=BlockWeights(None, (1, 0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 2))),
    ),
    (f"<lora:x:lbw={_ones(12)}>", dict(name="x", lbw=BlockWeights(None, (1.0,) * 12))),
    (f"<lora:x:lbw={_ones(20)}>", dict(name="x", lbw=BlockWeights(None, (1.0,) * 20))),
    (f"<lora:x:lbw={_ones(26)}>", dict(name="x", lbw=BlockWeights(None, (1.0,) * 26))),
    ("<lora:x:start=10:stop=20>", dict(name="x", start=StepPoint(10, False), stop=StepPoint(20, False))),
    ("<lora:x:start=0.3>", dict(name="x", start=StepPoint(0.3, True))),
    ("<lora:x:stop=1.0>", dict(name="x", stop=StepPoint(1.0, True))),
    ("<lora:x:start=0:stop=.5>", dict(name="x", start=StepPoint(0, False), stop=StepPoint(0.5, True))),
    ("<lora:x:start=0.5:stop=5>", dict(name="x", start=StepPoint(0.5, True), stop=StepPoint(5, False))),
    ("<lora:x:step=5-10>", dict(name="x", start=StepPoint(5, False), stop=StepPoint(10, False))),
    ("<lora:x:step=0.2-0.8>", dict(name="x", start=StepPoint(0.2, True), stop=StepPoint(0.8, True))),
    (
        "<lora:x:1:hr=0.5:neg=1:lbwe=ATTNDEEPON:x= 0.7>",
        dict(name="x", hr_te=WeightSchedule(((0.5, 0.0),)), hr_unet=WeightSchedule(((0.5, 0.0),)),
             extra={"neg": "1", "lbwe": "ATTNDEEPON", "x": " 0.7"}),
    ),
]


@pytest.mark.parametrize(("tag", "expected"), VALID, ids=[t for t, _ in VALID])
def test_valid_tags(tag: str, expected: dict) -> None:
    ref = parse_tag(tag)
    want = dict(te=1.0, dyn=None, lbw=None, start=None, stop=None, kind="lora", extra={}, tag=tag)
    want.update(expected)
    want.setdefault("unet", want["te"])
    for key, value in want.items():
        assert getattr(ref, key) == value, key
    assert isinstance(ref.te, float) and isinstance(ref.unet, float)


def test_parse_tag_strips_surrounding_whitespace() -> None:
    ref = parse_tag("  <lora:x:0.5>\n")
    assert (ref.name, ref.te, ref.tag) == ("x", 0.5, "<lora:x:0.5>")


def test_user_presets() -> None:
    mine = "0," * 16 + "2"
    ref = parse_tag("<lora:x:lbw=MINE>", presets={"MINE": mine})
    assert ref.lbw == BlockWeights("MINE", (0.0,) * 16 + (2.0,))
    ref = parse_tag("<lora:x:lbw=ALL>", presets={"ALL": [0.5] * 12})  # overrides a built-in
    assert ref.lbw == BlockWeights("ALL", (0.5,) * 12)
    with pytest.raises(PromptSyntaxError, match="preset 'BAD' has 3 weights"):
        parse_tag("<lora:x:lbw=BAD>", presets={"BAD": "1,2,3"})
    with pytest.raises(PromptSyntaxError, match="preset 'WORSE' is invalid"):
        parse_tag("<lora:x:lbw=WORSE>", presets={"WORSE": "1,a"})
    _, refs = parse_prompt("a <lora:x:1:lbw=MINE> b", presets={"MINE": mine})
    assert refs[0].lbw == BlockWeights("MINE", (0.0,) * 16 + (2.0,))


def test_parse_block_weights_quotes_the_value_without_a_tag() -> None:
    with pytest.raises(PromptSyntaxError) as info:
        parse_block_weights("1,2")
    assert info.value.tag == "1,2" and "2 weights" in info.value.problem


# ---------------------------------------------------------------------------------------------------------------------
# Malformed tags, table-driven
# ---------------------------------------------------------------------------------------------------------------------

BAD = [
    ("<lora:>", "empty"),
    ("<lora:   >", "empty"),
    ("<lora:x:abc>", "'abc', not a number"),
    ("<lora:x:0x10>", "not a number"),
    ("<lora:x:1_0>", "not a number"),
    ("<lora:x:1:2:3:4:5>", "6 positional arguments"),
    ("<lora:x:1:1:1:foo>", "5 positional arguments"),
    ("<lora:x:nan>", "not a number"),
    ("<lora:x:unet=NaN>", "not a number"),
    ("<lora:x:inf>", "not a number"),
    ("<lora:x:te=-inf>", "not a number"),
    ("<lora:x:1e999>", "not a finite number"),
    ("<lora:x:abc:te=1>", "not a number"),  # an overridden positional must still be valid
    ("<lora:x:dyn=-1>", "integer >= 1"),
    ("<lora:x:dyn=0>", "integer >= 1"),
    ("<lora:x:dyn=1.5>", "integer >= 1"),
    ("<lora:x:1:1:8.0>", "integer >= 1"),
    ("<lora:x:lbw=1,2,3>", "3 weights"),
    (f"<lora:x:lbw={_ones(16)}>", "16 weights"),
    (f"<lora:x:lbw={_ones(61)}>", "61 weights"),
    (f"<lora:x:lbw={_ones(16)},nan>", "weight 17 is 'nan'"),
    (f"<lora:x:lbw={_ones(16)},1e999>", "not a finite number"),
    (f"<lora:x:lbw={_ones(16)},>", "weight 17 is ''"),
    ("<lora:x:lbw=R," + _ones(16) + ">", "random"),
    ("<lora:x:lbw=FOO>", "unknown lbw preset 'FOO'"),
    ("<lora:x:lbw=inall>", "did you mean 'INALL'"),
    ("<lora:x:lbw=>", "unknown lbw preset ''"),
    ("<lora:x:lbw=ALL:w=ALL>", "both lbw= and w="),
    ("<lora:x:1:INALL>", "write lbw=INALL"),
    ("<lora:x:1:1:INALL>", "write lbw=INALL"),
    (f"<lora:x:1:{REF_PRESETS['INS']}>", "write lbw="),
    ("<lora:x:start=1.5>", "between 0.0 and 1.0"),
    ("<lora:x:start=10.0>", "between 0.0 and 1.0"),
    ("<lora:x:start=-1>", "neither a step number"),
    ("<lora:x:start=abc>", "neither a step number"),
    ("<lora:x:stop=1e-1>", "neither a step number"),
    ("<lora:x:start=10:stop=5>", "stop=5 must be after start=10"),
    ("<lora:x:start=0.5:stop=0.5>", "stop=0.5 must be after start=0.5"),
    ("<lora:x:stop=0>", "inactive"),
    ("<lora:x:stop=0.0>", "inactive"),
    ("<lora:x:step=5>", "START-STOP"),
    ("<lora:x:step=5-10-15>", "START-STOP"),
    ("<lora:x:step=-10>", "START-STOP"),
    ("<lora:x:step=10-5>", "must be after"),
    ("<lora:x:step=5-10:start=1>", "cannot be combined"),
    ("<lora:x:te=1:te=2>", "te= is given twice"),
    ("<lora:x:a=b=c>", "more than one '='"),
    ("<lora:x:=1>", "needs a word before '='"),
    ("<lora:x:a b=1>", "needs a word before '='"),
    ("<lora:x::1>", "argument 2 is empty"),
    ("<lora:x:>", "argument 2 is empty"),
    ("<lora: :1>", "argument 1 is empty"),
    ("<lora:te=1>", "name is missing"),
    ("<lora:x\ny:1>", "control character"),
    ("<hypernet:x:1>", "not a LoRA tag"),
    ("<LoRA:x:1>", "not a LoRA tag"),
    ("lora:x", "not a tag"),
    ("<lora:x:1", "not a tag"),
    ("<lora:x<lora:y:1>", "'<' or '>' inside"),
]


@pytest.mark.parametrize(("tag", "fragment"), BAD, ids=[t[:40] for t, _ in BAD])
def test_malformed_tags_are_rejected_quoting_the_tag(tag: str, fragment: str) -> None:
    with pytest.raises(PromptSyntaxError) as info:
        parse_tag(tag)
    err = info.value
    assert err.tag == tag
    assert repr(tag) in str(err)
    assert fragment in err.problem, err.problem


BAD_CLOSED_LORA_TAGS = [
    (t, f) for t, f in BAD if t.startswith(("<lora:", "<lyco:")) and t.endswith(">") and "<" not in t[1:]
]


@pytest.mark.parametrize(("tag", "fragment"), BAD_CLOSED_LORA_TAGS, ids=[t[:40] for t, _ in BAD_CLOSED_LORA_TAGS])
def test_malformed_tags_are_rejected_inside_prompts(tag: str, fragment: str) -> None:
    with pytest.raises(PromptSyntaxError) as info:
        parse_prompt(f"a photo, {tag}, <lora:ok:1>")
    assert info.value.tag == tag
    assert fragment in info.value.problem


@pytest.mark.parametrize(
    ("prompt", "quoted"),
    [
        ("a <lora:x:0.8", "<lora:x:0.8"),
        ("a <lora:x:0.8, b <hypernet:h:1>", "<lora:x:0.8, b "),
        ("a <lora:x<lora:y:1> b", "<lora:x"),
        ("<lyco:x", "<lyco:x"),
        ("<hypernet:a <lora:x:1", "<lora:x:1"),
    ],
)
def test_unclosed_tags_in_prompts(prompt: str, quoted: str) -> None:
    with pytest.raises(PromptSyntaxError, match="no closing") as info:
        parse_prompt(prompt)
    assert info.value.tag == quoted


def test_message_format_names_tag_and_problem() -> None:
    with pytest.raises(PromptSyntaxError) as info:
        parse_tag("<lora:x:abc>")
    assert str(info.value) == "bad LoRA tag '<lora:x:abc>': argument 2 (TE multiplier) is 'abc', not a number"


# ---------------------------------------------------------------------------------------------------------------------
# parse_prompt
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_prompt_removes_only_lora_tags_in_order() -> None:
    prompt = "masterpiece, <lora:a:0.5>, girl <hypernet:h:1> <lyco:b:1:0.2> <lora:a:0.7>\nsky <foo:>  <LORA:c:1>"
    text, refs = parse_prompt(prompt)
    assert text == "masterpiece, , girl <hypernet:h:1>  \nsky <foo:>  <LORA:c:1>"
    assert [(r.name, r.kind, r.te, r.unet, r.tag) for r in refs] == [
        ("a", "lora", 0.5, 0.5, "<lora:a:0.5>"),
        ("b", "lyco", 1.0, 0.2, "<lyco:b:1:0.2>"),
        ("a", "lora", 0.7, 0.7, "<lora:a:0.7>"),  # the same name twice: both kept, in order
    ]


def test_parse_prompt_without_tags() -> None:
    assert parse_prompt("") == ("", [])
    assert parse_prompt("a cat <3, (x:1.2) [a:b:0.5]") == ("a cat <3, (x:1.2) [a:b:0.5]", [])


def test_parse_prompt_names_with_spaces_unicode_and_subfolders() -> None:
    text, refs = parse_prompt("<lora:my style v2:0.6> 猫, <lora:スタイル/インク:0.7><lora:styles\\ink:0.1>")
    assert text == " 猫, "
    assert [r.name for r in refs] == ["my style v2", "スタイル/インク", "styles\\ink"]


# ---------------------------------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------------------------------

_NAME_CHARS = st.sampled_from(list("abcxyzABC0129_-.()[]/\\ ,'!é猫キャラ"))
names = st.text(_NAME_CHARS, min_size=1, max_size=20).filter(lambda s: s.strip() == s and s.strip())
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    """A decimal literal in one of the ways people write it, possibly padded with spaces."""
    x = draw(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
    form = draw(st.sampled_from([repr, "{:+.4f}".format, "{:e}".format, "{:g}".format, lambda v: str(int(v))]))
    pad = draw(st.sampled_from(["", " ", "  "]))
    return pad + form(x) + pad[:1]


@st.composite
def a1111_arg_lists(draw: st.DrawFn) -> list[str]:
    """Args of an A1111 `<lora:...>` tag: name + 0..3 positional numbers, and te/unet/dyn named args, interleaved."""
    name = draw(names)
    n_pos = draw(st.integers(0, 3))
    positional = [name] + [draw(number_texts()) for _ in range(min(n_pos, 2))]
    if n_pos == 3:
        positional.append(str(draw(st.integers(1, 512))))
    named = []
    for key in draw(st.sets(st.sampled_from(["te", "unet", "dyn"]))):
        value = str(draw(st.integers(1, 512))) if key == "dyn" else draw(number_texts())
        named.append(f"{key}={value}")
    # Interleave named args anywhere, keeping positional order.
    items = list(positional)
    for arg in named:
        items.insert(draw(st.integers(0, len(items))), arg)
    return items


def _a1111_expected(items: list[str]) -> tuple[str, float, float, int | None]:
    """A1111 v1.10's meaning of a lora tag's args, stated independently of lora_ext."""
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    te = float(named["te"]) if "te" in named else float(positional[1]) if len(positional) > 1 else 1.0
    if "unet" in named:
        unet = float(named["unet"])
    else:
        unet = float(positional[2]) if len(positional) > 2 else te
    if "dyn" in named:
        dyn = int(named["dyn"])
    else:
        dyn = int(positional[3]) if len(positional) > 3 else None
    return positional[0], te, unet, dyn


@settings(max_examples=300, deadline=None)
@given(a1111_arg_lists(), st.sampled_from(["lora", "lyco"]))
def test_a1111_numeric_semantics(items: list[str], kind: str) -> None:
    tag = f"<{kind}:{':'.join(items)}>"
    ref = parse_tag(tag)
    assert (ref.name, ref.te, ref.unet, ref.dyn) == _a1111_expected(items)
    assert ref.kind == kind and ref.tag == tag


@st.composite
def step_windows(draw: st.DrawFn) -> tuple[StepPoint | None, StepPoint | None]:
    def point() -> StepPoint:
        if draw(st.booleans()):
            return StepPoint(draw(st.floats(0.0, 1.0)), True)
        return StepPoint(draw(st.integers(0, 10_000)), False)

    start = point() if draw(st.booleans()) else None
    stop = point() if draw(st.booleans()) else None
    if stop is not None:
        first = start if start is not None and start.is_fraction == stop.is_fraction else None
        assume(stop.value > (first.value if first is not None else 0.0))
    return start, stop


@st.composite
def block_weights(draw: st.DrawFn) -> BlockWeights:
    if draw(st.booleans()):
        preset = draw(st.sampled_from(sorted(REF_PRESETS)))
        return BlockWeights(preset, _vec(REF_PRESETS[preset]))
    n = draw(st.sampled_from([17, 26, 12, 20]))
    return BlockWeights(None, tuple(draw(st.lists(finite, min_size=n, max_size=n))))


_EXTRA_VALUE = st.text(st.sampled_from(list("ab01 ._-,é")), max_size=8)


@st.composite
def schedules(draw: st.DrawFn) -> WeightSchedule:
    """A changing loractl schedule: 2-4 points at distinct steps (fractions or step numbers)."""
    fractions = draw(st.booleans())
    ats = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) if fractions else st.integers(0, 40).map(float)
    at_values = draw(st.lists(ats, min_size=2, max_size=4, unique=True))
    if not fractions and max(at_values) <= 1:
        at_values.append(7.0)
    weights = draw(st.lists(finite, min_size=len(at_values), max_size=len(at_values), unique=True))
    return WeightSchedule(tuple(zip(weights, at_values)))


@st.composite
def lora_refs(draw: st.DrawFn) -> LoraRef:
    te = draw(finite)
    start, stop = draw(step_windows())
    unet = draw(st.one_of(st.just(te), finite))
    te_schedule = unet_schedule = hr_te = hr_unet = None
    if start is None and stop is None:
        te_schedule = draw(st.none() | schedules())
        unet_schedule = draw(st.none() | schedules())
        hr_te = draw(st.none() | schedules())
        hr_unet = draw(st.none() | schedules())
        te = te_schedule.first if te_schedule else te
        unet = unet_schedule.first if unet_schedule else unet
    return LoraRef(
        name=draw(names),
        te=te,
        unet=unet,
        dyn=draw(st.none() | st.integers(1, 1024)),
        lbw=draw(st.none() | block_weights()),
        start=start,
        stop=stop,
        kind=draw(st.sampled_from(["lora", "lyco"])),
        extra=draw(st.dictionaries(st.sampled_from(["neg", "lbwe", "x", "my_arg"]), _EXTRA_VALUE, max_size=3)),
        te_schedule=te_schedule, unet_schedule=unet_schedule, hr_te=hr_te, hr_unet=hr_unet,
    )


def _without_tag(ref: LoraRef) -> LoraRef:
    return LoraRef(**{**ref.__dict__, "tag": ""})


@settings(max_examples=200, deadline=None)
@given(lora_refs())
def test_round_trip_of_random_valid_refs(ref: LoraRef) -> None:
    text = ref.to_tag()
    back = parse_tag(text)
    assert back.tag == text
    assert _without_tag(back) == ref
    assert back.extra == ref.extra
    assert parse_tag(back.to_tag()).to_tag() == text


@st.composite
def shuffled_tags(draw: st.DrawFn) -> tuple[str, dict]:
    """A tag written with named args in random order and random spelling; the fields it must parse to."""
    name = draw(names)
    te = draw(finite)
    unet = draw(finite)
    lbw = draw(st.none() | block_weights())
    start, stop = draw(step_windows())
    args = [f"te={te!r}", f"unet= {unet!r} "]
    if lbw is not None:
        key = draw(st.sampled_from(["lbw", "w"]))
        text = lbw.preset or draw(st.sampled_from([", ", ","])).join(repr(v) for v in lbw.values)
        args.append(f"{key}={text}")
    for key, point in (("start", start), ("stop", stop)):
        if point is not None:
            args.append(f"{key}={point}")
    args = draw(st.permutations(args))
    tag = "<lora:" + ":".join([name, *args]) + ">"
    return tag, dict(name=name, te=te, unet=unet, lbw=lbw, start=start, stop=stop)


@settings(max_examples=200, deadline=None)
@given(shuffled_tags())
def test_named_args_in_any_order(case: tuple[str, dict]) -> None:
    tag, expected = case
    ref = parse_tag(tag)
    for key, value in expected.items():
        assert getattr(ref, key) == value, key


_TEXT_PIECE = st.text(st.sampled_from(list("ab ,()[]:1.\n猫")), max_size=12)
_OTHER_TAG = st.sampled_from(["<hypernet:h:1>", "<foo:bar>", "<LORA:x:1>", "<lorax:y>", "<foo:>"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_TEXT_PIECE, st.none() | _OTHER_TAG, lora_refs()), max_size=5), _TEXT_PIECE)
def test_parse_prompt_random(parts: list, tail: str) -> None:
    prompt = "".join(text + (other or "") + ref.to_tag() for text, other, ref in parts) + tail
    expected_text = "".join(text + (other or "") for text, other, _ in parts) + tail
    text, refs = parse_prompt(prompt)
    assert text == expected_text
    assert [_without_tag(r) for r in refs] == [ref for _, _, ref in parts]
    assert [r.tag for r in refs] == [ref.to_tag() for _, _, ref in parts]


# ---------------------------------------------------------------------------------------------------------------------
# Block weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(REF_PRESETS))
def test_presets_match_lora_block_weight(preset: str) -> None:
    assert LBW_PRESETS[preset] == _vec(REF_PRESETS[preset])
    assert parse_block_weights(preset) == BlockWeights(preset, _vec(REF_PRESETS[preset]))


def test_no_unexpected_presets() -> None:
    assert set(LBW_PRESETS) == set(REF_PRESETS)


@pytest.mark.parametrize("n", sorted(REF_LAYOUTS))
def test_layouts_match_lora_block_weight(n: int) -> None:
    names = REF_LAYOUTS[n].split()
    weights = BlockWeights(None, tuple(float(i + 1) for i in range(n)))
    assert weights.block_names() == tuple(names)
    for block in ALL_BLOCKS:
        expected = float(names.index(block) + 1) if block in names else 0.0  # absent from the layout -> 0
        assert weights.multiplier_for(block) == expected, block
    assert weights.is_sdxl == (n in (12, 20))


def test_multiplier_for_examples() -> None:
    inall = parse_tag("<lora:x:lbw=INALL>").lbw
    assert [inall.multiplier_for(b) for b in ("BASE", "IN01", "IN08", "M00", "OUT03", "IN00", "IN03")] == [
        1,
        1,
        1,
        0,
        0,
        0,  # IN00 is not in the 17-value layout
        0,
    ]
    sdxl = parse_tag("<lora:x:lbw=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2>").lbw
    assert (sdxl.multiplier_for("IN04"), sdxl.multiplier_for("M00"), sdxl.multiplier_for("OUT05")) == (0.2, 0.6, 1.2)
    assert sdxl.multiplier_for("OUT06") == 0.0


@pytest.mark.parametrize("block", ["IN12", "OUT12", "MID", "base", "M01", "", "encoder"])
def test_multiplier_for_unknown_block(block: str) -> None:
    with pytest.raises(ValueError, match="unknown block"):
        BlockWeights(None, (1.0,) * 26).multiplier_for(block)


@pytest.mark.parametrize("values", [(), (1.0,) * 16, (1.0,) * 61, (1.0,) * 16 + (math.nan,)])
def test_block_weights_validate(values: tuple) -> None:
    with pytest.raises(ValueError):
        BlockWeights(None, values)


def test_tag_text():
    assert tag_text(["x", "0.5", "te=1"]) == "<lora:x:0.5:te=1>"
    assert tag_text(["x"], "lyco") == "<lyco:x>"
    assert parse_tag(tag_text(["x", "0.5", "te=1"])) == parse_tag("<lora:x:0.5:te=1>")


# ---------------------------------------------------------------------------------------------------------------------
# Step points
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "total", "step"),
    [
        ("0.3", 20, 6),
        ("0.29", 100, 29),  # 0.29 * 100 is 28.999999999999996 in binary floating point
        ("0.5", 7, 3),
        ("1.0", 20, 20),
        ("0.0", 20, 0),
        (".05", 30, 1),
        ("10", 20, 10),
        ("0", 20, 0),
        ("50", 20, 20),
    ],
)
def test_step_point_to_step(text: str, total: int, step: int) -> None:
    assert parse_tag(f"<lora:x:start={text}>").start.to_step(total) == step


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 10_000))
def test_fraction_to_step_is_exact_floor(hundredths: int, total: int) -> None:
    point = parse_tag(f"<lora:x:start={hundredths / 100}>").start
    assert point.is_fraction
    assert point.to_step(total) == hundredths * total // 100


@pytest.mark.parametrize("total", [0, -1, 2.5, True])
def test_to_step_needs_positive_total(total: object) -> None:
    with pytest.raises(ValueError):
        StepPoint(0.5, True).to_step(total)


@pytest.mark.parametrize(
    ("value", "is_fraction"), [(1.5, True), (-0.1, True), (-1, False), (2.5, False), (math.inf, False)]
)
def test_step_point_validates(value: float, is_fraction: bool) -> None:
    with pytest.raises(ValueError):
        StepPoint(value, is_fraction)


def test_active_steps() -> None:
    assert parse_tag("<lora:x:start=0.25:stop=0.75>").active_steps(20) == range(5, 15)
    assert parse_tag("<lora:x:step=5-10>").active_steps(20) == range(5, 10)
    assert parse_tag("<lora:x:stop=5>").active_steps(20) == range(0, 5)
    assert parse_tag("<lora:x:start=0.5:stop=3>").active_steps(20) == range(10, 10)  # mixed kinds can be empty
    assert parse_tag("<lora:x>").active_steps(4) == range(0, 4)


# ---------------------------------------------------------------------------------------------------------------------
# LoraRef records
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_ref_is_hashable_and_extra_is_compared() -> None:
    a = parse_tag("<lora:x:1:neg=0.5>")
    b = parse_tag("<lora:x:1:neg=0.5>")
    c = parse_tag("<lora:x:1:neg=0.7>")
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_lora_ref_copies_extra() -> None:
    extra = {"neg": "1"}
    ref = LoraRef("x", extra=extra)
    extra["neg"] = "2"
    assert ref.extra == {"neg": "1"}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name=""),
        dict(name=" x"),
        dict(name="a:b"),
        dict(name="a=b"),
        dict(name="x", te=math.nan),
        dict(name="x", unet=math.inf),
        dict(name="x", te="1"),
        dict(name="x", dyn=0),
        dict(name="x", dyn=2.0),
        dict(name="x", kind="hypernet"),
        dict(name="x", start=StepPoint(5, False), stop=StepPoint(5, False)),
        dict(name="x", extra={"te": "1"}),
        dict(name="x", extra={"hr": "a:b"}),
    ],
)
def test_lora_ref_validates(kwargs: dict) -> None:
    with pytest.raises(PromptSyntaxError):
        LoraRef(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Weight schedules (sd-webui-loractl syntax)
# ---------------------------------------------------------------------------------------------------------------------


def test_schedule_values_by_hand() -> None:
    """loractl's README examples, computed by hand: linear between points, constant outside, fractions of the pass
    when every step is <= 1 (0 = first step, 1 = last), step numbers otherwise."""
    ramp = parse_tag("<lora:x:0@0,1@0.5,0@1>")
    assert ramp.te == ramp.unet == 0.0 and ramp.unet_schedule == ramp.te_schedule
    assert [ramp.unet_weight(s, 11) for s in (0, 1, 5, 8, 10)] == pytest.approx([0.0, 0.2, 1.0, 0.4, 0.0])
    late = parse_tag("<lora:x:0.25@0.5,1@1>")  # "stays 0.25 until half the steps, then up to 1.0 at the last"
    assert [late.unet_weight(s, 21) for s in (0, 10, 15, 20)] == pytest.approx([0.25, 0.25, 0.625, 1.0])
    warmup = parse_tag("<lora:pixel:1:0@5,1@6>")  # step numbers: off for steps 0-5, on from step 6
    assert warmup.te == 1.0 and warmup.te_schedule is None
    assert [warmup.unet_weight(s, 20) for s in range(8)] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert warmup.unet_weight(19, 20) == 1.0 and warmup.unet_weight(5, 1000) == 0.0  # the step count does not matter
    named = parse_tag("<lora:pixel:te=0@0,1@1:unet=1>")
    assert named.te == 0.0 and named.te_weight() == 0.0 and named.unet_schedule is None and named.unet == 1.0
    semi = parse_tag("<lora:x:1@0;0@1>")  # semicolons separate points too
    assert semi.unet_weight(0, 3) == 1.0 and semi.unet_weight(1, 3) == pytest.approx(0.5)


def test_schedule_hires_weights() -> None:
    ref = parse_tag("<lora:x:0.5:hr=1@0,0@1>")
    assert ref.te_weight() == 0.5 and ref.unet_weight(3, 10) == 0.5
    assert ref.te_weight(hires=True) == 1.0 and ref.unet_weight(0, 5, hires=True) == 1.0
    assert ref.unet_weight(4, 5, hires=True) == 0.0
    split = parse_tag("<lora:x:1:hrunet=0.2>")
    assert split.te_weight(hires=True) == 1.0 and split.unet_weight(2, 4, hires=True) == 0.2
    assert split.is_scheduled and not parse_tag("<lora:x:1@0,1@1>").is_scheduled


@pytest.mark.parametrize(
    "tag, words",
    [
        ("<lora:x:0@0,1@0.5:start=3>", "cannot be combined with start=/stop="),
        ("<lora:x:1:unet=0@0,1@1:step=2-5>", "cannot be combined"),
        ("<lora:x:1@a>", "'a', not a step number"),
        ("<lora:x:1@-1>", "'-1', not a step number"),
        ("<lora:x:1@0,2@0>", "two points at step 0"),
        ("<lora:x:0@0@1>", "more than one '@'"),
        ("<lora:x:abc@0,1@1>", "not a number"),
        ("<lora:x:nan@0,1@1>", "'nan', not a number"),
        ("<lora:x:1:hr=1@x>", "hr= step"),
    ],
)
def test_bad_schedules_name_the_problem(tag: str, words: str) -> None:
    with pytest.raises(PromptSyntaxError, match=re.escape(words)):
        parse_tag(tag)
