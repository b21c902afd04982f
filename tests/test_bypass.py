"""Bypass mode (`lora_ext.patch.bypass`) against the merged model: for every algorithm, dtype and layer kind, the
tiny pipelines' UNet and text encoder compute the same outputs with the LoRAs as forward hooks as with the LoRAs merged
(the merge itself is tested against hand math in test_patcher); weights are never written; clearing the hooks gives the
original outputs bit for bit; per-sample gains equal per-image merges; FP8 layers take bypass and keep the delta that
a merge into FP8 rounds away."""

from __future__ import annotations

import pytest
import torch

from lora_ext.formats.algorithms import ALGORITHMS
from lora_ext.formats.network import parse_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.patch.bypass import Bypass, GenerationShape, can_bypass, estimate_seconds, needs_bypass
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from tests.lora_factory import assert_bit_identical, snapshot


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


def _inputs(pipe, dtype, batch=2):
    g = torch.Generator().manual_seed(5)
    unet = pipe.unet
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(dtype)
    context = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size - 1, (batch, 7), generator=g)
    return sample, context, ids


def _outputs(pipe, inputs):
    sample, context, ids = inputs
    with torch.no_grad():
        u = pipe.unet(sample, 10, encoder_hidden_states=context).sample
        t = pipe.text_encoder(ids)[0]
    return u.float(), t.float()


def _cases():
    for cls in ALGORITHMS:
        yield cls.name, False
    yield "lora", True  # DoRA
    yield "loha", True


@pytest.mark.parametrize("algo, dora", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_bypass_equals_merge_for_every_algorithm_dtype_and_layer_kind(sd15, algo, dora, dtype):
    """fp32: bypass == merged forward (to float rounding). Half precision: the merged weight is rounded to the
    layer's dtype and the bypass is not, so both are compared with the fp32 merged model: bypass is no further."""
    adapter = adapter_for_pipeline(sd15)
    tensors = make_lora_tensors(adapter, SynthSpec(algorithm=algo, rank=2, dora=dora, std=0.05),
                                select=lambda t: True, seed=3)
    net = parse_lora(tensors, name=f"{algo}_bp")
    kinds = {adapter.lookup(m).spec.kind for m in net.modules}
    inputs32 = _inputs(sd15, torch.float32)
    patcher = Patcher(adapter)
    base32 = _outputs(sd15, inputs32)
    patcher.apply([ActiveLora(net, te=0.7, unet=0.6)])
    exact = _outputs(sd15, inputs32)  # fp32 merged: the reference
    patcher.restore()
    pipe = sd15.to(dtype)
    try:
        adapter = adapter_for_pipeline(pipe)
        patcher = Patcher(adapter)
        original = snapshot(pipe)
        inputs = _inputs(pipe, dtype)
        base = _outputs(pipe, inputs)
        patcher.apply([ActiveLora(net, te=0.7, unet=0.6)])
        merged = _outputs(pipe, inputs)
        patcher.restore()
        patcher.apply([ActiveLora(net, te=0.7, unet=0.6)], divert=lambda c: True)
        assert patcher.is_pristine and patcher.diverted
        bypass = Bypass()
        bypass.set(patcher.diverted)
        assert_bit_identical(original, snapshot(pipe))  # bypass writes no weight
        hooked = _outputs(pipe, inputs)
        bypass.clear()
        after = _outputs(pipe, inputs)
    finally:
        sd15.to(torch.float32)
    for got, want, ref, want32, ref32 in zip(hooked, merged, base, exact, base32, strict=True):
        effect = (want32 - ref32).abs().max().item()
        assert effect > 0, "the LoRA must change the output for the test to mean anything"
        if dtype == torch.float32:
            err = (got - want).abs().max().item()
            assert err <= 2e-4 * max(effect, ref.abs().max().item()), (algo, dora, kinds, err, effect)
        else:
            err_bypass = (got - want32).abs().max().item()
            err_merge = (want - want32).abs().max().item()
            assert err_bypass <= 1.5 * err_merge + 1e-3 * want32.abs().max().item(), (algo, dora, err_bypass,
                                                                                     err_merge)
    for got, want in zip(after, base, strict=True):
        assert torch.equal(got, want)
    assert kinds  # every layer kind the algorithm applies to was covered (linear/conv/norm/embedding)


def test_every_layer_kind_is_covered_by_some_algorithm(sd15):
    adapter = adapter_for_pipeline(sd15)
    seen = set()
    for cls in ALGORITHMS:
        net = parse_lora(make_lora_tensors(adapter, SynthSpec(algorithm=cls.name, rank=2), select=lambda t: True),
                         name=cls.name)
        seen |= {adapter.lookup(m).spec.kind for m in net.modules}
    assert seen == {"linear", "conv", "norm"}  # embeddings: no synthesizer; by hand below


@pytest.mark.parametrize("algo", ["lora", "full"])
def test_bypass_equals_merge_on_the_token_embedding(sd15, algo):
    from lora_ext.patch.targets import file_module_name

    adapter = adapter_for_pipeline(sd15)
    target = adapter.targets["te1:text_model.embeddings.token_embedding"]
    rows, dim = target.spec.weight_shape
    g = torch.Generator().manual_seed(2)
    name = file_module_name(adapter, target, "kohya")
    if algo == "lora":
        tensors = {f"{name}.lora_up.weight": torch.randn(rows, 3, generator=g) * 0.1,
                   f"{name}.lora_down.weight": torch.randn(3, dim, generator=g) * 0.1,
                   f"{name}.alpha": torch.tensor(1.5)}
    else:
        tensors = {f"{name}.diff": torch.randn(rows, dim, generator=g) * 0.05}
    net = parse_lora(tensors, name="emb")
    assert adapter.lookup(next(iter(net.modules))).spec.kind == "embedding"
    inputs = _inputs(sd15, torch.float32)
    base = _outputs(sd15, inputs)[1]
    patcher = Patcher(adapter)
    patcher.apply([ActiveLora(net, te=0.9)])
    merged = _outputs(sd15, inputs)[1]
    patcher.restore()
    patcher.apply([ActiveLora(net, te=0.9)], divert=lambda c: True)
    bypass = Bypass()
    bypass.set(patcher.diverted)
    hooked = _outputs(sd15, inputs)[1]
    bypass.clear()
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)


def test_per_sample_gains_equal_per_image_merges(sd15):
    """Gains [0, 1, 0.5] on a batch of 3: each row equals the same input through the model merged at that weight."""
    adapter = adapter_for_pipeline(sd15)
    net = parse_lora(make_lora_tensors(adapter, SynthSpec(rank=4), select=lambda t: True, seed=9), name="ps")
    inputs = _inputs(sd15, torch.float32, batch=3)
    patcher = Patcher(adapter)
    want = []
    for row, weight in enumerate((0.0, 1.0, 0.5)):
        patcher.apply([ActiveLora(net, te=weight, unet=weight)])
        one = tuple(t[row:row + 1] for t in inputs)
        want.append(_outputs(sd15, one))
    patcher.restore()
    patcher.apply([ActiveLora(net)], divert=lambda c: True)
    bypass = Bypass()
    bypass.set(patcher.diverted, gain_of=lambda c: "ps")
    bypass.set_gain("ps", torch.tensor([0.0, 1.0, 0.5]))
    got = _outputs(sd15, inputs)
    bypass.set_gain("ps", torch.tensor([1.0, 1.0]))  # a host that gives the wrong count gets a clear error
    with pytest.raises(Exception, match="per-sample weight for ps has \\(2,\\) values"):
        _outputs(sd15, inputs)
    bypass.clear()
    patcher.restore()
    for row in range(3):
        for g, w in zip(got, want[row], strict=True):
            torch.testing.assert_close(g[row:row + 1], w, rtol=1e-4, atol=1e-5)


def test_fused_qkv_and_mha_out_proj_cannot_take_a_hook():
    mha = torch.nn.MultiheadAttention(8, 2)
    from lora_ext.formats.algorithms.base import LayerSpec
    from lora_ext.patch.keymap import Target

    spec = LayerSpec("linear", (8, 8))
    q = Target("te2:q", "te2", mha, "in_proj_weight", None, 0, spec, "BASE")
    out = Target("te2:o", "te2", mha.out_proj, "weight", "bias", None, spec, "BASE")
    plain = Target("te2:fc", "te2", torch.nn.Linear(8, 8), "weight", "bias", None, spec, "BASE")
    assert not can_bypass(q) and not can_bypass(out) and can_bypass(plain)
    assert not needs_bypass(plain)


def test_fp8_layers_keep_the_delta_that_a_merge_rounds_away():
    """A1111's "FP8 weight" (float8_e4m3fn storage, computed in float): with bypass the layer's output is the fp32
    formula on the FP8-stored base (x W8^T + m x (BA)^T s); merged into FP8, most of the delta is lost."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from lora_ext.formats.safetensors_io import save_safetensors_atomic
    from lora_ext.models.tiny import build_tiny_pipeline
    from lora_ext.session import LoraSession

    pipe = build_tiny_pipeline("sd15", seed=0)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    w8 = layer.weight.data.to(torch.float8_e4m3fn)
    layer.weight.data = w8
    stored = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    down = torch.randn(4, w8.shape[1], generator=g) * 0.05
    up = torch.randn(w8.shape[0], 4, generator=g) * 0.05
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "f8.safetensors"
        save_safetensors_atomic({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                 f"{name}.alpha": torch.tensor(2.0)}, path)

        class One:
            def resolve(self, n):
                return path

            def shorthash(self, p, m):
                return None

        session = LoraSession(adapter_for_pipeline, One())
        act = session.activate(pipe, ["<lora:f8:0.8>"])
        assert act.problems == [] and any("FP8" in n for n in act.notes)
        assert session.bypass_layers == 1 and torch.equal(layer.weight, stored)
        x = torch.randn(3, w8.shape[1], generator=g)
        # the FP8 weight computes through an upcast (what A1111 does: manual cast to the compute dtype)
        layer.weight.data = w8.float()
        want = x @ (w8.float() + 0.8 * (up @ down) * 0.5).T
        got = layer(x).detach()
        layer.weight.data = w8
        merged8 = (w8.float() + 0.8 * (up @ down) * 0.5).to(torch.float8_e4m3fn).float()
        exact_effect = (want - x @ w8.float().T).abs().max()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (x @ merged8.T - want).abs().max() > 0.3 * exact_effect  # what a merge into FP8 would lose
        session.restore()
        assert session.bypass_layers == 0 and torch.equal(layer.weight, stored)


def test_estimate_prefers_bypass_only_when_re_merging_costs_more(sd15):
    adapter = adapter_for_pipeline(sd15)
    net = parse_lora(make_lora_tensors(adapter, SynthSpec(rank=4), seed=1, components=("unet",)), name="e")
    patcher = Patcher(adapter)
    patcher.apply([ActiveLora(net)], divert=lambda c: True)
    contribs = patcher.diverted
    patcher.restore()
    merge_small, bypass_small = estimate_seconds(contribs, GenerationShape(height=64, width=64))
    merge_big, bypass_big = estimate_seconds(contribs, GenerationShape(height=1024, width=1024, batch=4))
    assert merge_small == merge_big  # a merge does not depend on the image
    assert bypass_big > 100 * bypass_small  # the bypass grows with the rows it sees (64x the pixels, 4x the batch)
