"""End-to-end training on tiny random-weight models: a CLI smoke run, the events file, learning, NaN handling,
SDXL and DreamBooth prior preservation.

Independent checks: the exported file is read back by the engine (`load_lora` + `Patcher.check`) and by diffusers'
`load_lora_weights`; learning is measured with the exported file merged by the engine's patcher (not the training
hooks), in latent space (a random VAE decodes everything to about the same colours).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ext.errors import TrainingError
from lora_ext.train.config import TrainConfig
from lora_ext.train.events import read_events
from tests.stack import require_diffusers_lora_loader

ROOT = Path(__file__).resolve().parents[2]
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_up\.weight|lora_down\.weight|alpha)$")


# ------------------------------------------------------------------------------------------------------ helpers


def pattern_image(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth deterministic RGB pattern, float [H, W, 3] in [0, 1]."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    xx, yy = xx / max(w - 1, 1), yy / max(h - 1, 1)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 6, 3)
    return np.stack([xx, yy, 0.5 + 0.5 * np.sin(a * xx + b * yy + c)], -1)


def write_images(folder: Path, n: int, *, caption: str = "a photo of sks", sizes=None, seed: int = 0) -> Path:
    """n PNG images (64x64 unless `sizes`) with `<caption> <i>` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (64, 64)
        Image.fromarray((pattern_image(seed + i, size) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{caption} {i}" if n > 1 else caption)
    return folder


def tiny_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    """A fast config on the tiny model: 64 px, no epoch checkpoints unless asked."""
    base = dict(pretrained_model=str(model), train_data_dir=str(data), output_dir=str(out), output_name="tiny",
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, save_every_n_epochs=None, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory) -> Path:
    from lora_ext.models.tiny import save_tiny_model

    return save_tiny_model("sd15", tmp_path_factory.mktemp("tiny") / "sd15")


def engine_report(lora_path: Path, model: Path):
    """Our engine's coverage report of a LoRA file against the model (unmatched modules, applied count)."""
    from lora_ext.formats.network import load_lora
    from lora_ext.models.loading import load_pipeline
    from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline

    net = load_lora(lora_path)
    pipe = load_pipeline(model).pipe
    return net, Patcher(adapter_for_pipeline(pipe)).check([ActiveLora(net)]).networks[0]


# --------------------------------------------------------------------------------------------------- smoke (CLI)


@pytest.mark.slow
def test_cli_smoke_run_writes_a_kohya_file_that_loads_everywhere(sd15_model, tmp_path):
    data = write_images(tmp_path / "data", 2)
    r = run_cli(["-m", "lora_ext", "train", "--pretrained_model", str(sd15_model), "--train_data_dir", str(data),
                 "--output_dir", "out", "--output_name", "smoke", "--resolution", "64", "--min_bucket_reso", "64",
                 "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_last_n", "1",
                 "--network_targets", "attn_mlp", "--train_text_encoder", "--sample_prompts", "a photo of sks",
                 "--sample_steps", "2", "--trigger_word", "sks"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    streamed = [json.loads(line) for line in r.stdout.splitlines()]
    run_dir = tmp_path / "lora_ext_runs" / "smoke"
    assert streamed == read_events(run_dir / "events.jsonl")  # the CLI streams exactly the run's events
    assert streamed[0]["type"] == "start" and streamed[-1]["type"] == "done"
    assert streamed[-1]["status"] == "finished" and "finished: step 2/2" in r.stderr

    out = tmp_path / "out" / "smoke.safetensors"
    from lora_ext.formats.safetensors_io import load_tensors, read_header

    header = read_header(out)
    keys = list(header.tensors)
    assert keys and all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:5]
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert {t.dtype for t in header.tensors.values()} == {"F16"}
    assert header.metadata["ss_output_name"] == "smoke" and header.metadata["ss_steps"] == "2"
    tensors = load_tensors(out)
    assert any(k.endswith("lora_up.weight") and tensors[k].abs().sum() > 0 for k in keys)  # it trained
    net, report = engine_report(out, sd15_model)
    assert report.error is None and report.unmatched == [] and report.unknown_keys == []
    assert report.modules_applied == len(net.modules) == len(keys) // 3
    assert (tmp_path / "out" / "smoke.json").is_file() and (tmp_path / "out" / "smoke.preview.png").is_file()
    assert json.loads((tmp_path / "out" / "smoke.json").read_text())["activation text"] == "sks"
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000002"]  # save_last_n = 1 pruned step 1

    # diffusers' own kohya loader takes it too (last: on a stack without it only this part is skipped)
    require_diffusers_lora_loader()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_model, local_files_only=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert len(pipe.get_list_adapters().get("unet", [])) == 1
    assert len(pipe.get_list_adapters().get("text_encoder", [])) == 1


# ------------------------------------------------------------------------------------------------------ events


def test_events_file_content(sd15_model, tmp_path):
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 3)
    seen: list[dict] = []
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=6, save_every_n_steps=4,
                      sample_every_n_epochs=1, sample_prompts=["a photo of sks"], sample_steps=2,
                      learning_rate=1e-3, lr_scheduler="linear")
    result = train(cfg, on_event=seen.append, console=open(os.devnull, "w"))  # noqa: SIM115
    events = read_events(result.run_dir / "events.jsonl")
    assert events == seen
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and "error" not in types
    start = events[0]
    assert (start["total_steps"], start["steps_per_epoch"], start["total_epochs"]) == (6, 3, 2)
    assert start["dataset"]["images"] == 3 and start["config"]["learning_rate"] == 1e-3
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [e["epoch"] for e in steps] == [1, 1, 1, 2, 2, 2]
    ema = 0.0
    for k, e in enumerate(steps, 1):
        assert math.isfinite(e["loss"]) and e["peak_memory_bytes"] > 0 and e["memory_kind"] == "rss"
        ema = 0.9 * ema + 0.1 * e["loss"]
        assert e["loss_avg"] == pytest.approx(ema / (1 - 0.9**k))
        # linear decay without warm-up: lr after step k = lr * (6 - k) / 6
        assert e["lr"] == pytest.approx(1e-3 * (6 - k) / 6)
    assert steps[0]["it_s"] is None and all(e["it_s"] > 0 for e in steps[1:])
    assert steps[-1]["eta_s"] == 0
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2]
    samples = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [3, 6] and all(Path(p).is_file() for e in samples for p in e["paths"])
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [4, 6] and Path(checkpoints[-1]["lora_path"]).is_file()
    done = events[-1]
    assert done["status"] == "finished" and done["output"] == str(result.output) and result.output.is_file()
    assert done["checkpoint"] == checkpoints[-1]["path"]


# ------------------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_training_learns_the_dataset(sd15_model, tmp_path):
    from diffusers import DDPMScheduler

    from lora_ext.app.generate import generate_latents
    from lora_ext.formats.network import load_lora
    from lora_ext.models.loading import load_pipeline
    from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
    from lora_ext.train.loop import train

    caption = "a photo of sks"
    data = write_images(tmp_path / "data", 1, caption=caption, seed=5)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=100, learning_rate=1e-2,
                      network_targets="attn_mlp", network_dim=8, cache_latents=True,
                      cache_text_encoder_outputs=True)
    result = train(cfg, console=open(os.devnull, "w"))  # noqa: SIM115

    pipe = load_pipeline(sd15_model).pipe
    pixels = torch.from_numpy(pattern_image(5).astype(np.float32).transpose(2, 0, 1))[None] * 2 - 1
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    noise = torch.randn((16, *x0.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)

    def eval_loss() -> float:  # fixed noise and timesteps: epsilon-prediction MSE on the training latent
        with torch.no_grad():
            pred = pipe.unet(ddpm.add_noise(x0.expand(16, -1, -1, -1), noise, t), t, text.expand(16, -1, -1)).sample
        return float(((pred - noise) ** 2).mean())

    def latent_distance() -> float:
        return float(np.mean([((generate_latents(pipe, caption, seed=s, steps=20, width=64, height=64, cfg=1.0)
                                 - x0) ** 2).mean() for s in range(4)]))

    base_loss, base_dist = eval_loss(), latent_distance()
    patcher = Patcher(adapter_for_pipeline(pipe))
    patcher.apply([ActiveLora(load_lora(result.output))])  # weight 1, merged by the engine
    lora_loss, lora_dist = eval_loss(), latent_distance()
    assert lora_loss < 0.7 * base_loss, (base_loss, lora_loss)
    assert lora_dist <= 0.7 * base_dist, (base_dist, lora_dist)


# ------------------------------------------------------------------------------------------------------ NaN loss


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(sd15_model, tmp_path, monkeypatch):
    from lora_ext.train import loop, loss
    from lora_ext.train.checkpoint import list_checkpoints, load_checkpoint

    calls = {"n": 0}
    real = loss.diffusion_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loss, "diffusion_loss", poisoned)
    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=5, save_every_n_steps=1)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 \(epoch 2\).*step-00000002"):
        loop.train(cfg, console=open(os.devnull, "w"))  # noqa: SIM115
    run_dir = cfg.run_path
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["type"] == "error" and events[-1]["step"] == 2
    assert events[-1]["checkpoint"].endswith("step-00000002")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000001", "step-00000002"]
    last = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert all(torch.isfinite(t).all() for t in last.lora.values())
    assert not cfg.output_path.exists()


# ------------------------------------------------------------------------------------------------- SDXL, DreamBooth


def test_sdxl_run_trains_both_text_encoders(tmp_path, monkeypatch):
    from lora_ext.models.tiny import save_tiny_model
    from lora_ext.train import loop

    seen_time_ids: list[list[int]] = []
    forward = loop.Denoiser.forward

    def spy(self, *args, add_time_ids=None, **kwargs):
        seen_time_ids.extend(add_time_ids.tolist())
        return forward(self, *args, add_time_ids=add_time_ids, **kwargs)

    monkeypatch.setattr(loop.Denoiser, "forward", spy)
    model = save_tiny_model("sdxl", tmp_path / "sdxl")
    data = write_images(tmp_path / "data", 2, sizes=[(64, 64), (128, 64)])
    cfg = tiny_config(model, data, tmp_path / "out", max_train_steps=2, train_text_encoder=True,
                      bucket_reso_steps=64, max_bucket_reso=128, min_snr_gamma=5.0, noise_offset=0.05)
    result = loop.train(cfg, console=open(os.devnull, "w"))  # noqa: SIM115
    # diffusers' SDXL scripts: (original h, w) + (crop top, left) + (target h, w); the 128x64 image is centre-cropped
    # to the 64x64 bucket, 32 px from the left
    assert sorted(seen_time_ids) == [[64, 64, 0, 0, 64, 64], [64, 128, 0, 32, 64, 64]]
    net, report = engine_report(result.output, model)
    prefixes = {m.split("_", 2)[0] + "_" + m.split("_", 2)[1] for m in net.modules}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert report.unmatched == [] and report.modules_applied == len(net.modules)
    assert net.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_dreambooth_generates_class_images_and_trains_with_prior_loss(sd15_model, tmp_path):
    from lora_ext.train.loop import train

    instance = write_images(tmp_path / "instance", 2, caption="")
    for p in instance.glob("*.txt"):
        p.unlink()
    seen: list[dict] = []
    cfg = TrainConfig(pretrained_model=str(sd15_model), instance_dir=str(instance), instance_prompt="a sks dog",
                      class_dir=str(tmp_path / "class"), class_prompt="a dog", num_class_images=2,
                      prior_loss_weight=0.5, output_dir=str(tmp_path / "out"), output_name="db", resolution=64,
                      min_bucket_reso=64, max_train_steps=2, sample_steps=2, save_every_n_epochs=None)
    result = train(cfg, on_event=seen.append, console=open(os.devnull, "w"))  # noqa: SIM115
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_00000.png", "class_00001.png"]
    start = next(e for e in seen if e["type"] == "start")
    assert start["dataset"]["class_images"] == 2
    assert result.status == "finished" and result.output.is_file()


# ------------------------------------------------------------------------------------------- dtypes, determinism


def test_mixed_precision_keeps_base_in_bf16_and_lora_in_fp32(sd15_model, tmp_path, monkeypatch):
    from lora_ext.train import network as network_module
    from lora_ext.train.loop import train

    built = []

    class Spy(network_module.LoraTrainingNetwork):
        def __init__(self, pipe, **kwargs):
            super().__init__(pipe, **kwargs)
            built.append(self)

    monkeypatch.setattr(network_module, "LoraTrainingNetwork", Spy)
    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=1, mixed_precision="bf16",
                      train_text_encoder=True)
    result = train(cfg, console=open(os.devnull, "w"))  # noqa: SIM115
    (net,) = built
    pipe = net.pipe
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in module.parameters())  # frozen (remove() restores after the run)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert result.status == "finished"


def test_runs_are_deterministic_for_a_seed(sd15_model, tmp_path):
    from lora_ext.train.checkpoint import load_checkpoint
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    weights = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = tiny_config(sd15_model, data, tmp_path / "out", output_name=name, seed=seed, max_train_steps=2,
                          learning_rate=1e-3, network_dropout=0.1, flip_aug=True)
        weights.append(load_checkpoint(train(cfg, console=open(os.devnull, "w")).checkpoint).lora)  # noqa: SIM115
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
