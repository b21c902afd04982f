"""The README's first command (`python -m lora_ext demo`): the shapes model learns a heart, and the judge sees it."""

from __future__ import annotations

import json

import pytest

from lora_ext.models.assets import shapes_model_available


@pytest.mark.slow
@pytest.mark.skipif(not shapes_model_available(), reason="the shapes model is not built")
def test_demo_teaches_the_shapes_model_a_heart(tmp_path):
    from lora_ext.app.demo import DEMO_LORA, DEMO_STEPS, run_demo
    from lora_ext.formats.safetensors_io import read_header
    from lora_ext.train.events import read_events

    summary = run_demo(tmp_path / "demo")
    lora = tmp_path / "demo" / "Lora" / f"{DEMO_LORA}.safetensors"
    assert summary["lora"] == str(lora) and lora.is_file()
    assert len(list((tmp_path / "demo" / "dataset").glob("*.png"))) == 16
    meta = read_header(lora).metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == DEMO_LORA
    events = read_events(tmp_path / "demo" / "lora_ext_runs" / DEMO_LORA / "events.jsonl")
    assert events[-1]["type"] == "done" and events[-1]["step"] == DEMO_STEPS  # it really trained
    card = json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["activation text"] == "heart"
    (line,) = summary["report"]
    applied, total = line.split(": ")[1].split(" modules")[0].split("/")
    assert applied == total  # every key of the file applied
    # what a person sees, as the judge reads it: hearts with the LoRA, none without
    assert summary["hearts"]["without"] == 0, summary["judge"]
    assert summary["hearts"]["with"] >= 4, summary["judge"]  # 6 of 6 on the dev machine (2 threads)
    assert summary["restored_exactly"] is True
    again = run_demo(tmp_path / "demo")  # a second run reuses the LoRA and draws the same
    assert again["lora"] == summary["lora"] and again["judge"] == summary["judge"]
