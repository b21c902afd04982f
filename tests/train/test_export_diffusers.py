"""Oracle: an exported training result loads in diffusers (`load_lora_weights` + `fuse_lora`) with every module
applied, and diffusers' fused weights equal our Patcher's (SD1 and SDXL, UNet incl. LoCon convs + text encoders)."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_ext.formats.network import load_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.train.export import build_metadata, export_lora
from lora_ext.train.network import LoraTrainingNetwork
from tests.stack import require_diffusers_lora_loader

COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def _tiny(arch: str):
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch, seed=0)


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for attr in COMPONENTS.values():
        module = getattr(pipe, attr, None)
        if module is not None:
            out[attr] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return out


def _changed(a, b) -> set[str]:
    return {f"{c}:{k}" for c in a for k in a[c] if not torch.equal(a[c][k], b[c][k])}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_loads_exported_lora_like_our_patcher(tmp_path, arch):
    require_diffusers_lora_loader()
    pipe = _tiny(arch)
    original = _weights(pipe)
    net = LoraTrainingNetwork(pipe, rank=4, alpha=2, targets="attn_mlp_conv", conv_rank=2, conv_alpha=1,
                              train_text_encoder=True, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras.values():
            lora.lora_up.copy_(torch.randn(lora.lora_up.shape, generator=g) * 0.05)
    # the weight each LoRA module must change: "<component attr>:<parameter name>"
    names = {}
    for attr in COMPONENTS.values():
        module = getattr(pipe, attr, None)
        if module is not None:
            names.update({id(p): f"{attr}:{n}" for n, p in module.named_parameters()})
    expected = {names[id(lora.target.module.weight)] for lora in net.loras.values()}
    meta = build_metadata({"output_name": "oracle"}, None, net.arch)
    path = export_lora(net, tmp_path / "oracle.safetensors", metadata=meta)  # fp16, as shipped
    net.remove()

    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="oracle")
    ref.fuse_lora(lora_scale=0.7, adapter_names=["oracle"])
    ref.unload_lora_weights()
    theirs = _weights(ref)

    patcher = Patcher(adapter_for_pipeline(pipe))
    rep = patcher.apply([ActiveLora(load_lora(path), te=0.7, unet=0.7)]).networks[0]
    assert rep.ok and rep.modules_applied == len(expected)
    ours = _weights(pipe)
    patcher.restore()

    # diffusers applied every module of the file (no key left behind) and nothing else
    assert _changed(original, theirs) == expected == _changed(original, ours)
    assert any(k.startswith("text_encoder:") for k in expected)
    assert any(".resnets." in k and k.endswith("conv1.weight") for k in expected)
    for key in expected:
        comp, k = key.split(":", 1)
        err = (ours[comp][k] - theirs[comp][k]).abs().max().item()
        assert err <= 1e-6 * theirs[comp][k].abs().max().item(), key
