"""Run with Forge's Python (tests/webui/test_forge.py): Forge's own module classes (`IntegratedUNet2DConditionModel`,
`IntegratedCLIP` around transformers' CLIP) built in tiny SD1, SD2 and SDXL shapes, as Forge's loader assembles them,
and Forge's own LoRA key maps (its ComfyUI lora collection: `model_lora_keys_unet` / `model_lora_keys_clip`, what its
built-in matches file keys with) against `lora_ext.patch.forge.adapter_for_forge` on the same objects. Forge rejects
tiny checkpoints and this machine cannot run full-size SD2/SDXL ones, so this is where those trees are checked.
Writes OUT/result.json.

    $SD_WEBUI_PYTHON tests/webui/forge_keymap_probe.py OUT
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from forge_inprocess import REPO, forge_argv, probe_main

CLIP = {"clip_l": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, hidden_act="quick_gelu"),
        "clip_h": dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, hidden_act="gelu"),
        "clip_g": dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, hidden_act="gelu")}
UNET = {
    "sd1": dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                context_dim=32, num_heads=2, use_linear_in_transformer=False),
    "sd2": dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                context_dim=48, num_head_channels=16, use_linear_in_transformer=True),
    "sdxl": dict(channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=2, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], context_dim=80,
                 num_head_channels=16, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=96),
}
ENCODERS = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}


def run() -> dict:
    forge_argv()  # Forge's memory manager reads its device flags at import
    sys.path.insert(0, str(REPO))  # lora_ext from this checkout
    import torch
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher.lora import model_lora_keys_clip, model_lora_keys_unet
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.patch.forge import adapter_for_forge

    rows = {}
    for arch, unet_config in UNET.items():
        torch.manual_seed(0)
        unet = IntegratedUNet2DConditionModel(in_channels=4, model_channels=32, out_channels=4,
                                              use_spatial_transformer=True, **unet_config)
        kmodel = torch.nn.Module()  # Forge's KModel as its key map reads it: .diffusion_model, .config
        kmodel.diffusion_model = unet
        kmodel.config = SimpleNamespace(huggingface_repo=f"tiny-{arch}")
        encoders = torch.nn.ModuleDict({
            name: IntegratedCLIP(CLIPTextModel, CLIPTextConfig(vocab_size=64, num_hidden_layers=2,
                                                               max_position_embeddings=8, **CLIP[name]),
                                 add_text_projection=name == "clip_g")
            for name in ENCODERS[arch]})
        model = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=kmodel),
                                                              clip=SimpleNamespace(cond_stage_model=encoders)))
        adapter = adapter_for_forge(model)
        paths = {id(m): f"diffusion_model.{p}" for p, m in unet.named_modules()}
        paths.update({id(m): p for p, m in encoders.named_modules()})
        forge_map = {**model_lora_keys_unet(kmodel, {}), **model_lora_keys_clip(encoders, {})}
        # ComfyUI's map is generated from the config and also names weights the model lacks (a resnet's
        # conv_shortcut where channels do not change, the last level's downsampler): those are left out
        weights = {f"diffusion_model.{k}" for k in unet.state_dict()} | set(encoders.state_dict())
        forge_map = {k: v for k, v in forge_map.items() if v in weights}
        kohya = {k: v for k, v in forge_map.items() if k.startswith(("lora_unet_", "lora_te"))}
        same, differ, missing = 0, [], []
        for key, param in forge_map.items():
            target = adapter.lookup(key)
            if target is None:
                if key in kohya:
                    missing.append((key, param))
                continue
            ours = f"{paths.get(id(target.module), '?')}.{target.weight_attr}"
            if ours == param:
                same += 1
            else:
                differ.append((key, param, ours))
        rows[arch] = {"arch": adapter.arch, "forge_keys": len(forge_map), "kohya_keys": len(kohya), "same": same,
                      "differ": differ[:10], "n_differ": len(differ), "missing": missing[:10],
                      "n_missing": len(missing),
                      "attention_kohya": sum(1 for k in kohya if "attn" in k or "self_attn" in k or "mlp" in k)}
    return {"rows": rows}


if __name__ == "__main__":
    probe_main(run)
