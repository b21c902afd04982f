"""Offline model assets, deterministic tiny models, the base-model loader and generation.

Independent references used: CLIP's own `SimpleTokenizer` (installed open_clip / clip, loaded without their package
`__init__`), token ids published with the hub tokenizers and in diffusers issue #4153, the published parameter counts
of SD1.5 / SD2 / SDXL, the WebUI harness's tiny sizes (make_tiny_ckpt.py and its README) and the original ldm
`UNetModel` (stable-diffusion-sdkit) for the A1111 yaml.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_ext.app.generate import generate_image, generate_latents
from lora_ext.errors import LoraExtError, ModelLoadError
from lora_ext.models import assets
from lora_ext.models.loading import (
    SCHEDULERS,
    load_pipeline,
    make_scheduler,
    probe_v_prediction,
    read_checkpoint,
)
from lora_ext.models.tiny import (
    build_tiny_pipeline,
    randomise_,
    save_safetensors_deterministic,
    save_tiny_model,
    tiny_configs,
)

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
BOS, EOS = 49406, 49407


# ------------------------------------------------------------------------------------------------------ helpers


def _components(pipe):
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def _assert_same_weights(a, b) -> None:
    ca, cb = _components(a), _components(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        sa, sb = ca[name].state_dict(), cb[name].state_dict()
        assert sa.keys() == sb.keys(), name
        different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
        assert not different, f"{name}: {different[:3]}"


def _pixels(pipe, prompt="a photo of a cat", seed=7) -> np.ndarray:
    return np.asarray(generate_image(pipe, prompt, seed=seed, steps=3, width=64, height=64))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def pipes(sd15, sdxl):
    return {"sd15": sd15, "sdxl": sdxl}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(arch, fmt) -> path of a saved tiny model, written once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, fmt: str) -> Path:
        if (arch, fmt) not in cache:
            cache[(arch, fmt)] = save_tiny_model(arch, tmp_path_factory.mktemp(f"{arch}-{fmt}"), fmt=fmt)
        return cache[(arch, fmt)]

    return get


# ---------------------------------------------------------------------------------------------------- tokenizer


def _reference_tokenizer_module():
    """CLIP's SimpleTokenizer module from an installed clip / open_clip, without importing the package."""
    for package, filename in (("clip", "simple_tokenizer.py"), ("open_clip", "tokenizer.py")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            continue
        module_spec = importlib.util.spec_from_file_location(f"_reference_{package}_tokenizer", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except ImportError:  # ftfy / regex missing
            continue
        return module
    pytest.skip("no installed clip / open_clip tokenizer to compare with")


PROMPTS = [
    "a photo of a cat",
    "A PHOTO of  a Cat, sitting on a MAT.",
    "masterpiece, best quality, 1girl, (red hair:1.2), [blue eyes], {smile}",
    "it's 3.14 o'clock and we're late; don't panic - 100% sure",
    "naïve café déjà vu, 東京タワー, 🐱🐶",
    "hello\n\tworld   spaced    out  ",
    "portrait_of_a_man, ultra-detailed, 8k uhd, f/1.8, 85mm",
    " ".join(["lorem ipsum dolor sit amet"] * 30),
    "",
]


def test_clip_tokenizer_matches_clips_own_simple_tokenizer():
    reference = _reference_tokenizer_module().SimpleTokenizer()
    ours = assets.load_tokenizer("clip")
    for prompt in PROMPTS:
        assert ours(prompt)["input_ids"] == [BOS, *reference.encode(prompt), EOS], prompt


def test_openclip_tokenizer_matches_reference_without_exclamation_marks():
    reference = _reference_tokenizer_module().SimpleTokenizer()
    ours = assets.load_tokenizer("openclip")
    for prompt in PROMPTS:
        assert "!" not in prompt
        assert ours(prompt)["input_ids"] == [BOS, *reference.encode(prompt), EOS], prompt


@pytest.mark.parametrize("kind", assets.TOKENIZER_KINDS)
def test_known_token_ids(kind):
    tok = assets.load_tokenizer(kind)
    # the hub tokenizer's ids (openai/clip-vit-large-patch14), also checked by the WebUI harness
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)


def test_padding_tokens_as_diffusers_ships_them():
    clip, openclip = assets.load_tokenizer("clip"), assets.load_tokenizer("openclip")
    ids = clip("a cat", padding="max_length", max_length=77)["input_ids"]
    assert ids[:4] == [BOS, 320, 2368, EOS] and set(ids[4:]) == {EOS} and len(ids) == 77
    ids = openclip("a cat", padding="max_length", max_length=77)["input_ids"]
    assert ids[:4] == [BOS, 320, 2368, EOS] and set(ids[4:]) == {0} and len(ids) == 77
    long = clip("cat " * 200, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS


def test_exclamation_marks_follow_diffusers_not_openclip():
    # diffusers issue #4153: open_clip gives [49406, 256, 748, 995, 49407] for "! !! !!!"; diffusers' SD2/SDXL
    # tokenizer_2 (pad token "!") splits every "!" off as the pad token 0. We ship diffusers' behaviour.
    assert assets.load_tokenizer("clip")("! !! !!!")["input_ids"] == [49406, 256, 748, 995, 49407]
    assert assets.load_tokenizer("openclip")("! !! !!!")["input_ids"] == [49406, 0, 0, 0, 0, 0, 0, 49407]


def test_make_tokenizer_script_reproduces_the_shipped_files(tmp_path):
    bpe = None
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                bpe = candidate
                break
    if bpe is None:
        pytest.skip("no installed copy of bpe_simple_vocab_16e6.txt.gz")
    spec = importlib.util.spec_from_file_location("_make_tokenizer", REPO / "tools" / "make_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.write_tokenizers(bpe.read_bytes(), tmp_path)
    for kind in assets.TOKENIZER_KINDS:
        shipped = assets.tokenizer_dir(kind)
        names = sorted(p.name for p in shipped.iterdir())
        assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
        for name in names:
            assert (tmp_path / kind / name).read_bytes() == (shipped / name).read_bytes(), (kind, name)


# ------------------------------------------------------------------------------------------------------ configs


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_size_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    expected = {  # published sizes: SD1.5 UNet 859.52M, SD2 865.91M, SDXL 2.567B; CLIP-L text 123.06M,
        # OpenCLIP ViT-H text (23 of 24 layers) 340.39M, ViT-bigG text + projection 694.66M; KL-f8 VAE 83.65M
        "sd15": (859_520_964, 123_060_480),
        "sd2-base": (865_910_724, 340_387_840),
        "sd21-v": (865_910_724, 340_387_840),
        "sdxl-base": (2_567_463_684, 123_060_480),
    }
    with torch.device("meta"):
        for name, (unet_params, te_params) in expected.items():
            assert _count(UNet2DConditionModel.from_config(assets.load_config(name, "unet"))) == unet_params
            assert _count(AutoencoderKL.from_config(assets.load_config(name, "vae"))) == 83_653_863
            te = CLIPTextModel(CLIPTextConfig.from_dict(assets.load_config(name, "text_encoder")))
            assert _count(te) == te_params
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(assets.load_config("sdxl-base", "text_encoder_2")))
        assert _count(te2) == 694_659_840


def test_shipped_configs_and_lookup():
    assert assets.config_dir("sd1") == assets.config_dir("sd15")
    assert assets.load_config("sd21-v", "scheduler")["prediction_type"] == "v_prediction"
    assert assets.load_config("sd2-base", "scheduler")["prediction_type"] == "epsilon"
    assert assets.load_config("sdxl", "vae")["force_upcast"] is True
    assert assets.load_config("sdxl", "model_index")["_class_name"] == "StableDiffusionXLPipeline"
    assert (assets.tokenizer_dir("clip") / "vocab.json").is_file()
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        assets.load_config("sd15", "text_encoder_2")
    with pytest.raises(ModelLoadError, match="sd15"):
        assets.config_dir("sd3")
    with pytest.raises(ModelLoadError, match="openclip"):
        assets.tokenizer_dir("t5")


# --------------------------------------------------------------------------------------------------- tiny models


def _layerless(keys) -> set[str]:
    return {re.sub(r"layers\.\d+\.", "layers.N.", k) for k in keys}


@pytest.mark.parametrize(("arch", "real"), [("sd15", "sd15"), ("sdxl", "sdxl-base")])
def test_tiny_models_have_the_real_module_structure(pipes, arch, real):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pipe = pipes[arch]
    with torch.device("meta"):
        real_unet = UNet2DConditionModel.from_config(assets.load_config(real, "unet"))
        real_vae = AutoencoderKL.from_config(assets.load_config(real, "vae"))
        real_tes = [CLIPTextModel(CLIPTextConfig.from_dict(assets.load_config(real, "text_encoder")))]
        if arch == "sdxl":
            cfg = CLIPTextConfig.from_dict(assets.load_config(real, "text_encoder_2"))
            real_tes.append(CLIPTextModelWithProjection(cfg))
    assert list(pipe.unet.state_dict()) == list(real_unet.state_dict())
    assert list(pipe.vae.state_dict()) == list(real_vae.state_dict())
    tiny_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    for tiny_te, real_te in zip(tiny_tes, real_tes):
        assert _layerless(tiny_te.state_dict()) == _layerless(real_te.state_dict())
        assert tiny_te.config.hidden_act == real_te.config.hidden_act


def test_tiny_sizes_match_the_webui_harness(sd15, sdxl):
    # make_tiny_ckpt.py: UNet model_channels 32, 2 heads (sd15) / 16-channel heads (sdxl), context 32 / 64,
    # adm_in_channels 1568; VAE ch 32; CLIP text 32 x 2 layers, 2 heads, MLP 64; open_clip TE2 32 x 2, embed 32.
    assert sd15.unet.conv_in.weight.shape == (32, 4, 3, 3)
    attn = sd15.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert (attn.heads, attn.to_k.weight.shape) == (2, (32, 32))
    assert sum(1 for n, _ in sd15.unet.named_modules() if re.fullmatch(r".*attentions\.\d+", n)) == 16
    assert sd15.vae.encoder.conv_in.weight.shape == (32, 3, 3, 3)
    te = sd15.text_encoder.config
    assert (te.hidden_size, te.num_hidden_layers, te.num_attention_heads, te.intermediate_size) == (32, 2, 2, 64)
    assert te.vocab_size == 49408 and te.max_position_embeddings == 77 and te.hidden_act == "quick_gelu"

    blocks = [m for n, m in sdxl.unet.named_modules() if n.endswith("transformer_blocks") and len(n.split(".")) > 2]
    assert sum(len(b) for b in blocks) == 70  # README: 70 transformer blocks, depth (1, 2, 10)
    mid = sdxl.unet.mid_block.attentions[0]
    assert len(mid.transformer_blocks) == 10 and isinstance(mid.proj_in, torch.nn.Linear)
    attn = mid.transformer_blocks[0].attn2
    assert attn.heads == 8 and attn.to_q.weight.shape == (128, 128) and attn.to_k.weight.shape == (128, 64)
    assert sdxl.unet.add_embedding.linear_1.weight.shape == (128, 1568)
    te2 = sdxl.text_encoder_2.config
    assert (te2.hidden_size, te2.num_hidden_layers, te2.num_attention_heads, te2.projection_dim) == (32, 2, 2, 32)
    assert te2.intermediate_size == 128 and te2.hidden_act == "gelu"
    assert sdxl.tokenizer.pad_token == "<|endoftext|>" and sdxl.tokenizer_2.pad_token == "!"


def test_every_parameter_is_random(pipes):
    for arch, pipe in pipes.items():
        for comp, module in _components(pipe).items():
            for name, p in module.named_parameters():
                # (a random normal draw can be exactly 0.0 now and then)
                assert torch.count_nonzero(p) >= 0.999 * p.numel(), f"{arch} {comp}.{name} is zero-initialised"
                assert torch.count_nonzero(p - 1) >= 0.999 * p.numel(), f"{arch} {comp}.{name} is one-initialised"
                assert torch.isfinite(p).all()
    conv_out = pipes["sdxl"].unet.conv_out.weight  # zero-initialised in the original models
    assert conv_out.unique().numel() == conv_out.numel()


def test_tiny_builds_are_deterministic(sd15, sdxl):
    _assert_same_weights(sd15, build_tiny_pipeline("sd15"))
    _assert_same_weights(sdxl, build_tiny_pipeline("sdxl", seed=0))
    other = build_tiny_pipeline("sd15", seed=1)
    assert not torch.equal(other.unet.conv_in.weight, sd15.unet.conv_in.weight)


def test_randomise_is_independent_of_global_rng_and_order():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    torch.manual_seed(123)
    randomise_(a, 5, "x")
    torch.manual_seed(999)
    randomise_(b, 5, "x")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # weights ~ N(0, 1/fan_in): check the scale on a big layer
    big = torch.nn.Linear(400, 300)
    randomise_(big, 0, "big")
    assert abs(big.weight.std().item() - 400**-0.5) < 0.002


# ---------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_generation_is_deterministic_per_seed(pipes, arch):
    pipe = pipes[arch]
    first = _pixels(pipe, seed=7)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, _pixels(pipe, seed=7))
    assert not np.array_equal(first, _pixels(pipe, seed=8))
    latents = generate_latents(pipe, "a photo of a cat", seed=7, steps=3, width=64, height=64)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    assert torch.equal(latents, generate_latents(pipe, "a photo of a cat", seed=7, steps=3, width=64, height=64))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_prompt_and_attention_weights_change_the_output(pipes, arch):
    """Non-trivial model: the text and every cross-attention projection matter (a LoRA there would be visible)."""
    pipe = pipes[arch]

    def latents(prompt="a photo of a cat"):
        return generate_latents(pipe, prompt, "blurry", seed=3, steps=2, width=64, height=64, cfg=5.0)

    base = latents()
    assert not torch.allclose(base, latents("a photo of a dog"))
    blocks = pipe.unet.down_blocks[1 if arch == "sd15" else 2].attentions[0].transformer_blocks
    weight = blocks[0].attn2.to_k.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.05 * torch.ones_like(weight))
        assert not torch.allclose(base, latents(), atol=1e-4)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.equal(base, latents())


def test_generation_rejects_bad_sizes(sd15):
    with pytest.raises(ValueError, match="multiples of 8"):
        generate_image(sd15, "x", seed=0, steps=1, width=60, height=64)
    with pytest.raises(ValueError, match="steps"):
        generate_image(sd15, "x", seed=0, steps=0, width=64, height=64)


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_save_load_round_trip(pipes, saved, arch, fmt):
    path = saved(arch, fmt)
    loaded = load_pipeline(path)
    assert loaded.arch == ("sd1" if arch == "sd15" else "sdxl")
    assert loaded.is_single_file == (fmt == "single-file") and loaded.source == path
    assert loaded.prediction_type == "epsilon"
    assert type(loaded.pipe).__name__ == type(pipes[arch]).__name__
    assert type(loaded.pipe.scheduler).__name__ == type(pipes[arch].scheduler).__name__
    _assert_same_weights(pipes[arch], loaded.pipe)
    assert np.array_equal(_pixels(pipes[arch]), _pixels(loaded.pipe))


def test_saved_files_are_byte_identical(saved, tmp_path):
    for arch, fmt in (("sd15", "single-file"), ("sdxl", "single-file"), ("sd15", "diffusers")):
        first = saved(arch, fmt)
        second = save_tiny_model(arch, tmp_path / f"{arch}-{fmt}", fmt=fmt)
        files = [first] if first.is_file() else sorted(p for p in first.rglob("*") if p.is_file())
        for f in files:
            twin = second if first.is_file() else second / f.relative_to(first)
            assert _sha256(f) == _sha256(twin), f


def test_single_file_layout_is_the_original_one(saved):
    sd, metadata = read_checkpoint(saved("sdxl", "single-file"))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # keys and shapes printed by the harness's make_tiny_ckpt.py --arch sdxl
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (64, 64)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight"] == (128, 128)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (128, 1568)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] == (
        32, 32)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (32, 32)
    assert shapes["first_stage_model.decoder.conv_out.weight"] == (3, 32, 3, 3)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    sd, _ = read_checkpoint(saved("sd15", "single-file"))
    assert tuple(sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"].shape) == (32, 32)
    assert tuple(sd["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"].shape) == (
        32, 32)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_sd15_yaml_builds_the_original_ldm_unet(saved, sd15):
    """The sidecar yaml is what A1111 instantiates: the ldm UNetModel from it must load the file and match."""
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    import yaml

    path = saved("sd15", "single-file")
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    params = config["model"]["params"]
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params["first_stage_config"]["params"]["ddconfig"]["ch"] == 32
    clip_dir = Path(params["cond_stage_config"]["params"]["version"])
    assert json.loads((clip_dir / "config.json").read_text())["hidden_size"] == 32
    assert (clip_dir / "vocab.json").is_file()
    unet = openaimodel.UNetModel(**params["unet_config"]["params"]).eval()
    sd, _ = read_checkpoint(path)
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    gen = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen), torch.tensor([500])
    with torch.no_grad():
        expected = unet(x, t, context=context)
        ours = sd15.unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_sdxl_yaml_describes_the_tiny_sgm_model(saved):
    import yaml

    path = saved("sdxl", "single-file")
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    unet = params["network_config"]["params"]
    assert (unet["model_channels"], unet["num_head_channels"], unet["context_dim"]) == (32, 16, 64)
    assert (unet["adm_in_channels"], unet["transformer_depth"], unet["channel_mult"]) == (1568, [1, 2, 10], [1, 2, 4])
    embedders = params["conditioner_config"]["params"]["emb_models"]
    assert embedders[0]["params"]["layer_idx"] == 1 and embedders[1]["params"]["arch"] == "tiny-sdxl-te2"
    open_clip_cfg = json.loads(path.with_name("tiny-sdxl.open_clip.json").read_text())
    assert open_clip_cfg["embed_dim"] == 32
    assert open_clip_cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 2}


def _copy_without_metadata(src: Path, dst: Path) -> Path:
    """The file's tensors in a new file with no metadata; the same-named yaml and sidecars copied along."""
    import safetensors.torch

    sd, _ = read_checkpoint(src)
    safetensors.torch.save_file(sd, str(dst))
    shutil.copy(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    sidecar = src.with_name(src.stem + ".open_clip.json")
    if sidecar.is_file():
        shutil.copy(sidecar, dst.with_name(dst.stem + ".open_clip.json"))
    return dst


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_head_counts_come_from_the_sidecar_yaml_without_metadata(pipes, saved, tmp_path, arch):
    path = _copy_without_metadata(saved(arch, "single-file"), tmp_path / "model.safetensors")
    loaded = load_pipeline(path)
    _assert_same_weights(pipes[arch], loaded.pipe)
    assert np.array_equal(_pixels(pipes[arch]), _pixels(loaded.pipe))
    path.with_suffix(".yaml").unlink()
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_pipeline(path)  # real-model head sizes (64 channels) do not fit the 32-wide text encoder


def test_ckpt_pickle_loads_with_weights_only(sd15, saved, tmp_path):
    src = saved("sd15", "single-file")
    sd, _ = read_checkpoint(src)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, path)
    shutil.copy(src.with_suffix(".yaml"), path.with_suffix(".yaml"))
    loaded = load_pipeline(path)
    assert loaded.is_single_file and loaded.arch == "sd1"
    _assert_same_weights(sd15, loaded.pipe)


def test_loading_works_without_any_network(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for fmt in ("diffusers", "single-file"):
        assert load_pipeline(saved("sdxl", fmt)).arch == "sdxl"


def test_options_dtype_scheduler_prediction_and_vae(sd15, saved):
    path = saved("sd15", "single-file")
    loaded = load_pipeline(path, arch="sd1", dtype=torch.float16, scheduler="euler_a", prediction_type="v")
    assert loaded.pipe.unet.dtype == torch.float16 and loaded.pipe.text_encoder.dtype == torch.float16
    assert type(loaded.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert loaded.prediction_type == "v_prediction" == loaded.pipe.scheduler.config.prediction_type
    folder = saved("sd15", "diffusers")
    for vae_source in (path, folder / "vae", folder):
        with_vae = load_pipeline(folder, vae_path=vae_source)
        _assert_same_weights(sd15, with_vae.pipe)


def test_sdxl_fp16_keeps_the_vae_upcast(saved):
    loaded = load_pipeline(saved("sdxl", "single-file"), dtype=torch.float16)
    assert loaded.pipe.unet.dtype == torch.float16 and loaded.pipe.vae.dtype == torch.float16
    assert loaded.pipe.vae.config.force_upcast is True  # the SDXL pipeline decodes in fp32


def test_sd2_single_file_uses_openclip_and_v_scheduler(tmp_path):
    """A tiny SD2-structured file: OpenCLIP text tower (pad "!") and prediction type from metadata."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.models import convert
    from lora_ext.models.tiny import canonical_text_encoder_state_dict

    cfg = tiny_configs("sd15")
    unet_cfg = {**cfg["unet"], "use_linear_projection": True, "attention_head_dim": [2, 4, 8, 8]}
    te_cfg = {**cfg["text_encoder"], "hidden_act": "gelu"}
    unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(cfg["vae"])
    te = CLIPTextModel(CLIPTextConfig.from_dict(te_cfg))
    for name, module in (("unet", unet), ("vae", vae), ("te", te)):
        randomise_(module, 0, name)
    sd = convert.diffusers_to_single_file("sd2", unet.state_dict(), unet_cfg, vae.state_dict(), cfg["vae"],
                                          [canonical_text_encoder_state_dict(te)], [te_cfg])
    hints = {"unet_head_channels": 16, "te_head_channels": 16, "image_size": 64}
    path = tmp_path / "tiny-sd2.safetensors"
    save_safetensors_deterministic(sd, path, {"lora_ext.single_file_hints": json.dumps(hints),
                                              "modelspec.prediction_type": "v"})
    loaded = load_pipeline(path)
    assert loaded.arch == "sd2" and loaded.prediction_type == "v_prediction"
    assert type(loaded.pipe.scheduler).__name__ == "DDIMScheduler"
    assert loaded.pipe.tokenizer.pad_token_id == 0
    assert torch.equal(loaded.pipe.unet.conv_in.weight, unet.conv_in.weight)
    assert loaded.pipe.text_encoder.config.hidden_act == "gelu"
    assert load_pipeline(path, prediction_type="epsilon").prediction_type == "epsilon"


def test_v_prediction_probe_follows_a1111s_rule():
    class FakeUNet(torch.nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = offset
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
            self.config = type("Config", (), {"in_channels": 4, "cross_attention_dim": 8})()

        def forward(self, x, t, encoder_hidden_states):
            assert int(t) == 999 and float(x.mean()) == 0.5 and x.dtype == torch.float32
            return type("Out", (), {"sample": x + self.offset})()

    assert probe_v_prediction(FakeUNet(-1.5)) is True
    assert probe_v_prediction(FakeUNet(-0.5)) is False
    unet = FakeUNet(0.0)
    probe_v_prediction(unet)
    assert unet.weight.dtype == torch.float16  # cast back


# ------------------------------------------------------------------------------------------------------- errors


def test_model_load_errors_name_the_file(tmp_path, saved):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7 + b"not a model at all" * 10)
    pickle_junk = tmp_path / "junk.ckpt"
    pickle_junk.write_bytes(b"this is not a pickle")
    not_a_checkpoint = tmp_path / "lora.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_a_checkpoint))
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    text = tmp_path / "model.txt"
    text.write_text("hello")
    for bad in (junk, pickle_junk, not_a_checkpoint, empty_dir, text, tmp_path / "missing.safetensors"):
        with pytest.raises(ModelLoadError) as info:
            load_pipeline(bad)
        assert str(bad) in str(info.value)
        assert isinstance(info.value, LoraExtError)
    with pytest.raises(ModelLoadError, match="sdxl"):
        load_pipeline(saved("sd15", "single-file"), arch="sdxl")
    with pytest.raises(ModelLoadError, match="sd1"):
        load_pipeline(saved("sdxl", "diffusers"), arch="sd1")
    with pytest.raises(ModelLoadError, match="valid"):
        load_pipeline(saved("sd15", "diffusers"), arch="flux")


def test_make_scheduler_names(sd15):
    expected = {
        "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
        "heun": "HeunDiscreteScheduler", "ddpm": "DDPMScheduler",
    }
    assert set(SCHEDULERS) == set(expected)
    with pytest.raises(ModelLoadError) as info:
        make_scheduler("k_dpm_3", sd15.scheduler.config)
    assert all(name in str(info.value) for name in expected)
    base = sd15.scheduler.config
    if importlib.util.find_spec("scipy") is None:  # diffusers' LMS scheduler needs scipy
        with pytest.raises(ModelLoadError, match="scipy"):
            make_scheduler("lms", base)
        del expected["lms"]
    for name, cls in expected.items():
        scheduler = make_scheduler(name, base)
        assert type(scheduler).__name__ == cls
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
        assert scheduler.config.beta_schedule == "scaled_linear"
    assert make_scheduler("dpmpp_2m", base).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("DPM++ 2M".replace(" ", "_"), base).config.solver_order == 2
    assert make_scheduler("ddim", base, prediction_type="v_prediction").config.prediction_type == "v_prediction"
