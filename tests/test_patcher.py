"""The patcher against hand-computed math and against bit-exact originals (tiny SD1.5 / SDXL pipelines)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ext.errors import ArchitectureMismatchError, NonFiniteWeightError, ShapeMismatchError
from lora_ext.formats.network import parse_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.patch import patcher as patcher_module
from lora_ext.prompt import parse_tag
from tests.lora_factory import (
    assert_bit_identical,
    expected_state,
    make_entries,
    modules_of,
    snapshot,
    to_state_dict,
)


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", seed=0)


def _close(got: dict, want: dict, rtol: float = 1e-6) -> None:
    for comp in want:
        for k, w in want[comp].items():
            g = got[comp][k]
            err = (g.float() - w.float()).abs().max().item()
            scale = w.float().abs().max().item() or 1.0
            assert err <= rtol * scale + 1e-7, f"{comp}:{k} max err {err} (scale {scale})"


@pytest.mark.parametrize("style", ["kohya", "compvis", "peft"])
def test_sd15_merge_equals_formula_and_restore_is_exact(sd15, style):
    original = snapshot(sd15)
    entries = make_entries(sd15, "lora", rank=4, alpha=None if style == "peft" else 2.0, seed=1)
    compvis = None
    if style == "compvis":
        from lora_ext.formats.layouts import unet_module_map

        compvis = unet_module_map(dict(sd15.unet.config))
    net = parse_lora(to_state_dict(entries, style, unet_compvis=compvis), name=f"t_{style}")
    patcher = Patcher(adapter_for_pipeline(sd15))
    report = patcher.apply([ActiveLora(net, te=0.7, unet=0.4)])
    rep = report.networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched, rep.summary()
    assert rep.applied_by_group.get("te1", 0) == sum(e.component == "te1" for e in entries)
    _close(snapshot(sd15), expected_state(sd15, entries, te=0.7, unet=0.4, original=original))
    now = snapshot(sd15)["unet"]
    assert any(not torch.equal(now[k], original["unet"][k]) for k in now)  # non-trivial: weights did change
    patcher.restore()
    assert_bit_identical(original, snapshot(sd15))
    assert patcher.is_pristine


def test_sdxl_kohya_compvis_te1_te2(sdxl):
    from lora_ext.formats.layouts import unet_module_map

    original = snapshot(sdxl)
    entries = make_entries(sdxl, "lora", rank=2, alpha=1.0, seed=3)
    assert {e.component for e in entries} == {"unet", "te1", "te2"}
    sd = to_state_dict(entries, "compvis", sdxl=True, unet_compvis=unet_module_map(dict(sdxl.unet.config)))
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
    net = parse_lora(sd, name="xl")
    assert net.arch.arch == "sdxl"
    patcher = Patcher(adapter_for_pipeline(sdxl))
    rep = patcher.apply([ActiveLora(net, te=1.0, unet=0.5)]).networks[0]
    assert rep.modules_applied == len(entries) and not rep.unmatched
    _close(snapshot(sdxl), expected_state(sdxl, entries, te=1.0, unet=0.5, original=original))
    patcher.restore()
    assert_bit_identical(original, snapshot(sdxl))


def test_switch_recomputes_only_changed_layers(sd15):
    original = snapshot(sd15)
    a = make_entries(sd15, "lora", seed=10, components=("unet",))
    b = make_entries(sd15, "lora", seed=11, components=("te1",))
    na, nb = parse_lora(to_state_dict(a, "kohya"), name="a"), parse_lora(to_state_dict(b, "kohya"), name="b")
    p = Patcher(adapter_for_pipeline(sd15))
    r1 = p.apply([ActiveLora(na), ActiveLora(nb)])
    assert r1.layers_recomputed == len(a) + len(b)
    r2 = p.apply([ActiveLora(na), ActiveLora(nb, te=0.5)])  # only b's weight changed
    assert (r2.layers_recomputed, r2.layers_unchanged) == (len(b), len(a))
    r3 = p.apply([ActiveLora(nb, te=0.5)])  # a removed: its layers restored, b untouched
    assert (r3.layers_restored, r3.layers_unchanged, r3.layers_recomputed) == (len(a), len(b), 0)
    _close(snapshot(sd15), expected_state(sd15, b, te=0.5, unet=1.0, original=original))
    p.restore()
    assert_bit_identical(original, snapshot(sd15))


def test_block_weights_scale_unet_blocks(sd15):
    """lbw=INALL (1 for BASE and IN01..IN08, 0 elsewhere): only text-encoder and down-block layers change."""
    original = snapshot(sd15)
    entries = make_entries(sd15, "lora", seed=5)
    net = parse_lora(to_state_dict(entries, "kohya"), name="lbw")
    ref = parse_tag("<lora:lbw:1:lbw=INALL>")
    p = Patcher(adapter_for_pipeline(sd15))
    p.apply([ActiveLora(net, te=ref.te, unet=ref.unet, block_weights=ref.lbw)])
    now = snapshot(sd15)
    for e in entries:
        k = f"{e.path}.weight"
        changed = not torch.equal(now[e.component][k], original[e.component][k])
        if e.component != "unet" or e.path.startswith("down_blocks"):
            assert changed, k
        else:
            assert not changed, k
    p.restore()
    assert_bit_identical(original, snapshot(sd15))


def test_two_loras_sum_and_loha_full(sd15):
    original = snapshot(sd15)
    lora = make_entries(sd15, "lora", seed=20)
    loha = make_entries(sd15, "loha", rank=2, alpha=1.0, seed=21, every=3)
    full = make_entries(sd15, "full", seed=22, every=2, components=("te1",))
    nets = [parse_lora(to_state_dict(x, "kohya"), name=n) for x, n in ((lora, "l"), (loha, "h"), (full, "f"))]
    p = Patcher(adapter_for_pipeline(sd15))
    p.apply([ActiveLora(nets[0], 0.5, 0.5), ActiveLora(nets[1], 1.0, 0.3), ActiveLora(nets[2], -1.0, 1.0)])
    want = original
    for entries, te, unet in ((lora, 0.5, 0.5), (loha, 1.0, 0.3), (full, -1.0, 1.0)):
        step = expected_state(sd15, entries, te, unet, want)
        want = step
    _close(snapshot(sd15), want, rtol=2e-6)
    p.restore()
    assert_bit_identical(original, snapshot(sd15))


def test_bad_inputs_leave_model_untouched(sd15, sdxl):
    original = snapshot(sd15)
    p = Patcher(adapter_for_pipeline(sd15))
    good = parse_lora(to_state_dict(make_entries(sd15, "lora", seed=30), "kohya"), name="good")
    p.apply([ActiveLora(good)])
    with_good = snapshot(sd15)
    # SDXL LoRA on SD1.5: refused while planning, so nothing changes (the good LoRA stays merged)
    xl = parse_lora(to_state_dict(make_entries(sdxl, "lora", seed=31), "kohya", sdxl=True), name="xl")
    with pytest.raises(ArchitectureMismatchError, match="SDXL"):
        p.apply([ActiveLora(good), ActiveLora(xl)])
    assert_bit_identical(with_good, snapshot(sd15))
    # a module whose factors do not fit the layer
    entries = make_entries(sd15, "lora", seed=32, components=("unet",))
    e = entries[0]
    e.tensors["lora_up.weight"] = torch.randn(e.tensors["lora_up.weight"].shape[0] + 1, 4)
    bad = parse_lora(to_state_dict(entries, "kohya"), name="badshape")
    with pytest.raises(ShapeMismatchError, match="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"):
        p.apply([ActiveLora(bad)])
    assert_bit_identical(with_good, snapshot(sd15))
    p.restore()
    assert_bit_identical(original, snapshot(sd15))
    # skip_bad leaves it out and says why
    rep = p.apply([ActiveLora(good), ActiveLora(bad)], skip_bad=True)
    assert rep.networks[1].error and rep.networks[0].error is None
    p.restore()
    assert_bit_identical(original, snapshot(sd15))


def test_overflow_is_refused_before_commit(sd15):
    sd15.to(torch.float16)
    try:
        original = snapshot(sd15)
        entries = make_entries(sd15, "lora", seed=40, std=200.0, components=("unet",))
        net = parse_lora(to_state_dict(entries, "kohya"), name="huge")
        p = Patcher(adapter_for_pipeline(sd15))
        with pytest.raises(NonFiniteWeightError, match="huge"):
            p.apply([ActiveLora(net)])
        assert_bit_identical(original, snapshot(sd15))
    finally:
        sd15.to(torch.float32)


def test_error_mid_apply_restores_everything(sd15, monkeypatch):
    original = snapshot(sd15)
    net = parse_lora(to_state_dict(make_entries(sd15, "lora", seed=50), "kohya"), name="boom")
    p = Patcher(adapter_for_pipeline(sd15))
    p.apply([ActiveLora(net, 0.3, 0.3)])
    calls = {"n": 0}
    real = patcher_module._merge_region

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(patcher_module, "_merge_region", flaky)
    with pytest.raises(KeyboardInterrupt):
        p.apply([ActiveLora(net, 0.9, 0.9)])
    assert_bit_identical(original, snapshot(sd15))
    assert p.is_pristine


# ------------------------------------------------------------------------------------------------ property tests

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.5, 1.0, -0.7])),
                                             max_size=3)),
        st.tuples(st.just("restore"), st.just(None)),
        st.tuples(st.just("fail"), st.integers(1, 20)),
    ),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_sequences_end_bit_exact(sd15, dtype):
    sd15.to(dtype)
    try:
        original = snapshot(sd15)
        nets_entries = [make_entries(sd15, algo, seed=60 + i, every=2, rank=2)
                        for i, algo in enumerate(["lora", "loha", "lora"])]
        nets = [parse_lora(to_state_dict(e, "kohya"), name=f"n{i}") for i, e in enumerate(nets_entries)]
        patcher = Patcher(adapter_for_pipeline(sd15))
        tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        @given(ops=_OPS)
        def run(ops):
            for op, arg in ops:
                if op == "apply":
                    actives = [ActiveLora(nets[i], te=m, unet=m) for i, m in arg]
                    patcher.apply(actives)
                    # reference in fp32 throughout, one rounding at the end (as the patcher promises)
                    want = {c: {k: v.float() for k, v in sd.items()} for c, sd in original.items()}
                    for i, m in arg:
                        want = expected_state(sd15, nets_entries[i], m, m, want)
                    want = {c: {k: v.to(dtype) for k, v in sd.items()} for c, sd in want.items()}
                    _close(snapshot(sd15), want, rtol=tol)
                elif op == "restore":
                    patcher.restore()
                    assert_bit_identical(original, snapshot(sd15))
                else:
                    counter = {"n": 0}
                    real = patcher_module._merge_region

                    def flaky(*a, _real=real, _stop=arg, _c=counter, **k):
                        _c["n"] += 1
                        if _c["n"] == _stop:
                            raise RuntimeError("injected failure")
                        return _real(*a, **k)

                    patcher_module._merge_region = flaky
                    try:
                        patcher.apply([ActiveLora(nets[0], 0.9, 0.9), ActiveLora(nets[1], 0.2, 0.2)])
                    except RuntimeError:
                        assert_bit_identical(original, snapshot(sd15))
                    finally:
                        patcher_module._merge_region = real
            patcher.restore()
            assert_bit_identical(original, snapshot(sd15))

        run()
    finally:
        sd15.to(torch.float32)


def test_multiplier_zero_is_a_no_op(sd15):
    original = snapshot(sd15)
    net = parse_lora(to_state_dict(make_entries(sd15, "lora", seed=70), "kohya"), name="z")
    p = Patcher(adapter_for_pipeline(sd15))
    rep = p.apply([ActiveLora(net, te=0.0, unet=0.0)])
    assert rep.layers_recomputed == 0 and p.is_pristine
    assert_bit_identical(original, snapshot(sd15))


def test_merged_equals_bypass_forward(sd15):
    """For every patched layer, layer(x) with merged weights == original layer(x) + multiplier * bypass(x)."""
    entries = make_entries(sd15, "lora", seed=80, every=4)
    net = parse_lora(to_state_dict(entries, "kohya"), name="bp")
    adapter = adapter_for_pipeline(sd15)
    mods = modules_of(sd15)
    g = torch.Generator().manual_seed(0)
    xs, before = {}, {}
    for e in entries:
        m = mods[e.component][e.path]
        xs[e.path] = torch.randn(3, m.weight.shape[1], generator=g)
        before[e.path] = m(xs[e.path]).detach()
    p = Patcher(adapter)
    p.apply([ActiveLora(net, te=0.6, unet=0.6)])
    for name, module in net.modules.items():
        t = adapter.lookup(name)
        path = t.key.split(":", 1)[1]
        m = mods[t.component][path if path in mods[t.component] else path.removeprefix("text_model.")]
        x = xs[path if path in xs else path.removeprefix("text_model.")]
        merged = m(x)
        by = before[path if path in before else path.removeprefix("text_model.")] + 0.6 * module.algorithm.bypass(
            x, p._slots[(id(m), "weight")].backup, t.spec)
        torch.testing.assert_close(merged, by, rtol=1e-5, atol=1e-6)
    p.restore()


def test_backups_are_retained_released_and_never_stale(sd15):
    original = snapshot(sd15)
    entries = make_entries(sd15, "lora", seed=90, components=("unet",))
    net = parse_lora(to_state_dict(entries, "kohya"), name="keep")
    p = Patcher(adapter_for_pipeline(sd15))
    p.apply([ActiveLora(net)])
    held = p.backup_bytes
    assert held == sum(original["unet"][f"{e.path}.weight"].numel() * 4 for e in entries)  # only touched tensors
    p.restore()
    assert p.is_pristine and p.backup_bytes == held  # kept for the next apply
    assert_bit_identical(original, snapshot(sd15))

    # someone loads other weights in place (as A1111 does on a checkpoint change): our backup must not win
    p.apply([ActiveLora(net)])
    new_weights = {k: v + 1.0 for k, v in original["unet"].items()}
    sd15.unet.load_state_dict(new_weights)
    rep = p.restore()
    assert rep.stale_backups == len(entries) and p.backup_bytes == 0
    assert all(torch.equal(v, new_weights[k]) for k, v in sd15.unet.state_dict().items())
    sd15.unet.load_state_dict(original["unet"])

    q = Patcher(adapter_for_pipeline(sd15), retain_bytes=0)
    q.apply([ActiveLora(net)])
    q.restore()
    assert q.backup_bytes == 0
    q.apply([ActiveLora(net)])
    q.release()
    assert q.backup_bytes == 0
    assert_bit_identical(original, snapshot(sd15))


def _move_weights(model: torch.nn.Module, paths: list[str]) -> None:
    """What Forge's memory manager does to a weight it moves (`m.weight = Parameter(m.weight.to(device))`): a new
    Parameter object with the same values (the device is the CPU here, so a copy stands for the move)."""
    for path in paths:
        module = model.get_submodule(path)
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def test_follow_moves_restores_weights_the_host_moved_while_merged(sd15):
    """Forge replaces Parameter objects when it moves weights between devices. With follow_moves, a merged weight that
    was moved is restored where it is now (bit for bit), a switch re-merges it there, and a moved weight without
    LoRAs merged is backed up afresh; without follow_moves, the moved merged weights would keep the LoRA for good
    (their backups are dropped as stale: what A1111 needs when a checkpoint is loaded into the same modules)."""
    original = snapshot(sd15)
    entries = make_entries(sd15, "lora", seed=91, components=("unet",))
    net = parse_lora(to_state_dict(entries, "kohya"), name="moved")
    paths = [e.path for e in entries]
    lora = ActiveLora(net, unet=0.8)

    p = Patcher(adapter_for_pipeline(sd15), follow_moves=True)
    p.apply([lora])
    merged = snapshot(sd15)
    _move_weights(sd15.unet, paths)
    assert_bit_identical(merged, snapshot(sd15))
    rep = p.apply([ActiveLora(net, unet=0.3)])  # a switch after the move: re-merged into the moved Parameters
    assert rep.stale_backups == 0 and rep.layers_recomputed == len(entries)
    _close(snapshot(sd15), expected_state(sd15, entries, te=1.0, unet=0.3, original=original))
    _move_weights(sd15.unet, paths)
    rep = p.restore()
    assert rep.stale_backups == 0 and rep.layers_restored == len(entries)
    assert_bit_identical(original, snapshot(sd15))
    _move_weights(sd15.unet, paths)  # moved while nothing is merged: the retained backups are re-taken
    assert p.restore().stale_backups == len(entries)
    p.apply([lora])
    p.restore()
    assert_bit_identical(original, snapshot(sd15))

    q = Patcher(adapter_for_pipeline(sd15))  # A1111's rule: a replaced Parameter is someone else's weight
    q.apply([lora])
    _move_weights(sd15.unet, paths)
    assert q.restore().stale_backups == len(entries)
    assert not torch.equal(snapshot(sd15)["unet"][f"{paths[0]}.weight"], original["unet"][f"{paths[0]}.weight"])
    sd15.unet.load_state_dict(original["unet"])
    assert_bit_identical(original, snapshot(sd15))


def test_fp8_weights_take_the_merge_and_restore_bit_exactly():
    """A1111's "FP8 weight" stores layers as float8_e4m3fn: the merge is computed in fp32 and rounded once into the
    layer's own dtype (what the built-in gives too), and restore gives the original fp8 bits back."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    from lora_ext.patch.keymap import ModelAdapter, Target, layer_spec

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 12, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g) * 0.5)
    layer.to(torch.float8_e4m3fn)
    original = layer.weight.detach().clone()
    adapter = ModelAdapter(arch="sd1")
    adapter._add(Target("unet:x", "unet", layer, "weight", None, None, layer_spec(layer), "BASE"), ["lora_unet_x"])
    up, down = torch.randn(12, 2, generator=g) * 0.5, torch.randn(2, 16, generator=g) * 0.5
    net = parse_lora({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down,
                      "lora_unet_x.alpha": torch.tensor(2.0)}, name="fp8")
    patcher = Patcher(adapter)
    rep = patcher.apply([ActiveLora(net, 0.8, 0.8)]).networks[0]
    assert rep.modules_applied == 1
    want = (original.to(torch.float32) + 0.8 * (up @ down)).to(torch.float8_e4m3fn)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), want.view(torch.uint8))
    patcher.restore()
    assert torch.equal(layer.weight.view(torch.uint8), original.view(torch.uint8))
