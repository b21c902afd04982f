"""export_lora / build_metadata: kohya keys and dtypes, sd-scripts metadata (all str, the families A1111's rule
reads), hashes by their published formulas, A1111 sidecars, preview, refusal to overwrite, read-back checks."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from lora_ext.errors import TrainingError
from lora_ext.formats.metadata import a1111_sd_version, base_model_from_metadata, metadata_summary
from lora_ext.formats.network import load_lora
from lora_ext.train.export import (
    build_metadata,
    compute_bucket_info,
    compute_tag_frequency,
    export_lora,
    model_file_hashes,
    sidecar_json,
)
from lora_ext.train.network import LoraTrainingNetwork

# what sd-scripts train_network.py writes (plus what it adds at save time); modelspec keys of sai_model_spec 1.0.1
SS_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch", "ss_num_epochs",
    "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps", "ss_lr_warmup_steps",
    "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout",
    "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip", "ss_max_token_length",
    "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset", "ss_training_comment", "ss_optimizer",
    "ss_max_grad_norm", "ss_caption_dropout_rate", "ss_prior_loss_weight", "ss_min_snr_gamma",
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info", "ss_network_args", "ss_sd_model_name", "ss_training_finished_at", "ss_steps", "ss_epoch",
    "sshs_model_hash", "sshs_legacy_hash",
}  # fmt: skip
MODELSPEC_KEYS = {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                  "modelspec.title", "modelspec.resolution", "modelspec.date", "modelspec.hash_sha256",
                  "modelspec.prediction_type", "modelspec.trigger_phrase"}

CONFIG = {
    "pretrained_model": "/models/Stable-diffusion/tiny-sd15.safetensors", "output_name": "ignored_by_export",
    "network_dim": 8, "network_alpha": 4, "learning_rate": 2e-4, "train_text_encoder": True, "resolution": 512,
    "train_batch_size": 2, "gradient_accumulation_steps": 3, "max_train_epochs": 5, "seed": 7,
    "trigger_word": "sks dog", "mixed_precision": "fp16", "lr_scheduler": "cosine", "optimizer": "adamw",
    "flip_aug": True, "color_jitter": 0.1, "clip_skip": 2,
}
REPORT = {"images": 4, "class_images": 0, "repeats_total": 40, "buckets": {(512, 512): 30, (576, 448): 10},
          "steps_per_epoch": 7, "total_steps": 35, "formula": "...", "problems": [], "skipped": []}


def _tiny(arch: str):
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch, seed=0)


@pytest.fixture(scope="module")
def sd15():
    return _tiny("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return _tiny("sdxl")


@pytest.fixture
def network(sd15):
    net = LoraTrainingNetwork(sd15, rank=8, alpha=4, targets="attn_mlp_conv", conv_rank=4, conv_alpha=2,
                              train_text_encoder=True, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in net.loras.values():
            lora.lora_up.copy_(torch.randn(lora.lora_up.shape, generator=g) * 0.05)
    yield net
    net.remove()


def _meta(arch="sd1", **kw):
    captions = {"/data/10_dog": ["sks dog, grass", "sks dog, Sofa ", "sks dog"]}
    return build_metadata(CONFIG, REPORT, arch, steps=35, epoch=5, started_at=1_700_000_000.5,
                          tag_frequency=compute_tag_frequency(captions),
                          dataset_dirs={"10_dog": {"n_repeats": 10, "img_count": 4}}, **kw)


def _raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118 (safe_open is no dict)


# --------------------------------------------------------------------------------------------------- the file


def test_file_keys_dtypes_and_metadata(tmp_path, network):
    path = export_lora(network, tmp_path / "my_dog.safetensors", metadata=_meta(), pipe_arch="sd1")
    tensors, meta = _raw(path)
    # kohya keys and dtypes
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(t.dtype == torch.float16 for k, t in tensors.items())
    alphas = {k: float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert all(t.dim() == 0 for k, t in tensors.items() if k.endswith(".alpha"))
    assert alphas["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] == 2.0  # 3x3 conv: conv_alpha
    assert alphas["lora_unet_down_blocks_1_resnets_0_conv_shortcut.alpha"] == 4.0  # 1x1: alpha
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert len(alphas) == len(network.loras)
    # metadata: sd-scripts' keys, every value a string
    assert meta.keys() >= SS_KEYS | MODELSPEC_KEYS
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_output_name"] == "my_dog"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert a1111_sd_version(meta) == "sd1" and base_model_from_metadata(meta) == "sd1"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("8", 4.0)
    args = json.loads(meta["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("4", "2") and "dora_wd" not in args
    assert float(meta["ss_learning_rate"]) == 2e-4 and float(meta["ss_text_encoder_lr"]) == 1e-4
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("35", "5", "5")
    assert (meta["ss_num_train_images"], meta["ss_max_train_steps"]) == ("40", "35")
    assert meta["ss_total_batch_size"] == "6" and meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_flip_aug"] == "True" and meta["ss_color_aug"] == "True" and meta["ss_clip_skip"] == "2"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_mixed_precision"] == "fp16"
    assert meta["ss_sd_model_name"] == "tiny-sd15.safetensors"
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.5
    assert float(meta["ss_training_finished_at"]) >= 1_700_000_000.5
    assert json.loads(meta["ss_tag_frequency"]) == {"10_dog": {"sks dog": 3, "grass": 1, "sofa": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_dog": {"n_repeats": 10, "img_count": 4}}
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets.values()) == [((512, 512), 30),
                                                                                     ((576, 448), 10)]
    # modelspec (sai_model_spec 1.0.1 for an SD1 LoRA)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.trigger_phrase"] == "sks dog" and meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.title"] == "ignored_by_export"  # the config's title; ss_output_name follows the file
    datetime.datetime.fromisoformat(meta["modelspec.date"])
    # the engine's metadata reader decodes the structured fields
    summary = metadata_summary(meta)
    assert summary["network_dim"] == 8 and summary["top_tags"]["sks dog"] == 3
    assert summary["bucket_resolutions"] == {"512x512": 30, "576x448": 10}


def test_hashes_follow_published_formulas(tmp_path, network):
    """sshs_model_hash = sha256 of the bytes after the header (kohya's addnet hash, A1111 reads it); sshs_legacy_hash
    = first 8 hex of sha256 of the 64 KiB at 1 MiB of the file saved with only the ss_* metadata (sd-scripts
    precalculate_safetensors_hashes); modelspec.hash_sha256 = "0x" + sha256 of all tensor content (ModelSpec)."""
    path = export_lora(network, tmp_path / "h.safetensors", metadata=_meta())
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    tensor_sha = hashlib.sha256(data[8 + n:]).hexdigest()
    tensors, meta = _raw(path)
    assert meta["sshs_model_hash"] == tensor_sha
    assert meta["modelspec.hash_sha256"] == "0x" + tensor_sha
    ss_only = safetensors.torch.save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000  # the window holds real data
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_sdxl_keys_and_family(tmp_path, sdxl):
    net = LoraTrainingNetwork(sdxl, rank=4, train_text_encoder=True, dora=True)
    try:
        meta = build_metadata({"output_name": "x", "resolution": None}, None, "sdxl")
        path = export_lora(net, tmp_path / "xl.safetensors", metadata=meta)
    finally:
        net.remove()
    tensors, meta = _raw(path)
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert not any("down_blocks" in k for k in tensors)
    assert all(t.shape[0] == 1 for k, t in tensors.items() if k.endswith(".dora_scale"))
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and a1111_sd_version(meta) == "sdxl"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024" and meta["ss_resolution"] == "(1024, 1024)"
    assert json.loads(path.with_suffix(".json").read_text())["sd version"] == "SDXL"


def _sd2_pipe():
    """The tiny SD1.5 pipeline with SD2's linear transformer projections (what tells SD2 apart)."""
    from diffusers import UNet2DConditionModel

    pipe = _tiny("sd15")
    cfg = dict(pipe.unet.config)
    cfg["use_linear_projection"] = True
    with torch.random.fork_rng(devices=[]):
        pipe.unet = UNet2DConditionModel.from_config(cfg)
    return pipe


@pytest.mark.parametrize("prediction,version,arch_id,reso", [
    ("epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "512x512"),
    ("v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768"),
])
def test_sd2_metadata(tmp_path, prediction, version, arch_id, reso):
    pipe = _sd2_pipe()
    net = LoraTrainingNetwork(pipe, rank=4, train_text_encoder=True, targets="attn_mlp")
    try:
        assert net.arch == "sd2"
        meta = build_metadata({"output_name": "x"}, None, "sd2", prediction_type=prediction)
        path = export_lora(net, tmp_path / "two.safetensors", metadata=meta, pipe_arch="sd2")
    finally:
        net.remove()
    tensors, meta = _raw(path)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == version
    assert a1111_sd_version(meta) == "sd2"
    assert meta["modelspec.architecture"] == arch_id and meta["modelspec.resolution"] == reso
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_"))
               for k in tensors)
    assert any(k.startswith("lora_unet_up_blocks_1_attentions_0_proj_in") for k in tensors)


# ------------------------------------------------------------------------------------------------ sidecars


def test_sidecar_and_preview(tmp_path, network):
    preview = Image.new("RGB", (24, 16), (10, 200, 30))
    path = export_lora(network, tmp_path / "card.safetensors", metadata=_meta(),
                       sidecar={"activation_text": "sks dog, photo", "preferred weight": 0.8, "notes": "hi",
                                "description": "a dog"},
                       preview=preview)
    card = json.loads((tmp_path / "card.json").read_text(encoding="utf-8"))
    assert card == {"description": "a dog", "sd version": "SD1", "activation text": "sks dog, photo",
                    "preferred weight": 0.8, "negative text": "", "notes": "hi"}
    with Image.open(tmp_path / "card.preview.png") as img:
        assert img.format == "PNG" and img.size == (24, 16) and img.convert("RGB").getpixel((3, 3)) == (10, 200, 30)
    assert path == tmp_path / "card.safetensors"


def test_sidecar_defaults():
    meta = {"modelspec.trigger_phrase": "ohwx", "ss_sd_model_name": "base.safetensors", "ss_steps": "10"}
    card = sidecar_json("sd2", None, meta)
    assert card["sd version"] == "SD2" and card["activation text"] == "ohwx"
    assert card["preferred weight"] == 1.0 and "base.safetensors" in card["description"]
    assert "steps 10" in card["notes"]


# ---------------------------------------------------------------------------------------------------- refusals


def test_never_overwrites_without_permission(tmp_path, network):
    path = export_lora(network, tmp_path / "keep.safetensors", metadata=_meta())
    before = path.read_bytes()
    card = (tmp_path / "keep.json").read_bytes()
    with pytest.raises(TrainingError, match="keep.safetensors already exists"):
        export_lora(network, path, metadata=_meta())
    assert path.read_bytes() == before and (tmp_path / "keep.json").read_bytes() == card
    # a sidecar alone also blocks (nothing written)
    (tmp_path / "other.preview.png").write_bytes(b"x")
    with pytest.raises(TrainingError, match="other.preview.png"):
        export_lora(network, tmp_path / "other.safetensors", metadata=_meta(), preview=Image.new("RGB", (2, 2)))
    assert not (tmp_path / "other.safetensors").exists() and not (tmp_path / "other.json").exists()
    # overwrite=True replaces all of them
    with torch.no_grad():
        next(iter(network.loras.values())).lora_up.add_(1.0)
    export_lora(network, path, metadata=_meta(), overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "keep.safetensors", "other.preview.png"]


def test_unusable_output_is_refused_and_nothing_left(tmp_path, network, monkeypatch):
    # a module no layer of the model answers to: refused before writing
    real = network.state_dict_kohya

    def with_stray(dtype=torch.float16):
        sd = real(dtype)
        sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4, dtype=dtype)
        sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2, dtype=dtype)
        return sd

    monkeypatch.setattr(network, "state_dict_kohya", with_stray)
    with pytest.raises(TrainingError, match="match no layer"):
        export_lora(network, tmp_path / "stray.safetensors", metadata=_meta())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    # NaN weights
    with torch.no_grad():
        next(iter(network.loras.values())).lora_up[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="NaN"):
        export_lora(network, tmp_path / "nan.safetensors", metadata=_meta())
    with torch.no_grad():
        next(iter(network.loras.values())).lora_up[0, 0] = 0.0
    # metadata claiming another family, non-str metadata, wrong pipe arch, wrong extension
    with pytest.raises(TrainingError, match="sdxl"):
        export_lora(network, tmp_path / "a.safetensors", metadata=_meta("sdxl"))
    with pytest.raises(TrainingError, match="strings"):
        export_lora(network, tmp_path / "b.safetensors", metadata={**_meta(), "ss_steps": 35})
    with pytest.raises(TrainingError, match="pipe_arch"):
        export_lora(network, tmp_path / "c.safetensors", metadata=_meta(), pipe_arch="sdxl")
    with pytest.raises(TrainingError, match=".safetensors"):
        export_lora(network, tmp_path / "d.pt", metadata=_meta())
    assert list(tmp_path.iterdir()) == []


def test_read_back_failure_removes_the_files(tmp_path, network, monkeypatch):
    """If the file on disk does not read back as written, the written files are removed and TrainingError raised."""
    import lora_ext.train.export as export

    def corrupt_load(path, **kw):
        net = load_lora(path, **kw)
        module = next(iter(net.modules.values()))
        module.algorithm.tensors()["lora_up.weight"].add_(1)  # what a bad disk would do
        return net

    monkeypatch.setattr(export, "load_lora", corrupt_load)
    with pytest.raises(TrainingError, match="read back differs"):
        export_lora(network, tmp_path / "bad.safetensors", metadata=_meta(), preview=Image.new("RGB", (2, 2)))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- helpers


def test_tag_frequency_rule():
    """sd-scripts set_tag_frequency: split on ",", strip, lower-case, drop empty, count per folder base name."""
    got = compute_tag_frequency({"/x/5_cat/": ["A cat, , SOFA", "a cat,a cat"], "dogs": []})
    assert got == {"5_cat": {"a cat": 3, "sofa": 1}, "dogs": {}}


def test_bucket_info_shapes():
    want = {"buckets": {"0": {"resolution": [448, 576], "count": 2}, "1": {"resolution": [512, 512], "count": 5}},
            "mean_img_ar_error": 0.0}
    assert compute_bucket_info({(512, 512): 5, (448, 576): 2}) == want
    assert compute_bucket_info({"512x512": 5, "448,576": 2}) == want
    assert compute_bucket_info([[512, 512, 5], [448, 576, 2]]) == want
    assert compute_bucket_info([{"resolution": [512, 512], "count": 5}, {"resolution": [448, 576], "count": 2}]) == want
    assert compute_bucket_info(None) is None


def test_model_file_hashes(tmp_path):
    blob = bytes(range(256)) * 5000  # 1.28 MB: the legacy window holds data
    f = tmp_path / "model.safetensors"
    f.write_bytes(blob)
    assert model_file_hashes(f) == {"ss_sd_model_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
                                    "ss_new_sd_model_hash": hashlib.sha256(blob).hexdigest()}
    assert model_file_hashes(tmp_path) == {}


def test_build_metadata_defaults_and_types():
    meta = build_metadata({}, None, "sd1")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_text_encoder_lr"] == "None" and meta["ss_clip_skip"] == "None"
    assert meta["ss_bucket_info"] == "null" and json.loads(meta["ss_tag_frequency"]) == {}
    assert "modelspec.trigger_phrase" not in meta and "modelspec.encoder_layer" not in meta
    assert a1111_sd_version(meta) == "sd1"
    with pytest.raises(ValueError):
        build_metadata({}, None, "sd3")
    with pytest.raises(ValueError):
        build_metadata({}, None, "sd1", prediction_type="flow")
