"""Norm-layer difference (LyCORIS "norm"): deltas for a GroupNorm/LayerNorm's affine weight and bias.

    dw = scale * w_norm          db = b_norm

`scale` is an explicit "scale" key or 1 (no rank; alpha has no effect, as in A1111). The bias delta is not scaled.
A1111 requires both keys; here "b_norm" is optional.
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

W_NORM, B_NORM = "w_norm", "b_norm"


@dataclass(frozen=True, eq=False)
class NormDiff(Algorithm):
    """Norm module: "w_norm", optional "b_norm"."""

    name: ClassVar[str] = "norm"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({".w_norm": W_NORM, ".b_norm": B_NORM})
    anchors: ClassVar[tuple[str, ...]] = (W_NORM,)
    bias_key: ClassVar[str | None] = B_NORM
    uses_alpha: ClassVar[bool] = False

    w_norm: Tensor
    b_norm: Tensor | None
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> NormDiff | None:
        if W_NORM not in tensors:
            return None
        w_norm, b_norm = tensors[W_NORM], tensors.get(B_NORM)
        if w_norm.numel() == 0:
            raise ShapeMismatchError(None, "w_norm is empty", key=W_NORM)
        if b_norm is not None and b_norm.numel() != w_norm.numel():
            raise ShapeMismatchError(
                None, f"b_norm {tuple(b_norm.shape)} and w_norm {tuple(w_norm.shape)} differ in size", key=B_NORM
            )
        return cls(w_norm, b_norm, ModuleExtras.from_tensors(tensors), tensor_source(tensors, (W_NORM, B_NORM)))

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """w_norm (and b_norm when the layer has a bias) with the norm weight's shape."""
        if spec.kind != "norm":
            return None
        out = {W_NORM: rnd(*spec.weight_shape)}
        if with_bias:
            out[B_NORM] = rnd(*spec.weight_shape)
        return out

    @property
    def rank(self) -> None:
        return None

    def _check_target(self, spec: LayerSpec) -> None:
        if spec.kind != "norm":
            raise ShapeMismatchError(None, f"w_norm applies to GroupNorm/LayerNorm layers, not a {spec.kind} layer",
                                     key=W_NORM)
        if self.w_norm.numel() != math.prod(spec.weight_shape):
            raise ShapeMismatchError(
                None, f"w_norm has shape {tuple(self.w_norm.shape)}, the norm weight is {spec.weight_shape}",
                key=W_NORM,
            )

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        delta = as_f32(self.w_norm, orig_weight.device).reshape(spec.weight_shape)
        scale = self.scale()
        return Dense(delta * scale if scale != 1.0 else delta.clone())
