"""Pivotal tuning: a word's embedding trained with the LoRA and bundled in the file (`bundle_emb.<word>.*`, A1111's
layout), its step share, exact resume, and the errors for settings that cannot work."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lora_ext.errors import ConfigError
from lora_ext.formats.network import load_lora
from lora_ext.train.checkpoint import list_checkpoints, load_checkpoint
from tests.train.test_loop_train import sd15_model, tiny_config, write_images  # noqa: F401

KEY = "bundle_emb.sks.string_to_param.*"


def _quiet():
    return open(os.devnull, "w")  # noqa: SIM115


def _start_vectors(model, word: str, n: int) -> torch.Tensor:
    from lora_ext.models.loading import load_pipeline

    pipe = load_pipeline(model).pipe
    ids = pipe.tokenizer([word], add_special_tokens=False).input_ids[0]
    return pipe.text_encoder.get_input_embeddings().weight[ids].float().mean(0).repeat(n, 1)


def test_pivotal_run_bundles_the_trained_embedding(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 3)  # captions "a photo of sks i"
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=4, learning_rate=1e-2,
                      pivotal_token="sks", pivotal_init="photo", pivotal_vectors=2, save_precision="fp32")
    result = train(cfg, console=_quiet())
    net = load_lora(result.output)
    vec = net.bundled_embeddings["sks"]["string_to_param.*"]
    start = _start_vectors(sd15_model, "photo", 2)
    assert vec.shape == start.shape and vec.dtype == torch.float32
    assert (vec - start).abs().max() > 1e-3  # it learned
    assert net.modules and all(not k.startswith("lora_te") for k in net.modules)  # the text encoder stays frozen
    args = net.metadata["ss_network_args"]
    assert '"pivotal_token": "sks"' in args and '"pivotal_vectors": "2"' in args


def test_pivotal_fraction_freezes_the_embedding_and_the_lora_goes_on(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=6, learning_rate=1e-2,
                      pivotal_token="sks", pivotal_fraction=0.5, save_every_n_steps=2, save_last_n=5,
                      train_text_encoder=True)
    train(cfg, console=_quiet())
    saved = {load_checkpoint(p).state.global_step: load_checkpoint(p).lora for p in list_checkpoints(cfg.run_path)}
    assert sorted(saved) == [2, 4, 6]
    assert not torch.equal(saved[2][KEY], _start_vectors(sd15_model, "sks", 1))
    assert not torch.equal(saved[2][KEY], saved[4][KEY])  # step 3 still trains it
    assert torch.equal(saved[4][KEY], saved[6][KEY])  # frozen from step 3 of 6 on
    ups = [k for k in saved[4] if k.endswith("lora_up.weight")]
    assert any(not torch.equal(saved[4][k], saved[6][k]) for k in ups)


@pytest.mark.slow
def test_pivotal_resume_is_bit_exact(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 3)
    common = dict(max_train_steps=8, learning_rate=5e-3, pivotal_token="sks", pivotal_vectors=2,
                  pivotal_lr=2e-2, train_text_encoder=True, save_every_n_steps=4)
    straight = train(tiny_config(sd15_model, data, tmp_path / "out", output_name="straight", **common),
                     console=_quiet())
    split = tiny_config(sd15_model, data, tmp_path / "out", output_name="split", **common)

    def stop_at_3(event: dict) -> None:
        if event["type"] == "step" and event["step"] == 3:
            (split.run_path / "STOP").touch()

    first = train(split, on_event=stop_at_3, console=_quiet())
    assert (first.status, first.global_step) == ("cancelled", 3)
    second = train(dataclasses.replace(split, resume=str(split.run_path)), console=_quiet())
    assert second.status == "finished"
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(second.checkpoint)
    assert KEY in a.lora and a.lora.keys() == b.lora.keys()
    for key in a.lora:
        assert torch.equal(a.lora[key], b.lora[key]), key


def test_sdxl_pivotal_bundles_clip_l_and_clip_g(tmp_path):
    from lora_ext.models.tiny import save_tiny_model
    from lora_ext.train.loop import train

    model = save_tiny_model("sdxl", tmp_path / "sdxl")
    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(model, data, tmp_path / "out", max_train_steps=2, pivotal_token="sks",
                      bucket_reso_steps=64)
    net = load_lora(train(cfg, console=_quiet()).output)
    parts = net.bundled_embeddings["sks"]
    assert sorted(parts) == ["clip_g", "clip_l"]
    from lora_ext.models.loading import load_pipeline

    pipe = load_pipeline(model).pipe
    assert parts["clip_l"].shape == (1, pipe.text_encoder.get_input_embeddings().weight.shape[1])
    assert parts["clip_g"].shape == (1, pipe.text_encoder_2.get_input_embeddings().weight.shape[1])


@pytest.mark.parametrize(("kw", "field", "says"), [
    (dict(pivotal_token="two words"), "pivotal_token", "one word"),
    (dict(pivotal_token="a.b"), "pivotal_token", "one word"),
    (dict(pivotal_token="sks", cache_text_encoder_outputs=True), "cache_text_encoder_outputs", "pivotal tuning"),
    (dict(pivotal_token="sks", pivotal_fraction=0.0), "pivotal_fraction", "(0, 1]"),
    (dict(pivotal_token="sks", pivotal_vectors=0), "pivotal_vectors", ">= 1"),
])
def test_bad_pivotal_settings_are_refused(sd15_model, tmp_path, kw, field, says):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        tiny_config(sd15_model, tmp_path, tmp_path / "out", **kw).validate()
    assert err.value.field == field and says in str(err.value)


def test_a_word_in_no_caption_is_refused_before_the_run_folder_exists(sd15_model, tmp_path):  # noqa: F811
    from lora_ext.train.loop import train

    data = write_images(tmp_path / "data", 2)
    cfg = tiny_config(sd15_model, data, tmp_path / "out", max_train_steps=2, pivotal_token="hrtz")
    with pytest.raises(ConfigError, match="'hrtz' appears in no caption") as err:
        train(cfg, console=_quiet())
    assert err.value.field == "pivotal_token"
    assert not cfg.run_path.exists()
