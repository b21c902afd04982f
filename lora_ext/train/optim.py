"""Optimizers and learning-rate schedules by name.

Optimizers: adamw (torch; fused on CUDA), adamw8bit (bitsandbytes), prodigy (prodigyopt), adafactor
(transformers.optimization.Adafactor with an external learning rate), sgd (torch). The optional packages are imported
only when chosen; a missing one is a ConfigError that says what to pip install. `optimizer_args` go to the optimizer's
constructor unchanged (e.g. weight_decay, betas, momentum, d_coef).

Schedules: diffusers.optimization.get_scheduler (constant, constant_with_warmup, cosine, cosine_with_restarts, linear,
polynomial); step counts are in scheduler steps (see `build_lr_scheduler`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lora_ext.errors import ConfigError

logger = logging.getLogger(__name__)

# optimizer name -> (module to import, pip package) for the optional ones
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
}


def check_optimizer_available(name: str) -> None:
    """Raise ConfigError (with the pip command) if the optimizer's optional package is not importable."""
    if name not in OPTIONAL_PACKAGES:
        return
    module, package = OPTIONAL_PACKAGES[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"optimizer: {name!r} needs the {package} package, which is not installed "
                          f"({exc.__class__.__name__}: {exc}); run `pip install {package}` in this Python "
                          "environment or choose adamw") from exc


def optimizer_warnings(name: str, learning_rate: float, lr_scheduler: str, warmup_steps: int) -> list[str]:
    """Settings that are legal but probably not meant (shown as warning events)."""
    out = []
    if name == "prodigy" and learning_rate < 0.1:
        out.append(f"prodigy adapts the step size itself and expects learning_rate around 1.0; {learning_rate:g} "
                   "makes it learn very slowly")
    if lr_scheduler == "constant" and warmup_steps > 0:
        out.append("lr_warmup_steps is ignored by the 'constant' scheduler; use constant_with_warmup")
    return out


def build_optimizer(name: str, param_groups: Sequence[Mapping[str, Any]], *, learning_rate: float,
                    optimizer_args: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (dicts with 'params' and optionally 'lr'); lr = default group lr."""
    args = dict(optimizer_args or {})
    groups = [dict(g) for g in param_groups]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("network_targets: no trainable parameter (the network selected no layer)")
    check_optimizer_available(name)
    try:
        if name == "adamw":
            params = [p for g in groups for p in g["params"]]
            if "fused" not in args and all(p.is_cuda and p.dtype == torch.float32 for p in params):
                args["fused"] = True
            return torch.optim.AdamW(groups, lr=learning_rate, **args)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=learning_rate, **args)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            fixed = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
            return Adafactor(groups, lr=learning_rate, **{**fixed, **args})
        if name == "adamw8bit":
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(groups, lr=learning_rate, **args)
        if name == "prodigy":
            import prodigyopt

            return prodigyopt.Prodigy(groups, lr=learning_rate, **args)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args: {name} does not accept {sorted(args)} ({exc})") from exc
    raise ConfigError(f"optimizer: unknown optimizer {name!r}")


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule `name`. warmup_steps/total_steps count scheduler.step() calls.

    Under accelerate each optimizer step calls scheduler.step() once per process, so the caller passes counts
    multiplied by the number of processes (as diffusers' training scripts do).
    """
    from diffusers.optimization import get_scheduler

    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    try:
        return get_scheduler(name, optimizer, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"lr_scheduler: {exc}") from exc
