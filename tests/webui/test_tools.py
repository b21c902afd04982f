"""The model tools in the real AUTOMATIC1111 v1.10 (tests/webui/driver.py scenario `tools`): a LoRA converted to
diffusers/PEFT names and back is read by the built-in with every module matched and gives the image ours gives with
the PEFT file; a checkpoint made by merge-model, loaded by A1111 as its checkpoint, draws what the tags draw on the
base checkpoint."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_converted_loras_and_merged_checkpoints_in_the_webui(driver, arch):
    res = driver("tools", arch)
    for row in res["convert"]:
        assert row["builtin_modules"] == row["file_modules"] > 0, row  # the built-in matched every module
        assert row["diff_builtin_vs_ours_peft"] <= 1, row
        assert row["diff_ours_back_vs_peft"] <= 1, row
    merge = res["merge"]
    assert merge["loaded"] == merge["merged_file"]
    assert merge["tensors_merged"] > 10 and merge["weights_changed_by_loading_merged"] > 10
    assert merge["diff_merged_vs_tags"] <= 1, merge  # the merged model is the model the tags gave
