"""lora_ext.patch.targets: the layer-selection presets in one place. Counts on the tiny models against hand counts of
kohya's rules, and the synthetic files (patch/synth.py) select exactly the layers training trains for each preset."""

from __future__ import annotations

import pytest

from lora_ext.patch import adapter_for_pipeline
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import PRESETS, file_module_name, selector
from lora_ext.train.network import LoraTrainingNetwork


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", seed=0)


# Hand counts (tiny models keep the real block structure: 2 resnets per down level, 3 per up level, SDXL's transformer
# depths 1/2/10; 2 text-encoder layers):
# SD1.5: 16 transformers (down 3 levels x 2, mid 1, up 3 x 3); "cross_kv" 2 projections each, "attn" 8, "attn_mlp" 12
#   (+ ff.net.0.proj, ff.net.2, proj_in, proj_out); resnets: 22 (down 8, mid 2, up 12), each conv1/conv2/time_emb_proj,
#   conv_shortcut where the width changes (down 2, every up resnet 12), 3 downsamplers, 3 upsamplers:
#   22*3 + 14 + 6 = 86.
# SDXL: 11 Transformer2DModels (down level 1 x 2 of depth 2, level 2 x 2 of depth 10, mid 1 of depth 10, up block 0
#   x 3 of depth 10, up block 1 x 3 of depth 2) = 70 transformer blocks: "attn" 70*8, "attn_mlp" 70*10 + 11*2
#   (proj_in/proj_out); resnets: 17 (down 6, mid 2, up 9), conv_shortcut: down 2 + up 9, 2 downsamplers, 2 upsamplers:
#   17*3 + 11 + 4 = 66. "cross_kv": 2 per transformer block. Text encoders: 6 per layer.
EXPECTED = {
    "sd15": {"cross_kv": 16 * 2, "attn": 16 * 8, "attn_mlp": 16 * 12, "attn_mlp_conv": 16 * 12 + 86, "te": 2 * 6},
    "sdxl": {"cross_kv": 70 * 2, "attn": 70 * 8, "attn_mlp": 70 * 10 + 22, "attn_mlp_conv": 70 * 10 + 22 + 66,
             "te": 2 * 2 * 6},
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_counts(request, arch, preset):
    adapter = adapter_for_pipeline(request.getfixturevalue(arch))
    unet_only = [t for t in adapter.targets.values() if selector(preset, text_encoder=False)(t)]
    with_te = [t for t in adapter.targets.values() if selector(preset)(t)]
    assert len(unet_only) == EXPECTED[arch][preset]
    assert len(with_te) - len(unet_only) == EXPECTED[arch]["te"]
    assert {t.component for t in unet_only} == {"unet"}
    paths = [t.key for t in unet_only]
    # kohya's LoCon rule leaves conv_in, conv_out and the time/add embeddings out
    assert not any(p.startswith(("unet:conv_in", "unet:conv_out", "unet:time_embedding", "unet:add_embedding"))
                   for p in paths)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", PRESETS)
def test_synth_and_training_select_the_same_modules(request, arch, preset):
    pipe = request.getfixturevalue(arch)
    adapter = adapter_for_pipeline(pipe)
    tensors = make_lora_tensors(adapter, SynthSpec("lora", rank=2), selector(preset))
    synth_names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    net = LoraTrainingNetwork(pipe, rank=2, targets=preset, train_text_encoder=True)
    try:
        assert set(net.loras) == synth_names
    finally:
        net.remove()


def test_file_module_names(sd15, sdxl):
    a1, ax = adapter_for_pipeline(sd15), adapter_for_pipeline(sdxl)
    t1 = a1.targets["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert file_module_name(a1, t1, "kohya") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert file_module_name(a1, t1, "kohya-compvis") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert file_module_name(a1, t1, "peft") == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tx = ax.targets["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert file_module_name(ax, tx, "kohya") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    with pytest.raises(ValueError, match="kohya, kohya-compvis, peft"):
        file_module_name(a1, t1, "lycoris")


def test_unknown_preset():
    with pytest.raises(ValueError, match="cross_kv, attn, attn_mlp, attn_mlp_conv"):
        selector("all")
