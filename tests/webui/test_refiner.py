"""The SDXL refiner in the real WebUI (issue 13 section 5): when the refiner takes over mid-generation, the LoRAs go
on it and stay there to the last step, and every weight is back afterwards."""

from __future__ import annotations


def test_loras_follow_the_refiner(driver):
    res = driver("refiner", "sdxl")
    assert res["switched_to"].startswith(res["refiner"]), res  # the refiner really was loaded mid-generation
    assert res["infotext_refiner"], res
    # A1111's get_empty_cond activates extra networks with none right after the refiner loads: the built-in loses
    # its LoRAs there for the rest of the image (vs_builtin ~5 here); ours puts them back before the next use
    assert res["vs_no_refiner"] <= 1, res  # same weights in the refiner: the LoRA stayed on after the switch
    assert res["effect"] > 0.5, res
    assert res["refiner_itself"] == 0, res  # the switch alone changes nothing (the copy has the base's weights)
    assert all(res["steps_merged"]) and len(res["steps_merged"]) == 6, res  # on the refiner too
    assert res["hashes"] and not res["comments"].strip(), res
    assert res["changed_after"] == [], res
