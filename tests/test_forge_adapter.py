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

from lora_ext.errors import ModelLoadError
from lora_ext.formats.network import parse_lora
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.models.convert import unet_diffusers_to_ldm
from lora_ext.patch import ActiveLora, Patcher
from lora_ext.patch.forge import adapter_for_forge
from lora_ext.patch.keymap import is_linear
from lora_ext.patch.ldm import adapter_for_ldm
from lora_ext.patch.quant import dequantize, logical_shape, quantized
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import selector
from lora_ext.prompt import parse_tag
from lora_ext.session import LoraSession
from tests.test_layouts_convert import CLIP_L, LDM_UNET, ldm_unet_cls, randomise, tiny_unet  # noqa: F401
from tests.test_session import DictResolver


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


class Q8_0:
    """A GGUF block format as Forge's `ParameterGGUF.gguf_cls` offers it, dequantizing with llama.cpp's own gguf-py
    (the reference implementation of the format, not Forge's or ours)."""

    baked_calls = 0

    @classmethod
    def bake(cls, parameter) -> None:
        cls.baked_calls += 1
        parameter.baked = True

    @classmethod
    def dequantize_pytorch(cls, parameter) -> torch.Tensor:
        gguf = pytest.importorskip("gguf")
        out = gguf.quants.dequantize(parameter.data.numpy(), gguf.GGMLQuantizationType.Q8_0)
        return torch.from_numpy(out).reshape(parameter.real_shape)


class GGUFWeight(nn.Parameter):
    """Forge's ParameterGGUF as lora_ext sees it: packed Q8_0 blocks as data, `gguf_cls`, and the real shape as
    `.shape`."""

    def __new__(cls, packed: torch.Tensor, shape: torch.Size, gguf_cls: type | None = Q8_0) -> GGUFWeight:
        param = super().__new__(cls, packed, requires_grad=False)
        param.real_shape, param.gguf_cls, param.baked = torch.Size(shape), gguf_cls, False
        return param

    @property
    def shape(self) -> torch.Size:
        return self.real_shape


class GGUFLinear(nn.Module):
    """Forge's `ForgeOperationsGGUF.Linear`: no in/out features, a GGUF weight dequantized in forward."""

    def __init__(self, weight: GGUFWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = getattr(self.weight, "gguf_cls", None)
        if cls is None and self.weight.dtype != x.dtype:
            # as Forge does with a GGUF weight stored as F16/F32: replaced by a plain Parameter in x's dtype, once
            self.weight = nn.Parameter(self.weight.data.to(x.dtype), requires_grad=False)
        weight = self.weight if cls is None else cls.dequantize_pytorch(self.weight)
        return F.linear(x, weight.to(x.dtype), self.bias)


GGUFLinear.__name__ = "Linear"


def _quantize(root: nn.Module, kind: str) -> tuple[int, dict[str, torch.Tensor]]:
    """Replace root's Forge-style linear layers of the transformer blocks by quantized ones (GGUF Q8_0 packed with
    gguf-py, or bitsandbytes' NF4 `Linear4bit`); returns their count and each one's dequantized weight (what the layer
    computes with), by module path."""
    gguf = pytest.importorskip("gguf")
    count, dequantized = 0, {}
    for path, module in list(root.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is not Linear or ".transformer_blocks." not in f"{path}.{name}":
                continue
            w = child.weight.detach().float()
            if kind == "gguf" and ".ff." in f"{path}.{name}":  # kept in F16 in the GGUF file, as small layers often are
                new = GGUFLinear(GGUFWeight(w.half(), w.shape, gguf_cls=None), child.bias)
                deq = w.half().float()
            elif kind == "gguf":
                packed = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
                new = GGUFLinear(GGUFWeight(torch.from_numpy(packed), w.shape), child.bias)
                deq = Q8_0.dequantize_pytorch(new.weight)
            else:
                bnb = pytest.importorskip("bitsandbytes")
                new = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=child.bias is not None, quant_type="nf4",
                                        compute_dtype=torch.float32)
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                new = new.to("cpu")  # bitsandbytes packs the weight when it is moved to its device
                deq = bnb.functional.dequantize_4bit(new.weight.data, new.weight.quant_state).float()
            setattr(module, name, new)
            dequantized[f"{path}.{name}"] = deq
            count += 1
    return count, dequantized


@pytest.mark.parametrize("kind", ["gguf", "bnb4"])
@pytest.mark.parametrize("dora", [False, True])
def test_quantized_forge_unet_takes_loras_as_bypass(ldm_unet_cls, kind, dora, tmp_path):  # noqa: F811
    """Forge's GGUF and NF4 UNets: their packed linear weights cannot take a merge, so the session applies LoRAs
    to them as bypass (the layers' own dequantizing forward plus the LoRA path) and merges the rest. The UNet's
    output equals that of the same UNet with float weights equal to the dequantized ones and the LoRA merged in
    float (the reference a merge-capable host computes); the packed weights are never written; restore is exact.
    The LoRA is applied before the UNet's first forward, where Forge replaces a GGUF file's F16 weights by fp32
    Parameters (the FF layers here): bypass there too, so nothing of the LoRA stays in the replaced weights."""
    _, forge = _trees(ldm_unet_cls)
    _, reference = _trees(ldm_unet_cls)
    _, untouched = _trees(ldm_unet_cls)
    f_unet = forge.forge_objects.unet.model.diffusion_model
    r_unet = reference.forge_objects.unet.model.diffusion_model
    u_unet = untouched.forge_objects.unet.model.diffusion_model
    count, dequantized = _quantize(f_unet, kind)
    assert count > 10 and _quantize(u_unet, kind)[0] == count
    for path, weight in dequantized.items():  # the reference computes with exactly the dequantized values
        r_unet.get_submodule(path).weight = nn.Parameter(weight.clone(), requires_grad=False)
    packed = {k: v.detach().clone() for k, v in f_unet.state_dict().items()}

    adapter = adapter_for_forge(forge)
    assert set(adapter.targets) == set(adapter_for_forge(reference).targets)  # every quantized layer is a target
    tensors = make_lora_tensors(adapter, SynthSpec(rank=4, dora=dora), select=selector("attn_mlp_conv"), seed=7)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = u_unet(x, t, context=ctx)  # the same quantized UNet; f_unet runs its first forward with the LoRA
    path = tmp_path / "q.safetensors"
    save_safetensors_atomic(tensors, path)
    session = LoraSession(adapter_for_forge, DictResolver({"q": path}))
    act = session.activate(forge, [parse_tag("<lora:q:0.8>")])
    assert not act.problems, act.problems
    assert any(f"{count} layers hold quantized (GGUF or 4-bit) weights" in note for note in act.notes), act.notes
    rep = act.report.networks[0]
    assert rep.modules_applied == len(tensors_modules(tensors)) and not rep.unmatched
    with torch.no_grad():
        ours = f_unet(x, t, context=ctx)
    assert all(torch.equal(v, packed[k]) for k, v in f_unet.state_dict().items() if k in packed and "transformer_"
               in k and v.dtype == torch.uint8)  # packed weights never written

    r_patcher = Patcher(adapter_for_forge(reference))
    r_patcher.apply([ActiveLora(parse_lora(tensors, name="q"), te=0.8, unet=0.8)])
    with torch.no_grad():
        expected = r_unet(x, t, context=ctx)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the LoRA changes the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)

    session.activate(forge, [])
    after = f_unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in packed.items())
    with torch.no_grad():
        assert torch.equal(f_unet(x, t, context=ctx), plain)


def tensors_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors}


def test_patcher_refuses_to_merge_into_a_quantized_weight(ldm_unet_cls):  # noqa: F811
    """Without a divert (a caller that does not route quantized layers to bypass), the patcher raises a typed error
    naming the layer instead of writing into packed data, and leaves every weight as it was."""
    _, forge = _trees(ldm_unet_cls)
    f_unet = forge.forge_objects.unet.model.diffusion_model
    _quantize(f_unet, "gguf")
    adapter = adapter_for_forge(forge)
    net = parse_lora(make_lora_tensors(adapter, SynthSpec(rank=4), select=selector("attn_mlp_conv"), seed=7),
                     name="q")
    before = {k: v.detach().clone() for k, v in f_unet.state_dict().items()}
    with pytest.raises(ModelLoadError, match=r"unet:.*stores its weight quantized \(gguf\).*bypass"):
        Patcher(adapter).apply([ActiveLora(net)])
    assert all(torch.equal(v, before[k]) for k, v in f_unet.state_dict().items())


def test_quantized_layer_helpers():
    """`lora_ext.patch.quant` reads the logical shape and dequantizes the two packed kinds (against their own
    libraries' dequantizers); a float tensor is neither."""
    gguf = pytest.importorskip("gguf")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    g = GGUFWeight(torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)), w.shape)
    assert quantized(g) == "gguf" and logical_shape(g) == (8, 64) and tuple(g.data.shape) == (8, 68)
    calls = Q8_0.baked_calls
    out = dequantize(g, torch.float16)
    assert Q8_0.baked_calls == calls + 1 and g.baked  # baked once, as Forge does before its first forward
    ref = gguf.quants.dequantize(g.data.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert out.dtype == torch.float16 and torch.equal(out, torch.from_numpy(ref).half())
    dequantize(g, torch.float32)
    assert Q8_0.baked_calls == calls + 1
    assert quantized(w) is None and logical_shape(w) == (8, 64)
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
    assert quantized(p) == "bnb4" and logical_shape(p) == (8, 64) and tuple(p.shape) != (8, 64)
    torch.testing.assert_close(dequantize(p, torch.float32), bnb.functional.dequantize_4bit(p.data, p.quant_state),
                               rtol=0, atol=0)
