"""(IA)^3 (LyCORIS "ia3"): a learned per-channel rescaling of the weight.

    W' = W * (1 + w)   i.e.   dW = scale * W * w, with w along the output axis (rows), or along the input axis
                                  (axis 1) when "on_input" is true

as A1111 computes it (`orig_weight * w`) and as LyCORIS trains it (w starts at 0). `W` is the layer's CURRENT weight.
w may be stored as (n,), (n, 1) or LyCORIS's conv layout (1, n, 1, 1); only its size matters. `scale` is an explicit
"scale" key or 1 (no rank; alpha has no effect). A1111 requires "on_input"; here it defaults to false.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from torch import Tensor

from lora_ext.errors import ShapeMismatchError
from lora_ext.formats.algorithms.base import Algorithm, Dense, LayerSpec, ModuleExtras, Random, as_f32, tensor_source

WEIGHT, ON_INPUT = "weight", "on_input"


@dataclass(frozen=True, eq=False)
class IA3(Algorithm):
    """(IA)^3 module: "weight", optional "on_input" (a 0-d bool/int tensor)."""

    name: ClassVar[str] = "ia3"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({".on_input": ON_INPUT})
    guarded_suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({".weight": WEIGHT})
    anchors: ClassVar[tuple[str, ...]] = (WEIGHT,)
    reads_current_weight: ClassVar[bool] = True
    uses_alpha: ClassVar[bool] = False

    weight: Tensor
    on_input: bool
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> IA3 | None:
        if WEIGHT not in tensors:
            return None
        weight = tensors[WEIGHT]
        if weight.numel() == 0:
            raise ShapeMismatchError(None, "ia3 weight is empty", key=WEIGHT)
        on_input = False
        if ON_INPUT in tensors:
            flag = tensors[ON_INPUT]
            if flag.numel() != 1:
                raise ShapeMismatchError(None, f"on_input must be one flag, got shape {tuple(flag.shape)}",
                                         key=ON_INPUT)
            on_input = bool(flag.reshape(()).item())
        return cls(weight, on_input, ModuleExtras.from_tensors(tensors), tensor_source(tensors, (WEIGHT, ON_INPUT)))

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """A per-output-channel vector w (out,), 10x larger than `rnd` draws (a visible rescaling)."""
        if spec.kind not in ("linear", "conv"):
            return None
        return {WEIGHT: rnd(spec.out_features) * 10}

    @property
    def rank(self) -> None:
        return None

    @property
    def axis(self) -> int:
        """The weight axis that w scales: 1 (input) with on_input, else 0 (output)."""
        return 1 if self.on_input else 0

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        if len(shape) < 2:
            raise ShapeMismatchError(None, f"IA3 cannot target a layer with a {len(shape)}-D weight ({spec.kind})",
                                     key=WEIGHT)
        if self.weight.numel() != shape[self.axis]:
            side = "input" if self.on_input else "output"
            raise ShapeMismatchError(
                None,
                f"ia3 weight has {self.weight.numel()} values but the layer weight {shape} has {shape[self.axis]} "
                f"{side} channels",
                key=WEIGHT,
            )

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        view = [1] * len(spec.weight_shape)
        view[self.axis] = -1
        w = as_f32(self.weight, orig_weight.device).reshape(view)
        return Dense(orig_weight.to(dtype=w.dtype) * w * self.scale())
