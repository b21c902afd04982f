"""Missing, wrong-family and broken LoRAs, bad tags: the user is told (comment + console), the generation goes on
without the bad LoRA; the infotext: hashes resolve on paste, sd_lora, bundled embeddings."""

from __future__ import annotations


def test_problems_are_shown_and_generation_continues(driver):
    res = driver("problems")
    rows = {r["prompt"]: r for r in res["rows"]}
    missing = rows["a cat <lora:does_not_exist:0.8>"]
    assert "Lora not found: does_not_exist" in missing["comments"], missing
    assert missing["diff_base"] == 0
    wrong = rows["a cat <lora:wrong_family:1>"]
    assert "wrong_family: not applied" in wrong["comments"] and "SDXL" in wrong["comments"], wrong
    assert wrong["diff_base"] == 0
    broken = rows["a cat <lora:broken:1>"]
    assert "broken.safetensors" in broken["comments"] and "damaged" in broken["comments"], broken
    mixed = [r for p, r in rows.items() if "does_not_exist:1>" in p][0]
    assert mixed["diff_good"] == 0 and mixed["diff_base"] > 0 and "does_not_exist" in mixed["comments"]
    bad_tag = rows["a cat <lora:x::1>"]
    assert "<lora:x::1>" in bad_tag["comments"] and "empty" in bad_tag["comments"], bad_tag
    assert "lora_ext: Lora not found: does_not_exist" in res["_log"]  # console


def test_infotext_paste_sd_lora_and_bundled_embeddings(driver):
    res = driver("infotext")
    assert res["hashes"] and res["pasted"] == "a cat <lora:renamed_copy:0.8>"
    assert res["sd_lora_diff"] == 0 and res["sd_lora_hashes"]
    assert res["bundle_diff"] <= 1
    assert res["bundle_ti_ours"] == res["bundle_ti_ref"] and res["bundle_ti_ref"], res
    assert res["bundle_registered_after"] is False
