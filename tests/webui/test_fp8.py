"""A1111's "FP8 weight" option (float8 storage of the UNet and text encoders, it runs on CPU): our LoRAs apply (the
extension used to fail there on a missing float8 kernel and apply nothing), like the built-in's merge into fp8, and
the weights come back bit for bit."""

from __future__ import annotations


def test_loras_apply_on_fp8_weights_and_restore(driver):
    res = driver("fp8", "sd1")
    assert "torch.float8_e4m3fn" in res["dtypes"]
    for row in res["rows"]:
        assert row["effect_ours"] > 0.5 and row["effect_ref"] > 0.5, row  # the LoRA changes the image, ours too
        # both merge into fp8, whose 3-bit mantissa rounds the result: ours is no further from the fp32 image than
        # the built-in's (the images differ from each other by fp8 roundings, not by what is merged)
        assert row["off_fp32_ours"] <= 1.2 * row["off_fp32_ref"] + 0.5, row
        assert row["changed_after"] == [] and not row["comments"].strip(), row
