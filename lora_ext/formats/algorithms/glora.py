"""GLoRA (LyCORIS "glora"): a low-rank change of the weight's input side plus a low-rank delta.

    dW = (alpha / r) * (W @ A + B)          W: the layer's current weight, flattened to (out, in_flat)

Two layouts of the four keys are in circulation (told apart by their shapes, as ComfyUI does):

- current (LyCORIS since 2024, 3.x and 4.x): a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in_flat);
  A = a1 @ a2, B = b1 @ b2. For a conv, W's input channels are mixed: (W A)[o, j, h, w] = sum_i W[o, i, h, w] A[i, j].
- old (LyCORIS 2.x, what A1111 v1.10's network_glora.py assumes): a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r);
  A = a2 @ a1, B = b2 @ b1; linear layers (and 1x1 convs) only.

r = the rank dimension (a2.shape[0] current, a1.shape[0] old). The alpha / r scale is LyCORIS' own (the authors'); A1111
v1.10's built-in ignores alpha for GLoRA (scale 1) and cannot read the current layout at all. A Tucker core
("bm.weight") is rejected with a clear message. The delta reads the current weight, so merges run in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor

from lora_ext.errors import ShapeMismatchError
from lora_ext.formats.algorithms.base import Algorithm, Dense, LayerSpec, ModuleExtras, Random, as_f32, tensor_source

A1, A2, B1, B2, BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"


def _flat(t: Tensor) -> tuple[int, int]:
    return int(t.shape[0]), int(t[0].numel()) if t.shape[0] else 0


@dataclass(frozen=True, eq=False)
class GLoRA(Algorithm):
    """GLoRA module: "a1.weight", "a2.weight", "b1.weight", "b2.weight" (current or old layout)."""

    name: ClassVar[str] = "glora"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({f".{k}": k for k in (A1, A2, B1, B2, BM)})
    anchors: ClassVar[tuple[str, ...]] = (A1,)
    reads_current_weight: ClassVar[bool] = True

    a: tuple[Tensor, Tensor]  # (left, right): A = left @ right, (in, r) @ (r, in)
    b: tuple[Tensor, Tensor]  # (left, right): B = left @ right, (out, r) @ (r, in_flat)
    old_layout: bool
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> GLoRA | None:
        if not all(k in tensors for k in (A1, A2, B1, B2)):
            return None
        if BM in tensors:
            raise ShapeMismatchError(None, "GLoRA with a Tucker core (bm.weight) is not supported; re-save the "
                                     "file without use_tucker", key=BM)
        (a1r, a1c), (a2r, a2c), (b1r, b1c), (b2r, b2c) = (_flat(tensors[k]) for k in (A1, A2, B1, B2))
        current = a1c == a2r == b1c == b2r and a1r == a2c
        old = a1r == a2c == b1r == b2c and a1c == a2r == b1c
        if current and old:  # square factors: both readings fit; the rank is the smaller side in practice
            old = a1r < a1c
            current = not old
        if not (current or old):
            raise ShapeMismatchError(
                None, f"a1 {tuple(tensors[A1].shape)}, a2 {tuple(tensors[A2].shape)}, b1 {tuple(tensors[B1].shape)}, "
                f"b2 {tuple(tensors[B2].shape)} fit neither GLoRA layout (current: a1 (in, r), a2 (r, in), "
                "b1 (out, r), b2 (r, in); old: a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r))", key=A1)
        t = {k: tensors[k] for k in (A1, A2, B1, B2)}
        if old:
            a, b = (t[A2], t[A1]), (t[B2], t[B1])
        else:
            a, b = (t[A1], t[A2]), (t[B1], t[B2])
        return cls(a, b, old, ModuleExtras.from_tensors(tensors), tensor_source(tensors, (A1, A2, B1, B2)))

    @classmethod
    def input_width(cls, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        a1, a2 = shapes.get(A1), shapes.get(A2)
        if a1 is None or a2 is None or len(a1) < 2 or len(a2) < 2:
            return None
        return int(a1[0]) if a1[0] == a2[1] and a1[1] == a2[0] and a1[0] > a1[1] else int(a1[1])

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """The current layout as LyCORIS saves it (1x1 conv factors for convs, b2 with the kernel)."""
        if spec.kind not in ("linear", "conv"):
            return None
        w = spec.weight_shape
        in_ch = w[1]
        k = (1, 1) if spec.kind == "conv" else ()
        return {A1: rnd(in_ch, rank, *k) * 0.3, A2: rnd(rank, in_ch, *k) * 0.3, B1: rnd(w[0], rank, *k),
                B2: rnd(rank, *w[1:])}

    @property
    def rank(self) -> int:
        return int(self.a[1].shape[0])

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        if spec.kind not in ("linear", "conv"):
            raise ShapeMismatchError(None, f"GLoRA cannot target a {spec.kind} layer", key=A1)
        in_ch = shape[1]
        if self.a[0].shape[0] != in_ch:
            raise ShapeMismatchError(None, f"the A factor mixes {self.a[0].shape[0]} input channels, the layer "
                                     f"weight is {shape}", key=A1)
        if self.b[0].shape[0] != shape[0] or self.b[1][0].numel() != spec.in_flat:
            raise ShapeMismatchError(None, f"the B factor builds ({self.b[0].shape[0]}, {self.b[1][0].numel()}), "
                                     f"the layer weight is {shape}", key=B1)
        if self.old_layout and spec.in_flat != in_ch:
            raise ShapeMismatchError(None, f"an old-layout GLoRA module applies to linear layers and 1x1 convs, "
                                     f"the layer weight is {shape}", key=A1)

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        device = orig_weight.device
        a = as_f32(self.a[0], device).reshape(self.a[0].shape[0], -1) @ as_f32(self.a[1], device).reshape(
            self.a[1].shape[0], -1)
        b = as_f32(self.b[0], device).reshape(self.b[0].shape[0], -1) @ as_f32(self.b[1], device).reshape(
            self.b[1].shape[0], -1)
        w = orig_weight.to(torch.float32)
        wa = torch.einsum("oi...,ij->oj...", w, a) if w.dim() > 2 else w @ a
        return Dense((wa + b.reshape(spec.weight_shape)).mul_(self.scale()))
