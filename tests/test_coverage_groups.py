"""One grouping of coverage: a file's module names (`key_group`) fall in the same groups as the model layers they name
(`target_group`: "te1", "te2", "unet:IN00".."unet:OUT11", "unet:M00", "unet:BASE"), with the A1111 block numbers of
formats/layouts.py's own diffusers <-> LDM table."""

from __future__ import annotations

import pytest

from lora_ext import families
from lora_ext.formats.layouts import diffusers_unet_block, ldm_unet_block, unet_module_map
from lora_ext.models import assets
from lora_ext.patch import adapter_for_pipeline
from lora_ext.patch.report import GROUPS, NetworkReport, group_order, key_group, target_group


@pytest.mark.parametrize("config", families.CONFIG_NAMES)  # every shipped config: a new family is checked too
def test_diffusers_block_labels_follow_the_layout_table(config):
    table = unet_module_map(assets.load_config(config, "unet"))
    for dpath, lpath in table.items():
        assert diffusers_unet_block(dpath) == ldm_unet_block(lpath), (dpath, lpath)
        assert diffusers_unet_block(dpath.replace(".", "_")) == ldm_unet_block(lpath), dpath


# kohya sd-scripts' SD1/SD2 names (diffusers paths, underscored)
KOHYA_SD1 = {
    "lora_unet_conv_in": "unet:IN00",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet:IN01",
    "lora_unet_down_blocks_0_attentions_1_proj_in": "unet:IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "unet:IN03",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "unet:IN04",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "unet:IN09",
    "lora_unet_down_blocks_3_resnets_1_conv2": "unet:IN11",
    "lora_unet_mid_block_attentions_0_proj_out": "unet:M00",
    "lora_unet_mid_block_resnets_1_time_emb_proj": "unet:M00",
    "lora_unet_up_blocks_0_resnets_2_conv1": "unet:OUT02",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "unet:OUT02",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": "unet:OUT03",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "unet:OUT05",
    "lora_unet_up_blocks_3_attentions_2_proj_out": "unet:OUT11",
    "lora_unet_conv_out": "unet:BASE",
    "lora_unet_time_embedding_linear_1": "unet:BASE",
    "lora_te_text_model_encoder_layers_11_mlp_fc2": "te1",
}
# kohya sd-scripts' SDXL names (compvis/sgm paths) and A1111/LyCORIS compvis names
KOHYA_COMPVIS_SDXL = {
    "lora_unet_input_blocks_0_0": "unet:IN00",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": "unet:IN04",
    "lora_unet_input_blocks_8_1_proj_in": "unet:IN08",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": "unet:M00",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0": "unet:OUT00",
    "lora_unet_output_blocks_5_2_conv": "unet:OUT05",
    "lora_unet_output_blocks_8_0_skip_connection": "unet:OUT08",
    "lora_unet_label_emb_0_0": "unet:BASE",
    "lora_unet_time_embed_2": "unet:BASE",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "te1",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": "te2",
    "lycoris_input_blocks_7_1_proj_out": "unet:IN07",
}
# diffusers / PEFT names
PEFT = {
    "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v": "unet:IN08",
    "unet.up_blocks.2.resnets.0.conv_shortcut": "unet:OUT06",
    "unet.up_blocks.2.upsamplers.0.conv": "unet:OUT08",
    "unet.mid_block.resnets.1.conv2": "unet:M00",
    "unet.add_embedding.linear_2": "unet:BASE",
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": "te1",
    "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": "te2",
    "text_model.encoder.layers.3.mlp.fc1": "te1",  # a PEFT adapter of the text encoder alone
    "down_blocks.1.attentions.0.proj_in": "unet:IN04",  # bare diffusers path
    "emb_params": "other",
    "bundle_emb.sks.string_to_param.*": "other",
}


@pytest.mark.parametrize(("name", "group"), [*KOHYA_SD1.items(), *KOHYA_COMPVIS_SDXL.items(), *PEFT.items()])
def test_key_group_of_real_module_names(name, group):
    assert key_group(name) == group
    assert group in GROUPS


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def adapter(request):
    from lora_ext.models.tiny import build_tiny_pipeline

    return adapter_for_pipeline(build_tiny_pipeline(request.param, seed=0))


def test_every_name_of_a_layer_groups_with_the_layer(adapter):
    wrong = {}
    for name, key in adapter.aliases.items():
        t = adapter.targets[key]
        if key_group(name) != target_group(t.component, t.block):
            wrong[name] = (key_group(name), target_group(t.component, t.block))
    assert wrong == {}
    groups = {target_group(t.component, t.block) for t in adapter.targets.values()}
    assert groups <= set(GROUPS) and "unet:M00" in groups and "unet:BASE" in groups


def test_report_groups_in_order():
    rep = NetworkReport("x", None, "sd1", "", 4, unmatched=[
        "lora_unet_up_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_input_blocks_10_0_emb_layers_1", "lora_unet_down_blocks_3_resnets_1_conv1"])
    assert rep.unmatched_by_group == {"unet:OUT00": 1, "te1": 1, "unet:IN10": 1, "unet:IN11": 1}
    assert "(te1: 1, unet:IN10: 1, unet:IN11: 1, unet:OUT00: 1;" in rep.summary()
    assert sorted(["other", "unet:BASE", "unet:OUT11", "unet:M00", "unet:IN02", "te2", "te1"], key=group_order) == [
        "te1", "te2", "unet:IN02", "unet:M00", "unet:OUT11", "unet:BASE", "other"]
