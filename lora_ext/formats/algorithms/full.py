"""Full weight difference (LyCORIS "full"/"diff"): the delta is stored as is.

    dW = scale * diff            db = diff_b

`scale` is an explicit "scale" key or 1 (there is no rank, so alpha has no effect, as in A1111). The bias delta is
not scaled (A1111 multiplies it by the user multiplier only). Applies to linear, conv, embedding and norm layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from torch import Tensor

from lora_ext.errors import ShapeMismatchError
from lora_ext.formats.algorithms.base import Algorithm, Dense, LayerSpec, ModuleExtras, Random, as_f32, tensor_source

DIFF, DIFF_B = "diff", "diff_b"


@dataclass(frozen=True, eq=False)
class FullDiff(Algorithm):
    """Full-difference module: "diff", optional "diff_b"."""

    name: ClassVar[str] = "full"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({".diff": DIFF, ".diff_b": DIFF_B})
    anchors: ClassVar[tuple[str, ...]] = (DIFF,)
    bias_key: ClassVar[str | None] = DIFF_B
    uses_alpha: ClassVar[bool] = False

    diff: Tensor
    diff_b: Tensor | None
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> FullDiff | None:
        if DIFF not in tensors:
            return None
        diff = tensors[DIFF]
        if diff.dim() == 0 or diff.numel() == 0:
            raise ShapeMismatchError(None, f"diff must be a weight-shaped tensor, got {tuple(diff.shape)}", key=DIFF)
        diff_b = tensors.get(DIFF_B)
        if diff_b is not None and diff_b.numel() == 0:
            raise ShapeMismatchError(None, "diff_b is empty", key=DIFF_B)
        return cls(diff, diff_b, ModuleExtras.from_tensors(tensors), tensor_source(tensors, (DIFF, DIFF_B)))

    @classmethod
    def input_width(cls, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        diff = shapes.get(DIFF)
        return int(diff[1]) if diff is not None and len(diff) == 2 else None

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """diff with the weight's shape, diff_b (out,) when the layer has a bias; both small (0.1x)."""
        if spec.kind not in ("linear", "conv"):
            return None
        out = {DIFF: rnd(*spec.weight_shape) * 0.1}
        if with_bias:
            out[DIFF_B] = rnd(spec.out_features) * 0.1
        return out

    @property
    def rank(self) -> None:
        return None

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        same_rows = len(shape) < 2 or self.diff.shape[0] == shape[0]
        if self.diff.numel() != math.prod(shape) or not same_rows:
            raise ShapeMismatchError(
                None, f"diff has shape {tuple(self.diff.shape)}, the layer weight is {shape}", key=DIFF
            )

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        diff = as_f32(self.diff, orig_weight.device).reshape(spec.weight_shape)
        scale = self.scale()
        return Dense(diff * scale if scale != 1.0 else diff.clone())
