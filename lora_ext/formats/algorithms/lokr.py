"""LoKr (LyCORIS): a Kronecker product of a small and a large matrix, either optionally low-rank.

    dW = scale * kron(w1, w2)

w1 (a, c) is "lokr_w1" or "lokr_w1_a" (a, r) @ "lokr_w1_b" (r, c). w2 is "lokr_w2" (b, d[, kh, kw]), or
"lokr_w2_a" (b, r) @ "lokr_w2_b" (r, d*kh*kw | d, kh, kw), or the Tucker form with "lokr_t2" (r, r, kh, kw):

    w2[p, q, h, w] = sum_{i,j} t2[i, j, h, w] * w2_a[i, p] * w2_b[j, q]          w2_a (r, b), w2_b (r, d)

The result is (a*b, c*d[, kh, kw]) = the target weight. In the flattened space kron(w1, w2) equals
kron(w1, w2.reshape(b, -1)), which is how it is computed here for linear and conv layers alike.

Scale (A1111, LyCORIS): alpha / rank only when a factorized half exists (rank = w2_b.shape[0], else w1_b.shape[0]);
with both halves stored whole, alpha is ignored and the scale is 1 (unless a "scale" key says otherwise).
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
    is_all_ones,
    tensor_source,
)

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B, T2 = "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


def _bad(key: str, reason: str) -> ShapeMismatchError:
    return ShapeMismatchError(None, reason, key=key)


@dataclass(frozen=True, eq=False)
class LoKr(Algorithm):
    """LoKr module: ("lokr_w1" | "lokr_w1_a"+"lokr_w1_b") and ("lokr_w2" | "lokr_w2_a"+"lokr_w2_b"[+"lokr_t2"])."""

    name: ClassVar[str] = "lokr"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({f".{k}": k for k in (W1, W1A, W1B, W2, W2A, W2B, T2)})
    anchors: ClassVar[tuple[str, ...]] = (W1, W1A)

    w1: Tensor | None
    w1_a: Tensor | None
    w1_b: Tensor | None
    w2: Tensor | None
    w2_a: Tensor | None
    w2_b: Tensor | None
    t2: Tensor | None
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> LoKr | None:
        has_1 = W1 in tensors or (W1A in tensors and W1B in tensors)
        has_2 = W2 in tensors or (W2A in tensors and W2B in tensors)
        if not (has_1 and has_2):
            return None
        # A whole matrix wins over its factors (A1111); unused factors are left out of `source` and so reported.
        if W1 in tensors:
            w1, w1_a, w1_b = tensors[W1], None, None
            keys1: tuple[str, ...] = (W1,)
        else:
            w1, w1_a, w1_b = None, tensors[W1A], tensors[W1B]
            keys1 = (W1A, W1B)
        if W2 in tensors:
            w2, w2_a, w2_b, t2 = tensors[W2], None, None, None
            keys2: tuple[str, ...] = (W2,)
        else:
            w2, w2_a, w2_b, t2 = None, tensors[W2A], tensors[W2B], tensors.get(T2)
            keys2 = (W2A, W2B, T2)
        algo = cls(w1, w1_a, w1_b, w2, w2_a, w2_b, t2, ModuleExtras.from_tensors(tensors),
                   tensor_source(tensors, keys1 + keys2))
        algo._validate()
        return algo

    def _validate(self) -> None:
        if self.w1 is not None:
            if self.w1.dim() < 2 or not is_all_ones(self.w1.shape[2:]):
                raise _bad(W1, f"lokr_w1 must be a matrix, got {tuple(self.w1.shape)}")
        else:
            a, b = self.w1_a, self.w1_b
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise _bad(W1A, f"lokr_w1_a {tuple(a.shape)} and lokr_w1_b {tuple(b.shape)} do not multiply")
        if self.w2 is not None:
            if self.w2.dim() < 2:
                raise _bad(W2, f"lokr_w2 must be at least 2-D, got {tuple(self.w2.shape)}")
        elif self.t2 is None:
            a, b = self.w2_a, self.w2_b
            if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
                raise _bad(W2A, f"lokr_w2_a {tuple(a.shape)} and lokr_w2_b {tuple(b.shape)} do not multiply")
        else:
            a, b, t = self.w2_a, self.w2_b, self.t2
            if a.dim() != 2 or b.dim() != 2 or t.dim() < 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
                raise _bad(
                    T2,
                    f"Tucker form: lokr_w2_a {tuple(a.shape)}, lokr_w2_b {tuple(b.shape)} and lokr_t2 "
                    f"{tuple(t.shape)} do not join (expected (r1, b), (r2, d), (r1, r2, kh, kw))",
                )
        if any(t is not None and t.numel() == 0 for t in (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a,
                                                          self.w2_b, self.t2)):
            raise _bad(W1 if self.w1 is not None else W1A, "empty LoKr factor")

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """w1 whole (a, c) with a, c the largest divisors <= sqrt of out and in; w2 factorized (b, r) @ (r, d*kh*kw)."""
        if spec.kind not in ("linear", "conv"):
            return None
        out_f, in_f = spec.weight_shape[0], spec.weight_shape[1]
        a, c = _small_factor(out_f), _small_factor(in_f)
        kernel = math.prod(spec.weight_shape[2:])
        return {W1: rnd(a, c) * 10, W2A: rnd(out_f // a, rank), W2B: rnd(rank, (in_f // c) * kernel)}

    @property
    def rank(self) -> int | None:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    # --- shapes ---------------------------------------------------------------------------------------------------
    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])

    def _w2_shape(self) -> tuple[int, int, tuple[int, ...] | None]:
        """(b, flattened width, kernel or None when w2 is stored flattened)."""
        if self.w2 is not None:
            kernel = tuple(self.w2.shape[2:]) if self.w2.dim() > 2 else None
            return int(self.w2.shape[0]), math.prod(self.w2.shape[1:]), kernel
        if self.t2 is not None:
            kernel = tuple(self.t2.shape[2:])
            return int(self.w2_a.shape[1]), int(self.w2_b.shape[1]) * math.prod(kernel), kernel
        kernel = tuple(self.w2_b.shape[2:]) if self.w2_b.dim() > 2 else None
        return int(self.w2_a.shape[0]), math.prod(self.w2_b.shape[1:]), kernel

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        if len(shape) < 2:
            raise _bad(W1 if self.w1 is not None else W1A,
                       f"LoKr cannot target a layer with a {len(shape)}-D weight ({spec.kind})")
        (a, c), (b, q, kernel) = self._w1_shape(), self._w2_shape()
        key2 = W2 if self.w2 is not None else W2A
        weight_kernel = tuple(shape[2:])
        kernel_size = math.prod(weight_kernel)
        fits = a * b == shape[0] and c * q == spec.in_flat
        if kernel is not None:
            fits = fits and (kernel == weight_kernel or (is_all_ones(kernel) and is_all_ones(weight_kernel)))
        else:
            fits = fits and q % kernel_size == 0
        if not fits:
            raise _bad(key2, f"kron of w1 ({a}, {c}) and w2 ({b}, {q}"
                             f"{'' if kernel is None else ' incl. kernel ' + str(kernel)}) does not give the layer "
                             f"weight {shape}")

    # --- math -------------------------------------------------------------------------------------------------------
    def _w1_matrix(self, device: torch.device) -> Tensor:
        if self.w1 is not None:
            return as_f32(self.w1, device).reshape(self.w1.shape[0], -1)
        return as_f32(self.w1_a, device) @ as_f32(self.w1_b, device)

    def _w2_matrix(self, device: torch.device) -> Tensor:
        """w2 flattened to (b, d*kh*kw), float32."""
        if self.w2 is not None:
            return as_f32(self.w2, device).reshape(self.w2.shape[0], -1)
        a, b = as_f32(self.w2_a, device), as_f32(self.w2_b, device)
        if self.t2 is None:
            return a @ b.reshape(b.shape[0], -1)
        t = as_f32(self.t2, device)
        core = t.reshape(t.shape[0], t.shape[1], -1)
        rebuilt = torch.einsum("ijk,ip,jq->pqk", core, a, b)
        return rebuilt.reshape(rebuilt.shape[0], -1)

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        device = orig_weight.device
        kron = torch.kron(self._w1_matrix(device), self._w2_matrix(device))
        return Dense(kron.mul_(self.scale()).reshape(spec.weight_shape))


def _small_factor(n: int) -> int:
    """Largest divisor of n that is <= sqrt(n) (how LoKr splits a dimension into two factors)."""
    return max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
