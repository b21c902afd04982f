"""Weight schedules (`<lora:x:0@0,1@0.5>`, sd-webui-loractl's syntax) in the real WebUI, re-merged per step and as
bypass: the same images either way, a step schedule equal to the start= window, hr= equal to a hires prompt at that
weight, no UNet weight written in bypass mode, every weight back afterwards."""

from __future__ import annotations


def test_schedules_in_both_modes(driver):
    res = driver("schedule", "sd1")
    assert res["step_merge_vs_window"] <= 1 and res["step_bypass_vs_window"] <= 1, res
    assert res["ramp_bypass_vs_merge"] <= 1, res
    # a ramp down from 1 to 0: strong in the early steps (far from the text-encoder-only image), and not the
    # constant LoRA either (the late steps, which set the fine detail, lack it)
    assert res["ramp_vs_te_only"] > 0.2 and res["ramp_vs_plain"] > 0.0, res
    assert res["hr_tag_vs_hr_prompt"] <= 1 and res["hr_tag_vs_none"] > 0.0, res  # 2 hires steps at 0.6: small
    assert not any(res["unet_written_step_bypass"]), res  # bypass: the weights are never written
    assert any(res["unet_written_step_merge"]), res  # merge: written from step 3 on
    assert "applied as bypass" in " ".join(res["notes"]["bypass"]), res
    assert "re-merging" in " ".join(res["notes"]["merge"]), res
    assert res["hashes_bypass"] and res["hashes_bypass"] == res["hashes_merge"], res
    assert not res["comments_bypass"].strip() and not res["comments_merge"].strip(), res
    assert res["changed_after"] == [], res
