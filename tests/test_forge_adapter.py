"""Forge's module trees (`lora_ext.patch.forge`), without Forge: a tree shaped as Forge holds it (compvis UNet whose
linear layers are Forge-style `Linear` modules that are not `nn.Linear`, weights loaded as inference tensors under
`torch.inference_mode()` as Forge loads them; transformers CLIP under `clip_l`) gets the same key map as A1111's tree
of the same weights, every module of a LoRA file applies, the merged weights equal those on A1111's tree, and restore
is bit-exact on inference tensors. The real Forge: tests/webui/test_forge.py and the issue's notes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from lora_ext.formats.network import parse_lora
from lora_ext.models.convert import unet_diffusers_to_ldm
from lora_ext.patch import ActiveLora, Patcher
from lora_ext.patch.forge import adapter_for_forge
from lora_ext.patch.keymap import is_linear
from lora_ext.patch.ldm import adapter_for_ldm
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import selector
from tests.test_layouts_convert import CLIP_L, LDM_UNET, ldm_unet_cls, randomise, tiny_unet  # noqa: F401


class Linear(nn.Module):
    """The shape of Forge's `backend.operations.ForgeOperations.Linear` (a plain module, not `nn.Linear`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class IntegratedCLIP(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


def _forge_linears(root: nn.Module) -> int:
    """Replace every nn.Linear below `root` by a Forge-style Linear holding inference-tensor parameters."""
    swapped = 0
    for _, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                new = Linear(child.in_features, child.out_features)
                with torch.inference_mode():
                    new.weight = nn.Parameter(child.weight.detach().clone(), requires_grad=False)
                    new.bias = (nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                                if child.bias is not None else None)
                setattr(module, child_name, new)
                swapped += 1
    return swapped


def _trees(ldm_unet_cls):  # noqa: F811
    unet = tiny_unet("sd1", seed=1)
    sd = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    a_unet, f_unet = ldm_unet_cls(**LDM_UNET["sd1"]), ldm_unet_cls(**LDM_UNET["sd1"])
    a_unet.load_state_dict(sd, strict=True)
    f_unet.load_state_dict(sd, strict=True)
    te = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 2)
    f_te = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 2)
    f_te.load_state_dict(te.state_dict())
    assert _forge_linears(f_unet) > 10
    a1111 = SimpleNamespace(model=SimpleNamespace(diffusion_model=a_unet),
                            cond_stage_model=SimpleNamespace(wrapped=SimpleNamespace(transformer=te)))
    encoders = nn.ModuleDict({"clip_l": IntegratedCLIP(f_te)})
    forge = SimpleNamespace(forge_objects=SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=f_unet)),
        clip=SimpleNamespace(cond_stage_model=encoders)))
    return a1111, forge


def test_forge_linear_is_a_linear_layer():
    layer = Linear(4, 3)
    layer.weight = nn.Parameter(torch.zeros(3, 4))
    assert is_linear(layer) and is_linear(nn.Linear(4, 3))
    layer.weight = nn.Parameter(torch.zeros(4, 3))  # a weight of other shape: not a linear layer we know
    assert not is_linear(layer)


def test_forge_tree_maps_like_a1111_and_patches_the_same_weights(ldm_unet_cls):  # noqa: F811
    a1111, forge = _trees(ldm_unet_cls)
    a_adapter, f_adapter = adapter_for_ldm(a1111), adapter_for_forge(forge)
    assert f_adapter.arch == a_adapter.arch == "sd1"
    assert set(f_adapter.targets) == set(a_adapter.targets)
    assert f_adapter.aliases == a_adapter.aliases
    net = parse_lora(make_lora_tensors(a_adapter, SynthSpec(rank=4), select=selector("attn_mlp"), seed=5), name="f")
    f_unet = forge.forge_objects.unet.model.diffusion_model
    before = {k: v.clone() for k, v in f_unet.state_dict().items()}
    reports = []
    for tree, adapter in ((a1111, a_adapter), (forge, f_adapter)):
        patcher = Patcher(adapter)
        reports.append(patcher.apply([ActiveLora(net, te=0.7, unet=0.9)]))
        tree.patcher = patcher
    for rep in reports:
        assert rep.networks[0].modules_applied == len(net.modules) and not rep.networks[0].unmatched
    a_sd = a1111.model.diffusion_model.state_dict()
    f_sd = f_unet.state_dict()
    assert a_sd.keys() == f_sd.keys()
    for key in a_sd:
        torch.testing.assert_close(f_sd[key], a_sd[key], rtol=0, atol=0)
    assert any(not torch.equal(f_sd[k], before[k]) for k in before)
    q = f_unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_q")
    assert type(q) is Linear and q.weight.is_inference()
    forge.patcher.restore()
    after = f_unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-exact on inference tensors


def test_quantized_forge_unet_is_refused_with_what_to_do(ldm_unet_cls):  # noqa: F811
    """Forge's nf4/fp4/gguf UNets hold packed integer weights: no merge, and their shapes are not the layers' shapes.
    The session says so (and how to let Forge's built-in apply the tag) instead of failing on shapes."""
    from lora_ext.session import LoraSession

    _, forge = _trees(ldm_unet_cls)
    forge.forge_objects.unet.model.storage_dtype = "nf4"
    with pytest.raises(ValueError, match="quantized \\(nf4\\).*Forge's built-in Lora"):
        adapter_for_forge(forge)
    session = LoraSession(adapter_for_forge, resolver=None)
    act = session.activate(forge, [])
    assert len(act.problems) == 1 and "this model is not supported" in act.problems[0] and "nf4" in act.problems[0]
    forge.forge_objects.unet.model.storage_dtype = torch.float8_e4m3fn  # a float dtype: adapted (bypass layers)
    assert adapter_for_forge(forge).arch == "sd1"
