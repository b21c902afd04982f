"""Optimizers and learning-rate schedules by name (lora_ext.train.optim)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from lora_ext.errors import ConfigError
from lora_ext.train.optim import build_lr_scheduler, build_optimizer, check_optimizer_available, optimizer_warnings


def _groups():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return [{"params": [a], "lr": 1e-3, "name": "unet"}, {"params": [b], "lr": 5e-4, "name": "text_encoder"}]


@pytest.mark.parametrize(("name", "cls"), [("adamw", "AdamW"), ("sgd", "SGD"), ("adafactor", "Adafactor")])
def test_builtin_optimizers_keep_group_learning_rates(name, cls):
    opt = build_optimizer(name, _groups(), learning_rate=1e-3)
    assert type(opt).__name__ == cls
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    loss = sum((p**2).sum() for g in opt.param_groups for p in g["params"])
    loss.backward()
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    opt.step()
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(not torch.equal(x, y) for x, y in zip(before, after))


def test_adamw_is_not_fused_on_cpu_and_takes_optimizer_args():
    opt = build_optimizer("adamw", _groups(), learning_rate=1e-3, optimizer_args={"weight_decay": 0.1,
                                                                                   "betas": [0.9, 0.99]})
    assert not opt.defaults.get("fused")
    assert opt.defaults["weight_decay"] == 0.1 and tuple(opt.defaults["betas"]) == (0.9, 0.99)


def test_bad_optimizer_args_name_the_option():
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer("sgd", _groups(), learning_rate=1e-3, optimizer_args={"bogus": 1})


@pytest.mark.parametrize(("name", "package"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_missing_optional_package_says_what_to_install(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # importing it raises ImportError
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        check_optimizer_available(name)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        build_optimizer(name, _groups(), learning_rate=1.0)


def test_prodigy_is_built_from_prodigyopt(monkeypatch):
    made = {}

    class FakeProdigy(torch.optim.SGD):
        def __init__(self, params, lr, **kw):
            made.update(lr=lr, **kw)
            super().__init__(params, lr=lr)

    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=FakeProdigy))
    opt = build_optimizer("prodigy", _groups(), learning_rate=1.0, optimizer_args={"d_coef": 2.0})
    assert isinstance(opt, FakeProdigy) and made == {"lr": 1.0, "d_coef": 2.0}
    assert optimizer_warnings("prodigy", 1e-4, "constant", 0)  # a tiny lr with prodigy is flagged
    assert not optimizer_warnings("prodigy", 1.0, "constant", 0)


def _lrs(name, steps=10, warmup=2, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = build_lr_scheduler(name, opt, warmup_steps=warmup, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_follow_their_formulas():
    # warm-up: lr * t / w; cosine: 0.5 * (1 + cos(pi * progress)); linear: (T - t) / (T - w)
    T, w = 10, 2
    cos = [t / w if t < w else 0.5 * (1 + math.cos(math.pi * (t - w) / (T - w))) for t in range(T)]
    lin = [t / w if t < w else (T - t) / (T - w) for t in range(T)]
    assert _lrs("cosine") == pytest.approx(cos)
    assert _lrs("linear") == pytest.approx(lin)
    assert _lrs("constant_with_warmup") == pytest.approx([0.0, 0.5] + [1.0] * 8)
    assert _lrs("constant") == pytest.approx([1.0] * 10)
    restarts = _lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[2] == pytest.approx(1.0) and restarts[6] == pytest.approx(1.0)  # two cycles of 4 steps
    poly = _lrs("polynomial", power=2.0)
    assert poly[2] == pytest.approx(1.0) and poly[6] < _lrs("polynomial", power=1.0)[6]
    assert optimizer_warnings("adamw", 1e-4, "constant", 5)  # warm-up ignored by 'constant' is flagged
