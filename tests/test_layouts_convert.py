"""Naming tables (lora_ext.formats.layouts) and state-dict converters (lora_ext.models.convert).

Independent references:
- the original `ldm` classes (stable-diffusion-sdkit): UNetModel and AutoencoderKL must load our converted weights
  strictly and compute the same outputs as the diffusers models;
- OpenCLIP's own `TextTransformer` (open_clip.transformer, loaded without the package's torchvision imports);
- diffusers' single-file loader (`from_single_file` with a local config folder, offline) and its conversion functions;
- A1111's block index arithmetic (convert_diffusers_name_to_compvis), written out here as formulas;
- the published diffusers configs of SD1.5 / SD2.1 / SDXL (values written out here), on `meta` models.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_ext.errors import ModelLoadError
from lora_ext.formats.layouts import (
    OpenClipSlot,
    clip_hf_to_openclip,
    hf_clip_module_path,
    ldm_unet_block,
    unet_module_map,
    vae_module_map,
)
from lora_ext.models.convert import (
    SingleFileParts,
    clip_hf_to_openclip_sd,
    clip_openclip_to_hf_sd,
    diffusers_to_single_file,
    hf_clip_keys_for,
    single_file_to_diffusers,
    unet_config_from_ldm,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)

ATOL = 1e-5
RTOL = 1e-4


# ------------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with fixed pseudo-random values (norm weights around 1), so no weight is 0 or 1 by init."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm)
    for _, module in sorted(model.named_modules(), key=lambda nm: nm[0]):
        for name, p in sorted(module.named_parameters(recurse=False)):
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if isinstance(module, norms) and name == "weight" else noise)
    return model.eval()


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def param_owners(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def _position_ids(model: nn.Module) -> dict[str, torch.Tensor]:
    """CLIP's `position_ids` buffer where the installed transformers saves it (persistent before 4.31, A1111's 4.30):
    the converters drop it and loaders keep the model's own value. Empty on transformers >= 4.31."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] == "position_ids"}


def clip_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict without a `position_ids` buffer (all of it on transformers >= 4.31)."""
    buffers = _position_ids(model)
    return {k: v for k, v in model.state_dict().items() if k not in buffers}


def load_clip_strict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """`load_state_dict(strict=True)` of converted CLIP weights; a `position_ids` buffer they lack keeps its value."""
    model.load_state_dict({**_position_ids(model), **sd}, strict=True)


# --------------------------------------------------------------------------------------------------- tiny configs

# The same tiny UNet in both layouts (SD1-shaped and SD2-shaped)
LDM_UNET = {
    "sd1": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=32, legacy=False),
    "sd2": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=16, use_spatial_transformer=True,
                use_linear_in_transformer=True, transformer_depth=1, context_dim=48, legacy=False),
}
DIFFUSERS_UNET = {
    "sd1": dict(sample_size=8, block_out_channels=[32, 64, 128, 128], layers_per_block=2, cross_attention_dim=32,
                attention_head_dim=2),
    "sd2": dict(sample_size=8, block_out_channels=[32, 64, 128, 128], layers_per_block=2, cross_attention_dim=48,
                attention_head_dim=[2, 4, 8, 8], use_linear_projection=True),
    # SDXL-shaped: no attention at level 0, transformer depth 2/3 (mid 3), text_time addition embedding
    "sdxl": dict(sample_size=8, block_out_channels=[32, 64, 64], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 3], attention_head_dim=[2, 4, 4], cross_attention_dim=80,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=40 + 6 * 8),
}
LDM_VAE = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
DIFFUSERS_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                     up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                     latent_channels=4, norm_num_groups=32, sample_size=16)
# Text encoders with 16-channel heads; widths differ so that diffusers' loader can tell SDXL's two encoders apart.
CLIP_L = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=8, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
CLIP_H = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
              max_position_embeddings=8, hidden_act="gelu", projection_dim=40, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
TE_SPECS = {"sd1": [(CLIPTextModel, CLIP_L)], "sd2": [(CLIPTextModel, CLIP_H)],
            "sdxl": [(CLIPTextModel, CLIP_L), (CLIPTextModelWithProjection, CLIP_H)]}
HEADS = {"sd1": dict(unet_heads=2), "sd2": dict(unet_head_channels=16), "sdxl": dict(unet_head_channels=16)}


def tiny_unet(arch: str, seed: int = 0) -> UNet2DConditionModel:
    return randomise(UNet2DConditionModel(**DIFFUSERS_UNET[arch]), seed)


def tiny_parts(arch: str, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, list[nn.Module]]:
    torch.manual_seed(seed)
    unet = tiny_unet(arch, seed)
    vae = randomise(AutoencoderKL(**DIFFUSERS_VAE), seed + 1)
    tes = [randomise(cls(CLIPTextConfig(**cfg)), seed + 2 + i) for i, (cls, cfg) in enumerate(TE_SPECS[arch])]
    return unet, vae, tes


def tiny_single_file(arch: str, seed: int = 0):
    unet, vae, tes = tiny_parts(arch, seed)
    sf = diffusers_to_single_file(arch, unet.state_dict(), unet.config, vae.state_dict(), vae.config,
                                  [t.state_dict() for t in tes], [t.config for t in tes])
    return sf, unet, vae, tes


# ----------------------------------------------------------------------------------- reference models (ldm, OpenCLIP)


def _import_with_stubs(stubs: dict[str, dict], module_name: str, pkg: tuple[str, Path] | None = None):
    """Import `module_name` while `stubs` (name -> attributes) stand in for missing packages; leave no trace of the
    stubs (nor of modules imported through them) in sys.modules afterwards."""
    before = set(sys.modules)
    mp = pytest.MonkeyPatch()
    missing = {name for name in stubs if importlib.util.find_spec(name.split(".")[0]) is None}
    try:
        for name, attrs in stubs.items():
            if name not in missing:
                continue
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            stub.__path__ = []
            for key, value in attrs.items():
                setattr(stub, key, value)
            mp.setitem(sys.modules, name, stub)
        if pkg is not None:
            package = types.ModuleType(pkg[0])
            package.__path__ = [str(pkg[1])]
            mp.setitem(sys.modules, pkg[0], package)
        module = importlib.import_module(module_name)
    finally:
        mp.undo()
        for name in set(sys.modules) - before:
            if name == module_name or name.startswith(tuple(stubs)) or (pkg and name.startswith(pkg[0])):
                sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="module")
def ldm_unet_cls():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel


@pytest.fixture(scope="module")
def ldm_autoencoder_cls():
    """ldm's AutoencoderKL subclasses pytorch_lightning.LightningModule (not installed): a plain nn.Module stands in."""
    module = _import_with_stubs({"pytorch_lightning": {"LightningModule": nn.Module}}, "ldm.models.autoencoder")
    return module.AutoencoderKL


@pytest.fixture(scope="module")
def openclip_transformer():
    """open_clip.transformer without running open_clip/__init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.origin is not None
    pkg = ("_test_open_clip_pkg", Path(spec.origin).parent)
    stubs = {"torchvision": {}, "torchvision.ops": {}, "torchvision.ops.misc": {"FrozenBatchNorm2d": nn.BatchNorm2d}}
    return _import_with_stubs(stubs, f"{pkg[0]}.transformer", pkg)


# ------------------------------------------------------------------------------------------------ 1. UNet vs ldm


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_unet_matches_ldm_unetmodel(arch, ldm_unet_cls):
    ldm = randomise(ldm_unet_cls(**LDM_UNET[arch]), 1)
    diff = tiny_unet(arch, 2)
    cfg = diff.config
    ctx_dim = LDM_UNET[arch]["context_dim"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, ctx_dim, generator=gen)

    with torch.no_grad():
        # ldm -> diffusers: strict load (keys and shapes), same function
        diff.load_state_dict(unet_ldm_to_diffusers(ldm.state_dict(), cfg), strict=True)
        want = ldm(x, t, context=ctx)
        got = diff(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert want.abs().mean() > 1e-2  # non-trivial output

        # diffusers -> ldm, with other weights
        randomise(diff, 4)
        ldm2 = ldm_unet_cls(**LDM_UNET[arch]).eval()
        ldm2.load_state_dict(unet_diffusers_to_ldm(diff.state_dict(), cfg), strict=True)
        torch.testing.assert_close(ldm2(x, t, context=ctx), diff(x, t, encoder_hidden_states=ctx).sample,
                                   atol=ATOL, rtol=RTOL)
        assert not torch.allclose(ldm2(x, t, context=ctx), want)  # the new weights really changed the output

    # the module map names exactly the modules that own parameters, on both sides
    table = unet_module_map(cfg)
    assert set(table) == param_owners(diff)
    assert set(table.values()) == param_owners(ldm)


def test_unet_map_follows_a1111_block_arithmetic():
    """A1111 convert_diffusers_name_to_compvis (SD1 layout), written out as formulas."""
    table = unet_module_map(dict(cross_attention_dim=768, attention_head_dim=8))

    def a1111(path: str) -> str:
        p = path.split(".")
        if p[0] == "down_blocks" and p[2] in ("attentions", "resnets"):
            return f"input_blocks.{1 + int(p[1]) * 3 + int(p[3])}.{1 if p[2] == 'attentions' else 0}"
        if p[0] == "down_blocks":  # downsamplers.0.conv
            return f"input_blocks.{3 + int(p[1]) * 3}.0.op"
        if p[0] == "mid_block":
            return f"middle_block.{1 if p[1] == 'attentions' else int(p[2]) * 2}"
        if p[0] == "up_blocks" and p[2] in ("attentions", "resnets"):
            return f"output_blocks.{int(p[1]) * 3 + int(p[3])}.{1 if p[2] == 'attentions' else 0}"
        if p[0] == "up_blocks":  # upsamplers.0.conv
            return f"output_blocks.{2 + int(p[1]) * 3}.{1 if p[1] == '0' else 2}.conv"
        raise AssertionError(path)

    checked = 0
    for dpath, lpath in table.items():
        if dpath.startswith(("down_blocks", "mid_block", "up_blocks")):
            depth = 4 if "resnets" in dpath or "attentions" in dpath else 99
            assert lpath.startswith(a1111(".".join(dpath.split(".")[:depth]))), (dpath, lpath)
            checked += 1
    assert checked > 300


def test_ldm_unet_block_labels():
    cases = {
        "input_blocks.0.0": "IN00",
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k": "IN04",
        "model.diffusion_model.input_blocks.11.0.out_layers.3": "IN11",
        "middle_block.1.proj_in": "M00",
        "diffusion_model.middle_block.0.in_layers.0": "M00",
        "output_blocks.0.0.skip_connection": "OUT00",
        "output_blocks.11.1.proj_out": "OUT11",
        "time_embed.0": "BASE",
        "label_emb.0.2": "BASE",
        "out.2": "BASE",
    }
    assert {k: ldm_unet_block(k) for k in cases} == cases


# -------------------------------------------------------------------------------------------------- 1b. VAE vs ldm


def test_vae_matches_ldm_autoencoder(ldm_autoencoder_cls):
    def make_ldm():
        return ldm_autoencoder_cls(ddconfig=LDM_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()

    ldm = randomise(make_ldm(), 5)
    diff = randomise(AutoencoderKL(**DIFFUSERS_VAE), 6)
    gen = torch.Generator().manual_seed(7)
    img = torch.randn(1, 3, 16, 16, generator=gen)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        diff.load_state_dict(vae_ldm_to_diffusers(ldm.state_dict(), diff.config), strict=True)
        torch.testing.assert_close(diff.encode(img).latent_dist.mean, ldm.encode(img).mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(diff.decode(z).sample, ldm.decode(z), atol=ATOL, rtol=RTOL)

        randomise(diff, 8)
        ldm2 = make_ldm()
        ldm2.load_state_dict(vae_diffusers_to_ldm(diff.state_dict(), diff.config), strict=True)
        torch.testing.assert_close(ldm2.encode(img).mean, diff.encode(img).latent_dist.mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ldm2.decode(z), diff.decode(z).sample, atol=ATOL, rtol=RTOL)
    assert set(vae_module_map(diff.config)) == param_owners(diff)
    assert set(vae_module_map(diff.config).values()) == param_owners(ldm)


def test_vae_accepts_legacy_attention_names_and_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = randomise(AutoencoderKL(**DIFFUSERS_VAE), 9)
    ldm_sd = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    assert ldm_sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm_sd.items()}, vae.config)
    assert_same_weights(theirs, vae.state_dict())
    legacy = {
        k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in vae.state_dict().items()
    }
    assert any(".query." in k for k in legacy)
    assert_same_weights(vae_diffusers_to_ldm(legacy, vae.config), ldm_sd)


# ------------------------------------------------------------------------------------------- 2. SDXL, real sizes


# Published diffusers configs (only the fields that matter), as on the Hugging Face hub.
REAL_UNET = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
REAL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
REAL_CLIP = {
    "L": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    "H": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512),
    "G": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280),
}
REAL_TE = {"sd1": [(CLIPTextModel, "L")], "sd2": [(CLIPTextModel, "H")],
           "sdxl": [(CLIPTextModel, "L"), (CLIPTextModelWithProjection, "G")]}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_unet_map_matches_diffusers_converter_real_size(arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNET[arch])
    table = unet_module_map(unet.config)
    assert set(table) == param_owners(unet)
    # diffusers' converter only moves dict values: feed it key names as values and read back where each one lands
    ldm = {}
    for key in unet.state_dict():
        module, param = key.rsplit(".", 1)
        ldm[f"model.diffusion_model.{table[module]}.{param}"] = key
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert back == {k: k for k in unet.state_dict()}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_config_inference_real_size(arch):
    """Real-size layouts on meta tensors: writing then reading a single file recovers the published configs."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNET[arch])
        vae = AutoencoderKL(**REAL_VAE)
        tes = [cls(CLIPTextConfig(**REAL_CLIP[name])) for cls, name in REAL_TE[arch]]
    sf = diffusers_to_single_file(arch, unet.state_dict(), unet.config, vae.state_dict(), vae.config,
                                  [t.state_dict() for t in tes], [t.config for t in tes])
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in sf)
    parts = single_file_to_diffusers(sf)
    assert parts.arch == arch

    def plain(value):
        return list(value) if isinstance(value, (tuple, list)) else value

    assert {k: plain(unet.config[k]) for k in parts.unet_config} == parts.unet_config
    assert set(REAL_UNET[arch]) <= set(parts.unet_config)
    assert {k: plain(vae.config[k]) for k in REAL_VAE} == {k: parts.vae_config[k] for k in REAL_VAE}
    assert parts.vae_config["sample_size"] == {"sd1": 512, "sd2": 768, "sdxl": 1024}[arch]
    assert parts.vae_config["scaling_factor"] == (0.13025 if arch == "sdxl" else 0.18215)
    for cfg, (cls, name) in zip(parts.te_configs, REAL_TE[arch]):
        want = dict(REAL_CLIP[name])
        if arch == "sd2":
            want.pop("projection_dim")  # SD2's encoder has no projection: nothing to read it from
        assert {k: cfg[k] for k in want} == want
        assert cfg["architectures"] == [cls.__name__]
    assert set(parts.unet_sd) == set(unet.state_dict())
    assert set(parts.vae_sd) == set(vae.state_dict())
    for te, sd in zip(tes, parts.te_sds):
        assert set(hf_clip_keys_for(sd, te.state_dict())) == set(clip_weights(te))
    # names only (what a key map needs from an A1111 model): any head count, SDXL time-embed width assumed
    ldm_unet = {k.removeprefix("model.diffusion_model."): v for k, v in sf.items() if k.startswith("model.diff")}
    names_cfg = unet_config_from_ldm(ldm_unet, heads=1)
    assert unet_module_map(names_cfg) == unet_module_map(unet.config)
    assert names_cfg.get("addition_time_embed_dim") == (256 if arch == "sdxl" else None)


def test_sdxl_round_trip_is_identity():
    sf, unet, vae, tes = tiny_single_file("sdxl")
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in sf)
    assert "conditioner.embedders.1.model.text_projection" in sf
    assert "model.diffusion_model.label_emb.0.0.weight" in sf
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in sf  # no attention at level 0
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn1.to_q.weight" in sf
    parts = single_file_to_diffusers(sf, "sdxl", unet_head_channels=16, te_head_channels=16, image_size=16)
    assert isinstance(parts, SingleFileParts) and parts.prediction_type == "epsilon"
    assert_same_weights(parts.unet_sd, unet.state_dict())
    assert_same_weights(parts.vae_sd, vae.state_dict())
    for te, sd in zip(tes, parts.te_sds):
        assert_same_weights(hf_clip_keys_for(sd, te.state_dict()), clip_weights(te))
    # the inferred configs build the same models
    for key, value in DIFFUSERS_UNET["sdxl"].items():
        assert parts.unet_config[key] == value, key
    UNet2DConditionModel(**parts.unet_config).load_state_dict(parts.unet_sd, strict=True)
    AutoencoderKL(**parts.vae_config).load_state_dict(parts.vae_sd, strict=True)
    for cfg, sd, (cls, ref) in zip(parts.te_configs, parts.te_sds, TE_SPECS["sdxl"]):
        assert {k: cfg[k] for k in ref} == ref
        model = cls(CLIPTextConfig(**cfg))
        load_clip_strict(model, hf_clip_keys_for(sd, model.state_dict()))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_own_single_file_loader_reads_our_file(arch, tmp_path):
    from diffusers.loaders import single_file_utils
    if not hasattr(single_file_utils, "create_diffusers_clip_model_from_ldm"):
        pytest.skip("diffusers < 0.28: no per-component single-file loading (create_diffusers_clip_model_from_ldm)")
    create_diffusers_clip_model_from_ldm = single_file_utils.create_diffusers_clip_model_from_ldm

    sf, unet, vae, tes = tiny_single_file(arch, seed=10)
    path = tmp_path / f"tiny-{arch}.safetensors"
    save_file(sf, str(path))
    config_dir = tmp_path / "config"
    unet.save_config(config_dir / "unet")
    vae.save_config(config_dir / "vae")
    te_dirs = ["text_encoder", "text_encoder_2"]
    for te, sub in zip(tes, te_dirs):
        config = copy.deepcopy(te.config)
        if arch == "sd2":
            # an SD2 file has no text_projection; diffusers < 0.34 then splits the fused q/k/v by the config's
            # projection_dim, which a CLIPTextModel never uses and which our tiny CLIP_H sets != hidden_size
            config.projection_dim = config.hidden_size
        config.save_pretrained(config_dir / sub)

    loaded = UNet2DConditionModel.from_single_file(str(path), config=str(config_dir), subfolder="unet",
                                                   local_files_only=True)
    assert_same_weights(loaded.state_dict(), unet.state_dict())
    loaded_vae = AutoencoderKL.from_single_file(str(path), config=str(config_dir), subfolder="vae",
                                                local_files_only=True)
    assert_same_weights(loaded_vae.state_dict(), vae.state_dict())
    for te, sub in zip(tes, te_dirs):
        got = create_diffusers_clip_model_from_ldm(type(te), sf, subfolder=sub, config=str(config_dir),
                                                   local_files_only=True)
        assert_same_weights(got.state_dict(), te.state_dict())


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_round_trip_and_sd2_identity_block(arch):
    sf, unet, vae, tes = tiny_single_file(arch, seed=20)
    if arch == "sd2":
        n = CLIP_H["num_hidden_layers"]
        extra = {k: v for k, v in sf.items() if k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.")}
        assert len(extra) == 12 and all(not v.any() for v in extra.values())  # zero block = identity
    parts = single_file_to_diffusers(sf, **HEADS[arch], te_head_channels=16)
    assert parts.arch == arch
    assert parts.prediction_type == ("epsilon" if arch == "sd1" else None)
    assert_same_weights(parts.unet_sd, unet.state_dict())
    assert_same_weights(parts.vae_sd, vae.state_dict())
    assert_same_weights(hf_clip_keys_for(parts.te_sds[0], tes[0].state_dict()), clip_weights(tes[0]))
    assert parts.te_configs[0]["num_hidden_layers"] == TE_SPECS[arch][0][1]["num_hidden_layers"]


def test_single_file_quirks_of_real_checkpoints():
    """.ckpt 'state_dict' wrapper, EMA copies and scheduler buffers, old SD1 text-encoder keys without 'text_model.',
    the position_ids buffer, OpenCLIP logit_scale, and the 'v_pred' marker key."""
    sf, unet, _, tes = tiny_single_file("sd1", seed=40)
    te = "cond_stage_model.transformer."
    old = {k.replace(te + "text_model.", te): v for k, v in sf.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(8)[None]
    old["model_ema.decay"] = torch.tensor(0.999)
    old["alphas_cumprod"] = torch.ones(1000)
    old["v_pred"] = torch.tensor([])
    parts = single_file_to_diffusers({"state_dict": old}, unet_heads=2, te_head_channels=16)
    assert parts.prediction_type == "v_prediction"
    assert_same_weights(parts.unet_sd, unet.state_dict())
    assert_same_weights(hf_clip_keys_for(parts.te_sds[0], tes[0].state_dict()), clip_weights(tes[0]))

    sf2, _, _, tes2 = tiny_single_file("sdxl", seed=41)
    sf2["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    parts2 = single_file_to_diffusers(sf2, unet_head_channels=16, te_head_channels=16)
    assert_same_weights(hf_clip_keys_for(parts2.te_sds[1], tes2[1].state_dict()), clip_weights(tes2[1]))


# ------------------------------------------------------------------------------------------------ 3. OpenCLIP


def _tokens(vocab: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, vocab - 1, (2, length), generator=gen)
    ids[0, 4] = vocab - 1  # end-of-text = the highest id, pooled by argmax in both models
    ids[1, length - 1] = vocab - 1
    return ids


def _openclip_tower(mod, cfg: dict) -> nn.Module:
    tower = mod.TextTransformer(
        context_length=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
        heads=cfg["num_attention_heads"], layers=cfg["num_hidden_layers"],
        mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"], output_dim=cfg["projection_dim"],
        act_layer=nn.GELU, pool_type="argmax",
    )
    return tower.eval()


def _compare_towers(tower: nn.Module, hf: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        ref = tower.forward_intermediates(ids, output_fmt="NLC")
        # penultimate layer (SD2/SDXL read hidden_states[-2]): the output of the second-to-last block
        torch.testing.assert_close(out.hidden_states[-2], ref["text_intermediates"][-2], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.last_hidden_state, tower.ln_final(ref["text_intermediates"][-1]),
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.text_embeds, tower(ids), atol=ATOL, rtol=RTOL)
        assert out.text_embeds.abs().mean() > 1e-2


def test_openclip_text_tower_matches_hf(openclip_transformer):
    cfg = dict(CLIP_H, num_hidden_layers=3)
    ids = _tokens(cfg["vocab_size"], cfg["max_position_embeddings"])

    tower = randomise(_openclip_tower(openclip_transformer, cfg), 12)
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    hf_sd = clip_openclip_to_hf_sd(tower.state_dict(), cfg["num_hidden_layers"])
    load_clip_strict(hf, hf_clip_keys_for(hf_sd, hf.state_dict()))
    _compare_towers(tower, hf, ids)

    randomise(hf, 13)
    tower2 = _openclip_tower(openclip_transformer, cfg)
    tower2.load_state_dict(clip_hf_to_openclip_sd(hf.state_dict(), cfg["num_hidden_layers"]), strict=True)
    _compare_towers(tower2, hf, ids)


def test_openclip_conversion_matches_diffusers_converter(openclip_transformer):
    from diffusers.loaders import single_file_utils
    if not hasattr(single_file_utils, "convert_open_clip_checkpoint"):
        pytest.skip("diffusers < 0.28 has no convert_open_clip_checkpoint(text_model, checkpoint, prefix)")
    convert_open_clip_checkpoint = single_file_utils.convert_open_clip_checkpoint
    cfg = dict(CLIP_H, num_hidden_layers=3)
    tower = randomise(_openclip_tower(openclip_transformer, cfg), 14)
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    prefix = "conditioner.embedders.1.model."
    theirs = convert_open_clip_checkpoint(hf, {prefix + k: v for k, v in tower.state_dict().items()}, prefix=prefix)
    assert_same_weights(clip_openclip_to_hf_sd(tower.state_dict(), 3), theirs)


def test_clip_slots_name_real_openclip_parameters(openclip_transformer):
    cfg = dict(CLIP_H, num_hidden_layers=2)
    tower = _openclip_tower(openclip_transformer, cfg)
    params = dict(tower.named_parameters())
    table = clip_hf_to_openclip(2)
    assert table["text_model.encoder.layers.1.self_attn.k_proj"] == OpenClipSlot(
        "transformer.resblocks.1.attn", "in_proj_weight", 1, bias="in_proj_bias")
    for slot in table.values():
        assert slot.weight_key in params
        assert slot.bias_key is None or slot.bias_key in params
    covered = {s.weight_key for s in table.values()} | {s.bias_key for s in table.values() if s.bias_key}
    assert covered == set(params)
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    assert set(table) == param_owners(hf)


def test_transformers5_clip_module_names():
    """transformers >= 5.6: CLIPTextModel dropped 'text_model.', CLIPTextModelWithProjection keeps it."""
    flat = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    if hasattr(flat, "text_model"):
        # transformers < 5.6 (A1111's 4.30) still nests the modules under 'text_model': that submodule carries
        # exactly the new spelling, so the flat-name handling is exercised on either stack
        flat = flat.text_model
    wrapped = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
    flat_names = [n for n, _ in flat.named_modules() if n]
    wrapped_names = {n for n, _ in wrapped.named_modules() if n}
    assert not any(n.startswith("text_model") for n in flat_names)  # the new spelling
    assert {hf_clip_module_path(n) for n in flat_names} <= wrapped_names
    assert all(hf_clip_module_path(n) == n for n in wrapped_names)  # idempotent, text_projection untouched
    assert hf_clip_module_path(hf_clip_module_path("encoder.layers.0.self_attn.q_proj")) == (
        "text_model.encoder.layers.0.self_attn.q_proj")
    # either spelling converts to the same OpenCLIP tensors
    randomise(flat, 15)
    wrapped.text_model.load_state_dict(flat.state_dict())
    with_proj = clip_hf_to_openclip_sd(wrapped.state_dict(), 2)
    without = clip_hf_to_openclip_sd(flat.state_dict(), 2)
    with_proj.pop("text_projection")
    assert_same_weights(without, with_proj)


# --------------------------------------------------------------------------------------------------- errors


def test_errors_are_model_load_errors():
    sf, unet, _, _ = tiny_single_file("sd1", seed=30)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        single_file_to_diffusers({"foo.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="not the requested sdxl"):
        single_file_to_diffusers(sf, "sdxl", unet_heads=2, te_head_channels=16)
    with pytest.raises(ModelLoadError, match="refiner"):
        single_file_to_diffusers({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                                  "conditioner.embedders.0.model.text_projection": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="not divisible by 3 heads"):
        single_file_to_diffusers(sf, unet_heads=3, te_head_channels=16)
    with pytest.raises(ModelLoadError, match="multiple of 64"):
        single_file_to_diffusers(sf, unet_heads=2)  # tiny width 32 with the real 64-channel CLIP heads
    bad = dict(unet.state_dict(), **{"down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="down_blocks.9"):
        unet_diffusers_to_ldm(bad, unet.config)
    broken = {k: v for k, v in sf.items() if ".output_blocks.3." not in k}
    with pytest.raises(ModelLoadError):
        single_file_to_diffusers(broken, unet_heads=2, te_head_channels=16)
    with pytest.raises(ModelLoadError, match="no LDM/SGM equivalent"):
        unet_module_map(dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))
