"""DoRA (weight-decomposed low-rank adaptation): rescale W + dW to a learned magnitude per column or per row.

    W' = dora_scale * (W + dW) / ||W + dW||

where the norm is taken per input column (over the output and kernel axes) or per output row (over the input and
kernel axes), depending on how the magnitude vector was saved:

* LyCORIS `wd_on_out=False` (also what A1111 v1.10 and older ComfyUI implement): dora_scale (1, in, 1, ...): per input
  column;
* LyCORIS `wd_on_out=True` (the LyCORIS 3.x default): dora_scale (out, 1, 1, ...): per output row;
* PEFT `lora_magnitude_vector`: dora_scale (out,): per output row.

Ambiguous shapes, and how they are resolved: a 1-D dora_scale always means PEFT's per-output-row magnitude (also for
square layers where out == in); a (1, 1, ...) dora_scale on a layer with out == in == 1 takes the per-column branch,
which gives the same numbers (both norms then run over the whole kernel). Any other shape raises ShapeMismatchError.

The norm is of the merged weight W + dW (DoRA paper, LyCORIS, PEFT, A1111). No epsilon is added (A1111 adds none;
LyCORIS and ComfyUI add float eps): a zero column gives a non-finite delta that the patcher's finite check reports.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lora_ext.errors import ShapeMismatchError

DoraAxis = Literal["in", "out"]


def dora_axis(weight_shape: tuple[int, ...], dora_shape: tuple[int, ...]) -> DoraAxis:
    """Which axis `dora_scale` normalizes for a weight of `weight_shape`: "in" (per input column) or "out" (per row).

    Raises ShapeMismatchError(key="dora_scale") when the shape fits neither convention or the weight is not at least
    2-D (DoRA on a norm layer's 1-D weight is undefined).
    """
    weight_shape, dora_shape = tuple(weight_shape), tuple(dora_shape)
    if len(weight_shape) < 2:
        raise ShapeMismatchError(
            None, f"DoRA needs a 2-D or conv weight, the target weight has shape {weight_shape}", key="dora_scale"
        )
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    if len(dora_shape) == 1:
        if dora_shape[0] == out_dim:
            return "out"
    elif len(dora_shape) >= 2:
        per_column = dora_shape[0] == 1 and dora_shape[1] == in_dim and all(d == 1 for d in dora_shape[2:])
        per_row = dora_shape[0] == out_dim and all(d == 1 for d in dora_shape[1:])
        if per_column:
            return "in"
        if per_row:
            return "out"
    raise ShapeMismatchError(
        None,
        f"dora_scale has shape {dora_shape}; for a weight of shape {weight_shape} expected (1, {in_dim}, 1, ...) "
        f"(per input column), ({out_dim}, 1, ...) (per output row) or ({out_dim},) (PEFT)",
        key="dora_scale",
    )


def weight_norm(weight: Tensor, axis: DoraAxis) -> Tensor:
    """||W|| per input column ("in": over the output and kernel axes, shaped (1, in, 1, ...)) or per output row
    ("out": over the input and kernel axes, shaped (out, 1, 1, ...)), ready to broadcast against W."""
    shape = tuple(weight.shape)
    trailing = [1] * (len(shape) - 2)
    if axis == "out":
        return weight.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], 1, *trailing)
    return weight.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(1, shape[1], *trailing)


def apply_dora(orig_weight: Tensor, delta: Tensor, dora_scale: Tensor) -> Tensor:
    """The new delta W' - W with weight decomposition, float32 on orig_weight's device.

    orig_weight: W, shape (out, in, ...), any float dtype (not modified); delta: dW with W's numel (already
    alpha-scaled, multiplier not applied: the caller multiplies the returned delta, as A1111 does); dora_scale: the
    magnitude, see the module docstring for the accepted shapes. Differentiable in all three (training learns the
    factors inside `delta` and the magnitude through this function); callers that only merge run it under no_grad.
    """
    weight = orig_weight.to(torch.float32)
    shape = tuple(weight.shape)
    axis = dora_axis(shape, tuple(dora_scale.shape))
    merged = weight + delta.to(device=weight.device, dtype=torch.float32).reshape(shape)
    norm = weight_norm(merged, axis)
    magnitude = dora_scale.to(device=weight.device, dtype=torch.float32).reshape(norm.shape)
    return merged * (magnitude / norm) - weight
