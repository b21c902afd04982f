"""Which base model a LoRA was made for, from tensor shapes with the real models' widths (no real model is built: each
LoRA here has rank 2 and only the few tensors whose widths tell), and the patcher's refusal of a mismatched LoRA.

Widths written out from the published models: cross-attention context 768 (SD1.x, CLIP ViT-L/14), 1024 (SD2.x,
OpenCLIP ViT-H/14), 2048 (SDXL: 768 + 1280, CLIP ViT-L + OpenCLIP ViT-bigG); UNet channels 320/640/1280; SDXL has
transformer depth 2 and 10 in its lower levels (no SD1/SD2 block has more than one transformer layer).
Metadata keys and values as kohya sd-scripts (`ss_base_model_version`, `ss_v2`) and Stability's model spec
(`modelspec.architecture`) write them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from lora_ext.errors import ArchitectureMismatchError
from lora_ext.formats.arch import detect_arch
from lora_ext.formats.network import load_lora, parse_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from tests.lora_factory import assert_bit_identical, snapshot

R = 2  # rank: only the widths matter


def _factors(out_f: int, in_f: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(out_f * 7919 + in_f)
    return torch.randn(R, in_f, generator=g) * 0.01, torch.randn(out_f, R, generator=g) * 0.01


def kohya(name: str, out_f: int, in_f: int, alpha: float = 1.0) -> dict[str, Tensor]:
    down, up = _factors(out_f, in_f)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


def peft(name: str, out_f: int, in_f: int) -> dict[str, Tensor]:
    down, up = _factors(out_f, in_f)
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}


SD1_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # kohya SD1/SD2: diffusers paths
SDXL_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # kohya SDXL: sgm paths, 640 channels
TE_Q = "text_model_encoder_layers_0_self_attn_q_proj"


# --------------------------------------------------------------------------------------------------- from shapes


@pytest.mark.parametrize("sd,arch,why", [
    (kohya(SD1_K, 320, 768), "sd1", "768"),
    (peft("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 320, 768), "sd1", "768"),
    (kohya(SD1_K, 320, 1024), "sd2", "1024"),
    (peft("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k", 320, 1024), "sd2", "1024"),
    (kohya(SDXL_K, 640, 2048), "sdxl", "2048"),
    (peft("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, 2048), "sdxl", "2048"),
    # SDXL second text encoder only (OpenCLIP bigG, 1280 wide): its keys alone say SDXL
    (kohya("lora_te2_" + TE_Q, 1280, 1280), "sdxl", "second text encoder"),
    (peft("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280), "sdxl", "second text encoder"),
    # SDXL structure: a second transformer layer in a block (input_blocks.7 = down_blocks.2, depth 10); attn1 reads
    # 1280 channels, which says nothing about the text encoder
    (kohya("lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q", 1280, 1280), "sdxl", "transformer layer"),
    (peft("unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q", 1280, 1280), "sdxl", "transformer layer"),
    # text-encoder-only LoRAs: CLIP ViT-L (768, SD1 under kohya's single-encoder prefix) vs OpenCLIP ViT-H (1024, SD2)
    (kohya("lora_te_" + TE_Q, 768, 768), "sd1", "768"),
    (kohya("lora_te_" + TE_Q, 1024, 1024), "sd2", "1024"),
    (peft("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 1024, 1024), "sd2", "1024"),
], ids=["sd1-kohya", "sd1-peft", "sd2-kohya", "sd2-peft", "sdxl-kohya-sgm", "sdxl-peft", "sdxl-te2-kohya",
        "sdxl-te2-peft", "sdxl-depth-kohya", "sdxl-depth-peft", "te-only-sd1", "te-only-sd2", "te-only-sd2-peft"])
def test_arch_from_real_widths(sd, arch, why):
    guess = parse_lora(sd, name="x").arch
    assert guess.arch == arch, guess
    assert why in guess.evidence
    assert guess.from_metadata is None


def test_768_wide_first_text_encoder_alone_is_not_conclusive():
    """CLIP ViT-L is SD1.x's encoder AND SDXL's first one: `lora_te1_` / `text_encoder.` keys 768 wide alone decide
    nothing (saying SD1 would refuse a valid SDXL LoRA), unlike kohya's single-encoder `lora_te_`."""
    for sd in (kohya("lora_te1_" + TE_Q, 768, 768),
               peft("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)):
        assert parse_lora(sd, name="x").arch.arch is None


def test_other_algorithms_tell_their_input_width():
    """The width is read from whichever factor meets the input: LoHa `hada_w*_b`, a full `diff`."""
    loha = {"hada_w1_a": (320, R), "hada_w1_b": (R, 1024), "hada_w2_a": (320, R), "hada_w2_b": (R, 1024)}
    assert detect_arch({SD1_K: loha}, None).arch == "sd2"
    assert detect_arch({SDXL_K: {"diff": (640, 2048)}}, None).arch == "sdxl"
    assert detect_arch({SD1_K: {"lora_down.weight": (R, 768), "lora_up.weight": (320, R)}}, None).arch == "sd1"
    # LoHa's second factor alone, and a Tucker LoRA's 1x1 down, also tell the width
    assert detect_arch({SD1_K: {"hada_w2_b": (R, 2048)}}, None).arch == "sdxl"
    assert detect_arch({SD1_K: {"lora_down.weight": (R, 1024, 1, 1)}}, None).arch == "sd2"


def test_shapes_before_structure_before_text_encoder():
    """A file with both cross-attention (SD2, 1024) and a 768-wide `lora_te_` module: the UNet's context width wins."""
    sd = {**kohya(SD1_K, 320, 1024), **kohya("lora_te_" + TE_Q, 768, 768)}
    assert parse_lora(sd, name="x").arch.arch == "sd2"


# -------------------------------------------------------------------------------------------------- from metadata

TINY = kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)  # widths say nothing


@pytest.mark.parametrize("meta,arch", [
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_v2": "True"}, "sd2"),
    ({"ss_v2": "True", "ss_base_model_version": "sd_v2"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
])
def test_metadata_only_evidence(meta, arch):
    guess = parse_lora(TINY, meta, name="x").arch
    assert (guess.arch, guess.from_metadata) == (arch, arch)
    assert "metadata" in guess.evidence


@pytest.mark.parametrize("sd,meta,arch,meta_arch,said", [
    (kohya(SD1_K, 320, 768), {"ss_base_model_version": "sdxl_base_v1-0"}, "sd1", "sdxl", "SDXL"),
    (kohya(SDXL_K, 640, 2048), {"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "sdxl", "sd1", "SD1.x"),
    (kohya("lora_te2_" + TE_Q, 1280, 1280), {"ss_v2": "True"}, "sdxl", "sd2", "SD2.x"),
    (kohya(SD1_K, 320, 1024), {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd2", "sd1", "SD1.x"),
])
def test_shapes_outrank_contradicting_metadata(sd, meta, arch, meta_arch, said):
    guess = parse_lora(sd, meta, name="x").arch
    assert (guess.arch, guess.from_metadata) == (arch, meta_arch)
    assert "metadata" in guess.evidence and said in guess.evidence, guess.evidence  # says why it ignored metadata


def test_agreeing_metadata_is_not_called_a_contradiction():
    guess = parse_lora(kohya(SD1_K, 320, 768), {"ss_base_model_version": "sd_v1"}, name="x").arch
    assert guess.arch == "sd1" and "metadata" not in guess.evidence


@pytest.mark.parametrize("meta", [{}, {"format": "pt"}])
def test_nothing_known_is_none(meta):
    guess = parse_lora(TINY, meta, name="x").arch
    assert guess.arch is None and guess.from_metadata is None and guess.label == "unknown"
    assert detect_arch({}, None).arch is None


# ---------------------------------------------------------------------------------------------- at the patcher


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


def test_sdxl_lora_on_sd15_is_refused_and_reported(sd15, tmp_path):
    """kohya SDXL names and real SDXL widths, no metadata: detected from shapes, refused before any weight changes."""
    sd = {**kohya(SDXL_K, 640, 2048), **kohya("lora_te1_" + TE_Q, 768, 768),
          **kohya("lora_te2_" + TE_Q, 1280, 1280),
          **kohya("lora_unet_output_blocks_2_1_transformer_blocks_5_attn1_to_q", 1280, 1280)}
    path = tmp_path / "my_sdxl_style.safetensors"
    save_file(sd, str(path))
    net = load_lora(path)
    assert net.arch.arch == "sdxl" and net.metadata == {}
    original = snapshot(sd15)
    patcher = Patcher(adapter_for_pipeline(sd15))
    with pytest.raises(ArchitectureMismatchError) as err:
        patcher.apply([ActiveLora(net)])
    msg = str(err.value)
    assert "SDXL" in msg and "SD1.x" in msg and "my_sdxl_style" in msg
    assert (err.value.lora_arch, err.value.model_arch) == ("SDXL", "SD1.x")
    assert_bit_identical(original, snapshot(sd15))
    assert patcher.is_pristine

    report = patcher.check([ActiveLora(net)])  # the same verdict, as data
    rep = report.networks[0]
    assert rep.error is not None and "SDXL" in rep.error and "SD1.x" in rep.error and "my_sdxl_style" in rep.error
    assert rep.lora_arch == "sdxl" and rep.modules_applied == 0 and report.errors
    assert_bit_identical(original, snapshot(sd15))

    rep = patcher.apply([ActiveLora(net)], skip_bad=True).networks[0]  # skipped, said why, nothing written
    assert rep.error and "SDXL" in rep.error
    assert_bit_identical(original, snapshot(sd15))
