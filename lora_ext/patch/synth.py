"""Synthetic LoRA files for a given model: random factors under the names real tools write.

Used by the demo, the benchmarks and the tests (the names come from the model's key map, the values are random).
Naming styles:
  "kohya"         what kohya sd-scripts writes: SD1/SD2 `lora_unet_<diffusers path>`, SDXL `lora_unet_<ldm path>`,
                  text encoders `lora_te_` (one encoder) or `lora_te1_`/`lora_te2_`
  "kohya-compvis" `lora_unet_<ldm path>` for every family (A1111/LyCORIS-style compvis names)
  "peft"          `unet.<path>.lora_A.weight`/`lora_B.weight`, `text_encoder[_2].<path>` (diffusers/PEFT format)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_ext.formats.algorithms import algorithm_named
from lora_ext.patch.keymap import ModelAdapter, Target

ATTENTION_PROJ = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TRANSFORMER_LINEAR = ATTENTION_PROJ + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def select_attention(target: Target) -> bool:
    """UNet attention projections (q, k, v, out of attn1/attn2) and text-encoder attention + MLP."""
    path = target.key.split(":", 1)[1]
    if target.component == "unet":
        return path.endswith(ATTENTION_PROJ)
    return path.endswith(TE_MODULES)


def select_transformer(target: Target) -> bool:
    """kohya's default LoRA targets: every Linear/1x1 conv inside Transformer2DModel blocks, TE attention + MLP."""
    path = target.key.split(":", 1)[1]
    if target.component == "unet":
        return path.endswith(TRANSFORMER_LINEAR)
    return path.endswith(TE_MODULES)


def select_locon(target: Target) -> bool:
    """select_transformer plus the UNet's convolutions in resnets, down/upsamplers (LoCon / LyCORIS)."""
    return select_transformer(target) or (target.component == "unet" and target.spec.kind == "conv")


@dataclass(frozen=True)
class SynthSpec:
    algorithm: str = "lora"  # the `name` of any registered algorithm ("lora", "loha", "lokr", "full", "norm", "ia3")
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank / 2 (a non-trivial scale); 0 -> no alpha key
    naming: str = "kohya"
    dora: bool = False
    std: float = 0.05  # factor init std; big enough to see, small enough to stay sane
    dtype: torch.dtype = torch.float32


def file_module_name(adapter: ModelAdapter, target: Target, naming: str) -> str:
    """The module name a tool of `naming` style writes for this target."""
    if naming == "peft":
        return target.spellings["peft"]
    if naming == "kohya-compvis" or (naming == "kohya" and adapter.arch == "sdxl"):
        return target.spellings["kohya_compvis"]
    if naming == "kohya":
        return target.spellings["kohya_diffusers"]
    raise ValueError(f"unknown naming style {naming!r}")


_PEFT_NAMES = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}  # what peft writes


def make_lora_tensors(adapter: ModelAdapter, spec: SynthSpec = SynthSpec(),
                      select: Callable[[Target], bool] = select_attention, *, seed: int = 0,
                      components: tuple[str, ...] = ("unet", "te1", "te2")) -> dict[str, Tensor]:
    """Random LoRA tensors for every selected target of the model, named as `spec.naming` tools write them.

    The tensors of one module come from the algorithm's own `synthesize` (any registered algorithm, by name); targets
    whose kind of layer the algorithm does not apply to are skipped."""
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
