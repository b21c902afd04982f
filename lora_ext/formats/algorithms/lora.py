"""LoRA / LoCon / DyLoRA: a low-rank product, optionally with a Tucker core (LyCORIS "lora_mid").

    dW = (alpha / rank) * up @ down                                   rank = down.shape[0]
    dW[o, i, h, w] = (alpha / rank) * sum_{n,m} up[o, n] * mid[n, m, h, w] * down[m, i]      (Tucker)

Shapes: up (out, r) or (out, r, 1, 1); down (r, in) or (r, in, kh, kw) (LoCon) or flattened (r, in*kh*kw);
mid (r, r, kh, kw) with a 1x1 down. Linear factors on a 1x1 conv and (r, in, 1, 1) factors on a linear layer both
apply (the flattened spaces are the same). Both forms are exactly low-rank in the flattened space: the Tucker core
folds into the down factor, so `weight_delta` returns LowRank.

DyLoRA (`dyn`, A1111's `<lora:name:te:unet:dyn>`): keep the first `dyn` ranks of up and down, with the scale still
alpha / full rank (A1111 `rebuild_conventional`). As in A1111, `dyn` does not apply to the Tucker form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from lora_ext.errors import ShapeMismatchError
from lora_ext.formats.algorithms.base import (
    Algorithm,
    LayerSpec,
    LowRank,
    ModuleExtras,
    Random,
    as_f32,
    input_fits,
    is_all_ones,
    tensor_source,
)

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def _checked_dyn(dyn: int) -> int:
    if dyn < 1:
        raise ValueError(f"dyn must be a positive rank, got {dyn}")
    return dyn


@dataclass(frozen=True, eq=False)
class Lora(Algorithm):
    """LoRA/LoCon/DyLoRA module: "lora_up.weight", "lora_down.weight", optional "lora_mid.weight"."""

    name: ClassVar[str] = "lora"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({
        # kohya / LyCORIS
        ".lora_up.weight": UP, ".lora_down.weight": DOWN, ".lora_mid.weight": MID,
        # PEFT / diffusers
        ".lora_B.weight": UP, ".lora_A.weight": DOWN,
        ".lora_B.default.weight": UP, ".lora_A.default.weight": DOWN,
        ".lora_B.default_0.weight": UP, ".lora_A.default_0.weight": DOWN,
        ".lora.up.weight": UP, ".lora.down.weight": DOWN,
        ".lora_linear_layer.up.weight": UP, ".lora_linear_layer.down.weight": DOWN,
        # old diffusers attention processors: "...processor.to_q_lora.up.weight"
        "_lora.up.weight": UP, "_lora.down.weight": DOWN,
    })  # fmt: skip
    anchors: ClassVar[tuple[str, ...]] = (DOWN,)

    up: Tensor
    down: Tensor
    mid: Tensor | None
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> Lora | None:
        if UP not in tensors or DOWN not in tensors:
            return None
        up, down, mid = tensors[UP], tensors[DOWN], tensors.get(MID)
        if up.dim() < 2 or not is_all_ones(up.shape[2:]) or up.numel() == 0:
            raise ShapeMismatchError(None, f"lora_up must be (out, rank) or (out, rank, 1, 1), got {tuple(up.shape)}",
                                     key=UP)
        if down.dim() < 2 or down.numel() == 0:
            raise ShapeMismatchError(None, f"lora_down must be (rank, in, ...), got {tuple(down.shape)}", key=DOWN)
        if mid is None:
            if up.shape[1] != down.shape[0]:
                raise ShapeMismatchError(
                    None, f"rank mismatch: lora_up {tuple(up.shape)} vs lora_down {tuple(down.shape)}", key=UP
                )
        else:
            if mid.dim() < 2 or tuple(mid.shape[:2]) != (up.shape[1], down.shape[0]):
                raise ShapeMismatchError(
                    None,
                    f"lora_mid {tuple(mid.shape)} does not join lora_up {tuple(up.shape)} "
                    f"and lora_down {tuple(down.shape)} (expected ({up.shape[1]}, {down.shape[0]}, kh, kw))",
                    key=MID,
                )
            if not is_all_ones(down.shape[2:]):
                raise ShapeMismatchError(
                    None, f"with lora_mid, lora_down must be 1x1, got {tuple(down.shape)}", key=DOWN
                )
        return cls(up, down, mid, ModuleExtras.from_tensors(tensors), tensor_source(tensors, (UP, DOWN, MID)))

    @classmethod
    def input_width(cls, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        down = shapes.get(DOWN)
        return int(down[1]) if down is not None and len(down) >= 2 else None

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
        if spec.kind not in ("linear", "conv"):
            return None
        out_f, in_f, kernel = spec.weight_shape[0], spec.weight_shape[1], spec.weight_shape[2:]
        down = rnd(rank, in_f, *kernel)
        return {DOWN: down, UP: rnd(out_f, rank, *([1] * len(kernel)))}

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def _check_target(self, spec: LayerSpec) -> None:
        shape = spec.weight_shape
        if len(shape) < 2:
            raise ShapeMismatchError(None, f"LoRA cannot target a layer with a {len(shape)}-D weight ({spec.kind})",
                                     key=UP)
        if self.up.shape[0] != shape[0]:
            raise ShapeMismatchError(
                None, f"lora_up has {self.up.shape[0]} outputs, the layer weight is {shape}", key=UP
            )
        if self.mid is None:
            if not input_fits(tuple(self.down.shape), shape):
                raise ShapeMismatchError(
                    None, f"lora_down {tuple(self.down.shape)} does not fit the layer weight {shape}", key=DOWN
                )
            return
        if self.down.shape[1] != shape[1] or tuple(self.mid.shape[2:]) != tuple(shape[2:]):
            raise ShapeMismatchError(
                None,
                f"lora_down {tuple(self.down.shape)} with lora_mid {tuple(self.mid.shape)} does not fit the layer "
                f"weight {shape}",
                key=MID,
            )

    def _factors(self, device, dyn: int | None) -> tuple[Tensor, Tensor]:
        """(up (out, r'), down (r', in_flat)) in float32; the Tucker core folded into down."""
        up = as_f32(self.up, device).reshape(self.up.shape[0], -1)
        down = as_f32(self.down, device).reshape(self.down.shape[0], -1)
        if self.mid is not None:
            mid = as_f32(self.mid, device)
            folded = mid.reshape(*mid.shape[:2], -1).permute(0, 2, 1) @ down  # (n, k, in)
            return up, folded.permute(0, 2, 1).reshape(mid.shape[0], -1)  # (n, in * k)
        if dyn is not None:
            up, down = up[:, : _checked_dyn(dyn)], down[: _checked_dyn(dyn)]
        return up, down

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> LowRank:
        up, down = self._factors(orig_weight.device, dyn)
        return LowRank(up, down, self.scale())

    def bypass(self, x: Tensor, orig_weight: Tensor, spec: LayerSpec, dyn: int | None = None) -> Tensor:
        """scale * up(down(x)): the down conv takes the layer's stride/padding/dilation (the mid conv with Tucker)."""
        self._check_weight(orig_weight, spec)
        if self.extras.dora_scale is not None or spec.groups != 1:
            return super().bypass(x, orig_weight, spec, dyn)
        dtype = x.dtype if x.is_floating_point() else orig_weight.dtype
        scale = self.scale()
        if spec.kind == "embedding":
            up, down = self._factors(x.device, dyn)
            return (F.embedding(x, up.to(dtype)) * scale) @ down.to(dtype)
        if spec.kind == "linear":
            up, down = self._factors(x.device, dyn)
            return F.linear(F.linear(x, down.to(dtype)) * scale, up.to(dtype))
        # conv
        out_ch, in_ch = spec.weight_shape[:2]
        conv_args = (spec.stride, spec.padding, spec.dilation)
        up = self.up.to(device=x.device, dtype=dtype).reshape(out_ch, -1, 1, 1)
        if self.mid is not None:
            down = self.down.to(device=x.device, dtype=dtype).reshape(self.down.shape[0], in_ch, 1, 1)
            mid = self.mid.to(device=x.device, dtype=dtype)
            hidden = F.conv2d(F.conv2d(x, down), mid, None, *conv_args)
        else:
            down = self.down.to(device=x.device, dtype=dtype).reshape(self.down.shape[0], *spec.weight_shape[1:])
            if dyn is not None:
                up, down = up[:, : _checked_dyn(dyn)], down[: _checked_dyn(dyn)]
            hidden = F.conv2d(x, down, None, *conv_args)
        return F.conv2d(hidden * scale, up)
