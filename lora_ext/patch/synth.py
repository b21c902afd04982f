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
    algorithm: str = "lora"  # "lora" | "loha" | "lokr" | "full" | "ia3"
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


def make_lora_tensors(adapter: ModelAdapter, spec: SynthSpec = SynthSpec(),
                      select: Callable[[Target], bool] = select_attention, *, seed: int = 0,
                      components: tuple[str, ...] = ("unet", "te1", "te2")) -> dict[str, Tensor]:
    """Random LoRA tensors for every selected target of the model, named as `spec.naming` tools write them."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}

    def rnd(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=g) * spec.std).to(spec.dtype)

    for target in sorted(adapter.targets.values(), key=lambda t: t.key):
        if target.component not in components or not select(target):
            continue
        shape = tuple(target.spec.weight_shape)
        if target.spec.kind not in ("linear", "conv"):
            continue
        name = file_module_name(adapter, target, spec.naming)
        out_f, in_f = shape[0], shape[1]
        ksize = shape[2:] if len(shape) == 4 else ()
        r = spec.rank
        alpha = spec.alpha if spec.alpha is not None else r / 2
        if spec.algorithm == "lora":
            down = rnd(r, in_f, *ksize)
            up = rnd(out_f, r, *([1] * len(ksize)))
            if spec.naming == "peft":
                out[f"{name}.lora_A.weight"] = down
                out[f"{name}.lora_B.weight"] = up
            else:
                out[f"{name}.lora_down.weight"] = down
                out[f"{name}.lora_up.weight"] = up
        elif spec.algorithm == "loha":
            flat_in = in_f * (int(torch.tensor(ksize).prod()) if ksize else 1)
            out[f"{name}.hada_w1_a"] = rnd(out_f, r)
            out[f"{name}.hada_w1_b"] = rnd(r, flat_in)
            out[f"{name}.hada_w2_a"] = rnd(out_f, r)
            out[f"{name}.hada_w2_b"] = rnd(r, flat_in)
            if ksize:
                out[f"{name}.hada_w1_a"] = rnd(out_f, r) * 10
                out[f"{name}.hada_w2_a"] = rnd(out_f, r) * 10
        elif spec.algorithm == "lokr":
            f1 = _small_factor(out_f)
            g1 = _small_factor(in_f)
            out[f"{name}.lokr_w1"] = rnd(f1, g1) * 10
            out[f"{name}.lokr_w2_a"] = rnd(out_f // f1, r)
            out[f"{name}.lokr_w2_b"] = rnd(r, (in_f // g1) * (int(torch.tensor(ksize).prod()) if ksize else 1))
        elif spec.algorithm == "full":
            out[f"{name}.diff"] = rnd(*shape) * 0.1
            if target.bias_attr is not None:
                out[f"{name}.diff_b"] = rnd(out_f) * 0.1
            alpha = 0
        elif spec.algorithm == "ia3":
            out[f"{name}.weight"] = rnd(out_f) * 10
            alpha = 0
        else:
            raise ValueError(f"unknown synthetic algorithm {spec.algorithm!r}")
        if alpha:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        if spec.dora:
            out[f"{name}.dora_scale"] = (1.0 + rnd(1, in_f, *([1] * len(ksize))).float()).to(spec.dtype)
    return out


def _small_factor(n: int) -> int:
    """Largest divisor of n that is <= sqrt(n) (LoKr splits dimensions into two factors)."""
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            best = i
        i += 1
    return best
