"""`lora_ext.session` on A1111's module tree (real ldm UNetModel + transformers CLIP, wrapped as the WebUI wraps it),
without the WebUI: merged weights against the LoRA formula computed by hand, every bad input turned into a sentence
while the good LoRAs still apply (or raised, strict), step windows, bit-exact restore."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lora_ext.errors import LoraExtError, LoraNotFoundError
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.models.convert import unet_diffusers_to_ldm
from lora_ext.patch.ldm import adapter_for_ldm
from lora_ext.prompt import parse_tag
from lora_ext.session import LoraSession, active_lora, step_of_call
from tests.test_layouts_convert import CLIP_L, LDM_UNET, ldm_unet_cls, randomise, tiny_unet  # noqa: F401


class DictResolver:
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def resolve(self, name: str) -> Path:
        if name not in self.files:
            raise LoraNotFoundError(f"Lora not found: {name}")
        return self.files[name]

    def shorthash(self, path: Path, metadata) -> str | None:
        return "h" + path.stem[:11]


def _session(resolver: DictResolver) -> LoraSession:
    """The session as the WebUI host makes it (A1111's model tree)."""
    return LoraSession(adapter_for_ldm, resolver)


def _tags(*items: list[str]) -> list[str]:
    return ["<lora:" + ":".join(i) + ">" for i in items]


@pytest.fixture
def model(ldm_unet_cls):  # noqa: F811
    unet = tiny_unet("sd1", seed=1)
    ldm_unet = ldm_unet_cls(**LDM_UNET["sd1"])
    ldm_unet.load_state_dict(unet_diffusers_to_ldm(unet.state_dict(), unet.config), strict=True)
    te = randomise(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 2)
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=ldm_unet),
                           cond_stage_model=SimpleNamespace(wrapped=SimpleNamespace(transformer=te)))


Q = "input_blocks.1.1.transformer_blocks.0.attn2.to_q"  # ldm path
Q_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"  # what sd-scripts writes for it
FC1 = "text_model.encoder.layers.0.mlp.fc1"
FC1_KOHYA = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def _module(model, path: str):
    if not path.startswith("text_model"):
        return model.model.diffusion_model.get_submodule(path)
    te = model.cond_stage_model.wrapped.transformer  # transformers 5 drops the `text_model.` level
    tail = path.removeprefix("text_model.")
    return next(m for name, m in te.named_modules() if name in (path, tail))


def _lora_file(tmp_path: Path, name: str, model, seed: int, rank: int = 3, alpha: float = 2.0,
               extra: dict | None = None) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for key, path in ((Q_KOHYA, Q), (FC1_KOHYA, FC1)):
        w = _module(model, path).weight
        t[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
        t[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
        t[f"{key}.alpha"] = torch.tensor(alpha)
    t.update(extra or {})
    p = tmp_path / f"{name}.safetensors"
    save_safetensors_atomic(t, p)
    return p, t


def _delta(t: dict, key: str, rank: int = 3, alpha: float = 2.0) -> torch.Tensor:
    return t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"] * (alpha / rank)


def test_two_tags_merge_to_the_formula_and_restore_bit_exactly(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    pb, tb = _lora_file(tmp_path, "b", model, 2)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa, "b": pb}))

    act = ctl.activate(model, _tags(["a", "0.8"], ["b", "0.5", "1.5"]))
    assert act.problems == [] and act.applied == ["a", "b"]
    want_q = q0 + 0.8 * _delta(ta, Q_KOHYA) + 1.5 * _delta(tb, Q_KOHYA)  # unet multiplier of b is 1.5
    want_fc = fc0 + 0.8 * _delta(ta, FC1_KOHYA) + 0.5 * _delta(tb, FC1_KOHYA)  # te multiplier of b is 0.5
    torch.testing.assert_close(_module(model, Q).weight.detach(), want_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(_module(model, FC1).weight.detach(), want_fc, rtol=0, atol=1e-6)
    assert act.hashes == {"a": "ha", "b": "hb"}

    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(_module(model, FC1).weight, fc0)
    assert ctl.is_pristine


def test_named_args_and_empty_list(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    ctl.activate(model, _tags(["a", "te=0", "unet=0.25"]))
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.25 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    assert torch.equal(_module(model, FC1).weight, fc0)
    act = ctl.activate(model, [])  # A1111 calls activate with [] when the prompt has no tag: everything off
    assert act.applied == [] and torch.equal(_module(model, Q).weight, q0)


def test_bad_inputs_become_problems_and_the_rest_applies(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "good", model, 1)
    # a file whose only module does not exist in this model
    pu, _ = _lora_file(tmp_path, "partly", model, 3, extra={
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2),
        "something_else.weight_x": torch.zeros(1)})
    # SDXL-width cross attention: another model family
    px = tmp_path / "xl.safetensors"
    save_safetensors_atomic({f"{Q_KOHYA}.lora_down.weight": torch.randn(4, 2048),
                             f"{Q_KOHYA}.lora_up.weight": torch.randn(32, 4)}, px)
    pbroken = tmp_path / "broken.safetensors"
    pbroken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"good": pa, "partly": pu, "xl": px, "broken": pbroken}))

    act = ctl.activate(model, _tags(["missing", "1"], ["good", "1"], ["xl", "1"], ["broken", "1"], ["partly", "0"],
                               ["good", "abc"]))
    text = "\n".join(act.problems)
    assert "Lora not found: missing" in text
    assert "xl: not applied" in text
    assert "broken" in text and str(pbroken) in text
    assert "partly: applied" in text and "1 of" in text and "down_blocks_9" in text and "something_else" in text
    assert "<lora:good:abc>" in text
    assert len(act.problems) == 5
    assert act.applied == ["good", "partly"]
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0)


def test_autocast_does_not_lower_the_merge_precision(model, tmp_path):
    """A1111 calls activate inside devices.autocast(); the merge must still be fp32."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctl.activate(model, _tags(["a", "0.7"]))
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.7 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    assert _module(model, Q).weight.dtype == torch.float32


def test_new_model_object_restores_and_forgets_the_old_one(model, tmp_path, ldm_unet_cls):  # noqa: F811
    pa, _ = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    ctl.activate(model, _tags(["a", "1"]))
    other = SimpleNamespace(model=SimpleNamespace(diffusion_model=ldm_unet_cls(**LDM_UNET["sd1"])),
                            cond_stage_model=model.cond_stage_model)
    ctl.activate(other, _tags(["a", "1"]))
    assert torch.equal(_module(model, Q).weight, q0)  # the previous model was put back before the switch
    assert not torch.equal(other.model.diffusion_model.get_submodule(Q).weight, q0)
    ctl.forget_model()
    assert ctl.patcher is None


def test_block_weights_and_multipliers_reach_the_patcher():
    """te x lbw(BASE) on text encoders, unet x lbw(block) on UNet blocks (lora-block-weight's rule)."""
    lora = active_lora(None, parse_tag("<lora:x:0.5:2:lbw=INALL>"))

    def m(component: str, block: str) -> float:
        return lora.multiplier(SimpleNamespace(component=component, block=block))

    assert (m("te1", "BASE"), m("unet", "IN05"), m("unet", "OUT11")) == (0.5, 2.0, 0.0)
    plain = active_lora(None, parse_tag("<lora:x:0.5:2>"))
    assert plain.multiplier(SimpleNamespace(component="unet", block="IN00")) == 2.0


def test_step_of_call():
    assert [step_of_call(c, 6, 6) for c in range(7)] == [0, 1, 2, 3, 4, 5, 5]
    assert [step_of_call(c, 12, 6) for c in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # two calls a step


def test_backups_freed_on_restore_when_not_retained(model, tmp_path):
    pa, _ = _lora_file(tmp_path, "a", model, 1)
    ctl = _session(DictResolver({"a": pa}))
    ctl.activate(model, _tags(["a", "1"]))
    ctl.restore()
    kept = ctl.patcher.backup_bytes
    w = _module(model, Q).weight
    assert kept >= w.numel() * w.element_size()  # retained for a fast next switch by default
    ctl.retain_bytes = 0  # the setting changes on an existing patcher too
    ctl.activate(model, _tags(["a", "1"]))
    ctl.restore()
    assert ctl.patcher.backup_bytes == 0


def test_start_stop_window_switches_the_unet_part_only(model, tmp_path):
    """<lora:a:1:start=2:stop=4> over 6 steps: the text encoder has the LoRA throughout, the UNet at steps 2 and 3."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    act = ctl.activate(model, _tags(["a", "1", "start=2", "stop=4"]))
    assert act.problems == []
    want_fc = fc0 + _delta(ta, FC1_KOHYA)
    unet_on = []
    for step in range(6):
        ctl.at_step(step, 6)
        torch.testing.assert_close(_module(model, FC1).weight.detach(), want_fc, rtol=0, atol=1e-6)
        q = _module(model, Q).weight.detach()
        if torch.equal(q, q0):
            unet_on.append(False)
        else:
            torch.testing.assert_close(q, q0 + _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
            unet_on.append(True)
    assert unet_on == [False, False, True, True, False, False]
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(_module(model, FC1).weight, fc0)
    assert ctl.at_step(3, 6) is None  # nothing windowed after the generation


def test_fractional_window_and_no_window_is_untouched(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    ctl.activate(model, _tags(["a", "1", "stop=0.5"]))  # floor(0.5 * 10) = 5: steps 0..4
    on = []
    for step in range(10):
        ctl.at_step(step, 10)
        on.append(not torch.equal(_module(model, Q).weight, q0))
    assert on == [True] * 5 + [False] * 5
    ctl.activate(model, _tags(["a", "1"]))
    assert ctl.at_step(7, 10) is None


def test_strict_raises_the_first_problem_and_touches_nothing(model, tmp_path):
    pa, _ = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    with pytest.raises(LoraNotFoundError, match="missing"):
        ctl.activate(model, _tags(["a", "1"], ["missing", "1"]), strict=True)
    with pytest.raises(LoraExtError, match="abc"):
        ctl.activate(model, _tags(["a", "abc"]), strict=True)
    assert torch.equal(_module(model, Q).weight, q0) and ctl.is_pristine


def _q_out(model, x: torch.Tensor) -> torch.Tensor:
    return _module(model, Q)(x).detach()


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_schedule_follows_the_interpolated_weight_each_step(model, tmp_path, mode):
    """<lora:a:1:0@0,1@1> over 5 steps: the UNet layer computes as if the LoRA were merged at weight step/4 (hand
    formula), the text encoder has weight 1 throughout; in bypass mode no weight is ever written."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    x = torch.randn(2, 7, q0.shape[1], generator=torch.Generator().manual_seed(3))
    ctl = _session(DictResolver({"a": pa}))
    ctl.schedule_mode = mode
    act = ctl.activate(model, _tags(["a", "1", "0@0,1@1"]))
    assert act.problems == [] and act.mode == mode
    assert any("UNet weight changes during sampling" in n for n in act.notes)
    for step in range(5):
        ctl.at_step(step, 5)
        w = step / 4
        want = torch.nn.functional.linear(x, q0 + w * _delta(ta, Q_KOHYA))
        torch.testing.assert_close(_q_out(model, x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_module(model, FC1).weight.detach(), fc0 + _delta(ta, FC1_KOHYA), rtol=0,
                                   atol=1e-6)
        if mode == "bypass":
            assert torch.equal(_module(model, Q).weight, q0) and ctl.bypass_layers == 1
    ctl.restore()
    assert ctl.bypass_layers == 0
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(_module(model, FC1).weight, fc0)
    assert torch.equal(_q_out(model, x), torch.nn.functional.linear(x, q0))


def test_schedule_with_two_loras_and_a_constant_one(model, tmp_path):
    """A constant LoRA stays merged while a scheduled one runs as bypass on the same layer: the layer's output is the
    sum of both (hand formula), and a te= schedule gives the text encoder its weight at step 0."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    pb, tb = _lora_file(tmp_path, "b", model, 2)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    x = torch.randn(3, q0.shape[1], generator=torch.Generator().manual_seed(4))
    ctl = _session(DictResolver({"a": pa, "b": pb}))
    ctl.schedule_mode = "bypass"
    ctl.activate(model, ["<lora:a:0.5>", "<lora:b:te=0.25@0,1@1:unet=1@0,0@10>"])
    torch.testing.assert_close(_module(model, FC1).weight.detach(),
                               fc0 + 0.5 * _delta(ta, FC1_KOHYA) + 0.25 * _delta(tb, FC1_KOHYA), rtol=0, atol=1e-6)
    for step, wb in ((0, 1.0), (3, 0.7), (10, 0.0), (12, 0.0)):
        ctl.at_step(step, 20)
        want = torch.nn.functional.linear(x, q0 + 0.5 * _delta(ta, Q_KOHYA) + wb * _delta(tb, Q_KOHYA))
        torch.testing.assert_close(_q_out(model, x), want, rtol=1e-5, atol=1e-6)
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(_module(model, FC1).weight, fc0)


def test_hires_pass_uses_the_hr_weights(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    tag = _tags(["a", "0.5", "hrte=1", "hrunet=0.2"])
    ctl.activate(model, tag)
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.5 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    ctl.activate(model, tag, hires=True)
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.2 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    torch.testing.assert_close(_module(model, FC1).weight.detach(), fc0 + _delta(ta, FC1_KOHYA), rtol=0, atol=1e-6)
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0)


def test_auto_mode_takes_the_cheaper_path_and_says_so(model, tmp_path, monkeypatch):
    """auto: re-merge at each change unless the estimate says the whole pass in bypass costs less (the estimate
    itself: test_bypass and bench/bench_bypass.py). The note names the LoRA, the path and both estimates."""
    import lora_ext.session as session_module
    from lora_ext.patch.bypass import GenerationShape

    pa, _ = _lora_file(tmp_path, "a", model, 1)
    ctl = _session(DictResolver({"a": pa}))
    calls = []

    def fake(contribs, shape):
        calls.append((len(contribs), shape))
        return 0.01, 0.002  # one re-merge: 10 ms; bypass: 2 ms per UNet call

    monkeypatch.setattr(session_module, "estimate_seconds", fake)
    shape = GenerationShape(steps=20, height=64, width=64)
    window = ctl.activate(model, _tags(["a", "1", "start=3"]), shape=shape)  # 1 change: 10 ms < 20 x 2 ms
    assert window.mode == "merge" and window.notes == [
        "a: UNet weight changes during sampling; applied by re-merging at its 1 changes (estimated 0.01 s; bypass "
        "over 20 steps: 0.04 s)"]
    ramp = ctl.activate(model, _tags(["a", "1", "0@0,1@1"]), shape=shape)  # 19 changes: 190 ms > 40 ms
    assert ramp.mode == "bypass" and ramp.notes[0].startswith("a: UNet weight changes during sampling; applied as "
                                                               "bypass on 1 layers (estimated 0.04 s over 20 steps")
    assert calls[-1] == (1, shape)  # the UNet layers of the changing LoRA, and the host's shape
    ctl.schedule_mode = "merge"  # the setting overrides the estimate
    assert ctl.activate(model, _tags(["a", "1", "0@0,1@1"]), shape=shape).mode == "merge"
    ctl.restore()


def test_per_image_loras_in_one_batch(model, tmp_path):
    """Three images: a shared LoRA merged once; 'b' at different weights per image and absent from one: each UNet row
    and each text-encoder call computes its own image's formula (hand math), also across the CFG layout (conditional
    rows, then unconditional ones) and split calls; nothing of 'b' is written into weights; restore is exact."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    pb, tb = _lora_file(tmp_path, "b", model, 2)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa, "b": pb}))
    images = [["<lora:a:0.5>", "<lora:b:1>"], ["<lora:a:0.5>"], ["<lora:a:0.5>", "<lora:b:0.3:unet=0.6>"]]
    act = ctl.activate(model, [], per_image=images)
    assert act.problems == [] and ctl.per_image and set(act.applied) == {"a", "b"} and set(act.hashes) == {"a", "b"}
    assert any("use b differently" in n for n in act.notes)
    # what is merged: 'a' only
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.5 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    te_b, unet_b = [1.0, 0.0, 0.3], [1.0, 0.0, 0.6]
    g = torch.Generator().manual_seed(7)
    rows = [0, 1, 2, 0, 1, 2]  # CFG: three conditional rows, then three unconditional ones
    x = torch.randn(6, 5, q0.shape[1], generator=g)
    ctl.batch_rows(rows)
    ctl.unet_call(6)
    got = _q_out(model, x)
    for r, image in enumerate(rows):
        w = q0 + 0.5 * _delta(ta, Q_KOHYA) + unet_b[image] * _delta(tb, Q_KOHYA)
        torch.testing.assert_close(got[r], torch.nn.functional.linear(x[r], w), rtol=1e-5, atol=1e-6)
    ctl.batch_rows(rows)  # the next step, the conditional and unconditional halves in two calls
    ctl.unet_call(3)
    first = _q_out(model, x[:3])
    ctl.unet_call(3)
    second = _q_out(model, x[3:])
    torch.testing.assert_close(torch.cat([first, second]), got, rtol=1e-6, atol=1e-7)
    fc_in = torch.randn(2, fc0.shape[1], generator=g)
    for image in range(3):
        ctl.text_image(image)
        w = fc0 + 0.5 * _delta(ta, FC1_KOHYA) + te_b[image] * _delta(tb, FC1_KOHYA)
        want = torch.nn.functional.linear(fc_in, w, _module(model, FC1).bias)
        torch.testing.assert_close(_module(model, FC1)(fc_in).detach(), want, rtol=1e-5, atol=1e-6)
    ctl.restore()
    assert not ctl.per_image
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(_module(model, FC1).weight, fc0)
    assert torch.equal(_q_out(model, x), torch.nn.functional.linear(x, q0))


def test_per_image_batch_with_the_same_loras_is_a_plain_merge(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    act = ctl.activate(model, [], per_image=[["<lora:a:0.5>"], ["<lora:a:0.50>"]])
    assert not ctl.per_image and ctl.bypass_layers == 0 and act.notes == []
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.5 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    ctl.restore()


def test_per_image_schedules_follow_each_image(model, tmp_path):
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    q0 = _module(model, Q).weight.detach().clone()
    ctl = _session(DictResolver({"a": pa}))
    ctl.activate(model, [], per_image=[["<lora:a:1:0@0,1@1>"], ["<lora:a:1:start=2>"]])
    x = torch.randn(2, q0.shape[1], generator=torch.Generator().manual_seed(8))
    for step, weights in ((0, (0.0, 0.0)), (2, (0.5, 1.0)), (4, (1.0, 1.0))):
        ctl.at_step(step, 5)
        ctl.batch_rows([0, 1])
        ctl.unet_call(2)
        got = _q_out(model, x)
        for r, w in enumerate(weights):
            torch.testing.assert_close(got[r], torch.nn.functional.linear(x[r], q0 + w * _delta(ta, Q_KOHYA)),
                                       rtol=1e-5, atol=1e-6)
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0)


def test_negative_prompt_loras_act_on_the_unconditional_branch_only(model, tmp_path):
    """`negative=`: a LoRA from the negative prompt reaches the unconditional rows and the encoding of the negative
    prompt, never the conditional rows or the positive encoding (hand formulas); the positive tags still merge."""
    pa, ta = _lora_file(tmp_path, "a", model, 1)
    pb, tb = _lora_file(tmp_path, "b", model, 2)
    q0 = _module(model, Q).weight.detach().clone()
    fc0 = _module(model, FC1).weight.detach().clone()
    fc = _module(model, FC1)
    ctl = _session(DictResolver({"a": pa, "b": pb}))
    act = ctl.activate(model, ["<lora:a:0.5>"], negative=[["<lora:b:0.8>"]])
    assert act.problems == [] and set(act.applied) == {"a", "b"}
    assert any("from the negative prompt" in n for n in act.notes)
    torch.testing.assert_close(_module(model, Q).weight.detach(), q0 + 0.5 * _delta(ta, Q_KOHYA), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, q0.shape[1], generator=g)
    ctl.batch_rows([0, 0], uncond=[False, True])  # one image: its conditional row, then its unconditional one
    ctl.unet_call(2)
    got = _q_out(model, x)
    base = q0 + 0.5 * _delta(ta, Q_KOHYA)
    torch.testing.assert_close(got[0], torch.nn.functional.linear(x[0], base), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], torch.nn.functional.linear(x[1], base + 0.8 * _delta(tb, Q_KOHYA)),
                               rtol=1e-5, atol=1e-6)
    y = torch.randn(3, fc0.shape[1], generator=g)
    want_pos = torch.nn.functional.linear(y, fc0 + 0.5 * _delta(ta, FC1_KOHYA), fc.bias)
    want_neg = torch.nn.functional.linear(y, fc0 + 0.5 * _delta(ta, FC1_KOHYA) + 0.8 * _delta(tb, FC1_KOHYA), fc.bias)
    ctl.text_image(0)
    torch.testing.assert_close(fc(y).detach(), want_pos, rtol=1e-5, atol=1e-6)
    ctl.text_image(0, negative=True)
    torch.testing.assert_close(fc(y).detach(), want_neg, rtol=1e-5, atol=1e-6)
    ctl.text_image(0)
    torch.testing.assert_close(fc(y).detach(), want_pos, rtol=1e-5, atol=1e-6)
    ctl.restore()
    assert torch.equal(_module(model, Q).weight, q0) and torch.equal(fc.weight, fc0)
