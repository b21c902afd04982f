"""Unit tests of the training loop's pieces: loss formula, text encoding, batching, checkpoints, RNG, events, stop.

Oracles: diffusers' own `compute_snr` and `encode_prompt`, the published min-SNR-gamma formula written out here, the
dataset package's step formula (`summarize`), hand-computed EMA values.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from lora_ext.errors import TrainingError
from lora_ext.train import checkpoint as ckpt
from lora_ext.train.denoiser import encode_text, tokenize
from lora_ext.train.events import EventLog, LossAverage, format_step, read_events
from lora_ext.train.loop import EpochBatches, RunControl, steps_per_epoch
from lora_ext.train.loss import compute_snr, diffusion_loss

# ----------------------------------------------------------------------------------------------------- loss formula


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_compute_snr_matches_diffusers(ddpm):
    from diffusers.training_utils import compute_snr as diffusers_snr

    t = torch.tensor([0, 1, 10, 250, 500, 999])
    torch.testing.assert_close(compute_snr(ddpm.alphas_cumprod, t), diffusers_snr(ddpm, t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_published_formula(ddpm, prediction_type):
    from diffusers.training_utils import compute_snr as diffusers_snr

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 100, 600, 990])
    gamma = 5.0
    snr = diffusers_snr(ddpm, t)
    # Hang et al. 2023 / diffusers' training scripts: w = min(SNR, gamma) / SNR (eps), / (SNR + 1) (v)
    w = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * w).mean()
    got = diffusion_loss(pred, target, t, alphas_cumprod=ddpm.alphas_cumprod, prediction_type=prediction_type,
                         min_snr_gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    plain = diffusion_loss(pred, target, t, alphas_cumprod=ddpm.alphas_cumprod, prediction_type=prediction_type)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred, target))
    assert not torch.allclose(got, plain)  # the weighting does something at these timesteps


def test_prior_weights_scale_class_samples(ddpm):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 2, 3])
    weights = torch.tensor([1.0, 0.25, 1.0])  # sample 1 is a class image with prior_loss_weight 0.25
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    got = diffusion_loss(pred, target, t, alphas_cumprod=ddpm.alphas_cumprod, prediction_type="epsilon",
                         sample_weights=weights)
    torch.testing.assert_close(got, (per_sample * weights).mean())


# ------------------------------------------------------------------------------------------------------ text encoding


@pytest.fixture(scope="module")
def tiny_sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15")


def test_encode_text_matches_diffusers_sd1(tiny_sd15):
    pipe = tiny_sd15
    captions = ["a photo of sks dog", ""]
    ref = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    with torch.no_grad():
        got, pooled = encode_text("sd1", [pipe.text_encoder], [tokenize(pipe.tokenizer, captions)], clip_skip=1)
    assert pooled is None
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_clip_skip_uses_the_earlier_layer_through_the_final_norm(tiny_sd15):
    # A1111 / sd-scripts: clip skip N = hidden state of the N-th last layer, then the final layer norm
    pipe = tiny_sd15
    ids = tokenize(pipe.tokenizer, ["a cat"])
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        te = pipe.text_encoder
        norm = (te.text_model if hasattr(te, "text_model") else te).final_layer_norm
        expected = norm(out.hidden_states[-2])
        got, _ = encode_text("sd1", [te], [ids], clip_skip=2)
        last, _ = encode_text("sd1", [te], [ids], clip_skip=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, last)


@pytest.mark.slow
def test_encode_text_matches_diffusers_sdxl():
    from lora_ext.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    captions = ["a photo of sks dog"]
    ids = [tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer_2, captions)]
    for clip_skip in (1, 2):
        ref = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                 clip_skip=None if clip_skip == 1 else clip_skip - 1)
        with torch.no_grad():
            hidden, pooled = encode_text("sdxl", [pipe.text_encoder, pipe.text_encoder_2], ids, clip_skip)
        torch.testing.assert_close(hidden, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(pooled, ref[2], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------ batches


def test_epoch_batches_shard_pad_and_skip():
    batches = [[0], [1], [2], [3], [4]]
    per_epoch = steps_per_epoch(len(batches), num_processes=2, accum=2)
    assert per_epoch == math.ceil(5 / 4) == 2
    p0 = EpochBatches(batches, steps_per_epoch=per_epoch, num_processes=2, process_index=0, accum=2)
    p1 = EpochBatches(batches, steps_per_epoch=per_epoch, num_processes=2, process_index=1, accum=2)
    # padded cyclically to 2 steps x 2 processes x 2 micro-batches = 8 batches, dealt out round-robin
    assert list(p0) == [[0], [2], [4], [1]]
    assert list(p1) == [[1], [3], [0], [2]]
    assert len(p0) == len(p1) == per_epoch * 2
    resumed = EpochBatches(batches, steps_per_epoch=per_epoch, num_processes=2, process_index=0, accum=2,
                           skip_steps=1)
    assert list(resumed) == [[4], [1]]


@pytest.mark.parametrize(("samples", "batch", "accum", "procs"), [(7, 2, 1, 1), (9, 1, 4, 1), (10, 3, 2, 2)])
def test_steps_per_epoch_agrees_with_the_dataset_summary(tmp_path, samples, batch, accum, procs):
    from PIL import Image

    from lora_ext.train.dataset import BucketBatchSampler, DatasetSpec, TrainDataset, scan_dataset, summarize

    for i in range(samples):
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x")
    spec = DatasetSpec(train_data_dir=tmp_path, resolution=64, min_bucket_reso=64)
    records, scan = scan_dataset(spec)
    report = summarize(records, spec, batch, 1, None, accum, procs, scan=scan)
    sampler = BucketBatchSampler(TrainDataset(records, spec), batch, seed=0)
    assert steps_per_epoch(len(sampler), procs, accum) == report.steps_per_epoch


# -------------------------------------------------------------------------------------------------------- checkpoints


def _state(step: int) -> ckpt.CheckpointState:
    return ckpt.CheckpointState(global_step=step, epoch=1, step_in_epoch=2, dataset_hash="abc",
                                loss_avg={"beta": 0.9, "value": 0.5, "count": 3})


def _save(run, step, keep=2, rng=None):
    lora = {"lora_unet_x.lora_down.weight": torch.full((2, 3), float(step)),
            "lora_unet_x.lora_up.weight": torch.zeros(3, 2), "lora_unet_x.alpha": torch.tensor(2.0)}
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2, 3)}},
           "param_groups": [{"lr": 1e-4, "params": [0]}]}
    return ckpt.save_checkpoint(run, _state(step), lora=lora, lora_metadata={"k": "v"}, optimizer=opt,
                                lr_scheduler={"last_epoch": step, "base_lrs": [1e-4]},
                                rng=rng or [ckpt.capture_rng()], keep_last=keep)


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    for step in (1, 2, 3):
        path, removed = _save(tmp_path, step)
    assert path.name == "step-00000003"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert ckpt.latest_checkpoint(tmp_path) == path
    loaded = ckpt.load_checkpoint(path)
    assert loaded.state == _state(3)
    assert torch.equal(loaded.lora["lora_unet_x.lora_down.weight"], torch.full((2, 3), 3.0))
    assert loaded.lora_metadata == {"k": "v"}
    assert loaded.optimizer["param_groups"][0]["lr"] == 1e-4
    assert loaded.lr_scheduler["last_epoch"] == 3
    assert set(loaded.rng) == {0}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoint_save_failure_leaves_previous_intact(tmp_path, monkeypatch):
    good, _ = _save(tmp_path, 5)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 6)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert ckpt.load_checkpoint(good).state.global_step == 5


def test_damaged_checkpoint_names_the_file(tmp_path):
    path, _ = _save(tmp_path, 1)
    (path / "training.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="training.pt"):
        ckpt.load_checkpoint(path)


def test_rng_capture_restore_reproduces_every_stream():
    gen = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.randn(5, generator=gen)
    states = ckpt.capture_rng({"noise": gen})

    def draw():
        return (random.random(), float(np.random.rand()), torch.rand(3), torch.randn(3, generator=gen))

    first = draw()
    draw()  # move every stream on
    ckpt.restore_rng(states, {"noise": gen})
    again = draw()
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_rng_states_survive_a_checkpoint_file(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    path, _ = _save(tmp_path, 1, rng=[ckpt.capture_rng({"noise": gen})])
    expected = (torch.rand(4), torch.rand(2, generator=gen))
    ckpt.restore_rng(ckpt.load_checkpoint(path).rng[0], {"noise": gen})
    assert torch.equal(torch.rand(4), expected[0]) and torch.equal(torch.rand(2, generator=gen), expected[1])


# ------------------------------------------------------------------------------------------------------------- events


def test_event_log_lines_and_moving_average(tmp_path):
    seen = []
    log = EventLog(tmp_path / "events.jsonl", callback=seen.append)
    avg = LossAverage()
    losses = [1.0, 0.5, 0.25]
    for i, loss in enumerate(losses, 1):
        log.emit("step", step=i, loss=loss, loss_avg=avg.update(loss))
    log.emit("warning", message="nan stays valid JSON", value=float("nan"))
    log.close()
    with open(tmp_path / "events.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "step", "st')  # a torn line from a killed process
    events = read_events(tmp_path / "events.jsonl")
    assert [e["type"] for e in events] == ["step", "step", "step", "warning"]
    assert events[3]["value"] is None
    assert seen == events
    # bias-corrected EMA, beta 0.9: m_k = 0.9 m_{k-1} + 0.1 x_k, avg_k = m_k / (1 - 0.9^k)
    m = 0.0
    for k, (e, x) in enumerate(zip(events, losses), 1):
        m = 0.9 * m + 0.1 * x
        assert e["loss_avg"] == pytest.approx(m / (1 - 0.9**k), rel=1e-12)
    assert events[0]["loss_avg"] == 1.0
    with pytest.raises(ValueError):
        EventLog(None).emit("bogus")


def test_progress_line_format():
    line = format_step({"step": 5, "total_steps": 20, "epoch": 2, "loss": 0.12345, "loss_avg": 0.2, "lr": 1e-4,
                        "it_s": 3.2, "eta_s": 65.0, "peak_memory_bytes": 2**30})
    assert line == "step 5/20 (25%) epoch 2 loss 0.1235 avg 0.2000 lr 1.00e-04 3.20 it/s ETA 0:01:05 mem 1.0 GiB"


# --------------------------------------------------------------------------------------------------------------- stop


def test_stop_request_by_file_and_signal(tmp_path):
    stop = RunControl(tmp_path)
    assert not stop.stop_requested() and not stop.save_requested()
    (tmp_path / "STOP").touch()
    assert stop.stop_requested() and "STOP" in stop.reason
    (tmp_path / "STOP").unlink()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with stop.signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested() and stop.reason == "signal SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before
    (tmp_path / "SAVE").touch()
    assert stop.save_requested()
    stop.save_done()
    assert not stop.save_requested() and not (tmp_path / "SAVE").exists()


def test_a_runner_that_exits_is_a_stop_request(tmp_path):
    """A child started through lora_ext.train.process stops when its runner is no longer its parent."""
    assert not RunControl(tmp_path, runner=os.getppid()).stop_requested()
    gone = RunControl(tmp_path, runner=os.getppid() + 100000)  # as after the runner died and we were re-parented
    assert gone.stop_requested() and f"(pid {os.getppid() + 100000}) exited" in gone.reason


def test_events_json_is_one_object_per_line(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")
    log.emit("checkpoint", step=1, path=tmp_path / "x", removed=[])
    log.close()
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == str(tmp_path / "x")
