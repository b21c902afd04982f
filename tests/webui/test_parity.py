"""Our `<lora:...>` handling against the built-in Lora extension in the same WebUI process, same model and files:
the images must be equal within one level (fp32 CPU), the infotext hashes identical, and the weights back to the
fresh load after every generation."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_images_equal_the_builtin(driver, arch):
    res = driver("parity", arch)
    assert len(res["rows"]) >= 10
    algorithms = set(res["files"].values())
    assert {"lora", "lora+dora", "loha", "lokr", "oft", "harness"} <= algorithms
    for row in res["rows"]:
        assert row["owners"][0] != row["owners"][1] and row["owners"][1].startswith("lora_ext"), row
        assert row["max_diff"] <= 1, row
        # non-trivial: the built-in's LoRA visibly changes the image, and so does ours
        assert row["effect"] > 0.5 and row["ours_effect"] > 0.5, row
        assert row["hashes_ours"] == row["hashes_ref"] and row["hashes_ref"], row
        assert row["changed_after"] == [], row
        assert not row["comments"].strip(), row
