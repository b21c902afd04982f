"""The training form is generated from TrainConfig: every field, with the CLI's help text and rules; its TOML is the
file the CLI reads (checked by parsing it with the CLI's own parser); presets only set known fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lora_ext.errors import ConfigError
from lora_ext.train.config import TrainConfig, build_parser, config_from_argv
from lora_ext.ui.form import (
    BASIC_FIELDS,
    DREAMBOOTH_FIELDS,
    PRESETS,
    apply_preset,
    clean_values,
    config_from_values,
    estimate_line,
    form_fields,
    values_from_toml,
    values_to_toml,
)


def test_every_config_field_is_a_form_field_with_its_help_text():
    fields = {f.name: f for f in form_fields()}
    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert list(fields) == list(config_fields)  # same fields, same order: the form cannot drift from the CLI
    for name, f in fields.items():
        assert f.help == config_fields[name].metadata["help"] and f.help
    help_text = build_parser().format_help().replace("\n", " ")
    for name in ("network_dim", "require_captions", "min_snr_gamma"):
        assert f"--{name}" in help_text
    assert set(BASIC_FIELDS) <= set(fields) and set(DREAMBOOTH_FIELDS) <= set(fields)
    assert fields["optimizer"].kind == "choice" and "prodigy" in fields["optimizer"].choices
    assert fields["network_alpha"].kind == "float" and fields["network_alpha"].optional
    assert [f.section for f in form_fields()][0] == "Model and output"
    assert {f.section for f in form_fields()} == {"Model and output", "Dataset", "Network", "Optimisation",
                                                  "Checkpoints and samples", "Run control"}


def test_form_values_become_the_config_the_cli_would_build(tmp_path):
    values = {"pretrained_model": "m", "train_data_dir": "d", "output_name": "x", "network_dim": 8.0,
              "network_alpha": "", "max_train_epochs": "3", "sample_prompts": "a cat\n\n  a dog  \n",
              "optimizer_args": "weight_decay = 0.01\nbetas = [0.9, 0.99]", "prediction_type": ""}
    cfg = config_from_values(values)
    toml = tmp_path / "form.toml"
    toml.write_text(values_to_toml(values), encoding="utf-8")
    cli = config_from_argv(["--config", str(toml)])  # the CLI's own parser reads the saved form
    assert cli == cfg
    assert (cfg.network_dim, cfg.network_alpha, cfg.max_train_epochs) == (8, None, 3)
    assert cfg.sample_prompts == ["a cat", "a dog"]
    assert cfg.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    back = values_from_toml(toml.read_text(encoding="utf-8"))
    assert config_from_values(back) == cfg


@pytest.mark.parametrize("change, field_name", [
    ({"network_dim": 0}, "network_dim"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"resolution": 500}, "resolution"),
    ({"output_name": "../evil"}, "output_name"),
    ({"output_name": "a/b"}, "output_name"),
    ({"network_dim": "four"}, "network_dim"),
    ({"optimizer": "adamx"}, "optimizer"),
])
def test_bad_values_name_their_field(change, field_name):
    values = {"pretrained_model": "m", "train_data_dir": "d", "output_name": "x", **change}
    with pytest.raises(ConfigError) as info:
        config_from_values(values)
    assert info.value.field == field_name or str(info.value).startswith(f"form: {field_name}")


def test_presets_set_only_config_fields_and_stay_editable():
    for preset in PRESETS.values():
        cfg = config_from_values({"pretrained_model": "m", "train_data_dir": "d", "output_name": "x",
                                  **preset.values})
        for key, value in preset.values.items():
            assert getattr(cfg, key) == value, (preset.name, key)
        assert preset.name in PRESETS and preset.describe().startswith(preset.summary)
    both = apply_preset(apply_preset({"network_dim": 4}, "6 GB"), "style")
    assert both["network_dim"] == 32 and both["mixed_precision"] == "fp16"
    assert both["cache_latents"] is False  # style flips images: latents cannot be cached
    with pytest.raises(ConfigError, match="unknown preset"):
        apply_preset({}, "48 GB")


def test_the_shapes_sample_preset_the_demo_and_the_benchmarks_train_alike(tmp_path, monkeypatch):
    """The tab's "shapes sample (CPU)" preset is the setting bench/RESULTS.md measures: the same values as the demo's
    and the benchmarks' (`concept.SAMPLE_TRAINING`, one source)."""
    from lora_ext.app.demo import DEMO_STEPS
    from lora_ext.shapes.concept import SAMPLE_TRAINING

    values = apply_preset({}, "shapes sample (CPU)")
    assert {k: values[k] for k in SAMPLE_TRAINING} == SAMPLE_TRAINING
    assert values["pretrained_model"] == "shapes" and values["train_data_dir"].endswith("hearts")
    assert SAMPLE_TRAINING["max_train_steps"] == DEMO_STEPS
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_concept

    args = type("Args", (), {"steps": None, "rank": None, "lr": None, "pivotal_lr": None})()
    plain = bench_concept.settings("plain", tmp_path, tmp_path, args)
    assert {k: plain[k] for k in SAMPLE_TRAINING} == SAMPLE_TRAINING


def test_clean_values_and_estimate():
    assert clean_values({"network_alpha": "none", "resolution": " 512 ", "vae": ""}) == {
        "network_alpha": None, "resolution": 512, "vae": None}
    assert estimate_line(None, None, None).startswith("total steps: pick a dataset")
    assert estimate_line(120, 10, 0.5, "measured") == "total 120 steps / 10 epochs / about 1 min 00 s (measured)"
