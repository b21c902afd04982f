"""merge-loras, resize, extract, convert against hand-computed math (deltas from the published formulas, optimal
truncated-SVD errors from singular values, kohya's dynamic-rank rules worked by hand) and diffusers' own loader."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_ext.formats.safetensors_io import load_tensors, read_header, save_safetensors_atomic
from lora_ext.models.loading import load_pipeline
from lora_ext.models.tiny import save_tiny_model
from lora_ext.tools.common import ToolError
from lora_ext.tools.lora_tools import convert_lora, dynamic_rank, extract_lora, merge_loras, resize_lora
from tests.lora_factory import kohya_name, make_entries, te_path, to_state_dict
from tests.stack import require_diffusers_lora_loader


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    path = save_tiny_model("sd15", root, "single-file")
    return path, load_pipeline(path).pipe


def _file_deltas(path) -> dict[str, torch.Tensor]:
    """kohya LoRA file -> module name -> up @ down * alpha / rank, straight from the tensors (no parser)."""
    sd = load_tensors(path)
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            base = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{base}.lora_up.weight"].float()
            r = down.shape[0]
            alpha = float(sd[f"{base}.alpha"]) if f"{base}.alpha" in sd else r
            out[base] = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * (alpha / r)
    return out


def _entry_deltas(pipe, entries, weight) -> dict[str, torch.Tensor]:
    mods = {"unet": dict(pipe.unet.named_modules()), "te1": dict(pipe.text_encoder.named_modules())}
    out = {}
    for e in entries:
        w0 = mods[e.component][e.path].weight
        out[kohya_name(e, False)] = weight * e.delta(w0).reshape(w0.shape[0], -1)
    return out


def _add(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


def test_merge_loras_exact_is_the_weighted_sum(sd15, tmp_path):
    model, pipe = sd15
    ea = make_entries(pipe, "lora", rank=3, seed=1)
    eb = make_entries(pipe, "lora", rank=2, seed=2, alpha=1.0, every=2)
    save_safetensors_atomic(to_state_dict(ea, "kohya"), tmp_path / "a.safetensors")
    save_safetensors_atomic(to_state_dict(eb, "peft"), tmp_path / "b.safetensors")  # other spelling, no alpha
    eb_scale1 = [type(e)(e.component, e.path, e.algo, {k: v for k, v in e.tensors.items() if k != "alpha"})
                 for e in eb]
    out = tmp_path / "ab.safetensors"
    report = merge_loras([(tmp_path / "a.safetensors", 0.7), (tmp_path / "b.safetensors", -0.4)], out, model=model)
    want = _add(_entry_deltas(pipe, ea, 0.7), _entry_deltas(pipe, eb_scale1, -0.4))
    got = _file_deltas(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert report.overall_error == 0.0
    assert {r.rank for r in report.layers} == {3, 5}  # ranks concatenated where both touch a layer


def test_merge_loras_mixed_algorithms_exact_and_at_rank(sd15, tmp_path):
    model, pipe = sd15
    ea = make_entries(pipe, "lora", rank=2, seed=3)
    eh = make_entries(pipe, "loha", rank=2, seed=4, every=3)
    save_safetensors_atomic(to_state_dict(ea, "kohya"), tmp_path / "a.safetensors")
    save_safetensors_atomic(to_state_dict(eh, "kohya"), tmp_path / "h.safetensors")
    want = _add(_entry_deltas(pipe, ea, 1.0), _entry_deltas(pipe, eh, 0.5))
    inputs = [(tmp_path / "a.safetensors", 1.0), (tmp_path / "h.safetensors", 0.5)]
    merge_loras(inputs, tmp_path / "exact.safetensors", model=model)
    got = _file_deltas(tmp_path / "exact.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    # at rank 2: the error of each layer is the optimal (Eckart-Young) one
    report = merge_loras(inputs, tmp_path / "r2.safetensors", rank=2, model=model)
    got = _file_deltas(tmp_path / "r2.safetensors")
    by_name = {r.name: r for r in report.layers}
    names = {kohya_name(e, False): f"{e.component}:{e.path if e.component == 'unet' else te_path(e.path)}"
             for e in ea + eh}
    checked = 0
    for k, delta in want.items():
        s = torch.linalg.svdvals(delta.double())
        optimal = math.sqrt(float((s[2:] ** 2).sum()) / float((s ** 2).sum()))
        actual = float((got[k].double() - delta.double()).norm() / delta.double().norm())
        assert abs(actual - optimal) < 1e-4, k
        assert abs(by_name[names[k]].relative_error - optimal) < 1e-4
        checked += optimal > 1e-3
    assert checked > 5  # the LoHa layers really lost something


def test_dynamic_rank_rules_by_hand():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    # sv_ratio 5: keep s > 8 / 5 = 1.6 -> 8, 4, 2
    assert dynamic_rank(s, "sv_ratio", 5) == 3
    # sv_fro 0.9: squared shares 64, 80, 84, 85, 85.25, 85.3125 of 85.3125; 0.9^2 = 0.81 is passed at the 2nd
    assert dynamic_rank(s, "sv_fro", 0.9) == 2
    # sv_cumulative 0.9: sums 8, 12, 14, 15 of 15.75 -> 0.508, 0.762, 0.889, 0.952: the 4th reaches 0.9
    assert dynamic_rank(s, "sv_cumulative", 0.9) == 4
    assert dynamic_rank(s, "sv_ratio", 1000) == 5  # never the full length (kohya's clamp)
    with pytest.raises(ToolError):
        dynamic_rank(s, "sv_fro", 1.5)


def test_resize_dynamic_picks_hand_ranks(sd15, tmp_path):
    model, pipe = sd15
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    entries = make_entries(pipe, "lora", rank=6, seed=5, every=4)
    for e in entries:  # factors with known singular values: up = U diag(s), down = V^T (orthonormal)
        out_f, in_f = e.tensors["lora_up.weight"].shape[0], e.tensors["lora_down.weight"].shape[1]
        u, _ = torch.linalg.qr(torch.randn(out_f, 6, generator=g))
        v, _ = torch.linalg.qr(torch.randn(in_f, 6, generator=g))
        e.tensors.update({"lora_up.weight": u * s, "lora_down.weight": v.T.contiguous(), "alpha": torch.tensor(6.0)})
    save_safetensors_atomic(to_state_dict(entries, "kohya"), tmp_path / "in.safetensors")
    for method, param, rank in (("sv_ratio", 5, 3), ("sv_fro", 0.9, 2), ("sv_cumulative", 0.9, 4)):
        out = tmp_path / f"{method}.safetensors"
        report = resize_lora(tmp_path / "in.safetensors", out, dynamic=method, param=param, model=model)
        assert {r.rank for r in report.layers} == {rank}, method
        optimal = math.sqrt(float((s[rank:] ** 2).sum() / (s ** 2).sum()))
        assert all(abs(r.relative_error - optimal) < 1e-5 for r in report.layers)
        assert read_header(out).metadata["ss_network_dim"] == "Dynamic"
    report = resize_lora(tmp_path / "in.safetensors", tmp_path / "fixed.safetensors", rank=2, model=model)
    assert {r.rank for r in report.layers} == {2}
    want = _entry_deltas(pipe, entries, 1.0)
    got = _file_deltas(tmp_path / "fixed.safetensors")
    for k in want:
        err = float((got[k] - want[k]).norm() / want[k].norm())
        assert abs(err - math.sqrt(float((s[2:] ** 2).sum() / (s ** 2).sum()))) < 1e-5


def test_extract_recovers_a_known_low_rank_delta(sd15, tmp_path):
    model, pipe = sd15
    sd = load_tensors(model)
    g = torch.Generator().manual_seed(9)
    changed = {}
    for key in sorted(sd):
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight", "self_attn.k_proj.weight")):
            w = sd[key]
            delta = (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)) * 0.05
            sd[key] = w + delta
            changed[key] = delta
    tuned = tmp_path / "tuned.safetensors"
    save_safetensors_atomic(sd, tuned, read_header(model).metadata)
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(model, tuned, out, rank=2)
    assert len(report.layers) == len(changed)
    assert max(r.relative_error for r in report.layers) < 1e-5
    assert report.skipped  # unchanged layers are left out
    got = _file_deltas(out)
    assert any(k.startswith("lora_te_") for k in got)  # the text encoder changed, so it is in
    worst = 0.0
    for delta in changed.values():
        hits = [v for k, v in got.items() if v.shape == delta.shape and
                float((v - delta).norm() / delta.norm()) < 1e-4]
        worst = max(worst, 0.0 if hits else 1.0)
    assert worst == 0.0
    with pytest.raises(ToolError, match="nothing to extract"):
        extract_lora(model, model, tmp_path / "none.safetensors", rank=2)


def test_convert_round_trips_and_diffusers_loads_it(sd15, tmp_path):
    model, pipe = sd15
    entries = make_entries(pipe, "lora", rank=4, seed=6, alpha=4.0)  # alpha == rank: renaming only
    src = tmp_path / "k.safetensors"
    save_safetensors_atomic(to_state_dict(entries, "kohya"), src, {"ss_network_dim": "4", "note": "kept"})
    convert_lora(src, tmp_path / "d.safetensors", to="diffusers", model=model)
    convert_lora(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya", model=model)
    a, b = load_tensors(src), load_tensors(tmp_path / "k2.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_header(tmp_path / "k2.safetensors").metadata["note"] == "kept"
    d = load_tensors(tmp_path / "d.safetensors")
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in d)
    # alpha != rank: the scale is folded into lora_B; the delta is the same to rounding
    e2 = make_entries(pipe, "lora", rank=4, seed=7, alpha=1.5)
    save_safetensors_atomic(to_state_dict(e2, "kohya"), tmp_path / "k3.safetensors")
    convert_lora(tmp_path / "k3.safetensors", tmp_path / "d3.safetensors", to="diffusers", model=model,
                 dtype="fp16")
    assert {t.dtype for t in load_tensors(tmp_path / "d3.safetensors").values()} == {torch.float16}

    require_diffusers_lora_loader()
    before, after = _fused_by_diffusers(pipe, tmp_path / "d3.safetensors")
    mods = dict(pipe.unet.named_modules())
    n = 0
    for e in e2:
        if e.component != "unet":
            continue
        key = f"{e.path}.weight"
        want = e.delta(mods[e.path].weight)
        got = after[key] - before[key]
        assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max()) + 1e-6, key
        n += 1
    assert n > 5


def _fused_by_diffusers(pipe, path):
    """The UNet state of a copy of `pipe` before and after diffusers' own loader fuses the file (the oracle)."""
    ref = copy.deepcopy(pipe)
    before = {k: v.clone() for k, v in ref.unet.state_dict().items()}
    ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    ref.fuse_lora(lora_scale=1.0, adapter_names=["x"])
    ref.unload_lora_weights()
    return before, ref.unet.state_dict()


def test_cli_tools(sd15, tmp_path):
    from lora_ext.app.cli import main

    model, pipe = sd15
    save_safetensors_atomic(to_state_dict(make_entries(pipe, "lora", rank=4, seed=8), "kohya"),
                            tmp_path / "a.safetensors")
    a = str(tmp_path / "a.safetensors")
    assert main(["merge-loras", f"{a}:0.5", f"{a}:0.5", "--model", str(model), "--rank", "4",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    got, want = _file_deltas(tmp_path / "m.safetensors"), _file_deltas(tmp_path / "a.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert main(["resize", a, "--rank", "2", "--model", str(model), "--out", str(tmp_path / "r.safetensors")]) == 0
    assert main(["convert", a, "--to", "diffusers", "--model", str(model), "--out",
                 str(tmp_path / "c.safetensors")]) == 0
    assert main(["extract", "--base", str(model), "--tuned", str(model), "--rank", "2",
                 "--out", str(tmp_path / "e.safetensors")]) == 2  # nothing changed: a clear error
    assert not (tmp_path / "e.safetensors").exists()
    assert main(["resize", a, "--rank", "2", "--model", str(model), "--out", str(tmp_path / "r.safetensors")]) == 2


def test_randomized_svd_of_dense_deltas_meets_the_optimal_error():
    """Dense deltas at a small rank take the randomized SVD; its error (reported exactly) is within 1e-3 of the
    Eckart-Young optimum computed from the full spectrum, on a spectrum like a fine-tune's (decaying + noise)."""
    from lora_ext.formats.algorithms.base import LayerSpec
    from lora_ext.patch.keymap import Target
    from lora_ext.tools.lora_tools import LayerDelta, _truncate

    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(640, 640, generator=g))
    v, _ = torch.linalg.qr(torch.randn(320, 320, generator=g))
    s = 1.0 / (1 + torch.arange(320.0)) ** 1.2
    a = (u[:, :320] * s) @ v.T + 1e-4 * torch.randn(640, 320, generator=g)
    target = Target("unet:x", "unet", torch.nn.Linear(320, 640), "weight", None, None, LayerSpec("linear", (640, 320)),
                    "BASE")
    for rank in (4, 16):
        up, down, result, total = _truncate(LayerDelta(target, dense=a), rank, None)
        sv = torch.linalg.svdvals(a.double())
        optimal = math.sqrt(float((sv[rank:] ** 2).sum() / (sv ** 2).sum()))
        actual = float((a.double() - (up @ down).double()).norm() / a.double().norm())
        assert abs(result.relative_error - actual) < 1e-5  # the reported error is the real one
        assert actual - optimal < 1e-3, (rank, actual, optimal)
        assert abs(total - float((a.double() ** 2).sum())) < 1e-6 * total


def test_conv_layers_round_trip_through_merge_and_resize(sd15, tmp_path):
    """LoCon files (3x3 conv layers, kohya's [r, in, 3, 3] down / [out, r, 1, 1] up): merged exactly and resized to
    their own rank, every layer's delta comes back (published formula: up @ down * alpha / rank)."""
    from lora_ext.patch import adapter_for_pipeline
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors
    from lora_ext.patch.targets import selector

    model, pipe = sd15
    tensors = make_lora_tensors(adapter_for_pipeline(pipe), SynthSpec("lora", rank=3), selector("attn_mlp_conv"),
                                seed=4)
    src = tmp_path / "locon.safetensors"
    save_safetensors_atomic(tensors, src)
    want = _file_deltas(src)
    convs = [k for k in want if tensors[f"{k}.lora_down.weight"].dim() == 4 and
             tensors[f"{k}.lora_down.weight"].shape[-1] == 3]
    assert len(convs) > 5
    merge_loras([(src, 1.0)], tmp_path / "m.safetensors", model=model)
    resize_lora(src, tmp_path / "r.safetensors", rank=3, model=model)
    for out in ("m.safetensors", "r.safetensors"):
        got = _file_deltas(tmp_path / out)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        assert load_tensors(tmp_path / out)[f"{convs[0]}.lora_down.weight"].shape[-2:] == (3, 3)


def test_converted_locon_loads_in_diffusers_like_ours(sd15, tmp_path):
    """A LoCon file (attention, MLP and 3x3 convs) converted to diffusers/PEFT names: diffusers' own loader changes
    exactly the layers our patcher changes, to the same values."""
    import copy

    from lora_ext.formats.network import load_lora
    from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
    from lora_ext.patch.synth import SynthSpec, make_lora_tensors
    from lora_ext.patch.targets import selector

    require_diffusers_lora_loader()
    model, pipe = sd15
    tensors = make_lora_tensors(adapter_for_pipeline(pipe), SynthSpec("lora", rank=3, std=0.3),
                                selector("attn_mlp_conv"), seed=2)
    save_safetensors_atomic(tensors, tmp_path / "locon.safetensors")
    convert_lora(tmp_path / "locon.safetensors", tmp_path / "locon_d.safetensors", to="diffusers", model=model)
    before, after = _fused_by_diffusers(pipe, tmp_path / "locon_d.safetensors")
    ours = copy.deepcopy(pipe)
    Patcher(adapter_for_pipeline(ours)).apply([ActiveLora(load_lora(tmp_path / "locon.safetensors"))])
    mine = ours.unet.state_dict()
    changed_theirs = {k for k in before if not torch.equal(before[k], after[k])}
    changed_ours = {k for k in before if not torch.equal(before[k], mine[k])}
    assert changed_theirs == changed_ours and sum(mine[k].dim() == 4 and mine[k].shape[-1] == 3
                                                  for k in changed_ours) > 10
    for k in changed_ours:
        assert float((after[k] - mine[k]).abs().max()) <= 1e-6 * float(mine[k].abs().max()), k
