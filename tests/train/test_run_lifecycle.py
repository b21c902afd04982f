"""A run's life as a new user meets it: failed starts leave nothing behind and the retry works, a finished run killed
before its export is recovered by --resume, run state stays out of the LoRA folders, training survives a closed
stdout and stops with a checkpoint when its runner dies, errors are printed once, bucket limits follow the
resolution, and a finished LoRA has a preview for its card.

The commands are the ones a person types (`python -m lora_ext.train ...`, `python -m lora_ext train ... | head -2`),
run in subprocesses on the tiny SD1.5 model; outcomes are checked on disk (run folder, events.jsonl, the LoRA read
back by the engine), not on our own return values.
"""

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

from lora_ext.errors import ConfigError
from lora_ext.formats.safetensors_io import load_tensors, read_header
from lora_ext.library import LoraIndex
from lora_ext.train.checkpoint import latest_checkpoint, load_checkpoint
from lora_ext.train.events import read_events
from tests.train.test_loop_train import ROOT, engine_report, sd15_model, tiny_config, write_images  # noqa: F401

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _quiet():
    return open(os.devnull, "w")  # noqa: SIM115


def _train_cmd(model: Path, data: Path, out: Path, *extra: str, name: str = "life") -> list[str]:
    return [sys.executable, "-m", "lora_ext.train", "--pretrained_model", str(model), "--train_data_dir", str(data),
            "--output_dir", str(out), "--output_name", name, "--resolution", "64", *extra]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return read_events(path) if path.exists() else []


def _types(run_dir: Path) -> list[str]:
    return [e["type"] for e in _events(run_dir)]


# ------------------------------------------------------------------------------------------------ 1. failed starts


@pytest.mark.slow
def test_a_failed_start_creates_nothing_and_the_same_command_then_works(sd15_model, tmp_path):  # noqa: F811
    out = tmp_path / "models" / "Lora"
    run_dir = tmp_path / "models" / "lora_ext_runs" / "life"
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (data / "broken.txt").write_text("a broken image")
    missing_model = tmp_path / "no-such-model"

    r = _run(_train_cmd(missing_model, data, out, "--max_train_steps", "1"), tmp_path)
    assert r.returncode == 2 and "no-such-model" in r.stderr and "--pretrained_model" in r.stderr, r.stderr
    assert not run_dir.exists() and not out.exists()

    r = _run(_train_cmd(sd15_model, data, out, "--max_train_steps", "1"), tmp_path)  # broken-only dataset
    assert r.returncode == 2 and "no usable image" in r.stderr and "broken.png" in r.stderr, r.stderr
    assert not run_dir.exists() and not out.exists()

    r = _run(_train_cmd(sd15_model, data, out, "--max_train_steps", "1", "--min_bucket_reso", "128"), tmp_path)
    assert r.returncode == 2 and "--min_bucket_reso" in r.stderr and "--resolution" in r.stderr, r.stderr
    assert not run_dir.exists()

    # the inputs fixed, the very same command succeeds: no --overwrite, no --resume
    write_images(data, 2)
    r = _run(_train_cmd(sd15_model, data, out, "--max_train_steps", "1"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "life.safetensors").is_file() and latest_checkpoint(run_dir) is not None
    assert _types(run_dir)[0] == "start" and "error" not in _types(run_dir)


@pytest.mark.slow
def test_a_run_folder_without_a_checkpoint_is_reused_and_a_real_run_gets_a_hint_that_works(sd15_model, tmp_path):  # noqa: F811
    data = write_images(tmp_path / "data", 2)
    out = tmp_path / "Lora"
    run_dir = tmp_path / "lora_ext_runs" / "life"
    # what a start that died before its first checkpoint leaves (e.g. killed while loading the model)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text('pretrained_model = "elsewhere"\noutput_name = "life"\n')
    (run_dir / "events.jsonl").write_text('{"type": "start", "time": 1}\n')
    cmd = _train_cmd(sd15_model, data, out, "--max_train_steps", "2", "--save_every_n_steps", "1")
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _types(run_dir)[0] == "start" and _types(run_dir).count("start") == 1  # the stale events are gone
    assert 'pretrained_model = "elsewhere"' not in (run_dir / "config.toml").read_text()

    # a folder with checkpoints is protected; the hint names a command that continues it, and that command works
    (out / "life.safetensors").unlink()
    r = _run(cmd, tmp_path)
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    hint = f"python -m lora_ext.train --resume {run_dir}"
    assert hint in r.stderr, r.stderr
    r = _run([sys.executable, "-m", "lora_ext.train", "--resume", str(run_dir), "--max_train_steps", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(latest_checkpoint(run_dir)).state.global_step == 3
    assert read_header(out / "life.safetensors").metadata["ss_steps"] == "3"


# --------------------------------------------------------------------------------- 2. killed between save and export


class Killed(BaseException):
    """Stands for the process dying right after the final checkpoint was written."""


@pytest.mark.slow
def test_resuming_a_finished_run_that_was_not_exported_exports_it_then_does_nothing(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "Lora", max_train_steps=3, preview=False)

    def die_after_final_checkpoint(event: dict) -> None:
        if event["type"] == "checkpoint" and event["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_event=die_after_final_checkpoint, console=_quiet())
    final = latest_checkpoint(cfg.run_path)
    assert load_checkpoint(final).state.global_step == 3 and not cfg.output_path.exists()

    resumed = dataclasses.replace(cfg, resume=str(cfg.run_path))
    result = train(resumed, console=_quiet())
    assert (result.status, result.global_step, result.output) == ("finished", 3, cfg.output_path)
    exported = load_tensors(cfg.output_path)
    trained = load_checkpoint(final).lora
    assert exported.keys() == trained.keys()
    for key, value in trained.items():  # the file holds the checkpoint's weights (exported in fp16)
        assert torch.equal(exported[key], value.to(torch.float16)), key
    net, report = engine_report(cfg.output_path, sd15_model)
    assert report.unmatched == [] and report.modules_applied == len(net.modules) > 0
    steps = [e for e in _events(cfg.run_path) if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]  # no step was trained again

    stamp = cfg.output_path.stat().st_mtime_ns
    again = train(resumed, console=_quiet())
    assert (again.status, again.output) == ("finished", cfg.output_path)
    assert cfg.output_path.stat().st_mtime_ns == stamp  # a no-op: nothing rewritten, nothing loaded
    done = _events(cfg.run_path)[-1]
    assert done["type"] == "done" and done["already_exported"] is True

    # a LoRA of the same name that this run did not write is not replaced by a resume without --overwrite
    cfg.output_path.write_bytes(b"someone else's file")
    with pytest.raises(Exception, match="already exists; pass --overwrite"):
        train(resumed, console=_quiet())


# -------------------------------------------------------------------------------------- 3. run state and LoRA folders


def _fake_run_folder(root: Path) -> None:
    """A run folder as older versions left inside the LoRA folder (`<output_dir>/.runs/<name>`)."""
    import safetensors.torch

    step = root / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (root / "config.toml").write_text('output_name = "x"\n')
    (root / "events.jsonl").write_text("")
    tensors = {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)}
    safetensors.torch.save_file(tensors, str(step / "lora.safetensors"))
    (step / "state.json").write_text("{}")
    torch.save({}, step / "training.pt")
    torch.save({}, step / "rng-0.pt")


@pytest.mark.slow
def test_checkpoints_stay_out_of_the_lora_folder_and_the_catalogue_skips_run_folders(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    lora_dir = tmp_path / "models" / "Lora"
    cfg = tiny_config(sd15_model, data, lora_dir, max_train_steps=2, save_every_n_steps=1, preview=False)
    result = train(cfg, console=_quiet())
    assert result.run_dir == tmp_path / "models" / "lora_ext_runs" / "tiny"
    assert latest_checkpoint(result.run_dir) is not None
    on_disk = sorted(p.relative_to(lora_dir).as_posix() for p in lora_dir.rglob("*") if p.is_file())
    assert on_disk == ["tiny.json", "tiny.safetensors"]  # what A1111 lists under models/Lora: the LoRA alone

    _fake_run_folder(lora_dir / ".runs" / "old")  # left by an older version, or put there by hand
    _fake_run_folder(lora_dir / "by-hand")
    (lora_dir / "checkpoint-copy").mkdir()
    for name in ("state.json", "training.pt", "lora.safetensors"):
        (lora_dir / "checkpoint-copy" / name).write_bytes((latest_checkpoint(result.run_dir) / name).read_bytes())
    names = [e.name for e in LoraIndex([lora_dir]).refresh()]
    assert names == ["tiny"]
    # a LoRA folder that merely holds a config.toml is still listed
    (lora_dir / "styles").mkdir()
    (lora_dir / "styles" / "config.toml").write_text("")
    (lora_dir / "styles" / "ink.safetensors").write_bytes(cfg.output_path.read_bytes())
    assert sorted(e.name for e in LoraIndex([lora_dir]).refresh()) == ["ink", "tiny"]


# ------------------------------------------------------------------------------------------- 4. wrapper and runner


def _start_event(run_dir: Path) -> dict | None:
    return next((e for e in _events(run_dir) if e["type"] == "start"), None)


def _steps(run_dir: Path) -> int:
    return sum(1 for t in _types(run_dir) if t == "step")


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["wrapper", "child"])
def test_training_survives_a_closed_stdout(sd15_model, tmp_path, entry):  # noqa: F811
    """`python -m lora_ext train ... | head -2` (the wrapper's stdout closes) and `python -m lora_ext.train
    --json-events ... | head -2` (the training process's own stdout closes): no traceback, the run finishes."""
    data = write_images(tmp_path / "data", 2)
    run_dir = tmp_path / "lora_ext_runs" / "life"
    train_args = _train_cmd(sd15_model, data, tmp_path / "Lora", "--max_train_steps", "6", "--no-preview")[3:]
    prefix = [sys.executable, "-m", "lora_ext", "train"] if entry == "wrapper" else \
        [sys.executable, "-m", "lora_ext.train", "--json-events"]
    shell = " ".join(f"'{a}'" for a in [*prefix, *train_args]) + " | head -2"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert len(r.stdout.splitlines()) == 2 and r.stdout.startswith('{"type": "start"'), r.stdout
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-2000:]  # the pipeline waited for the training and got its status
    done = _events(run_dir)[-1]
    assert done["type"] == "done" and done["status"] == "finished" and done["step"] == 6
    if entry == "child":  # the training process noted where its events went on
        assert any(e["type"] == "warning" and "stdout" in e["message"] for e in _events(run_dir))
    assert (tmp_path / "Lora" / "life.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_child_stops_with_a_checkpoint_when_its_wrapper_is_killed(sd15_model, tmp_path, how):  # noqa: F811
    data = write_images(tmp_path / "data", 2)
    run_dir = tmp_path / "lora_ext_runs" / "life"
    train_args = _train_cmd(sd15_model, data, tmp_path / "Lora", "--max_train_steps", "100000")[3:]
    wrapper = subprocess.Popen([sys.executable, "-m", "lora_ext", "train", *train_args], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _steps(run_dir) >= 2 or wrapper.poll() is not None, 120, "two training steps")
        assert wrapper.poll() is None, wrapper.communicate()[1][-2000:]
        child = _start_event(run_dir)["pid"]
        assert child != wrapper.pid
        wrapper.send_signal(getattr(signal, how))
        _wait_for(lambda: "done" in _types(run_dir), 120, "the child's done event")
        code = wrapper.wait(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    done = _events(run_dir)[-1]
    assert done["type"] == "done" and done["status"] == "cancelled", done
    expected = "signal SIGTERM" if how == "SIGTERM" else f"(pid {wrapper.pid}) exited"
    assert expected in done["reason"], done
    if how == "SIGTERM":
        assert code == 3  # the wrapper waited for its child and passed on "cancelled"
    last = latest_checkpoint(run_dir)
    assert last is not None and load_checkpoint(last).state.global_step == done["step"] >= 2
    _wait_for(lambda: not Path(f"/proc/{child}").exists() or "zombie" in _proc_state(child), 60, "the child's exit")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


# ----------------------------------------------------------------------------------------- 5-7. messages and docs


@pytest.mark.slow
def test_errors_are_printed_once(sd15_model, tmp_path):  # noqa: F811
    data = write_images(tmp_path / "data", 1)
    for cmd in (_train_cmd(tmp_path / "missing", data, tmp_path / "Lora", "--max_train_steps", "1"),
                [sys.executable, "-m", "lora_ext", "train",
                 *_train_cmd(tmp_path / "missing", data, tmp_path / "Lora", "--max_train_steps", "1")[3:]]):
        r = _run(cmd, tmp_path)
        assert r.returncode == 2
        assert r.stderr.count("missing does not exist") == 1, r.stderr


def test_resolution_alone_is_enough_and_conflicts_name_the_flags(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.config import config_from_argv

    data = write_images(tmp_path / "data", 2)
    r = _run(_train_cmd(sd15_model, data, tmp_path / "Lora", "--dry-run"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "64x64" in r.stdout or "64 x 64" in r.stdout, r.stdout
    argv = ["--pretrained_model", "m", "--train_data_dir", "d", "--output_name", "x", "--resolution", "64"]
    with pytest.raises(ConfigError, match=r"^min_bucket_reso: --min_bucket_reso 256 is above --resolution 64"):
        config_from_argv([*argv, "--min_bucket_reso", "256"]).validate()
    with pytest.raises(ConfigError, match=r"^max_bucket_reso: --max_bucket_reso 32 is below --resolution 64"):
        config_from_argv([*argv, "--max_bucket_reso", "32"]).validate()


@pytest.mark.slow
def test_a_finished_lora_has_a_preview_without_sample_prompts(sd15_model, tmp_path):  # noqa: F811
    from PIL import Image

    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2, caption="a red circle")
    cfg = tiny_config(sd15_model, data, tmp_path / "Lora", max_train_steps=1, trigger_word="zkz", sample_steps=2)
    result = train(cfg, console=_quiet())
    preview = tmp_path / "Lora" / "tiny.preview.png"
    assert Image.open(preview).size == (64, 64)
    sample = [e for e in _events(result.run_dir) if e["type"] == "sample"]
    assert sample and sample[-1]["prompts"] == ["zkz, a red circle 0"]


def test_the_cli_help_lists_every_subcommand():
    r = _run([sys.executable, "-m", "lora_ext", "--help"], ROOT)
    described = r.stdout.split("positional arguments")[0]
    for command in ("inspect", "tiny-model", "generate", "train", "demo"):
        assert f" {command}," in described.replace("\n", " ") or f" {command}." in described.replace("\n", " "), \
            described


@pytest.mark.slow
def test_save_now_writes_a_checkpoint_and_training_goes_on(sd15_model, tmp_path):  # noqa: F811
    """The SAVE file in the run folder (the tab's "save now"): a checkpoint after the step in progress, then on."""
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "Lora", max_train_steps=4, preview=False)

    def save_at_2(event: dict) -> None:
        if event["type"] == "step" and event["step"] == 2:
            (cfg.run_path / "SAVE").touch()

    result = train(cfg, on_event=save_at_2, console=_quiet())
    assert (result.status, result.global_step) == ("finished", 4)
    saved = [e["step"] for e in _events(cfg.run_path) if e["type"] == "checkpoint"]
    assert saved == [2, 4]  # no periodic saves configured: 2 is the requested one, 4 the final one
    assert not (cfg.run_path / "SAVE").exists()
    assert load_checkpoint(cfg.run_path / "checkpoints" / "step-00000002").state.global_step == 2
