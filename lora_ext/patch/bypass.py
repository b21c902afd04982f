"""Bypass mode: a LoRA applied on a layer's output, y = layer(x) + m * bypass(x), instead of merged into its weight.

The patcher merges (zero per-step cost, see `lora_ext.patch.patcher`). Bypass serves where one merge per generation
cannot: multipliers that change every step (weight schedules), weights that cannot hold the merged result (FP8
storage: the delta would be rounded away; quantized weights, `lora_ext.patch.quant`, which cannot take a merge at
all), and different LoRAs per image of a batch. The math is each algorithm's own `Algorithm.bypass` (tested equal to
the merged layer's forward for every algorithm, dtype and layer kind); this module only routes it:

- a forward hook on the layer *instance* (`Module.register_forward_hook`): no `torch.nn` class is patched, no attention
  function swapped, no weight written, so the original weights stay bit-exact by construction and `clear()` (removing
  the hooks) is the restore;
- each layer gets the contributions the patcher planned for it (`Patcher.apply(..., divert=...)` hands them over), in
  the plan's order, each with its multiplier and an optional *gain*: a number per LoRA (`set_gain`) that the session
  changes between steps at no cost (a schedule's weight), or a tensor of one value per sample of the batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lora_ext.errors import ShapeMismatchError
from lora_ext.patch.keymap import Target
from lora_ext.patch.quant import dequantize, quantized

Gain = float | Tensor
"""A multiplier on top of a contribution's own: a number, or a 1-D tensor with one value per sample of the batch."""


def can_bypass(target: Target) -> bool:
    """Whether the layer's output can take a bypass: not a q/k/v third of a fused `in_proj_weight`, and not the
    `out_proj` of an `nn.MultiheadAttention` (which reads the weight without calling the module, so no hook runs)."""
    return target.chunk is None and type(target.module).__name__ != "NonDynamicallyQuantizableLinear"


def needs_bypass(target: Target) -> bool:
    """Whether merging into the weight would lose the delta: FP8 storage (A1111's "FP8 weight"), whose 3 mantissa bits
    round a LoRA's small change away, or a quantized weight (`lora_ext.patch.quant`: Forge's GGUF and 4-bit), which
    cannot take a merge at all. Such layers get their LoRAs as bypass."""
    weight = getattr(target.module, target.weight_attr)
    if quantized(weight) is not None:
        return can_bypass(target)
    return weight.is_floating_point() and weight.element_size() == 1 and can_bypass(target)


@dataclass(frozen=True, eq=False)
class _Entry:
    contribution: Any  # lora_ext.patch.patcher._Contribution (module, target, multiplier, dyn)
    gain: Hashable | None


class _Layer:
    """The hook of one layer and its entries."""

    def __init__(self, bypass: Bypass, target: Target) -> None:
        self.target = target
        self.entries: list[_Entry] = []
        self.handle = target.module.register_forward_hook(self._hook, with_kwargs=True)
        self._bypass = bypass

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(output, Tensor):
            return None
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            return None
        extra = None
        weight = getattr(module, self.target.weight_attr)
        if quantized(weight) is not None:  # packed: dequantized only for the algorithms that read its values
            dtype = x.dtype if x.is_floating_point() else torch.float32
            if any(e.contribution.module.algorithm.needs_current_weight for e in self.entries):
                weight = dequantize(weight, dtype)
            else:  # the shape is all they check: a zero-stride stand-in costs nothing
                weight = torch.zeros((), dtype=dtype, device=x.device).expand(self.target.spec.weight_shape)
        elif weight.element_size() == 1 and weight.is_floating_point():  # FP8 storage: read as float
            weight = weight.to(x.dtype if x.is_floating_point() else torch.float32)
        with torch.no_grad():
            for entry in self.entries:
                gain = self._bypass.gain(entry.gain)
                c = entry.contribution
                if isinstance(gain, float):
                    factor: Gain = c.multiplier * gain
                    if factor == 0.0:
                        continue
                else:
                    factor = _per_sample(gain, output, c) * c.multiplier
                y = c.module.algorithm.bypass(x, weight, self.target.spec, dyn=c.dyn)
                y = y * factor
                extra = y if extra is None else extra.add_(y)
        if extra is None:
            return None
        return output + extra.to(output.dtype)


def _per_sample(gain: Tensor, output: Tensor, c: Any) -> Tensor:
    if gain.dim() != 1 or gain.shape[0] != output.shape[0]:
        raise ShapeMismatchError(
            c.network.path, f"a per-sample weight for {c.network.name} has {tuple(gain.shape)} values but the layer "
            f"{c.target.key} runs a batch of {output.shape[0]}", key=c.module.name,
            hint="the host split the batch differently from the weights it gave (report this as a bug)")
    return gain.to(device=output.device, dtype=output.dtype).reshape(-1, *([1] * (output.dim() - 1)))


class Bypass:
    """The bypass hooks of one model (the patcher's adapter's targets). Not thread-safe, like the patcher."""

    def __init__(self) -> None:
        self._layers: dict[int, _Layer] = {}
        self._gains: dict[Hashable, Gain] = {}

    @property
    def layers(self) -> int:
        """How many layers carry a bypass now."""
        return sum(1 for layer in self._layers.values() if layer.entries)

    @property
    def active(self) -> bool:
        return bool(self._layers)

    def set(self, contributions: Sequence[Any], gain_of: Any = None) -> None:
        """Make exactly these contributions (the patcher's diverted ones) run as bypass; `gain_of(contribution)` gives
        each its gain key (None: no gain). Layers no longer listed lose their hook."""
        wanted: dict[int, list[_Entry]] = {}
        targets: dict[int, Target] = {}
        for c in contributions:
            key = id(c.target.module)
            targets[key] = c.target
            wanted.setdefault(key, []).append(_Entry(c, gain_of(c) if gain_of is not None else None))
        for key in [k for k in self._layers if k not in wanted]:
            self._layers.pop(key).handle.remove()
        for key, entries in wanted.items():
            layer = self._layers.get(key)
            if layer is None:
                layer = self._layers[key] = _Layer(self, targets[key])
            layer.entries = entries

    def set_gain(self, key: Hashable, value: Gain) -> None:
        """The gain of every entry with this key from now on (a number, or one value per sample of the batch)."""
        self._gains[key] = float(value) if not isinstance(value, Tensor) else value

    def gain(self, key: Hashable | None) -> Gain:
        if key is None:
            return 1.0
        return self._gains.get(key, 1.0)

    def clear(self) -> None:
        """Remove every hook and gain: the model computes exactly as before (its weights were never written)."""
        for layer in self._layers.values():
            layer.handle.remove()
        self._layers.clear()
        self._gains.clear()


# ------------------------------------------------------------------------------------------------ merge or bypass?


@dataclass(frozen=True)
class GenerationShape:
    """What the host is about to generate, for the merge-or-bypass estimate: sampling steps of this pass, image size in
    pixels, images per batch (the UNet runs on twice as many rows with CFG)."""

    steps: int = 20
    height: int = 512
    width: int = 512
    batch: int = 1


@dataclass(frozen=True)
class _Machine:
    flops: float  # float ops per second of a merge's addmm (large, efficient)
    bandwidth: float  # bytes per second
    per_op: float  # seconds of fixed cost per layer operation (Python, kernel launch)
    fresh_bandwidth: float  # bytes per second written into newly allocated activations (page faults on CPU)


# Calibrated with bench/bench_bypass.py (bench/RESULTS.md): on the 2-core CPU the estimate is within 2x of both
# measured paths (re-merge of 192 SD1 layers at rank 16; the bypass per UNet call at 256 px, where the fixed cost of
# each hooked layer, new activation buffers, outweighs the thin matmuls of each further LoRA). The CUDA figures are
# orders of magnitude (not measured yet); what decides is the ratio of the two estimates.
_MACHINES = {"cpu": _Machine(1.5e11, 4e10, 1e-5, 1e10), "cuda": _Machine(5e13, 2e12, 3e-5, 2e12)}
_CONTEXT_TOKENS = 77


def _level(key: str, levels: int) -> int:
    """The resolution level (0 = full latent size) of a UNet layer, from its diffusers path."""
    path = key.split(":", 1)[-1]
    parts = path.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1]) + (1 if "downsamplers" in parts else 0)
    elif parts[0] == "up_blocks":
        level = levels - 1 - int(parts[1]) - (1 if "upsamplers" in parts else 0)
    elif parts[0] == "mid_block":
        level = levels - 1
    else:
        level = 0
    return max(0, min(level, levels - 1))


def _rows(target: Target, shape: GenerationShape, levels: int) -> int:
    """Rows (tokens, or output positions of a conv) the layer sees per UNet call."""
    batch = 2 * shape.batch
    path = target.key.split(":", 1)[-1]
    if ".attn2.to_k" in path or ".attn2.to_v" in path:
        return batch * _CONTEXT_TOKENS
    if "time_emb" in path or "add_embedding" in path or "time_embedding" in path:
        return batch
    scale = 8 * 2 ** _level(target.key, levels)
    return batch * max(1, shape.height // scale) * max(1, shape.width // scale)


def estimate_seconds(contributions: Sequence[Any], shape: GenerationShape) -> tuple[float, float]:
    """(seconds to merge these contributions once, seconds their bypass adds to one UNet call), estimated from the
    layers' sizes, the LoRAs' ranks and the image size."""
    if not contributions:
        return 0.0, 0.0
    weight0 = getattr(contributions[0].target.module, contributions[0].target.weight_attr)
    machine = _MACHINES["cuda" if weight0.device.type == "cuda" else "cpu"]
    levels = 1 + max((int(c.target.key.split(":", 1)[-1].split(".")[1]) for c in contributions
                      if c.target.key.split(":", 1)[-1].startswith("down_blocks.")), default=3)
    merge = bypass = 0.0
    layers: dict[int, list[Any]] = {}
    for c in contributions:
        layers.setdefault(id(c.target.module), []).append(c)
    for cs in layers.values():
        target = cs[0].target
        weight = getattr(target.module, target.weight_attr)
        numel, element = weight.numel(), max(2, weight.element_size())
        out_f, in_flat = target.spec.out_features, target.spec.in_flat if len(target.spec.weight_shape) > 1 else 1
        rows = _rows(target, shape, levels) if target.component == "unet" else _CONTEXT_TOKENS * shape.batch
        rank = sum(int(c.module.algorithm.rank or min(out_f, in_flat)) for c in cs)
        merge += (2 * numel * rank) / machine.flops + numel * (4 + 2 * element) / machine.bandwidth
        merge += machine.per_op * (1 + len(cs))
        # per hooked layer: read x, new buffers for the LoRAs' sum and for output + sum
        bypass += rows * (in_flat + 3 * out_f) * element / machine.fresh_bandwidth + machine.per_op
        # per LoRA: the two thin matmuls, its output added into the sum
        bypass += (2 * rows * rank * (in_flat + out_f)) / machine.flops
        bypass += rows * out_f * element * len(cs) / machine.bandwidth + machine.per_op * 2 * len(cs)
    return merge, bypass
