"""merge-model: the streamed, merged checkpoint equals (bitwise) the model the patcher gives for the same tags.

Reference: the checkpoint loaded as a diffusers pipeline by the standalone host's loader, patched by `Patcher` with
the same LoRAs and tag arguments, then written back to the single-file layout by the converter (OpenCLIP's q/k/v of
SDXL's second encoder fused as A1111 holds them). Nothing of the reference goes through the tool's code.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_ext.errors import LoraExtError, LoraFileError, ModelLoadError
from lora_ext.formats.network import parse_lora
from lora_ext.formats.safetensors_io import load_tensors, read_header, save_safetensors_atomic
from lora_ext.models.loading import load_pipeline
from lora_ext.models.tiny import pipeline_to_single_file, save_tiny_model
from lora_ext.patch import Patcher, adapter_for_pipeline
from lora_ext.prompt import parse_tag
from lora_ext.session import active_lora
from lora_ext.tools.args import parse_lora_arg
from lora_ext.tools.common import ToolError
from lora_ext.tools.merge_model import MERGE_METADATA_KEY, LoraInput, merge_model
from tests.lora_factory import make_entries, to_state_dict


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"sd15": save_tiny_model("sd15", root / "sf", "single-file"),
            "sdxl": save_tiny_model("sdxl", root / "sfxl", "single-file"),
            "sd15-folder": save_tiny_model("sd15", root / "folder", "diffusers")}


def _lora_files(pipe, folder, sdxl: bool, seed: int = 0):
    """Three LoRAs on the model's attention and text encoders: LoRA, LoHa, full diff (different algorithms)."""
    folder.mkdir(exist_ok=True)
    out = {}
    for i, algo in enumerate(("lora", "loha", "full")):
        entries = make_entries(pipe, algo, rank=3, seed=seed + i, every=1 + i)
        path = folder / f"{algo}.safetensors"
        save_safetensors_atomic(to_state_dict(entries, "kohya", sdxl=sdxl), path)
        out[algo] = path
    return out


def _reference(model, tags, files, dtype=torch.float32):
    """The patched model, in the single-file layout."""
    loaded = load_pipeline(model, dtype=dtype)
    pipe = loaded.pipe
    actives = []
    for tag in tags:
        ref = parse_tag(tag)
        net = parse_lora(load_tensors(files[ref.name]), name=ref.name, path=files[ref.name])
        actives.append(active_lora(net, ref))
    Patcher(adapter_for_pipeline(pipe)).apply(actives)
    return pipeline_to_single_file(pipe, loaded.arch)


def _assert_equal_files(out, want):
    got = load_tensors(out)
    compared = 0
    for key, t in want.items():
        if key.startswith("first_stage_model."):
            continue  # the VAE is not patched; compared bytewise below via the header
        assert key in got, key
        assert got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), f"{key}: max diff {(got[key].float() - t.float()).abs().max()}"
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_merge_equals_patcher_bitwise(models, tmp_path, arch):
    model = models[arch]
    pipe = load_pipeline(model).pipe
    files = _lora_files(pipe, tmp_path / "loras", sdxl=arch == "sdxl")
    lbw = "lbw=1,0,1,1,0.5,1,1,0,1,1,1,1" if arch == "sdxl" else "lbw=1,0,1,1,0.5,1,1,0,1,1,1,1,1,1,1,1,1"
    tags = ["<lora:lora:0.8>", "<lora:loha:1.0:0.5>", f"<lora:full:0.7:{lbw}>"]
    out = tmp_path / "merged.safetensors"
    inputs = [LoraInput(files[parse_tag(t).name], parse_tag(t)) for t in tags]
    report = merge_model(model, inputs, out)
    assert report.tensors_merged > 10 and not report.unmatched
    _assert_equal_files(out, _reference(model, tags, files))
    # tensors no LoRA touches are copied byte for byte (the VAE included)
    src, dst = load_tensors(model), load_tensors(out)
    vae = [k for k in src if k.startswith("first_stage_model.")]
    assert vae and all(torch.equal(src[k], dst[k]) for k in vae)
    assert set(src) == set(dst)
    meta = read_header(out).metadata
    merged = json.loads(meta[MERGE_METADATA_KEY])
    assert [m["tag"] for m in merged["loras"]] == [parse_tag(t).to_tag() for t in tags]
    assert all(len(m["shorthash"]) == 12 for m in merged["loras"])
    # the merged checkpoint loads as a model like any other, with the base's sidecar config beside it (A1111 reads it)
    assert model.with_suffix(".yaml").is_file() and str(out.with_suffix(".yaml")) in report.sidecars
    assert out.with_suffix(".yaml").read_bytes() == model.with_suffix(".yaml").read_bytes()
    assert load_pipeline(out).arch == load_pipeline(model).arch


def test_merge_fp16_equals_patcher_on_fp16_model(models, tmp_path):
    model = models["sdxl"]
    pipe = load_pipeline(model).pipe
    files = _lora_files(pipe, tmp_path / "loras", sdxl=True, seed=7)
    tags = ["<lora:lora:1.3>", "<lora:loha:-0.6>"]
    out = tmp_path / "merged16.safetensors"
    merge_model(model, [LoraInput(files[parse_tag(t).name], parse_tag(t)) for t in tags], out, dtype="fp16")
    want = _reference(model, tags, files, dtype=torch.float16)
    _assert_equal_files(out, want)
    assert {i.dtype for i in read_header(out).tensors.values()} == {"F16"}


def test_merge_diffusers_folder(models, tmp_path):
    folder = models["sd15-folder"]
    pipe = load_pipeline(folder).pipe
    files = _lora_files(pipe, tmp_path / "loras", sdxl=False, seed=3)
    tags = ["<lora:lora:0.9>", "<lora:full:0.4>"]
    out = tmp_path / "merged_folder"
    merge_model(folder, [LoraInput(files[parse_tag(t).name], parse_tag(t)) for t in tags], out)
    got = load_pipeline(out).pipe
    ref = load_pipeline(folder).pipe
    actives = [active_lora(parse_lora(load_tensors(files[parse_tag(t).name]), name=parse_tag(t).name),
                           parse_tag(t)) for t in tags]
    Patcher(adapter_for_pipeline(ref)).apply(actives)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(ref, name).state_dict(), getattr(got, name).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "tokenizer").is_dir() and (out / "model_index.json").is_file()


def test_cli_merge_model_and_lora_args(models, tmp_path):
    from lora_ext.app.cli import main

    model = models["sd15"]
    pipe = load_pipeline(model).pipe
    files = _lora_files(pipe, tmp_path / "Lora", sdxl=False, seed=11)
    out = tmp_path / "cli.safetensors"
    rc = main(["merge-model", "--model", str(model), "--lora", "lora:0.5", "--lora", f"{files['loha']}:0.25:1",
               "--lora-dir", str(tmp_path / "Lora"), "--out", str(out), "--json"])
    assert rc == 0
    _assert_equal_files(out, _reference(model, ["<lora:lora:0.5>", "<lora:loha:0.25:1>"], files))
    # never overwrites without --force; the existing file is untouched
    before = out.read_bytes()
    rc = main(["merge-model", "--model", str(model), "--lora", "lora:1", "--lora-dir", str(tmp_path / "Lora"),
               "--out", str(out)])
    assert rc == 2 and out.read_bytes() == before
    # a path with tag arguments; a tag; an unknown name
    assert parse_lora_arg(f"{files['lora']}:0.3:lbw=INALL").ref.lbw is not None
    assert parse_lora_arg("<lora:lora:0.3>", [tmp_path / "Lora"]).path == files["lora"]
    with pytest.raises(LoraExtError, match="nope"):
        parse_lora_arg("nope:1", [tmp_path / "Lora"])


def test_bad_inputs_leave_nothing(models, tmp_path):
    model = models["sd15"]
    pipe = load_pipeline(model).pipe
    files = _lora_files(pipe, tmp_path / "loras", sdxl=False)
    ok = [LoraInput(files["lora"], parse_tag("<lora:lora:1>"))]
    # a LoRA for another family
    xl_pipe = load_pipeline(models["sdxl"]).pipe
    xl = _lora_files(xl_pipe, tmp_path / "xl", sdxl=True)
    with pytest.raises(LoraExtError):
        merge_model(model, [LoraInput(xl["lora"], parse_tag("<lora:lora:1>"))], tmp_path / "a.safetensors")
    # a checkpoint that is not one (a LoRA file given as the model)
    with pytest.raises(ModelLoadError):
        merge_model(files["lora"], ok, tmp_path / "b.safetensors")
    # outside the allowed folders
    allowed = tmp_path / "models" / "Stable-diffusion"
    allowed.mkdir(parents=True)
    with pytest.raises(ToolError, match="only be written inside"):
        merge_model(model, ok, tmp_path / "c.safetensors", allowed_dirs=[allowed])
    # a full disk while writing: a typed error, no partial or temporary file, the input untouched
    before = model.read_bytes()
    out = allowed / "d.safetensors"
    import lora_ext.formats.safetensors_stream as streaming

    orig = streaming.tensor_bytes

    calls = {"n": 0}

    def boom(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return orig(t)

    streaming.tensor_bytes = boom
    import lora_ext.tools.merge_model as mm

    mm.tensor_bytes = boom
    try:
        with pytest.raises(LoraFileError, match="No space left"):
            merge_model(model, ok, out, allowed_dirs=[allowed])
    finally:
        streaming.tensor_bytes = orig
        mm.tensor_bytes = orig
    assert list(allowed.iterdir()) == []
    assert model.read_bytes() == before

