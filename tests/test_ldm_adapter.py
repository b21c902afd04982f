"""Key maps for A1111's module trees: the real ldm UNetModel (SD1/SD2), transformers CLIP (FrozenCLIPEmbedder), the
real OpenCLIP text tower (SD2 and SDXL's second encoder, q/k/v fused in nn.MultiheadAttention) and the SDXL compvis
layout. The same LoRA patched into the diffusers tree and into the original tree must give the same weights once the
original tree is converted back (conversion itself is checked against ldm/OpenCLIP/diffusers in
test_layouts_convert.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_ext.formats.layouts import unet_module_map
from lora_ext.formats.network import parse_lora
from lora_ext.models.convert import (
    clip_hf_to_openclip_sd,
    clip_openclip_to_hf_sd,
    hf_clip_keys_for,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.patch.ldm import adapter_for_ldm
from lora_ext.patch.report import key_group, target_group
from tests.lora_factory import make_entries, to_state_dict
from tests.test_layouts_convert import (  # noqa: F401  (fixtures)
    CLIP_H,
    CLIP_L,
    LDM_UNET,
    _openclip_tower,
    clip_weights,
    ldm_unet_cls,
    load_clip_strict,
    openclip_transformer,
    randomise,
    tiny_unet,
)


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_close(a: dict, b: dict, what: str, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{what}:{k}: {m}")


def _skeleton(sd: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with the given state dict's names and shapes (Linear/Conv2d/LayerNorm), for layouts whose real
    classes are not installable (sgm's SDXL UNet)."""
    root = nn.Module()
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        mod, _, param = key.rpartition(".")
        owners.setdefault(mod, {})[param] = t
    for path, params in owners.items():
        w = params["weight"]
        if w.dim() == 4:
            m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias="bias" in params)
        elif w.dim() == 2:
            m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
        else:
            m = nn.LayerNorm(w.shape[0])
        m.load_state_dict(params)
        parent = root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], m)
    return root


def _ldm_model(unet: nn.Module, cond_stage: object | None = None, conditioner: object | None = None):
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    if conditioner is not None:
        model.conditioner = conditioner
    else:
        model.cond_stage_model = cond_stage
    return model


def _lora(pipe, seed: int, style: str, sdxl: bool = False) -> tuple[list, object]:
    entries = make_entries(pipe, "lora", rank=3, alpha=2.0, seed=seed)
    compvis = unet_module_map(dict(pipe.unet.config)) if style == "compvis" else None
    return entries, parse_lora(to_state_dict(entries, style, sdxl=sdxl, unet_compvis=compvis), name="ldm")


@pytest.mark.parametrize("style", ["kohya", "compvis"])
def test_sd1_ldm_tree_matches_diffusers_tree(ldm_unet_cls, style):  # noqa: F811
    unet = tiny_unet("sd1", seed=1)
    te = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 2)
    ldm_unet = ldm_unet_cls(**LDM_UNET["sd1"])
    ldm_unet.load_state_dict(unet_diffusers_to_ldm(unet.state_dict(), unet.config), strict=True)
    ldm_te = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 99)
    ldm_te.load_state_dict(te.state_dict())
    # A1111 wraps FrozenCLIPEmbedder in its prompt hijack: cond_stage_model.wrapped.transformer
    model = _ldm_model(ldm_unet, cond_stage=SimpleNamespace(wrapped=SimpleNamespace(transformer=ldm_te)))
    pipe = SimpleNamespace(unet=unet, text_encoder=te)
    entries, net = _lora(pipe, seed=3, style=style)

    ldm_adapter = adapter_for_ldm(model)
    assert ldm_adapter.arch == "sd1"
    original_ldm = _sd(ldm_unet)
    p_ldm = Patcher(ldm_adapter)
    rep = p_ldm.apply([ActiveLora(net, te=0.9, unet=0.6)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched, rep.summary()
    p_diff = Patcher(adapter_for_pipeline(pipe))
    p_diff.apply([ActiveLora(net, te=0.9, unet=0.6)])

    _assert_close(unet_ldm_to_diffusers(_sd(ldm_unet), unet.config), _sd(unet), "unet")
    _assert_close(_sd(ldm_te), _sd(te), "te")
    assert any(not torch.equal(v, original_ldm[k]) for k, v in _sd(ldm_unet).items())
    p_ldm.restore()
    for k, v in _sd(ldm_unet).items():
        assert torch.equal(v, original_ldm[k]), k


def test_sd2_openclip_fused_qkv(openclip_transformer):  # noqa: F811
    """SD2's text encoder in A1111 is OpenCLIP: q/k/v LoRAs land in thirds of in_proj_weight; fc1/fc2 in c_fc/c_proj."""
    cfg = dict(CLIP_H, num_hidden_layers=2)
    hf = randomise(CLIPTextModel(CLIPTextConfig(**cfg)), 5)
    tower = _openclip_tower(openclip_transformer, cfg)
    oc_sd = clip_hf_to_openclip_sd(hf.state_dict(), cfg["num_hidden_layers"])
    tower.load_state_dict({**tower.state_dict(), **oc_sd}, strict=True)
    original = _sd(tower)

    from diffusers import UNet2DConditionModel

    from tests.test_layouts_convert import DIFFUSERS_UNET

    unet = randomise(UNet2DConditionModel(**DIFFUSERS_UNET["sd2"]), 6)
    pipe = SimpleNamespace(unet=unet, text_encoder=hf)
    entries = make_entries(pipe, "lora", rank=3, alpha=2.0, seed=7, components=("te1",))
    net = parse_lora(to_state_dict(entries, "kohya"), name="sd2te")
    model = _ldm_model(_skeleton(unet_diffusers_to_ldm(unet.state_dict(), unet.config)),
                       cond_stage=SimpleNamespace(wrapped=SimpleNamespace(model=tower)))
    adapter = adapter_for_ldm(model)
    assert adapter.arch == "sd2"
    q = adapter.lookup("lora_te_text_model_encoder_layers_1_self_attn_k_proj")
    assert (q.weight_attr, q.chunk, q.bias_attr) == ("in_proj_weight", 1, "in_proj_bias")

    p = Patcher(adapter)
    rep = p.apply([ActiveLora(net, te=0.8)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched
    Patcher(adapter_for_pipeline(pipe)).apply([ActiveLora(net, te=0.8)])
    back = clip_openclip_to_hf_sd(_sd(tower), cfg["num_hidden_layers"], with_projection=False)
    _assert_close(hf_clip_keys_for(back, hf.state_dict()), clip_weights(hf), "openclip vs hf", atol=2e-6)
    p.restore()
    for k, v in _sd(tower).items():
        assert torch.equal(v, original[k]), k


def test_sdxl_compvis_tree_with_openclip_te2(openclip_transformer):  # noqa: F811
    """SDXL in A1111: sgm UNet (compvis names; a skeleton with the converter's names stands in for sgm, which is not
    installable), conditioner.embedders[0].transformer (CLIP) and [1].model (OpenCLIP with text_projection)."""
    unet = tiny_unet("sdxl", seed=8)
    te1 = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 9)
    te2 = randomise(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H)), 10)
    tower = _openclip_tower(openclip_transformer, CLIP_H)
    tower.load_state_dict({**tower.state_dict(), **clip_hf_to_openclip_sd(te2.state_dict(), 2)}, strict=True)
    ldm_unet = _skeleton(unet_diffusers_to_ldm(unet.state_dict(), unet.config))
    te1_ldm = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    te1_ldm.load_state_dict(te1.state_dict())
    conditioner = SimpleNamespace(embedders=[SimpleNamespace(transformer=te1_ldm), SimpleNamespace(model=tower),
                                             SimpleNamespace()])
    model = _ldm_model(ldm_unet, conditioner=conditioner)
    pipe = SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2)
    entries, net = _lora(pipe, seed=11, style="compvis", sdxl=True)
    assert {e.component for e in entries} == {"unet", "te1", "te2"}

    adapter = adapter_for_ldm(model)
    assert adapter.arch == "sdxl"
    p = Patcher(adapter)
    rep = p.apply([ActiveLora(net, te=0.7, unet=1.1)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched, rep.summary()
    rep_diffusers = Patcher(adapter_for_pipeline(pipe)).apply([ActiveLora(net, te=0.7, unet=1.1)]).networks[0]
    # one grouping on both hosts, and every name of a layer (compvis, diffusers, peft, ...) groups with it
    assert rep.applied_by_group == rep_diffusers.applied_by_group
    assert {n for n, k in adapter.aliases.items()
            if key_group(n) != target_group(adapter.targets[k].component, adapter.targets[k].block)} == set()
    _assert_close(unet_ldm_to_diffusers(_sd(ldm_unet), unet.config), _sd(unet), "unet")
    _assert_close(_sd(te1_ldm), _sd(te1), "te1")
    back = clip_openclip_to_hf_sd(_sd(tower), 2, with_projection=True)
    _assert_close(hf_clip_keys_for(back, te2.state_dict()), clip_weights(te2), "te2", atol=2e-6)


# ------------------------------------------------------------------ the real ldm text-encoder classes (A1111's SD1/SD2)


def _tiny_open_clip_factory():
    """open_clip's real CLIP class (imported without torchvision) built at tiny size, as a stand-in for
    open_clip.create_model_and_transforms (which would download weights)."""
    import importlib.util

    from tests.test_layouts_convert import _import_with_stubs

    spec = importlib.util.find_spec("open_clip")
    pkg = ("_lora_ext_test_open_clip", Path(spec.origin).parent)
    stubs = {"torchvision": {}, "torchvision.ops": {}, "torchvision.ops.misc": {"FrozenBatchNorm2d": nn.BatchNorm2d}}
    clip_cls = _import_with_stubs(stubs, f"{pkg[0]}.model", pkg).CLIP

    def create_model_and_transforms(arch, device=None, pretrained=None):
        vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
        text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
        return clip_cls(embed_dim=32, vision_cfg=vision, text_cfg=text), None, None

    return create_model_and_transforms


@pytest.fixture(scope="module")
def ldm_encoders():
    """ldm.modules.encoders.modules with `open_clip` replaced by the tiny factory above (import-time only)."""
    import importlib
    import sys
    import types

    stub = types.ModuleType("open_clip")
    stub.create_model_and_transforms = _tiny_open_clip_factory()
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k == "open_clip" or k.startswith("ldm.modules.encoders")}
    sys.modules["open_clip"] = stub
    try:
        module = importlib.import_module("ldm.modules.encoders.modules")
    finally:
        sys.modules.pop("open_clip", None)
        for k in [k for k in sys.modules if k.startswith("ldm.modules.encoders")]:
            sys.modules.pop(k)
        sys.modules.update(saved)
    return module


def test_real_frozen_clip_embedder_sd1(ldm_encoders, tmp_path):
    from lora_ext.models.assets import tokenizer_dir

    hf = randomise(CLIPTextModel(CLIPTextConfig(**{**CLIP_L, "vocab_size": 49408, "max_position_embeddings": 77,
                                                   "bos_token_id": 49406, "eos_token_id": 49407})), 21)
    hf.save_pretrained(tmp_path)
    for f in Path(tokenizer_dir("clip")).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    embedder = ldm_encoders.FrozenCLIPEmbedder(version=str(tmp_path), device="cpu")
    twin = CLIPTextModel(hf.config)
    twin.load_state_dict(embedder.transformer.state_dict())
    unet = tiny_unet("sd1", seed=22)
    model = _ldm_model(_skeleton(unet_diffusers_to_ldm(unet.state_dict(), unet.config)), cond_stage=embedder)
    pipe = SimpleNamespace(unet=unet, text_encoder=twin)
    entries = make_entries(pipe, "lora", rank=2, alpha=1.0, seed=23, components=("te1",))
    net = parse_lora(to_state_dict(entries, "kohya"), name="frozenclip")
    adapter = adapter_for_ldm(model)
    assert adapter.arch == "sd1"
    rep = Patcher(adapter).apply([ActiveLora(net, te=0.5)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched
    Patcher(adapter_for_pipeline(pipe)).apply([ActiveLora(net, te=0.5)])
    _assert_close(_sd(embedder.transformer), _sd(twin), "FrozenCLIPEmbedder")


def test_real_frozen_openclip_embedder_sd2(ldm_encoders):
    embedder = ldm_encoders.FrozenOpenCLIPEmbedder(arch="tiny", version=None, device="cpu", layer="penultimate")
    randomise(embedder.model, 24)
    original = _sd(embedder.model)
    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407)
    hf = CLIPTextModel(CLIPTextConfig(**cfg))
    oc_text = {k: v for k, v in original.items() if k != "logit_scale"}
    load_clip_strict(hf, hf_clip_keys_for(clip_openclip_to_hf_sd(oc_text, 2, with_projection=False), hf.state_dict()))
    from diffusers import UNet2DConditionModel

    from tests.test_layouts_convert import DIFFUSERS_UNET

    unet = randomise(UNet2DConditionModel(**DIFFUSERS_UNET["sd2"]), 25)
    model = _ldm_model(_skeleton(unet_diffusers_to_ldm(unet.state_dict(), unet.config)),
                       cond_stage=SimpleNamespace(wrapped=embedder))
    pipe = SimpleNamespace(unet=unet, text_encoder=hf)
    entries = make_entries(pipe, "lora", rank=2, alpha=1.0, seed=26, components=("te1",))
    net = parse_lora(to_state_dict(entries, "kohya"), name="openclip")
    adapter = adapter_for_ldm(model)
    assert adapter.arch == "sd2"
    p = Patcher(adapter)
    rep = p.apply([ActiveLora(net, te=0.5)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched
    Patcher(adapter_for_pipeline(pipe)).apply([ActiveLora(net, te=0.5)])
    now = {k: v for k, v in _sd(embedder.model).items() if k != "logit_scale"}
    back = hf_clip_keys_for(clip_openclip_to_hf_sd(now, 2, with_projection=False), hf.state_dict())
    _assert_close(back, clip_weights(hf), "FrozenOpenCLIPEmbedder", atol=2e-6)
    p.restore()
    for k, v in _sd(embedder.model).items():
        assert torch.equal(v, original[k]), k
