"""Training configuration: TOML + flags (precedence, types, errors), --help, resume rules, the CLI entry points."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ext.errors import ConfigError
from lora_ext.train.config import (
    RESUME_MUTABLE,
    TrainConfig,
    build_parser,
    check_resume_compatible,
    config_from_argv,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _valid(**kw) -> TrainConfig:
    base = {"pretrained_model": "model", "output_name": "x", "train_data_dir": "data"}
    return TrainConfig(**{**base, **kw})


def test_defaults_are_the_documented_ones():
    c = TrainConfig()
    assert (c.output_dir, c.network_dim, c.network_alpha, c.network_targets, c.learning_rate) == \
        ("models/Lora", 4, None, "attn", 1e-4)
    assert (c.optimizer, c.lr_scheduler, c.max_grad_norm, c.train_batch_size, c.mixed_precision) == \
        ("adamw", "constant", 1.0, 1, "no")
    assert (c.save_every_n_epochs, c.save_last_n, c.seed, c.clip_skip, c.sample_steps, c.sample_cfg) == \
        (1, 3, 42, 1, 20, 7.0)
    assert c.effective_text_encoder_lr == pytest.approx(0.5e-4)
    assert c.resolved_resolution("sd1") == 512 and c.resolved_resolution("sdxl") == 1024
    assert c.resolved_resolution("sd2", "v_prediction") == 768
    # run folders live beside the LoRA folder, never inside it (the WebUI would list checkpoints as LoRAs)
    assert _valid().run_path == Path("models/lora_ext_runs/x")
    assert _valid(output_dir="a/o").run_path == Path("a/lora_ext_runs/x")
    assert _valid(output_dir=".").run_path == Path("lora_ext_runs/x")
    assert _valid(runs_dir="r").run_path == Path("r/x") and _valid(run_dir="d", runs_dir="r").run_path == Path("d")


def test_toml_then_flags_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('pretrained_model = "m"\noutput_name = "n"\ntrain_data_dir = "d"\n'
                    "[network]\nnetwork_dim = 8\nnetwork_alpha = 4\n"
                    "[optimizer_args]\nweight_decay = 0.05\n"
                    "[training]\nflip_aug = true\nsample_prompts = [\"a\", \"b\"]\n")
    c = config_from_argv(["--config", str(toml), "--network_dim", "16", "--no-flip_aug", "--learning-rate", "3e-4"])
    assert c.network_dim == 16  # the flag wins
    assert c.network_alpha == 4.0 and isinstance(c.network_alpha, float)  # TOML int -> float field
    assert c.flip_aug is False and c.learning_rate == 3e-4
    assert c.optimizer_args == {"weight_decay": 0.05} and c.sample_prompts == ["a", "b"]
    assert c.max_train_steps is None  # neither: the default
    c2 = config_from_argv(["--config", str(toml), "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",
                           "--network_alpha", "none"])
    assert c2.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.99]} and c2.network_alpha is None
    assert load_config(toml).network_dim == 8


def test_toml_roundtrip(tmp_path):
    c = _valid(network_dim=8, sample_prompts=["x, y"], optimizer_args={"betas": [0.9, 0.99]}, trigger_word='q"t',
               save_every_n_epochs=None, max_train_steps=7)
    (tmp_path / "c.toml").write_text(c.to_toml())
    assert load_config(tmp_path / "c.toml") == c


@pytest.mark.parametrize(("text", "match"), [
    ("network_dimm = 8", "network_dimm.*did you mean 'network_dim'"),
    ('network_dim = "eight"', "network_dim must be a int"),
    ("flip_aug = 1", "flip_aug must be a bool"),
    ("sample_prompts = [1]", "sample_prompts must be a list of strings"),
    ("network_dim = [", "not valid TOML"),
])
def test_toml_errors_name_the_field(tmp_path, text, match):
    (tmp_path / "bad.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "bad.toml")


def test_missing_toml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(("changes", "field"), [
    ({"pretrained_model": None}, "pretrained_model"),
    ({"output_name": None}, "output_name"),
    ({"output_name": "a/b"}, "output_name"),
    ({"train_data_dir": None}, "train_data_dir"),
    ({"max_train_steps": 10, "max_train_epochs": 2}, "max_train_steps"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"lr_scheduler": "step"}, "lr_scheduler"),
    ({"network_targets": "everything"}, "network_targets"),
    ({"network_blocks": ["IN99"]}, "network_blocks"),
    ({"cache_latents": True, "flip_aug": True}, "cache_latents"),
    ({"cache_text_encoder_outputs": True, "train_text_encoder": True}, "cache_text_encoder_outputs"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"resolution": 500}, "resolution"),
    ({"sample_every_n_steps": 5}, "sample_prompts"),
    ({"instance_dir": "i", "train_data_dir": None}, "instance_prompt"),
    ({"network_dim": 0}, "network_dim"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        _valid(**changes).validate()


def test_valid_config_passes():
    assert _valid(dry_run=True, output_name=None).validate().dry_run


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    flat = " ".join(text.split())
    assert "LoRA rank (default: 4)" in flat
    assert "(default: models/Lora)" in flat and "--no-flip_aug" in flat and "--network-dim" in flat
    assert flat.count("(default: ") == len(dataclasses.fields(TrainConfig))


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        config_from_argv(["--network_dim", "eight"])
    assert exc.value.code == 2 and "network_dim" in capsys.readouterr().err


def test_resume_rules(tmp_path):
    saved = _valid(max_train_steps=10)
    check_resume_compatible(saved, dataclasses.replace(saved, max_train_steps=30, sample_prompts=["x"]), tmp_path)
    with pytest.raises(ConfigError, match="^network_dim: .*was started with 4, now 8"):
        check_resume_compatible(saved, dataclasses.replace(saved, network_dim=8), tmp_path)
    assert "learning_rate" not in RESUME_MUTABLE and "max_train_steps" in RESUME_MUTABLE


def test_resume_without_config_reads_the_saved_run_config(tmp_path):
    (tmp_path / "config.toml").write_text(_valid(network_dim=8, max_train_steps=10).to_toml())
    c = config_from_argv(["--resume", str(tmp_path), "--max_train_steps", "20"])
    assert (c.network_dim, c.max_train_steps, c.resume, c.pretrained_model) == (8, 20, str(tmp_path), "model")


# -------------------------------------------------------------------------------------------------- entry points


def _run(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_train_help_goes_through_the_child_process(tmp_path):
    r = _run(["-m", "lora_ext", "train", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--network_dim" in r.stdout and "--resume" in r.stdout and "(default: 4)" in r.stdout


def test_cli_train_config_error_exit_status(tmp_path):
    r = _run(["-m", "lora_ext", "train", "--pretrained_model", "m", "--output_name", "x"], tmp_path)
    assert r.returncode == 2
    assert "error: train_data_dir: no dataset given" in r.stderr


def _dataset(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64 + 32 * i, 64), (40 * i, 90, 200)).save(folder / f"img{i}.png")
        if i:
            (folder / f"img{i}.txt").write_text(f"a photo of sks, tag{i}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


@pytest.mark.slow
def test_dry_run_prints_the_summary_without_loading_weights(tmp_path):
    from lora_ext.models.tiny import save_tiny_model

    model = save_tiny_model("sd15", tmp_path / "model")
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()  # a dry run must not need the UNet's weights
    _dataset(tmp_path / "data" / "5_sks")
    r = _run(["-m", "lora_ext.train", "--pretrained_model", "model", "--train_data_dir", "data", "--resolution",
              "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--max_train_epochs", "2",
              "--train_batch_size", "2", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(sd1, epsilon), resolution 64" in out
    assert "images: 3" in out and "5 repeats" in out
    assert "broken.png" in out  # the unreadable file is reported, not a crash
    assert "total steps:" in out and "formula:" in out
    assert not (tmp_path / "models").exists()  # nothing written
