"""The README's first command (`python -m lora_ext demo`): the whole story on the embedded tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_trains_a_lora_and_generates_with_and_without_it(tmp_path):
    from lora_ext.app.demo import DEMO_IMAGES, DEMO_STEPS, run_demo
    from lora_ext.formats.safetensors_io import read_header
    from lora_ext.train.events import read_events

    summary = run_demo(tmp_path / "demo")
    lora = tmp_path / "demo" / "Lora" / "demo_trained.safetensors"
    assert summary["lora"] == str(lora) and lora.is_file()
    assert len(list((tmp_path / "demo" / "dataset").glob("*.png"))) == DEMO_IMAGES
    meta = read_header(lora).metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "demo_trained"
    events = read_events(tmp_path / "demo" / "lora_ext_runs" / "demo_trained" / "events.jsonl")
    assert events[-1]["type"] == "done" and events[-1]["step"] == DEMO_STEPS  # it really trained
    card = json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["activation text"] == "sks"
    assert summary["report"] == ["demo_trained: 128/128 modules applied"]  # every key of the file applied
    a = np.asarray(Image.open(summary["images"]["without"]), dtype=np.float32)
    b = np.asarray(Image.open(summary["images"]["with"]), dtype=np.float32)
    assert np.abs(a - b).mean() > 1.0 and summary["restored_exactly"] is True
    again = run_demo(tmp_path / "demo")  # a second run reuses the model and the LoRA
    assert again["lora"] == summary["lora"] and again["images"] == summary["images"]
