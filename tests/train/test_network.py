"""LoraTrainingNetwork: targets (kohya's class-name rule as the reference), initialisation (torch's own nn.Linear /
nn.Conv2d init, which kohya and PEFT call), step-0 identity, hooked forward == the exported file merged by the
Patcher, gradients, gradient checkpointing, half-precision base, remove()."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from lora_ext.errors import TrainingError
from lora_ext.formats.network import load_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.train.export import build_metadata, export_lora
from lora_ext.train.network import LoraTrainingNetwork


def _tiny(arch: str):
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch, seed=0)


@pytest.fixture(scope="module")
def sd15():
    return _tiny("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return _tiny("sdxl")


def _inputs(pipe, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    ctx_dim = unet.config.cross_attention_dim
    kw = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g).to(dtype),
                                   "time_ids": torch.randn(1, 6, generator=g).to(dtype)}
    return {"sample": torch.randn(1, 4, 8, 8, generator=g).to(dtype), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 8, ctx_dim, generator=g).to(dtype), **kw}


def _ids(seed=0):
    return torch.randint(0, 49408, (1, 8), generator=torch.Generator().manual_seed(seed))


def _outputs(pipe, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """UNet output and each text encoder's last hidden state, float32 copies."""
    out = {"unet": pipe.unet(**_inputs(pipe, dtype)).sample.detach().float()}
    for attr in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, attr, None)
        if te is not None:
            out[attr] = te(_ids()).last_hidden_state.detach().float()
    return out


def _randomise(network: LoraTrainingNetwork, seed: int, std: float = 0.1) -> None:
    """Random values in every LoRA parameter (as if trained); dora_scale perturbed around its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.copy_(torch.randn(lora.lora_up.shape, generator=g) * std)
            lora.lora_down.add_(torch.randn(lora.lora_down.shape, generator=g) * std)
            if lora.dora_scale is not None:
                lora.dora_scale.mul_(1 + 0.2 * torch.randn(lora.dora_scale.shape, generator=g))


def _snapshot(pipe):
    comps = {"unet": pipe.unet, "te1": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["te2"] = pipe.text_encoder_2
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    """max |a - b| relative to max |b|, asserted <= rtol; returns the relative error."""
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"
    return err


# ------------------------------------------------------------------------------------------------------ targets


def _kohya_rule(pipe, preset: str, train_te: bool) -> set[int]:
    """kohya networks.lora's selection, restated from its source: every Linear/Conv2d below a module whose class is
    Transformer2DModel (+ ResnetBlock2D, Downsample2D, Upsample2D with conv_dim) in the UNet, below CLIPAttention /
    CLIPMLP in a text encoder. "attn" is the diffusers script's to_q/to_k/to_v/to_out.0 of Attention modules."""
    chosen: set[int] = set()
    if preset == "attn":
        for _, m in pipe.unet.named_modules():
            if type(m).__name__ == "Attention":
                chosen |= {id(m.to_q), id(m.to_k), id(m.to_v), id(m.to_out[0])}
    else:
        classes = {"Transformer2DModel"}
        if preset == "attn_mlp_conv":
            classes |= {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
        for _, m in pipe.unet.named_modules():
            if type(m).__name__ in classes:
                chosen |= {id(c) for c in m.modules() if isinstance(c, (nn.Linear, nn.Conv2d))}
    if train_te:
        for attr in ("text_encoder", "text_encoder_2"):
            te = getattr(pipe, attr, None)
            if te is None:
                continue
            for _, m in te.named_modules():
                if type(m).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                    chosen |= {id(c) for c in m.modules() if isinstance(c, nn.Linear)}
    return chosen


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["attn", "attn_mlp", "attn_mlp_conv"])
def test_presets_select_kohya_layers(request, arch, preset):
    pipe = request.getfixturevalue(arch)
    net = LoraTrainingNetwork(pipe, rank=4, targets=preset, conv_rank=2, conv_alpha=1, train_text_encoder=True)
    try:
        got = {id(lora.target.module) for lora in net.loras.values()}
        assert got == _kohya_rule(pipe, preset, train_te=True)
        for lora in net.loras.values():
            w = lora.target.module.weight
            is_kxk = w.dim() == 4 and tuple(w.shape[2:]) != (1, 1)
            assert (lora.rank, lora.alpha) == ((2, 1.0) if is_kxk else (4, 4.0)), lora.name
    finally:
        net.remove()


def test_text_encoder_only_when_asked_and_blocks(sd15):
    net = LoraTrainingNetwork(sd15, targets="attn_mlp")
    assert set(net.module_counts()) == {"unet"}
    net.remove()
    net = LoraTrainingNetwork(sd15, targets="attn", blocks=["in04", "OUT03"])
    try:
        assert {lora.target.block for lora in net.loras.values()} == {"IN04", "OUT03"}
        assert len(net.loras) == 16  # one transformer block each, 8 projections
    finally:
        net.remove()
    with pytest.raises(TrainingError, match="IN99"):
        LoraTrainingNetwork(sd15, targets="attn", blocks=["IN99"])
    with pytest.raises(TrainingError, match="norm"):
        LoraTrainingNetwork(sd15, targets=lambda t: t.spec.kind == "norm")


def test_kohya_module_names(sd15, sdxl):
    """Names as sd-scripts writes them: SD1 diffusers paths with underscores, SDXL compvis (sgm) paths."""
    net = LoraTrainingNetwork(sd15, targets="attn_mlp_conv", train_text_encoder=True)
    names = set(net.loras)
    net.remove()
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_up_blocks_1_attentions_2_proj_out",
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_te_text_model_encoder_layers_1_mlp_fc2"} <= names
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in names)
    net = LoraTrainingNetwork(sdxl, targets="attn_mlp_conv", train_text_encoder=True)
    names = set(net.loras)
    net.remove()
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
            "lora_unet_output_blocks_0_1_proj_in",
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_2_conv",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1"} <= names
    assert all(n.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for n in names)
    assert not any("down_blocks" in n or "mid_block" in n for n in names)


# ---------------------------------------------------------------------------------------------------- init


def test_initialisation_matches_torch_layer_init(sd15):
    """lora_down is drawn as nn.Linear / nn.Conv2d initialise their weight (kaiming_uniform a=sqrt(5), the call kohya
    and PEFT make), lora_up is zero, dora_scale = the base weight's column norms."""
    keys = ["unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet:down_blocks.0.resnets.0.conv1"]
    for key in keys:
        torch.manual_seed(123)
        net = LoraTrainingNetwork(sd15, rank=3, targets=lambda t, key=key: t.key == key, dora=True)
        (lora,) = net.loras.values()
        net.remove()
        w = lora.target.module.weight.detach()
        torch.manual_seed(123)
        if w.dim() == 2:
            ref = nn.Linear(w.shape[1], 3, bias=False).weight
        else:
            ref = nn.Conv2d(w.shape[1], 3, tuple(w.shape[2:]), bias=False).weight
        assert torch.equal(lora.lora_down.detach(), ref.detach())
        bound = 1 / math.sqrt(w[0].numel())
        assert lora.lora_down.abs().max() <= bound and lora.lora_down.abs().max() > 0.8 * bound
        assert torch.count_nonzero(lora.lora_up) == 0 and lora.lora_up.shape == (w.shape[0], 3, *[1] * (w.dim() - 2))
        cols = torch.sqrt((w.float() ** 2).sum(dim=[d for d in range(w.dim()) if d != 1]))
        assert lora.dora_scale.shape == (1, w.shape[1], *[1] * (w.dim() - 2))
        torch.testing.assert_close(lora.dora_scale.detach().flatten(), cols, rtol=1e-6, atol=0)
        assert lora.lora_down.dtype == torch.float32


def test_seeded_init_is_deterministic(sd15):
    a = LoraTrainingNetwork(sd15, seed=7)
    sa = a.state_dict_kohya(torch.float32)
    a.remove()
    b = LoraTrainingNetwork(sd15, seed=7)
    sb = b.state_dict_kohya(torch.float32)
    b.remove()
    c = LoraTrainingNetwork(sd15, seed=8)
    sc = c.state_dict_kohya(torch.float32)
    c.remove()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("lora_down.weight"))


# ------------------------------------------------------------------------------------------ step 0 and equivalence


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_step0_bit_identical(request, arch):
    pipe = request.getfixturevalue(arch)
    with torch.no_grad():
        base = _outputs(pipe)
        for kw in ({"targets": "attn_mlp_conv", "conv_rank": 2}, {"targets": "attn_mlp", "dora": True}):
            net = LoraTrainingNetwork(pipe, rank=4, alpha=1, train_text_encoder=True, **kw)
            out = _outputs(pipe)
            net.remove()
            for k in base:
                assert torch.equal(out[k], base[k]), (kw, k)


@pytest.mark.parametrize("arch,kw", [
    ("sd15", {"targets": "attn_mlp_conv", "conv_rank": 3, "conv_alpha": 1.5}),
    ("sdxl", {"targets": "attn_mlp"}),
    ("sd15", {"targets": "attn_mlp_conv", "dora": True}),
    ("sdxl", {"targets": "attn", "dora": True}),
])
def test_hooked_equals_exported_file_merged_by_patcher(request, tmp_path, arch, kw):
    pipe = request.getfixturevalue(arch)
    with torch.no_grad():
        base = _outputs(pipe)
    net = LoraTrainingNetwork(pipe, rank=4, alpha=2, train_text_encoder=True, **kw)
    _randomise(net, seed=1)
    results = {}
    for multiplier in (1.0, 0.6):
        net.multiplier = multiplier
        with torch.no_grad():
            results[multiplier] = _outputs(pipe)
    meta = build_metadata({"output_name": "eq"}, None, net.arch)
    path = export_lora(net, tmp_path / "eq.safetensors", metadata=meta, dtype=torch.float32)
    net.remove()
    patcher = Patcher(adapter_for_pipeline(pipe))
    try:
        for multiplier, hooked in results.items():
            rep = patcher.apply([ActiveLora(load_lora(path), te=multiplier, unet=multiplier)]).networks[0]
            assert not rep.unmatched and rep.modules_applied == len(net.loras)
            with torch.no_grad():
                merged = _outputs(pipe)
            for k in merged:
                _close(hooked[k], merged[k], rtol=1e-5)
                assert (merged[k] - base[k]).abs().max() > 1e-2 * base[k].abs().max(), k  # the LoRA does something
    finally:
        patcher.restore()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_lora(dtype):
    """Base weights in half precision, LoRA parameters in fp32: grads are fp32 and reach every LoRA parameter; the
    hooked output equals the merged file within the half-precision noise."""
    pipe = _tiny("sd15")
    with torch.no_grad():
        ref32 = _outputs(pipe)
    net = LoraTrainingNetwork(pipe, rank=4, targets="attn_mlp_conv", train_text_encoder=True)
    _randomise(net, seed=2)
    with torch.no_grad():
        hooked32 = _outputs(pipe)
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    out = pipe.unet(**_inputs(pipe, dtype)).sample
    assert out.dtype == dtype
    out.float().square().mean().backward()
    unet_params = list(net.unet_parameters())
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in unet_params)
    assert all(bool(torch.isfinite(p.grad).all()) for p in unet_params)
    with torch.no_grad():
        hooked = _outputs(pipe, dtype)
    sd = net.state_dict_kohya(torch.float32)
    net.remove()
    from lora_ext.formats.network import parse_lora

    patcher = Patcher(adapter_for_pipeline(pipe))
    patcher.apply([ActiveLora(parse_lora(sd))])
    with torch.no_grad():
        merged = _outputs(pipe, dtype)
    patcher.restore()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    for k in merged:
        _close(hooked[k], merged[k], rtol=tol)
        _close(hooked[k], hooked32[k], rtol=tol)
        assert (hooked32[k] - ref32[k]).abs().max() > 4 * tol * ref32[k].abs().max()


# ------------------------------------------------------------------------------------------------------ gradients


def test_gradients_flow_only_to_lora_parameters(sdxl):
    flags_before = {id(p): p.requires_grad for p in sdxl.unet.parameters()}
    net = LoraTrainingNetwork(sdxl, rank=2, targets="attn_mlp_conv", train_text_encoder=True, dora=True)
    try:
        base_params = [p for m in (sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2) for p in m.parameters()]
        assert not any(p.requires_grad for p in base_params)
        assert all(p.requires_grad for p in net.parameters())
        loss = sdxl.unet(**_inputs(sdxl)).sample.square().mean()
        for attr in ("text_encoder", "text_encoder_2"):
            loss = loss + getattr(sdxl, attr)(_ids()).last_hidden_state.square().mean()
        loss.backward()
        assert all(p.grad is None for p in base_params)
        for lora in net.loras.values():
            assert lora.lora_up.grad is not None and lora.lora_up.grad.abs().sum() > 0, lora.name
            assert lora.lora_down.grad is not None  # zero at step 0 (up == 0), but part of the graph
            assert lora.dora_scale.grad is not None
    finally:
        net.remove()
    assert {id(p): p.requires_grad for p in sdxl.unet.parameters()} == flags_before


def _grads(pipe, net):
    net.zero_grad(set_to_none=True)
    pipe.unet.train()
    loss = pipe.unet(**_inputs(pipe)).sample.square().mean() + pipe.text_encoder(_ids()).last_hidden_state.mean()
    loss.backward()
    pipe.unet.eval()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def test_gradient_checkpointing_keeps_hooks():
    """With diffusers' and transformers' activation checkpointing on, the hooked layers run again during backward
    (the recompute) and the gradients are the same as without checkpointing."""
    pipe = _tiny("sd15")
    net = LoraTrainingNetwork(pipe, rank=4, targets="attn_mlp", train_text_encoder=True)
    _randomise(net, seed=3)
    plain = _grads(pipe, net)
    pipe.unet.enable_gradient_checkpointing()
    te = pipe.text_encoder
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.x; older: gradient_checkpointing_enable
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif "gradient_checkpointing_kwargs" in inspect.signature(te.gradient_checkpointing_enable).parameters:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # pragma: no cover - transformers 4.35+
    else:  # pragma: no cover - transformers < 4.35 (A1111's 4.30): re-entrant only, needs an input requiring grad
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()
    te.train()
    calls = []
    probe_names = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    probes = [net.loras[n].target.module for n in probe_names]
    handles = [m.register_forward_hook(lambda mod, a, o: calls.append(mod)) for m in probes]
    checkpointed = _grads(pipe, net)
    for h in handles:
        h.remove()
    net.remove()
    for m in probes:  # one forward + one recompute each
        assert sum(1 for mod in calls if mod is m) == 2
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-4, atol=1e-7)
    # every up factor gets a gradient, except q/k of the 1x1 mid-block self-attention (softmax over one token is 1)
    zero = {k for k, g in plain.items() if "lora_up" in k and g.abs().sum() == 0}
    assert zero <= {f"loras.lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{p}.lora_up" for p in "qk"}


def test_dropout_only_in_training_mode(sd15):
    net = LoraTrainingNetwork(sd15, rank=4, dropout=0.5)
    _randomise(net, seed=4)
    try:
        net.eval()
        with torch.no_grad():
            a = sd15.unet(**_inputs(sd15)).sample
            b = sd15.unet(**_inputs(sd15)).sample
        assert torch.equal(a, b)
        net.train()
        torch.manual_seed(0)
        with torch.no_grad():
            c = sd15.unet(**_inputs(sd15)).sample
        assert not torch.allclose(a, c)
    finally:
        net.remove()


# --------------------------------------------------------------------------------------------------- attachment


def _hook_counts(pipe):
    mods = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return [(name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for root in mods for name, m in root.named_modules()]


def test_remove_restores_module_tree_exactly():
    pipe = _tiny("sdxl")
    te_body = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers < 5.6 nests 'text_model'
    te_body.embeddings.token_embedding.weight.requires_grad_(False)  # an odd flag that must come back
    tree = _hook_counts(pipe)
    params = {id(p): (p.requires_grad, p.data_ptr()) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
              for p in m.parameters()}
    weights = _snapshot(pipe)
    with torch.no_grad():
        base = _outputs(pipe)
    net = LoraTrainingNetwork(pipe, rank=4, targets="attn_mlp_conv", train_text_encoder=True, dora=True)
    _randomise(net, seed=5)
    assert _hook_counts(pipe) != tree
    pipe.unet(**_inputs(pipe)).sample.mean().backward()
    net.remove()
    net.remove()  # idempotent
    assert _hook_counts(pipe) == tree
    assert {id(p): (p.requires_grad, p.data_ptr()) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
            for p in m.parameters()} == params
    after = _snapshot(pipe)
    for comp in weights:
        assert weights[comp].keys() == after[comp].keys()
        for k, v in weights[comp].items():
            assert torch.equal(v, after[comp][k]), f"{comp}:{k}"
    with torch.no_grad():
        out = _outputs(pipe)
    for k in base:
        assert torch.equal(out[k], base[k])


def test_set_enabled_and_multiplier(sd15):
    with torch.no_grad():
        base = sd15.unet(**_inputs(sd15)).sample
    net = LoraTrainingNetwork(sd15, rank=4)
    _randomise(net, seed=6)
    try:
        with torch.no_grad():
            on = sd15.unet(**_inputs(sd15)).sample
            net.set_enabled(False)
            off = sd15.unet(**_inputs(sd15)).sample
            net.set_enabled(True)
            net.multiplier = 0.0
            zero = sd15.unet(**_inputs(sd15)).sample
        assert torch.equal(off, base) and torch.equal(zero, base) and not torch.allclose(on, base)
    finally:
        net.remove()


# ------------------------------------------------------------------------------------------------- state and groups


def test_param_groups(sdxl):
    net = LoraTrainingNetwork(sdxl, rank=2, train_text_encoder=True)
    try:
        groups = net.param_groups(unet_lr=1e-4)
        assert [g["name"] for g in groups] == ["unet", "text_encoder"]
        assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(5e-5)
        assert net.param_groups(1e-4, te_lr=3e-5)[1]["lr"] == 3e-5
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(net.parameters()))
        te_ids = {id(p) for g in groups[1:] for p in g["params"]}
        assert te_ids == {id(p) for lo in net.loras.values() if lo.target.component != "unet" for p in lo.parameters()}
        torch.optim.AdamW(groups)  # accepted as is
    finally:
        net.remove()
    net = LoraTrainingNetwork(sdxl, rank=2)
    assert [g["name"] for g in net.param_groups(1e-4)] == ["unet"]
    net.remove()


def test_state_dict_kohya_round_trip_and_errors(sd15):
    a = LoraTrainingNetwork(sd15, rank=4, alpha=2, targets="attn_mlp_conv", conv_rank=2, train_text_encoder=True,
                            dora=True, seed=1)
    _randomise(a, seed=7)
    sd = a.state_dict_kohya(torch.float32)
    a.remove()
    half = a.state_dict_kohya()
    assert all(t.dtype == torch.float16 for t in half.values())
    assert all(t.dim() == 0 for k, t in half.items() if k.endswith(".alpha"))
    suffixes = {k.split(".", 1)[1] for k in sd}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    b = LoraTrainingNetwork(sd15, rank=4, alpha=2, targets="attn_mlp_conv", conv_rank=2, train_text_encoder=True,
                            dora=True, seed=2)
    try:
        b.load_state_dict_kohya(sd)
        sb = b.state_dict_kohya(torch.float32)
        assert sb.keys() == sd.keys() and all(torch.equal(sb[k], sd[k]) for k in sd)
        name = next(iter(b.loras))
        with pytest.raises(TrainingError, match="lacks"):
            b.load_state_dict_kohya({k: v for k, v in sd.items() if not k.startswith(name + ".lora_up")})
        with pytest.raises(TrainingError, match="does not have"):
            b.load_state_dict_kohya({**sd, "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)})
        bad = dict(sd)
        bad[f"{name}.lora_down.weight"] = torch.zeros(3, 3)
        with pytest.raises(TrainingError, match="shape"):
            b.load_state_dict_kohya(bad)
        # alpha in the state wins (it sets the scale the factors were trained with)
        sd2 = dict(sd)
        sd2[f"{name}.alpha"] = torch.tensor(1.0)
        b.load_state_dict_kohya(sd2)
        assert b.loras[name].alpha == 1.0 and b.loras[name].algorithm().scale() == 0.25
    finally:
        b.remove()


@pytest.mark.parametrize("kw", [{"rank": 0}, {"rank": 2.5}, {"alpha": -1}, {"alpha": float("nan")},
                                {"conv_rank": 0}, {"dropout": 1.0}, {"targets": "everything"}, {"targets": 3},
                                {"dtype": torch.int32}])
def test_invalid_settings(sd15, kw):
    with pytest.raises(ValueError):
        LoraTrainingNetwork(sd15, **kw)
    assert all(not m._forward_hooks for m in sd15.unet.modules())
