"""Resume and cancel: 20 steps straight == 10 steps + stop + resume 10 (bit-exact on CPU); a STOP file or SIGTERM
saves a usable checkpoint within one step; settings a resumed run may not change are refused."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_ext.errors import ConfigError, TrainingError
from lora_ext.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from lora_ext.train.events import read_events
from tests.train.test_loop_train import ROOT, engine_report, sd15_model, tiny_config, write_images  # noqa: F401


def _quiet():
    return open(os.devnull, "w")  # noqa: SIM115


@pytest.mark.slow
def test_resume_is_bit_exact(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data" / "2_sks", 3)  # 3 images x 2 repeats, batch 1, accumulation 2: 3 steps/epoch
    common = dict(max_train_steps=20, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=3,
                  learning_rate=2e-3, network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0,
                  shuffle_caption=True, caption_dropout=0.2, flip_aug=True, train_text_encoder=True,
                  network_targets="attn_mlp", save_every_n_epochs=2)
    straight = tiny_config(sd15_model, data.parent, tmp_path / "out", output_name="straight", **common)
    r1 = train(straight, console=_quiet())

    split = tiny_config(sd15_model, data.parent, tmp_path / "out", output_name="split", **common)

    def stop_at_10(event: dict) -> None:
        if event["type"] == "step" and event["step"] == 10:
            (split.run_path / "STOP").touch()

    first = train(split, on_event=stop_at_10, console=_quiet())
    assert (first.status, first.global_step, first.output) == ("cancelled", 10, None)
    state = load_checkpoint(first.checkpoint).state
    assert (state.global_step, state.epoch, state.step_in_epoch) == (10, 3, 1)  # mid-epoch 4
    second = train(dataclasses.replace(split, resume=str(split.run_path)), console=_quiet())
    assert (second.status, second.global_step) == ("finished", 20)

    a, b = load_checkpoint(r1.checkpoint), load_checkpoint(second.checkpoint)
    assert a.lora.keys() == b.lora.keys() and any(k.startswith("lora_te_") for k in a.lora)
    for key in a.lora:
        assert torch.equal(a.lora[key], b.lora[key]), key
    assert any(a.lora[k].abs().sum() > 0 for k in a.lora if k.endswith("lora_up.weight"))
    for k, v in a.optimizer["state"].items():
        assert torch.equal(v["exp_avg_sq"], b.optimizer["state"][k]["exp_avg_sq"])
    assert a.lr_scheduler["last_epoch"] == b.lr_scheduler["last_epoch"] == 20

    straight_events = read_events(r1.run_dir / "events.jsonl")
    split_events = read_events(second.run_dir / "events.jsonl")
    losses = [(e["step"], e["loss"], e["lr"]) for e in straight_events if e["type"] == "step"]
    assert [(e["step"], e["loss"], e["lr"]) for e in split_events if e["type"] == "step"] == losses
    starts = [e for e in split_events if e["type"] == "start"]
    assert [s["global_step"] for s in starts] == [0, 10] and starts[1]["resumed_from"] == str(first.checkpoint)
    assert [e["status"] for e in split_events if e["type"] == "done"] == ["cancelled", "finished"]


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "events.jsonl"
    return [e["step"] for e in read_events(path) if e["type"] == "step"] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop_file", "sigterm"])
def test_cancel_saves_a_usable_checkpoint_within_one_step(sd15_model, tmp_path, how):  # noqa: F811
    data = write_images(tmp_path / "data", 2)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lora_ext.train", "--pretrained_model", str(sd15_model), "--train_data_dir",
           str(data), "--output_dir", str(tmp_path / "out"), "--output_name", "c", "--run_dir", str(run_dir),
           "--resolution", "64", "--min_bucket_reso", "64", "--max_train_steps", "10000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2 or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stderr.read()
        requested_after = _steps(run_dir)[-1]
        if how == "stop_file":
            (run_dir / "STOP").touch()
        else:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 3, err[-2000:]  # cancelled
    events = read_events(run_dir / "events.jsonl")
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "cancelled" and done["output"] is None
    assert done["step"] <= requested_after + 2  # stopped within one step of noticing (plus the step in flight)
    last = latest_checkpoint(run_dir)
    assert last is not None and str(last) == done["checkpoint"]
    assert load_checkpoint(last).state.global_step == done["step"]
    net, report = engine_report(last / "lora.safetensors", sd15_model)
    assert report.unmatched == [] and report.modules_applied == len(net.modules) > 0
    assert not (tmp_path / "out" / "c.safetensors").exists()

    # `--resume RUN_DIR` alone picks the run's saved config; a flag extends it, and the run ends with the export
    target = done["step"] + 2
    r = subprocess.run([sys.executable, "-m", "lora_ext.train", "--resume", str(run_dir), "--max_train_steps",
                        str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _steps(run_dir)[-2:] == [target - 1, target]
    assert (tmp_path / "out" / "c.safetensors").is_file()
    assert not (run_dir / "STOP").exists()


def test_resume_refuses_changed_training_settings(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=2)
    result = train(cfg, console=_quiet())
    with pytest.raises(ConfigError, match="^network_dim: .*was started with 4, now 8"):
        train(dataclasses.replace(cfg, resume=str(result.run_dir), network_dim=8), console=_quiet())
    # a fresh run with the same name does not silently reuse or delete the old one
    with pytest.raises(TrainingError, match=f"holds a finished run that wrote {cfg.output_path}; .* --overwrite"):
        train(cfg, console=_quiet())
    (result.output).unlink()
    with pytest.raises(TrainingError, match=f"already holds a training run with checkpoints; continue it with "
                                            f"`python -m lora_ext.train --resume {result.run_dir}`"):
        train(cfg, console=_quiet())
    with pytest.raises(TrainingError, match="started with other settings"):
        train(dataclasses.replace(cfg, learning_rate=1e-3), console=_quiet())
    with pytest.raises(ConfigError, match="^max_train_steps: .*already reached step 2, beyond the 1 steps asked for"):
        train(dataclasses.replace(cfg, resume=str(result.run_dir), max_train_steps=1), console=_quiet())
    assert list_checkpoints(result.run_dir)
    events = read_events(result.run_dir / "events.jsonl")
    assert [e["type"] for e in events].count("done") == 1
    assert events[-1]["type"] == "error" and events[-1]["message"].startswith("max_train_steps: ")
