"""The "Lora hashes" field and the CLI's "parameters" text, against A1111 v1.10's rules typed in from its source
(extensions-builtin/Lora/extra_networks_lora.py `remove_symbols` and the join; scripts/lora_script.py
`infotext_pasted`; modules/infotext_utils.py `quote`). The real WebUI comparison is in tests/webui/test_parity.py."""

from __future__ import annotations

import json

from lora_ext.formats.infotext import (
    GenerationParameters,
    format_lora_hashes,
    infotext_name,
    parse_lora_hashes,
    quote,
    relink_prompt,
)


def test_names_lose_colons_and_commas_as_in_a1111():
    assert infotext_name("my,lora") == "mylora"
    assert infotext_name("a:b, c") == "ab c"
    assert infotext_name("styles/ink") == "styles/ink"


def test_format_and_parse_round_trip_a1111_style():
    hashes = {"ink": "0123456789ab", "sub/dots v2": "ba9876543210"}
    text = format_lora_hashes(hashes)
    assert text == "ink: 0123456789ab, sub/dots v2: ba9876543210"  # ', '.join(f'{k}: {v}' ...)
    assert parse_lora_hashes(text) == hashes
    assert parse_lora_hashes(" a :  x1 ,b:y2, junk") == {"a": "x1", "b": "y2"}
    assert format_lora_hashes({}) == ""


def test_quote_follows_infotext_utils():
    assert quote("euler") == "euler"
    assert quote("a: b") == '"a: b"'
    assert quote('say "hi", ok') == json.dumps('say "hi", ok')


def test_parameters_text_is_what_a1111_writes():
    params = GenerationParameters(prompt="a cat <lora:ink:0.8>", negative="blurry", steps=3, sampler="euler",
                                  cfg=7.0, seed=5, width=64, height=64, lora_hashes={"ink": "0123456789ab"})
    assert params.text() == ('a cat <lora:ink:0.8>\nNegative prompt: blurry\n'
                             'Steps: 3, Sampler: euler, CFG scale: 7, Seed: 5, Size: 64x64, '
                             'Lora hashes: "ink: 0123456789ab"')
    bare = GenerationParameters(prompt="x", steps=1, sampler="euler", cfg=1.5, seed=0, width=8, height=8)
    assert bare.text() == "x\nSteps: 1, Sampler: euler, CFG scale: 1.5, Seed: 0, Size: 8x8"


def test_relink_rewrites_only_names_with_a_known_hash():
    local = {"0123456789ab": "ink_renamed"}
    prompt = "a <lora:ink:0.8> b <lyco:dots:1> c <lora:other:1> <hypernet:ink:1>"
    out = relink_prompt(prompt, {"ink": "0123456789ab", "dots": "ffff"}, local.get)
    assert out == "a <lora:ink_renamed:0.8> b <lyco:dots:1> c <lora:other:1> <hypernet:ink:1>"
