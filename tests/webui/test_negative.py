"""LoRA tags in the negative prompt (issue 13 section 6) in the real WebUI: plain text by default, as the built-in
(and said once); with the opt-in setting, applied to the negative branch only."""

from __future__ import annotations


def test_negative_prompt_tags(driver):
    res = driver("negative", "sd1")
    assert res["off_vs_builtin"] <= 1, res  # default: the same as the built-in (the tag is text for the encoder)
    assert "negative prompt's LoRA tags" in res["comments_off"], res
    assert res["cfg1_vs_plain"] <= 1, res  # CFG 1: only the conditional branch counts, it has no negative LoRA
    assert res["on_effect"] > 0.5, res  # CFG 7: the unconditional branch has it
    assert any("from the negative prompt" in n for n in res["notes_on"]), res
    assert not res["comments_on"].strip(), res
    assert res["infotext_negative"] and "<lora:" in res["infotext_negative"][0], res  # as written
    assert all(d <= 1 for d in res["batch_vs_solo"]), res
    assert res["changed_after"] == [], res
