"""The tab's callbacks without a browser: presets fill the form, the form saves as the TOML the CLI reads and loads
back, the live view of no job, the prompt sent to txt2img, the SVG chart."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from lora_ext.train.config import config_from_argv  # noqa: E402
from lora_ext.ui.chart import loss_chart_svg  # noqa: E402
from lora_ext.ui.service import Roots, TrainService, prompt_for  # noqa: E402
from lora_ext.ui.tab import TrainTab, _display  # noqa: E402


def _tab(tmp_path: Path) -> TrainTab:
    (tmp_path / "data").mkdir()
    return TrainTab(TrainService(Roots(datasets=[tmp_path / "data"], models=[tmp_path], lora_dir=tmp_path / "Lora",
                                       work_dir=tmp_path / "work")), current_label="(current)")


def _form(tab: TrainTab, **values):
    defaults = {f.name: _display(f, f.default) for f in tab.fields}
    defaults.update(values)
    return [defaults[n] for n in tab.names]


def _value(update):
    return update["value"] if isinstance(update, dict) else update.value


def test_presets_fill_the_form_and_say_what_they_chose(tmp_path):
    tab = _tab(tmp_path)
    out = tab.apply_presets("8 GB", "style", *_form(tab))
    values = dict(zip(tab.names, (_value(u) for u in out[:-1])))
    assert values["network_dim"] == 32 and values["train_batch_size"] == 2 and values["flip_aug"] is True
    assert values["cache_latents"] is False and values["network_alpha"] == "16.0"  # optional number: a text box
    assert "on 8 GB: mixed_precision = fp16" in out[-1] and "150-200 images" in out[-1]


def test_the_form_saves_as_toml_the_cli_reads_and_loads_back(tmp_path):
    tab = _tab(tmp_path)
    form = _form(tab, pretrained_model="(current)", train_data_dir="cats", output_name="ink", network_dim=16,
                 network_alpha="8", sample_prompts="an ink cat\nan ink dog", optimizer_args="weight_decay = 0.05")
    path, message = tab.save_toml(*form)
    assert path and "ink.toml" in message
    cli = config_from_argv(["--config", path, "--pretrained_model", "m"])  # the CLI reads the saved form
    assert (cli.output_name, cli.network_dim, cli.network_alpha) == ("ink", 16, 8.0)
    assert cli.sample_prompts == ["an ink cat", "an ink dog"] and cli.optimizer_args == {"weight_decay": 0.05}
    loaded = tab.load_toml(path)
    values = dict(zip(tab.names, (_value(u) for u in loaded[:-1])))
    assert values["sample_prompts"] == "an ink cat\nan ink dog" and values["optimizer_args"] == "weight_decay = 0.05"
    assert values["network_alpha"] == "8.0" and "Loaded ink.toml" in loaded[-1]
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dim = 'four'\n", encoding="utf-8")
    assert "network_dim must be a int" in tab.load_toml(str(bad))[-1]


def test_live_view_without_a_job_and_the_prompt_to_send(tmp_path):
    tab = _tab(tmp_path)
    progress, stats, chart, samples, log, result, send = tab.poll()
    assert "no training job yet" in progress and stats == "No training job yet." and samples == [] and send == ""
    assert "appears with the first steps" in chart
    assert prompt_for("ink", 0.8, "ink style, sketch") == "<lora:ink:0.8> ink style, sketch"
    assert prompt_for("ink", 1.0, "") == "<lora:ink:1>"
    assert "refresh the list" in tab.resume(None)


def test_loss_chart_draws_raw_and_smoothed_curves():
    svg = loss_chart_svg([[1, 1.0, 1.0], [2, 0.5, 0.9], [3, float("nan"), 0.8], [4, 0.7, 0.85]])
    assert svg.count("<polyline") == 2 and 'class="smoothed"' in svg and "step 4: loss 0.7000" in svg
    points = svg.split('class="raw"')[1].split('points="')[1].split('"')[0].split()
    assert len(points) == 3  # the non-finite row is left out


def test_loss_chart_draws_validation_points_and_names_the_best_step():
    svg = loss_chart_svg([[1, 1.0, 1.0], [4, 0.5, 0.8]], validation=[[2, 0.9], [4, 0.6], [6, 0.7]])
    assert svg.count('class="validation-point"') == 3
    assert "validation 0.7000 (best 0.6000 at step 4)" in svg
    # the x axis spans the validation steps too (step 6 is the right edge)
    xs = [float(c.split('cx="')[1].split('"')[0]) for c in svg.split("<circle")[1:]]
    assert xs == sorted(xs) and abs(xs[-1] - (640 - 12)) < 0.1
