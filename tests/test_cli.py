"""The command line: tiny-model, inspect, generate (in-process through `main`, plus one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ext.app.cli import main
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.models.loading import load_pipeline
from lora_ext.patch import adapter_for_pipeline
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import selector
from tests.lora_factory import assert_bit_identical, snapshot

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD1.5 diffusers model and a Lora folder with a kohya LoRA made for it."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["tiny-model", "--arch", "sd15", "--out", str(root / "model")]) == 0
    pipe = load_pipeline(root / "model").pipe
    lora_dir = root / "Lora"
    lora_dir.mkdir()
    tensors = make_lora_tensors(adapter_for_pipeline(pipe), SynthSpec(rank=4, alpha=2.0, std=0.5), selector("attn"))
    save_safetensors_atomic(tensors, lora_dir / "ink.safetensors",
                            metadata={"ss_output_name": "ink", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                                      "ss_network_module": "networks.lora"})
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return root


def _gen(ws: Path, prompt: str, out: str, *extra: str) -> int:
    return main(["generate", "--model", str(ws / "model"), "--prompt", prompt, "--lora-dir", str(ws / "Lora"),
                 "--seed", "5", "--steps", "3", "--width", "64", "--height", "64", "--out", str(ws / out), *extra])


def test_generate_with_and_without_lora(workspace, capsys):
    assert _gen(workspace, "a cat", "plain.png") == 0
    assert _gen(workspace, "a cat <lora:ink:0.9>", "ink.png", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    net = report["report"]["networks"][0]
    assert net["modules_applied"] == net["modules_total"] > 0 and not net["unmatched"]
    a = np.asarray(Image.open(workspace / "plain.png"), dtype=np.int16)
    b = np.asarray(Image.open(workspace / "ink.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 5
    params = Image.open(workspace / "ink.png").info["parameters"]
    assert params.startswith("a cat <lora:ink:0.9>") and 'Lora hashes: "ink: ' in params and "Seed: 5" in params
    # same seed, no tag again: identical to the first image (weights were restored)
    assert _gen(workspace, "a cat", "plain2.png") == 0
    assert np.array_equal(a, np.asarray(Image.open(workspace / "plain2.png"), dtype=np.int16))


def test_generate_errors_are_one_clear_line(workspace, capsys):
    assert _gen(workspace, "a cat <lora:nope:1>", "x.png") == 2
    err = capsys.readouterr().err
    assert "nope" in err and str(workspace / "Lora") in err
    assert _gen(workspace, "a cat <lora:broken:1>", "x.png") == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert _gen(workspace, "a cat <lora:ink:abc>", "x.png") == 2
    assert "<lora:ink:abc>" in capsys.readouterr().err
    assert not (workspace / "x.png").exists()
    # --skip-bad: the bad LoRA is left out and reported, the good one applied
    assert _gen(workspace, "a cat <lora:broken:1> <lora:ink:0.5>", "skip.png", "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "broken" in out and "ink: " in out


def test_inspect_reports_algorithm_rank_arch_and_coverage(workspace, capsys):
    lora = workspace / "Lora" / "ink.safetensors"
    assert main(["inspect", str(lora), "--model", str(workspace / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algorithms"] == {"lora": info["modules"]}
    assert {r["type"] for r in info["module_types"]} >= {"attn1_to_q", "self_attn_q_proj"}
    assert all(r["ranks"] == [4] and r["alphas"] == [2.0] for r in info["module_types"])
    assert info["coverage"]["modules_applied"] == info["modules"] and not info["coverage"]["unmatched"]
    assert info["metadata"]
    assert main(["inspect", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "rank 4" in text and "modules:" in text
    assert main(["inspect", str(workspace / "Lora" / "broken.safetensors")]) == 2


def test_inspect_prints_applied_and_unmatched_in_one_grouping(workspace, tmp_path, capsys):
    from safetensors.torch import load_file

    tensors = load_file(str(workspace / "Lora" / "ink.safetensors"))
    extra = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn3_to_q"  # no such layer
    tensors.update({f"{extra}.lora_down.weight": torch.zeros(4, 64), f"{extra}.lora_up.weight": torch.zeros(64, 4)})
    save_safetensors_atomic(tensors, tmp_path / "extra.safetensors")
    assert main(["inspect", str(tmp_path / "extra.safetensors"), "--model", str(workspace / "model"), "--json"]) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert cov["unmatched"] == [extra] and cov["unmatched_by_group"] == {"unet:IN04": 1}
    assert cov["applied_by_group"]["unet:IN04"] == 8 and cov["applied_by_group"]["te1"] == 2 * 6
    assert main(["inspect", str(tmp_path / "extra.safetensors"), "--model", str(workspace / "model")]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert "unet:IN04: 8 applied, 1 unmatched" in lines and "te1: 12 applied" in lines
    assert lines.index("te1: 12 applied") < lines.index("unet:IN01: 8 applied") < lines.index("unet:M00: 8 applied")


def test_single_file_model_through_the_cli(workspace, tmp_path):
    assert main(["tiny-model", "--arch", "sd15", "--out", str(tmp_path / "tiny"), "--format", "single-file"]) == 0
    files = list((tmp_path / "tiny").glob("*.safetensors"))
    assert len(files) == 1
    loaded = load_pipeline(files[0])
    reference = load_pipeline(workspace / "model")
    assert_bit_identical(snapshot(reference.pipe), snapshot(loaded.pipe))
    assert _gen(workspace, "a cat <lora:ink:0.9>", "sf.png") == 0
    assert main(["generate", "--model", str(files[0]), "--prompt", "a cat <lora:ink:0.9>", "--lora-dir",
                 str(workspace / "Lora"), "--seed", "5", "--steps", "3", "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "sf.png")]) == 0
    a = np.asarray(Image.open(workspace / "sf.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "sf.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_module_entry_point_in_a_subprocess(workspace):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "lora_ext", "generate", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--lora-dir" in out.stdout and "default 20" in out.stdout
    for sub in ("inspect", "tiny-model"):
        r = subprocess.run([sys.executable, "-m", "lora_ext", sub, "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


def test_model_weights_untouched_after_failed_generation(workspace):
    """A LoRA that fails while the pipeline runs (here: generation raises) still leaves the weights original."""
    from lora_ext.app import runner

    session = runner.Session(workspace / "model")
    before = snapshot(session.pipe)

    def boom(*a, **k):
        raise RuntimeError("sampler crashed")

    import lora_ext.app.generate as gen_mod

    real = gen_mod.generate_image
    gen_mod.generate_image = boom
    try:
        with pytest.raises(RuntimeError, match="sampler crashed"):
            session.generate("a cat <lora:ink:1>", lora_dirs=[workspace / "Lora"], steps=2, width=64, height=64)
    finally:
        gen_mod.generate_image = real
    assert session.patcher.is_pristine
    assert_bit_identical(before, snapshot(session.pipe))
    assert torch.is_grad_enabled()
