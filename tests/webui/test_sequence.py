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
