"""Broken and hostile LoRA files, end to end: through tag resolution, reading, parsing and patching, each gives a
typed error naming the file and the cause, and the model (with another LoRA already merged) is left untouched."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ext.app.runner import Session
from lora_ext.errors import (
    ArchitectureMismatchError,
    LoraExtError,
    LoraFileError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnsafeFileError,
)
from lora_ext.formats.layouts import unet_module_map
from tests.lora_factory import assert_bit_identical, make_entries, snapshot, to_state_dict

MARKER = Path("/tmp/lora_ext_pwned_marker")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _good(pipe) -> dict[str, torch.Tensor]:
    return to_state_dict(make_entries(pipe, "lora", seed=1, every=3), "kohya")


def _header_file(path: Path, header: bytes, declared: int | None = None, tail: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + tail)


def build_corpus(d: Path, pipe, xl_pipe) -> dict[str, tuple[type[LoraExtError], str]]:
    """name -> (expected error type, a word the message must contain)."""
    good = _good(pipe)
    corpus: dict[str, tuple[type[LoraExtError], str]] = {}

    (d / "zero.safetensors").write_bytes(b"")
    corpus["zero"] = (LoraFileError, "zero.safetensors")

    save_file(good, str(d / "full.safetensors"))
    data = (d / "full.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    corpus["truncated"] = (LoraFileError, "truncated.safetensors")

    _header_file(d / "badjson.safetensors", b"{not json at all")
    corpus["badjson"] = (LoraFileError, "JSON")

    _header_file(d / "hugeheader.safetensors", b"{}", declared=2**60)
    corpus["hugeheader"] = (LoraFileError, "header")

    ints = {k: (v * 100).to(torch.int32) for k, v in good.items()}
    save_file(ints, str(d / "intdtype.safetensors"))
    corpus["intdtype"] = (LoraFileError, "dtype")

    nan = dict(good)
    k = next(iter(nan))
    nan[k] = nan[k].clone()
    nan[k][0, 0] = float("nan")
    save_file(nan, str(d / "nan.safetensors"))
    corpus["nan"] = (NonFiniteWeightError, "NaN")

    bad_rank = dict(good)
    up = next(k for k in bad_rank if k.endswith("lora_up.weight"))
    bad_rank[up] = torch.randn(bad_rank[up].shape[0], bad_rank[up].shape[1] + 1)
    save_file(bad_rank, str(d / "rankmismatch.safetensors"))
    corpus["rankmismatch"] = (ShapeMismatchError, "lora_unet")

    wrong_layer = dict(good)
    down = next(k for k in wrong_layer if k.endswith("lora_down.weight") and "lora_unet" in k)
    wrong_layer[down] = torch.randn(wrong_layer[down].shape[0], wrong_layer[down].shape[1] + 3)
    save_file(wrong_layer, str(d / "wronglayer.safetensors"))
    corpus["wronglayer"] = (ShapeMismatchError, "shape")

    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    corpus["evil"] = (UnsafeFileError, "evil.pt")

    with zipfile.ZipFile(d / "evilzip.pt", "w") as z:  # a torch-style zip whose data.pkl runs code
        z.writestr("evilzip/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
        z.writestr("evilzip/version", "3\n")
    corpus["evilzip"] = (LoraFileError, "evilzip.pt")

    (d / "notlora.safetensors").unlink(missing_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(d / "notlora.safetensors"))
    corpus["notlora"] = (LoraFileError, "no LoRA tensors")

    xl = to_state_dict(make_entries(xl_pipe, "lora", seed=2), "compvis", sdxl=True,
                       unet_compvis=unet_module_map(dict(xl_pipe.unet.config)))
    save_file(xl, str(d / "sdxl_on_sd1.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    corpus["sdxl_on_sd1"] = (ArchitectureMismatchError, "SDXL")

    _header_file(d / "metadata_nonstr.safetensors",
                 json.dumps({"__metadata__": {"a": 1}}).encode())
    corpus["metadata_nonstr"] = (LoraFileError, "metadata")
    return corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lora_ext.models.tiny import build_tiny_pipeline

    d = tmp_path_factory.mktemp("corpus")
    pipe = build_tiny_pipeline("sd15")
    xl = build_tiny_pipeline("sdxl")
    save_file(_good(pipe), str(d / "good.safetensors"))
    return d, pipe, build_corpus(d, pipe, xl)


def test_each_bad_file_fails_clearly_and_model_untouched(setup):
    d, pipe, corpus = setup
    MARKER.unlink(missing_ok=True)
    session = Session(d, pipe=pipe, arch="sd1")
    original = snapshot(pipe)
    from lora_ext.prompt import parse_prompt

    _, good_refs = parse_prompt("<lora:good:0.7>")
    session.use_lora_dirs([d])
    session.loras.activate(pipe, good_refs, strict=True)
    with_good = snapshot(pipe)
    assert any(not torch.equal(with_good["unet"][k], original["unet"][k]) for k in original["unet"])
    for name, (err_type, word) in corpus.items():
        _, refs = parse_prompt(f"<lora:good:0.7> <lora:{name}:1>")
        with pytest.raises(LoraExtError) as info:
            session.loras.activate(pipe, refs, strict=True)
        assert isinstance(info.value, err_type), f"{name}: got {type(info.value).__name__}: {info.value}"
        message = str(info.value)
        assert name in message, f"{name}: message does not name the file: {message}"
        assert word.lower() in message.lower(), f"{name}: message does not say {word!r}: {message}"
        assert_bit_identical(with_good, snapshot(pipe))
        # with skip_bad the bad file is reported and the good LoRA stays applied
        act = session.loras.activate(pipe, refs)
        assert any(name in w for w in act.problems) and act.applied == ["good"]
        assert_bit_identical(with_good, snapshot(pipe))
    assert not MARKER.exists(), "a pickle in a LoRA file executed code"
    session.patcher.restore()
    assert_bit_identical(original, snapshot(pipe))
