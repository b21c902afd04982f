"""Two-process data-parallel training on CPU through `accelerate launch` (gloo).

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its simple launcher); the
multi-process launcher (torchrun) with ACCELERATE_USE_CPU=true gives two CPU processes joined by gloo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ext.train.checkpoint import load_checkpoint
from lora_ext.train.events import read_events
from tests.train.test_loop_train import ROOT, engine_report, sd15_model, write_images  # noqa: F401


@pytest.mark.slow
def test_two_process_run_through_accelerate_launch(sd15_model, tmp_path):  # noqa: F811
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists() and shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    data = write_images(tmp_path / "data", 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [str(accelerate if accelerate.exists() else shutil.which("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", "-m", "lora_ext.train", "--pretrained_model", str(sd15_model),
           "--train_data_dir", str(data), "--output_dir", "out", "--output_name", "ddp", "--resolution", "64",
           "--min_bucket_reso", "64", "--max_train_steps", "4", "--save_every_n_steps", "2"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    events = read_events(tmp_path / "lora_ext_runs" / "ddp" / "events.jsonl")
    start = events[0]
    assert start["type"] == "start" and start["num_processes"] == 2
    assert start["steps_per_epoch"] == 2  # 4 samples, batch 1, split over 2 processes
    assert [e["type"] for e in events].count("start") == 1  # only the main process writes events
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "finished"
    ckpt = load_checkpoint(Path(events[-1]["checkpoint"]) if Path(events[-1]["checkpoint"]).is_absolute()
                           else tmp_path / events[-1]["checkpoint"])
    assert sorted(ckpt.rng) == [0, 1] and ckpt.state.num_processes == 2
    net, report = engine_report(tmp_path / "out" / "ddp.safetensors", sd15_model)
    assert report.unmatched == [] and report.modules_applied == len(net.modules)
