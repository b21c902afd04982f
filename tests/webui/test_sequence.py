"""Sequences of generations that switch LoRA sets and weights, an interrupt and an exception mid-generation: the
model's weights are bit-identical to the fresh load after each one, and merged while sampling."""

from __future__ import annotations


def test_weights_restored_after_every_generation(driver):
    res = driver("sequence")
    assert res["raised"] and "injected failure" in res["raised"]
    labels = [e["after"] for e in res["events"]]
    assert any("interrupted" in x for x in labels) and any("raised" in x for x in labels)
    for e in res["events"]:
        assert e["changed"] == 0, e
    merged = dict((i, m) for i, m in res["merged_during"])
    assert merged[0] and merged[1] and merged[2] and merged[4] and not merged[3], merged
    assert res["repeat_diff"] == 0


def test_start_stop_window(driver):
    res = driver("window")
    steps = {s: (unet, te) for s, unet, te in res["steps"]}
    assert sorted(steps) == list(range(6)), res["steps"]
    assert [steps[s][0] for s in range(6)] == [False, False, True, True, False, False], res["steps"]
    assert all(steps[s][1] for s in range(6)), res["steps"]  # the text encoder keeps it (conditioning before step 0)
    assert not res["comments"].strip(), res["comments"]
    assert res["whole_vs_plain"] == 0 and res["never_vs_te_only"] == 0
    assert res["windowed_vs_plain"] > 0 and res["windowed_vs_te_only"] > 0  # in between, and different from both
    assert res["changed_after"] == []
