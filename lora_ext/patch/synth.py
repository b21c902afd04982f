"""Synthetic LoRA files for a given model: random factors under the names real tools write.

Used by the demo, the benchmarks and the tests (the names come from the model's key map, the values are random).
Which layers (`selector(preset)`) and the module names of each naming style ("kohya", "kohya-compvis", "peft":
`file_module_name`) come from `lora_ext.patch.targets`, the rules training uses; peft files get
`.lora_A.weight`/`.lora_B.weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_ext.formats.algorithms import algorithm_named
from lora_ext.patch.keymap import ModelAdapter, Target
from lora_ext.patch.targets import file_module_name, selector


@dataclass(frozen=True)
class SynthSpec:
    algorithm: str = "lora"  # the `name` of any registered algorithm ("lora", "loha", "lokr", "full", "norm", "ia3")
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank / 2 (a non-trivial scale); 0 -> no alpha key
    naming: str = "kohya"
    dora: bool = False
    std: float = 0.05  # factor init std; big enough to see, small enough to stay sane
    dtype: torch.dtype = torch.float32


_PEFT_NAMES = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}  # what peft writes


def make_lora_tensors(adapter: ModelAdapter, spec: SynthSpec = SynthSpec(),
                      select: Callable[[Target], bool] | None = None, *, seed: int = 0,
                      components: tuple[str, ...] = ("unet", "te1", "te2")) -> dict[str, Tensor]:
    """Random LoRA tensors for every selected target of the model, named as `spec.naming` tools write them.

    The tensors of one module come from the algorithm's own `synthesize` (any registered algorithm, by name); targets
    whose kind of layer the algorithm does not apply to are skipped. `select`: which layers (default: the "attn"
    preset with the text encoders, `lora_ext.patch.targets.selector("attn")`)."""
    select = select or selector("attn")
    cls = algorithm_named(spec.algorithm)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}

    def rnd(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=g) * spec.std).to(spec.dtype)

    for target in sorted(adapter.targets.values(), key=lambda t: t.key):
        if target.component not in components or not select(target):
            continue
        tensors = cls.synthesize(target.spec, spec.rank, rnd, with_bias=target.bias_attr is not None)
        if tensors is None:
            continue
        name = file_module_name(adapter, target, spec.naming)
        for suffix, t in tensors.items():
            out[f"{name}.{_PEFT_NAMES.get(suffix, suffix) if spec.naming == 'peft' else suffix}"] = t
        alpha = spec.alpha if spec.alpha is not None else spec.rank / 2
        if alpha and cls.uses_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        shape = target.spec.weight_shape
        if spec.dora and len(shape) >= 2:  # DoRA needs a 2-D or conv weight
            out[f"{name}.dora_scale"] = (1.0 + rnd(1, shape[1], *([1] * (len(shape) - 2))).float()).to(spec.dtype)
    return out
