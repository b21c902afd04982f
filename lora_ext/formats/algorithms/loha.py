"""LoHa (LyCORIS): the Hadamard (element-wise) product of two low-rank matrices.

    dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)                          rank = w1_b.shape[0] (A1111)

Shapes: w*_a (out, r), w*_b (r, in) or, for convs, (r, in*kh*kw) / (r, in, kh, kw). With a Tucker core ("hada_t1",
"hada_t2", shape (r, r, kh, kw)) a side is rebuilt as

    side[o, i, h, w] = sum_{p,q} t[p, q, h, w] * w_a[p, o] * w_b[q, i]                w_a (r, out), w_b (r, in)

(note w_a's transposed layout in the Tucker form). Each side may use its core independently, as in A1111. The
product is not low-rank, so the delta is Dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor

from lora_ext.errors import ShapeMismatchError
from lora_ext.formats.algorithms.base import (
    Algorithm,
    Dense,
    LayerSpec,
    ModuleExtras,
    Random,
    as_f32,
    input_fits,
    is_all_ones,
    tensor_source,
)

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"


@dataclass(frozen=True, eq=False)
class _Side:
    """One factor of the Hadamard product: a @ b, or the Tucker form t x a x b."""

    a: Tensor
    b: Tensor
    t: Tensor | None
    key: str  # the w*_a key, for error messages

    def validate(self) -> None:
        a, b, t = self.a, self.b, self.t
        if t is None:
            if a.dim() < 2 or not is_all_ones(a.shape[2:]) or b.dim() < 2 or a.shape[1] != b.shape[0]:
                raise ShapeMismatchError(
                    None, f"{self.key} {tuple(a.shape)} and its _b {tuple(b.shape)} do not multiply", key=self.key
                )
        elif a.dim() != 2 or b.dim() != 2 or t.dim() < 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
            raise ShapeMismatchError(
                None,
                f"Tucker form: {self.key} {tuple(a.shape)}, _b {tuple(b.shape)} and core {tuple(t.shape)} do not "
                "join (expected a (r1, out), b (r2, in), t (r1, r2, kh, kw))",
                key=self.key,
            )
        if min(a.numel(), b.numel()) == 0:
            raise ShapeMismatchError(None, "empty factor", key=self.key)

    @property
    def out_features(self) -> int:
        return int(self.a.shape[1] if self.t is not None else self.a.shape[0])

    @property
    def in_flat(self) -> int:
        if self.t is not None:
            return int(self.b.shape[1]) * math.prod(self.t.shape[2:])
        return math.prod(self.b.shape[1:])

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        if self.out_features != weight_shape[0]:
            return False
        if self.t is None:
            return input_fits(tuple(self.b.shape), weight_shape)
        return self.b.shape[1] == weight_shape[1] and tuple(self.t.shape[2:]) == tuple(weight_shape[2:])

    def matrix(self, device: torch.device) -> Tensor:
        """The side in the flattened space, (out, in_flat) float32."""
        a, b = as_f32(self.a, device), as_f32(self.b, device)
        if self.t is None:
            return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
        t = as_f32(self.t, device)
        core = t.reshape(t.shape[0], t.shape[1], -1)
        rebuilt = torch.einsum("pqk,po,qi->oik", core, a, b)
        return rebuilt.reshape(rebuilt.shape[0], -1)


@dataclass(frozen=True, eq=False)
class LoHa(Algorithm):
    """LoHa module: "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", optional "hada_t1"/"hada_t2"."""

    name: ClassVar[str] = "loha"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({f".{k}": k for k in (W1A, W1B, W2A, W2B, T1, T2)})
    anchors: ClassVar[tuple[str, ...]] = (W1A,)

    side1: _Side
    side2: _Side
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> LoHa | None:
        if not all(k in tensors for k in (W1A, W1B, W2A, W2B)):
            return None
        side1 = _Side(tensors[W1A], tensors[W1B], tensors.get(T1), W1A)
        side2 = _Side(tensors[W2A], tensors[W2B], tensors.get(T2), W2A)
        side1.validate()
        side2.validate()
        if (side1.out_features, side1.in_flat) != (side2.out_features, side2.in_flat):
            raise ShapeMismatchError(
                None,
                f"the two Hadamard factors have different shapes: ({side1.out_features}, {side1.in_flat}) vs "
                f"({side2.out_features}, {side2.in_flat})",
                key=W2A,
            )
        source = tensor_source(tensors, (W1A, W1B, W2A, W2B, T1, T2))
        return cls(side1, side2, ModuleExtras.from_tensors(tensors), source)

    @classmethod
    def input_width(cls, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        for key in (W1B, W2B):
            shape = shapes.get(key)
            if shape is not None and len(shape) >= 2:
                return int(shape[1])
        return None

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """Flattened factors w*_a (out, r), w*_b (r, in*kh*kw); the a-sides 10x larger for convs (visible deltas)."""
        if spec.kind not in ("linear", "conv"):
            return None
        out_f = spec.out_features
        out = {W1A: rnd(out_f, rank), W1B: rnd(rank, spec.in_flat), W2A: rnd(out_f, rank), W2B: rnd(rank, spec.in_flat)}
        if spec.kind == "conv":
            out[W1A] = rnd(out_f, rank) * 10
            out[W2A] = rnd(out_f, rank) * 10
        return out

    @property
    def rank(self) -> int:
        return int(self.side1.b.shape[0])

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        if len(shape) < 2:
            raise ShapeMismatchError(None, f"LoHa cannot target a layer with a {len(shape)}-D weight ({spec.kind})",
                                     key=W1A)
        for side in (self.side1, self.side2):
            if not side.fits(shape):
                raise ShapeMismatchError(
                    None,
                    f"{side.key} factor builds ({side.out_features}, {side.in_flat}), the layer weight is {shape}",
                    key=side.key,
                )

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        device = orig_weight.device
        product = self.side1.matrix(device) * self.side2.matrix(device)
        return Dense(product.mul_(self.scale()).reshape(spec.weight_shape))
