"""Tests of lora_ext.formats.algorithms: the LoRA/LyCORIS algorithm math.

Oracles, all independent of the code under test:
* the published formulas, written out by hand below (per-kernel-position loops, block-wise Kronecker products,
  column-by-column DoRA), evaluated in float64;
* torch's own layer functions for "layer(x; W + dW) - layer(x; W)" (float64);
* the installed LyCORIS package (lycoris-lora): its trainer modules (real state-dict key names and layouts, their
  `get_diff_weight` / `get_merged_weight`) and `lycoris.functional` bypass paths.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lora_ext.errors import LoraFileError, ShapeMismatchError
from lora_ext.formats.algorithms import (
    ALGORITHMS,
    IA3,
    OFT,
    Dense,
    FullDiff,
    GLoRA,
    LayerSpec,
    LoHa,
    LoKr,
    Lora,
    LowRank,
    NormDiff,
    apply_dora,
    detect_algorithm,
    dora_axis,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |bypass - reference| / max |reference|; the reference is float64 from the same (dtype-rounded) inputs
BYPASS_TOL = {torch.float32: 5e-6, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}
DELTA_TOL = 5e-6  # deltas are computed in float32 from dtype-rounded inputs, whatever the storage dtype


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """Full float32 on GPUs too (cuDNN convolutions default to TF32, ~1e-3 relative error)."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double().cpu()
    return float((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------------
# Target layers, and their forward computed by torch (the oracle for bypass)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    spec: LayerSpec
    x_shape: tuple[int, ...]


LAYERS = {
    "linear": Layer(LayerSpec("linear", (12, 8)), (2, 3, 8)),
    "conv3x3": Layer(LayerSpec("conv", (12, 8, 3, 3), stride=(2, 2), padding=(1, 1)), (2, 8, 7, 7)),
    "conv1x1": Layer(LayerSpec("conv", (12, 8, 1, 1)), (2, 8, 5, 5)),
    "layernorm": Layer(LayerSpec("norm", (8,), eps=1e-5), (2, 3, 8)),
    "groupnorm": Layer(LayerSpec("norm", (8,), num_groups=4, eps=1e-6), (2, 8, 5, 5)),
    "embedding": Layer(LayerSpec("embedding", (12, 8)), (2, 5)),
}


def torch_layer(spec: LayerSpec, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if spec.kind == "linear":
        return F.linear(x, w, b)
    if spec.kind == "conv":
        return F.conv2d(x, w, b, stride=spec.stride, padding=spec.padding)
    if spec.kind == "embedding":
        return F.embedding(x, w)
    if spec.num_groups is not None:
        return F.group_norm(x, spec.num_groups, w, b, spec.eps)
    return F.layer_norm(x, spec.weight_shape, w, b, spec.eps)


def make_layer_params(spec: LayerSpec, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
    if spec.kind == "norm":
        return 1 + 0.2 * torch.randn(spec.weight_shape, generator=g), 0.1 * torch.randn(spec.weight_shape, generator=g)
    weight = torch.randn(spec.weight_shape, generator=g) / math.sqrt(spec.in_flat)
    bias = None if spec.kind == "embedding" else 0.1 * torch.randn(spec.out_features, generator=g)
    return weight, bias


def make_input(layer: Layer, g: torch.Generator) -> Tensor:
    if layer.spec.kind == "embedding":
        return torch.randint(0, layer.spec.weight_shape[0], layer.x_shape, generator=g)
    return torch.randn(layer.x_shape, generator=g)


# ---------------------------------------------------------------------------------------------------------------------
# The published formulas, by hand, in float64 (t: the module's tensors as float64; W: the layer weight as float64)
# ---------------------------------------------------------------------------------------------------------------------
def alpha_over_rank(t: dict[str, Tensor], rank: int) -> float:
    if "scale" in t:
        return float(t["scale"])
    return float(t["alpha"]) / rank if "alpha" in t else 1.0


def kernel_positions(shape: tuple[int, ...]):
    return [(h, w) for h in range(shape[2]) for w in range(shape[3])]


def f_lora(t, W):
    """dW = alpha/r * up @ down (A1111 rebuild_conventional)."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if W.dim() == 4 and down.dim() == 4 and down.shape[2:] != (1, 1):  # LoCon: kxk down, 1x1 up, per kernel position
        out = torch.zeros(W.shape, dtype=torch.float64)
        for h, w in kernel_positions(W.shape):
            out[:, :, h, w] = up2 @ down[:, :, h, w]
    else:
        out = (up2 @ down.reshape(r, -1)).reshape(W.shape)
    return out * alpha_over_rank(t, r)


def f_lora_tucker(t, W):
    """dW[:, :, h, w] = alpha/r * up @ mid[:, :, h, w] @ down (LyCORIS/A1111 CP rebuild)."""
    up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t["lora_mid.weight"]
    r = down.shape[0]
    out = torch.zeros(W.shape, dtype=torch.float64)
    for h, w in kernel_positions(W.shape):
        out[:, :, h, w] = up[:, :, 0, 0] @ mid[:, :, h, w] @ down[:, :, 0, 0]
    return out * alpha_over_rank(t, r)


def hada_side(t, n, W):
    a, b, core = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"], t.get(f"hada_t{n}")
    if core is None:
        return (a @ b.reshape(b.shape[0], -1)).reshape(W.shape)
    out = torch.zeros(W.shape, dtype=torch.float64)
    for h, w in kernel_positions(W.shape):
        out[:, :, h, w] = a.T @ core[:, :, h, w] @ b
    return out


def f_loha(t, W):
    """dW = alpha/r * (w1a @ w1b) * (w2a @ w2b), r = w1b.shape[0] (Tucker sides: a^T t b per kernel position)."""
    return hada_side(t, 1, W) * hada_side(t, 2, W) * alpha_over_rank(t, t["hada_w1_b"].shape[0])


def kron_blocks(w1: Tensor, w2: Tensor) -> Tensor:
    """kron(w1, w2) written out block by block: block (i, j) = w1[i, j] * w2 (w2 may carry a kernel)."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return out


def f_lokr(t, W):
    """dW = scale * kron(w1, w2); scale = alpha/r only when a half is factorized (A1111/LyCORIS)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        core, a, b = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
        w2 = torch.zeros(a.shape[1], b.shape[1], *core.shape[2:], dtype=torch.float64)
        for h, w in kernel_positions(w2.shape):
            w2[:, :, h, w] = a.T @ core[:, :, h, w] @ b
    else:
        w2b = t["lokr_w2_b"]
        w2 = t["lokr_w2_a"] @ w2b.reshape(w2b.shape[0], -1)
        if W.dim() == 4:
            w2 = w2.reshape(w2.shape[0], -1, *W.shape[2:])
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = float(t["scale"]) if "scale" in t else (float(t["alpha"]) / rank if rank and "alpha" in t else 1.0)
    return kron_blocks(w1, w2).reshape(W.shape) * scale


def f_glora(t, W):
    """dW = alpha/r * (W A + B), written per output row and input channel (LyCORIS `_glora_weight`):
    current layout A = a1 (in, r) @ a2 (r, in), B = b1 (out, r) @ b2 (r, in*k*k); old layout (A1111 v1.10's
    network_glora) A = a2 (in, r) @ a1 (r, in), B = b2 (out, r) @ b1 (r, in)."""
    a1, a2, b1, b2 = (t[k].reshape(t[k].shape[0], -1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    old = t.get("old_layout_marker") is not None or a1.shape[0] < a1.shape[1]
    A, B, r = (a2 @ a1, b2 @ b1, a1.shape[0]) if old else (a1 @ a2, b1 @ b2, a2.shape[0])
    out = torch.zeros(W.shape, dtype=torch.float64)
    for o in range(W.shape[0]):
        for j in range(W.shape[1]):  # input channel j of W A: sum_i W[o, i, ...] A[i, j]
            out[o, j] = sum(W[o, i] * A[i, j] for i in range(W.shape[1]))
    out += B.reshape(W.shape)
    return out * alpha_over_rank(t, r)


def _cayley_by_hand(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I - Q)^-1, Q = B - B^T (scaled down to |Q|_F = constraint when larger and constraint > 0)."""
    q = blocks - blocks.transpose(-1, -2)
    norm = math.sqrt(float((q ** 2).sum()))
    if constraint > 0 and norm + 1e-8 > constraint:
        q = q * (constraint / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.stack([torch.linalg.solve((eye - qi).T, (eye + qi).T).T for qi in q.reshape(-1, *q.shape[-2:])]
                       ).reshape(q.shape)


def f_oft(t, W):
    """OFT: W'[block k, row m] = sum_n R_k[n, m] W[block k, row n] (R^T per block), R by Cayley (or given as
    "oft_diag"), then the optional row rescale; dW = W' - W."""
    out = W.shape[0]
    if "oft_diag" in t:
        r = t["oft_diag"].double()
    else:
        r = _cayley_by_hand(t["oft_blocks"].double(), float(t["alpha"]) * out if "alpha" in t else 0.0)
    k, n, _ = r.shape
    new = torch.zeros(W.shape, dtype=torch.float64)
    for b in range(k):
        for m in range(n):
            new[b * n + m] = sum(r[b, i, m] * W[b * n + i] for i in range(n))
    if "rescale" in t:
        new = new * t["rescale"].double().reshape(-1, *[1] * (W.dim() - 1))
    return new - W


def f_boft(t, W):
    """BOFT: stage i (stride s = 2^i * b/2) pairs row j with row j + s inside each group of 2s rows, gathers the
    rows of each block in that order, multiplies by R_i's block (R itself, not its transpose), scatters them back."""
    blocks = t["oft_blocks"].double()
    m, nb, b, _ = blocks.shape
    out = W.shape[0]
    r = _cayley_by_hand(blocks, float(t["alpha"]) * out if "alpha" in t else 0.0)
    x = W.clone()
    for i in range(m):
        s = (2 ** i) * (b // 2)
        order = []  # row order after "(c g k) -> (c k g)": for each group c, k = 0..s-1, g = 0..1
        for c in range(out // (2 * s)):
            for kk in range(s):
                for g in range(2):
                    order.append(c * 2 * s + g * s + kk)
        y = x.clone()
        for blk in range(out // b):
            rows = order[blk * b:(blk + 1) * b]
            for a, row in enumerate(rows):
                y[row] = sum(r[i, blk, a, j] * x[rows[j]] for j in range(b))
        x = y
    if "rescale" in t:
        x = x * t["rescale"].double().reshape(-1, *[1] * (W.dim() - 1))
    return x - W


def f_full(t, W):
    return t["diff"].reshape(W.shape) * (float(t["scale"]) if "scale" in t else 1.0)


def f_norm(t, W):
    return t["w_norm"].reshape(W.shape) * (float(t["scale"]) if "scale" in t else 1.0)


def f_ia3(t, W):
    """dW = W * w along the output rows (or input columns with on_input) (A1111 `orig_weight * w`)."""
    w = t["weight"].flatten()
    if "on_input" in t and bool(t["on_input"]):
        return W * w.reshape(1, -1, *[1] * (W.dim() - 2))
    return W * w.reshape(-1, *[1] * (W.dim() - 1))


def dora_by_hand(W: Tensor, dW: Tensor, magnitude: Tensor, per_row: bool) -> Tensor:
    """W' - W with W' = m * (W + dW) / ||W + dW||, one column (or row) at a time."""
    merged = W + dW
    new = torch.empty_like(merged)
    m = magnitude.flatten()
    if per_row:
        for o in range(merged.shape[0]):
            new[o] = merged[o] * m[o] / torch.sqrt((merged[o] ** 2).sum())
    else:
        for i in range(merged.shape[1]):
            new[:, i] = merged[:, i] * m[i] / torch.sqrt((merged[:, i] ** 2).sum())
    return new - W


def with_dora(formula, per_row: bool):
    def f(t, W):
        return dora_by_hand(W, formula(t, W), t["dora_scale"], per_row)

    return f


# ---------------------------------------------------------------------------------------------------------------------
# Cases: algorithm variant x layer. Each builds one module's tensors (float32, cast to the test dtype later).
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    layer: str
    cls: type
    make: Callable[[torch.Generator], dict[str, Tensor]]
    formula: Callable[[dict[str, Tensor], Tensor], Tensor]
    bias: Callable[[dict[str, Tensor]], Tensor] | None = None


def ones(*shape):
    return torch.ones(shape)


def R(g, *shape, std=1.0):
    return torch.randn(shape, generator=g) * std


def column_norms(shape, per_row, g):
    """A plausible DoRA magnitude for a random layer of `shape` (norms of W at init, perturbed)."""
    W = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if per_row:
        norms = W.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
    else:
        norms = W.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(1, shape[1], *[1] * (len(shape) - 2))
    return norms * (1 + 0.3 * torch.rand(norms.shape, generator=g))


A = torch.tensor  # alpha as stored by kohya/LyCORIS: a 0-d tensor

CASES = [
    # LoRA / LoCon / DyLoRA files
    Case("lora", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4), "lora_down.weight": R(g, 4, 8, std=0.3),
                                            "alpha": A(2.0)}, f_lora),
    Case("lora-no-alpha", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, std=0.3),
                                                     "lora_down.weight": R(g, 4, 8, std=0.3)}, f_lora),
    Case("lora-scale-key", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4), "lora_down.weight": R(g, 4, 8),
                                                      "alpha": A(8.0), "scale": A(0.25)}, f_lora),
    Case("lora-conv-factors", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1),
                                                         "lora_down.weight": R(g, 4, 8, 1, 1, std=0.3),
                                                         "alpha": A(4.0)}, f_lora),
    Case("locon", "conv3x3", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1),
                                              "lora_down.weight": R(g, 4, 8, 3, 3, std=0.2), "alpha": A(1.0)}, f_lora),
    Case("locon-flat-down", "conv3x3", Lora, lambda g: {"lora_up.weight": R(g, 12, 4),
                                                        "lora_down.weight": R(g, 4, 72, std=0.2)}, f_lora),
    Case("locon-tucker", "conv3x3", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1),
                                                     "lora_down.weight": R(g, 4, 8, 1, 1, std=0.5),
                                                     "lora_mid.weight": R(g, 4, 4, 3, 3, std=0.3),
                                                     "alpha": A(2.0)}, f_lora_tucker),
    Case("lora-linear-factors", "conv1x1", Lora, lambda g: {"lora_up.weight": R(g, 12, 4),
                                                            "lora_down.weight": R(g, 4, 8, std=0.3),
                                                            "alpha": A(3.0)}, f_lora),
    Case("lora", "conv1x1", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1),
                                             "lora_down.weight": R(g, 4, 8, 1, 1, std=0.3)}, f_lora),
    Case("lora", "embedding", Lora, lambda g: {"lora_up.weight": R(g, 12, 4), "lora_down.weight": R(g, 4, 8),
                                               "alpha": A(2.0)}, f_lora),
    # LoHa
    Case("loha", "linear", LoHa, lambda g: {"hada_w1_a": R(g, 12, 3), "hada_w1_b": R(g, 3, 8),
                                            "hada_w2_a": R(g, 12, 3), "hada_w2_b": R(g, 3, 8, std=0.3),
                                            "alpha": A(1.5)}, f_loha),
    Case("loha", "conv3x3", LoHa, lambda g: {"hada_w1_a": R(g, 12, 3), "hada_w1_b": R(g, 3, 72),
                                             "hada_w2_a": R(g, 12, 3), "hada_w2_b": R(g, 3, 72, std=0.3),
                                             "alpha": A(3.0)}, f_loha),
    Case("loha-tucker", "conv3x3", LoHa, lambda g: {"hada_w1_a": R(g, 3, 12), "hada_w1_b": R(g, 3, 8),
                                                    "hada_w2_a": R(g, 3, 12), "hada_w2_b": R(g, 3, 8),
                                                    "hada_t1": R(g, 3, 3, 3, 3, std=0.3),
                                                    "hada_t2": R(g, 3, 3, 3, 3, std=0.3), "alpha": A(3.0)}, f_loha),
    Case("loha", "conv1x1", LoHa, lambda g: {"hada_w1_a": R(g, 12, 2), "hada_w1_b": R(g, 2, 8),
                                             "hada_w2_a": R(g, 12, 2), "hada_w2_b": R(g, 2, 8, std=0.3)}, f_loha),
    # LoKr (12 = 3 x 4 outputs, 8 = 2 x 4 inputs)
    Case("lokr-w2-factored", "linear", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2_a": R(g, 4, 2),
                                                        "lokr_w2_b": R(g, 2, 4, std=0.3), "alpha": A(1.0)}, f_lokr),
    Case("lokr-w1-factored", "linear", LoKr, lambda g: {"lokr_w1_a": R(g, 3, 1), "lokr_w1_b": R(g, 1, 2),
                                                        "lokr_w2": R(g, 4, 4, std=0.3), "alpha": A(4.0)}, f_lokr),
    Case("lokr-whole-alpha-ignored", "linear", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2": R(g, 4, 4, std=0.3),
                                                                "alpha": A(123.0)}, f_lokr),
    Case("lokr-w2-conv", "conv3x3", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2": R(g, 4, 4, 3, 3, std=0.2)},
         f_lokr),
    Case("lokr-w2b-flat", "conv3x3", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2_a": R(g, 4, 2),
                                                      "lokr_w2_b": R(g, 2, 36, std=0.2), "alpha": A(1.0)}, f_lokr),
    Case("lokr-w2b-4d", "conv3x3", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2_a": R(g, 4, 2),
                                                    "lokr_w2_b": R(g, 2, 4, 3, 3, std=0.2), "alpha": A(1.0)}, f_lokr),
    Case("lokr-tucker", "conv3x3", LoKr, lambda g: {"lokr_w1_a": R(g, 3, 2), "lokr_w1_b": R(g, 2, 2),
                                                    "lokr_w2_a": R(g, 2, 4), "lokr_w2_b": R(g, 2, 4),
                                                    "lokr_t2": R(g, 2, 2, 3, 3, std=0.3), "alpha": A(2.0)}, f_lokr),
    Case("lokr", "conv1x1", LoKr, lambda g: {"lokr_w1": R(g, 3, 2), "lokr_w2": R(g, 4, 4, 1, 1, std=0.3),
                                             "scale": A(0.5)}, f_lokr),
    # full diff
    Case("glora", "linear", GLoRA, lambda g: {"a1.weight": R(g, 8, 3, std=0.3), "a2.weight": R(g, 3, 8, std=0.3),
                                             "b1.weight": R(g, 12, 3), "b2.weight": R(g, 3, 8, std=0.3),
                                             "alpha": A(1.5)}, f_glora),
    Case("glora-old-layout", "linear", GLoRA, lambda g: {"a1.weight": R(g, 3, 8, std=0.3),
                                                         "a2.weight": R(g, 8, 3, std=0.3), "b1.weight": R(g, 3, 8),
                                                         "b2.weight": R(g, 12, 3, std=0.3), "alpha": A(3.0)}, f_glora),
    Case("glora", "conv3x3", GLoRA, lambda g: {"a1.weight": R(g, 8, 3, 1, 1, std=0.3),
                                              "a2.weight": R(g, 3, 8, 1, 1, std=0.3),
                                              "b1.weight": R(g, 12, 3, 1, 1), "b2.weight": R(g, 3, 8, 3, 3, std=0.1),
                                              "alpha": A(2.0)}, f_glora),
    Case("glora-old-layout", "conv1x1", GLoRA, lambda g: {"a1.weight": R(g, 2, 8, 1, 1, std=0.3),
                                                          "a2.weight": R(g, 8, 2, 1, 1, std=0.3),
                                                          "b1.weight": R(g, 2, 8, 1, 1),
                                                          "b2.weight": R(g, 12, 2, 1, 1, std=0.3)}, f_glora),
    Case("full", "linear", FullDiff, lambda g: {"diff": R(g, 12, 8, std=0.2), "diff_b": R(g, 12, std=0.1),
                                                "alpha": A(5.0)}, f_full, lambda t: t["diff_b"]),
    Case("full", "conv3x3", FullDiff, lambda g: {"diff": R(g, 12, 8, 3, 3, std=0.1), "diff_b": R(g, 12, std=0.1)},
         f_full, lambda t: t["diff_b"]),
    Case("full", "layernorm", FullDiff, lambda g: {"diff": R(g, 8, std=0.2), "diff_b": R(g, 8, std=0.1)},
         f_full, lambda t: t["diff_b"]),
    Case("full", "embedding", FullDiff, lambda g: {"diff": R(g, 12, 8, std=0.2), "scale": A(0.5)}, f_full),
    # OFT (LyCORIS diag-oft / kohya), old oft_diag, BOFT
    Case("oft", "linear", OFT, lambda g: {"oft_blocks": R(g, 3, 4, 4, std=0.3)}, f_oft),
    Case("oft-constraint-rescale", "conv3x3", OFT, lambda g: {"oft_blocks": R(g, 4, 3, 3, std=0.5),
                                                               "alpha": A(0.02), "rescale": 1 + R(g, 12, 1, 1, 1,
                                                                                                  std=0.1)}, f_oft),
    Case("oft-diag-old", "linear", OFT, lambda g: {"oft_diag": torch.eye(4).repeat(3, 1, 1) + R(g, 3, 4, 4, std=0.1)},
         f_oft),
    Case("boft", "linear", OFT, lambda g: {"oft_blocks": R(g, 2, 6, 2, 2, std=0.3)}, f_boft),
    Case("boft-constraint", "conv1x1", OFT, lambda g: {"oft_blocks": R(g, 2, 6, 2, 2, std=0.5), "alpha": A(0.02)},
         f_boft),
    # norm
    Case("norm", "layernorm", NormDiff, lambda g: {"w_norm": R(g, 8, std=0.2), "b_norm": R(g, 8, std=0.1)},
         f_norm, lambda t: t["b_norm"]),
    Case("norm", "groupnorm", NormDiff, lambda g: {"w_norm": R(g, 8, std=0.2), "b_norm": R(g, 8, std=0.1)},
         f_norm, lambda t: t["b_norm"]),
    Case("norm-no-bias", "groupnorm", NormDiff, lambda g: {"w_norm": R(g, 8, std=0.2)}, f_norm),
    # IA3 (LyCORIS layouts: (out,) for linear, (1, out, 1, 1) for conv; on_input a 0-d int/bool)
    Case("ia3", "linear", IA3, lambda g: {"weight": R(g, 12, std=0.3), "on_input": torch.tensor(False)}, f_ia3),
    Case("ia3-on-input", "linear", IA3, lambda g: {"weight": R(g, 8, std=0.3), "on_input": torch.tensor(1)}, f_ia3),
    Case("ia3", "conv3x3", IA3, lambda g: {"weight": R(g, 1, 12, 1, 1, std=0.3), "on_input": torch.tensor(0)}, f_ia3),
    Case("ia3-on-input", "conv3x3", IA3, lambda g: {"weight": R(g, 1, 8, 1, 1, std=0.3),
                                                    "on_input": torch.tensor(True)}, f_ia3),
    Case("ia3-no-flag", "conv1x1", IA3, lambda g: {"weight": R(g, 12, std=0.3)}, f_ia3),
    # DoRA on top of LoRA/LoHa: both axes, PEFT's 1-D magnitude
    Case("lora+dora-columns", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, std=0.3),
                                                         "lora_down.weight": R(g, 4, 8, std=0.3), "alpha": A(2.0),
                                                         "dora_scale": column_norms((12, 8), False, g)},
         with_dora(f_lora, per_row=False)),
    Case("lora+dora-rows", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, std=0.3),
                                                      "lora_down.weight": R(g, 4, 8, std=0.3), "alpha": A(2.0),
                                                      "dora_scale": column_norms((12, 8), True, g)},
         with_dora(f_lora, per_row=True)),
    Case("lora+dora-peft", "linear", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, std=0.3),
                                                      "lora_down.weight": R(g, 4, 8, std=0.3),
                                                      "dora_scale": column_norms((12, 8), True, g).flatten()},
         with_dora(f_lora, per_row=True)),
    Case("locon+dora-columns", "conv3x3", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1, std=0.3),
                                                           "lora_down.weight": R(g, 4, 8, 3, 3, std=0.1),
                                                           "dora_scale": column_norms((12, 8, 3, 3), False, g)},
         with_dora(f_lora, per_row=False)),
    Case("locon+dora-rows", "conv3x3", Lora, lambda g: {"lora_up.weight": R(g, 12, 4, 1, 1, std=0.3),
                                                        "lora_down.weight": R(g, 4, 8, 3, 3, std=0.1),
                                                        "alpha": A(8.0),
                                                        "dora_scale": column_norms((12, 8, 3, 3), True, g)},
         with_dora(f_lora, per_row=True)),
    Case("loha+dora-columns", "linear", LoHa, lambda g: {"hada_w1_a": R(g, 12, 2), "hada_w1_b": R(g, 2, 8, std=0.3),
                                                         "hada_w2_a": R(g, 12, 2), "hada_w2_b": R(g, 2, 8, std=0.3),
                                                         "alpha": A(1.0),
                                                         "dora_scale": column_norms((12, 8), False, g)},
         with_dora(f_loha, per_row=False)),
]


def cast_module(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.id}-{c.layer}")
def test_algorithm_properties(case: Case, dtype: torch.dtype, device: str) -> None:
    """detect -> delta == published formula; bypass == layer(x; W+dW, b+db) - layer(x; W, b); both non-trivial."""
    layer = LAYERS[case.layer]
    spec = layer.spec
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-{case.layer}".encode()))
    tensors = cast_module(case.make(g), dtype)
    weight, bias = make_layer_params(spec, g)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    x = make_input(layer, g)
    x = x.to(dtype) if x.is_floating_point() else x

    algorithm = detect_algorithm(tensors)
    assert type(algorithm) is case.cls
    assert algorithm.used_keys == frozenset(tensors)
    algorithm.check_shape(spec)

    t64 = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    W64 = weight.double()
    expected = case.formula(t64, W64)
    expected_bias = case.bias(t64) if case.bias else None

    # the delta, against the formula
    weight_dev = weight.to(device)
    before = weight_dev.clone()
    delta = algorithm.weight_delta(weight_dev, spec)
    assert torch.equal(weight_dev, before), "weight_delta must not modify the layer weight"
    dense = delta.materialize(spec.weight_shape)
    assert dense.dtype == torch.float32 and dense.device.type == device
    assert tuple(dense.shape) == spec.weight_shape
    assert rel_err(dense, expected) < DELTA_TOL
    if isinstance(delta, LowRank):
        assert delta.up.shape[0] == spec.out_features and delta.down.shape[1] == spec.in_flat
    bias_delta = algorithm.bias_delta(None if bias is None else bias.to(device), spec)
    if expected_bias is None:
        assert bias_delta is None
    else:
        assert rel_err(bias_delta, expected_bias.reshape(bias.shape)) < DELTA_TOL

    # non-triviality: the delta is not ~0 and the adapted output differs from the base output
    assert expected.norm() > 0.05 * W64.norm()
    x64 = x.double() if x.is_floating_point() else x
    b64 = None if bias is None else bias.double()
    new_b64 = b64
    if expected_bias is not None:
        new_b64 = expected_bias if b64 is None else b64 + expected_bias.reshape(b64.shape)
    base = torch_layer(spec, x64, W64, b64)
    reference = torch_layer(spec, x64, W64 + expected, new_b64) - base
    assert reference.abs().max() > 0.05 * base.abs().max()

    # bypass, against the float64 forward of the merged layer
    out = algorithm.bypass(x.to(device), weight_dev, spec)
    assert out.dtype == (dtype if x.is_floating_point() else weight.dtype)
    assert out.shape == reference.shape
    assert rel_err(out, reference) < BYPASS_TOL[dtype]


def test_lora_returns_low_rank_for_plain_and_tucker_and_dense_with_dora() -> None:
    by_id = {f"{c.id}-{c.layer}": c for c in CASES}
    for case_id, kind in [("lora-linear", LowRank), ("locon-conv3x3", LowRank), ("locon-tucker-conv3x3", LowRank),
                          ("lora+dora-rows-linear", Dense), ("loha-linear", Dense), ("lokr-tucker-conv3x3", Dense)]:
        case = by_id[case_id]
        spec = LAYERS[case.layer].spec
        algorithm = detect_algorithm(case.make(torch.Generator().manual_seed(0)))
        assert isinstance(algorithm.weight_delta(torch.randn(spec.weight_shape), spec), kind), case_id


def test_case_list_covers_every_algorithm() -> None:
    assert {c.cls for c in CASES} == set(ALGORITHMS)


# ---------------------------------------------------------------------------------------------------------------------
# Scale rules (A1111 calc_scale) and DyLoRA
# ---------------------------------------------------------------------------------------------------------------------
def lora_tensors(out=6, rank=4, inp=5, **extra):
    g = torch.Generator().manual_seed(1)
    return {"lora_up.weight": torch.randn(out, rank, generator=g),
            "lora_down.weight": torch.randn(rank, inp, generator=g), **extra}


def test_scale_is_alpha_over_rank_and_explicit_scale_wins() -> None:
    lora = Lora.from_tensors(lora_tensors(alpha=torch.tensor(2.0)))
    assert (lora.rank, lora.alpha, lora.scale()) == (4, 2.0, 0.5)
    assert Lora.from_tensors(lora_tensors(alpha=torch.tensor([3.0]))).scale() == 0.75  # 1-element alpha
    missing = Lora.from_tensors(lora_tensors())
    assert (missing.alpha, missing.scale()) == (None, 1.0)  # no alpha: alpha = rank
    explicit = Lora.from_tensors(lora_tensors(alpha=torch.tensor(2.0), scale=torch.tensor(0.1)))
    assert explicit.scale() == pytest.approx(0.1)
    half = Lora.from_tensors(lora_tensors(alpha=torch.tensor(0.1, dtype=torch.float16)))
    assert half.scale() == float(torch.tensor(0.1, dtype=torch.float16)) / 4  # the stored fp16 value, as A1111 reads it


def test_rank_definitions_follow_a1111() -> None:
    loha = LoHa.from_tensors({"hada_w1_a": ones(4, 3), "hada_w1_b": ones(3, 5), "hada_w2_a": ones(4, 2),
                              "hada_w2_b": ones(2, 5), "alpha": torch.tensor(6.0)})
    assert (loha.rank, loha.scale()) == (3, 2.0)  # dim = w1_b.shape[0]
    whole = LoKr.from_tensors({"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(3, 3), "alpha": torch.tensor(6.0)})
    assert (whole.rank, whole.scale()) == (None, 1.0)  # no factorized half: alpha ignored
    half = LoKr.from_tensors({"lokr_w1_a": torch.ones(2, 3), "lokr_w1_b": torch.ones(3, 2), "lokr_w2": torch.ones(3, 3),
                              "alpha": torch.tensor(6.0)})
    assert (half.rank, half.scale()) == (3, 2.0)
    for algorithm in (FullDiff.from_tensors({"diff": torch.ones(2, 2), "alpha": torch.tensor(4.0)}),
                      NormDiff.from_tensors({"w_norm": torch.ones(2), "alpha": torch.tensor(4.0)}),
                      IA3.from_tensors({"weight": torch.ones(2), "alpha": torch.tensor(4.0)})):
        assert (algorithm.rank, algorithm.scale()) == (None, 1.0)


@pytest.mark.parametrize("layer_id", ["linear", "conv3x3"])
def test_dyn_truncates_ranks_but_keeps_alpha_over_full_rank(layer_id: str) -> None:
    spec = LAYERS[layer_id].spec
    g = torch.Generator().manual_seed(3)
    kernel = spec.weight_shape[2:]
    up = torch.randn(12, 6, *[1] * len(kernel), generator=g)
    down = torch.randn(6, 8, *kernel, generator=g)
    lora = Lora.from_tensors({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)})
    W = torch.randn(spec.weight_shape, generator=g)
    expected = (up.reshape(12, 6)[:, :2] @ down.reshape(6, -1)[:2]).reshape(spec.weight_shape) * (3.0 / 6)
    delta = lora.weight_delta(W, spec, dyn=2)
    assert isinstance(delta, LowRank) and delta.up.shape[1] == 2
    assert rel_err(delta.materialize(spec.weight_shape), expected) < DELTA_TOL
    x = make_input(LAYERS[layer_id], g)
    assert rel_err(lora.bypass(x, W, spec, dyn=2), torch_layer(spec, x.double(), expected.double(), None)) < 1e-5
    full = lora.weight_delta(W, spec, dyn=100).materialize(spec.weight_shape)  # dyn above the rank: everything
    assert torch.allclose(full, lora.weight_delta(W, spec).materialize(spec.weight_shape))
    with pytest.raises(ValueError):
        lora.weight_delta(W, spec, dyn=0)


def test_bias_deltas_are_not_alpha_scaled() -> None:
    spec = LayerSpec("linear", (3, 2))
    full = FullDiff.from_tensors({"diff": ones(3, 2), "diff_b": torch.full((3,), 2.0), "scale": torch.tensor(0.5)})
    assert torch.equal(full.weight_delta(torch.zeros(3, 2), spec).materialize((3, 2)), torch.full((3, 2), 0.5))
    assert torch.equal(full.bias_delta(torch.zeros(3), spec), torch.full((3,), 2.0))
    assert torch.equal(full.bias_delta(None, spec), torch.full((3,), 2.0))  # a layer without bias still gets the delta
    norm = NormDiff.from_tensors({"w_norm": torch.ones(4), "b_norm": torch.ones(4), "scale": torch.tensor(3.0)})
    assert torch.equal(norm.bias_delta(None, LayerSpec("norm", (4,))), torch.ones(4))


# ---------------------------------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 5), (6, 6), (4, 3, 3, 3), (1, 7)])
@pytest.mark.parametrize("per_row", [False, True])
def test_apply_dora_matches_the_decomposition_by_hand(shape: tuple[int, ...], per_row: bool) -> None:
    g = torch.Generator().manual_seed(7)
    W = torch.randn(shape, generator=g)
    dW = 0.3 * torch.randn(shape, generator=g)
    if per_row:
        magnitude = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) + 0.5
    else:
        magnitude = torch.rand(1, shape[1], *[1] * (len(shape) - 2), generator=g) + 0.5
    result = apply_dora(W, dW, magnitude)
    assert result.dtype == torch.float32 and result.shape == W.shape
    assert rel_err(result, dora_by_hand(W.double(), dW.double(), magnitude.double(), per_row)) < 1e-5
    merged = W + result  # the decomposition's defining property: the new norms are the magnitudes
    norms = merged.reshape(shape[0], -1).norm(dim=1) if per_row else merged.transpose(0, 1).reshape(shape[1], -1).norm(
        dim=1)
    assert torch.allclose(norms, magnitude.flatten(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
@pytest.mark.parametrize("per_row", [False, True])
def test_apply_dora_is_differentiable_like_the_decomposition_by_hand(shape: tuple[int, ...], per_row: bool) -> None:
    """Training learns the factors (inside dW) and the magnitude through `apply_dora`: its gradients are those of
    the by-hand formula (float64 autograd); W is not a leaf that needs one, but gets it if asked."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(shape, generator=g)
    dW = 0.3 * torch.randn(shape, generator=g)
    mshape = (shape[0], *[1] * (len(shape) - 1)) if per_row else (1, shape[1], *[1] * (len(shape) - 2))
    magnitude = torch.rand(mshape, generator=g) + 0.5
    probe = torch.randn(shape, generator=g)
    grads = []
    for dtype, formula in ((torch.float32, lambda w, d, m: apply_dora(w, d, m)),
                           (torch.float64, lambda w, d, m: dora_by_hand(w, d, m, per_row))):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (W, dW, magnitude)]
        (formula(*leaves) * probe.to(dtype)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads):
        assert got is not None and rel_err(got, want) < 1e-4
        assert want.abs().max() > 0  # non-trivial


def test_dora_axis_resolution() -> None:
    assert dora_axis((6, 6), (1, 6)) == "in"  # LyCORIS wd_on_out=False / A1111
    assert dora_axis((6, 6), (6, 1)) == "out"  # LyCORIS wd_on_out=True
    assert dora_axis((6, 6), (6,)) == "out"  # PEFT magnitude vector, also for square layers
    assert dora_axis((4, 3, 3, 3), (1, 3, 1, 1)) == "in"
    assert dora_axis((4, 3, 3, 3), (4, 1, 1, 1)) == "out"
    assert dora_axis((1, 5), (1, 1)) == "out"  # a single output row: only the per-row reading fits
    assert dora_axis((5, 1), (1, 1)) == "in"
    bad_shapes = [((6, 5), (5,)), ((6, 5), (1, 6)), ((6, 5), (6, 5)), ((4, 3, 3, 3), (1, 3, 3, 3)), ((8,), (8,))]
    for weight_shape, bad in bad_shapes:
        with pytest.raises(ShapeMismatchError) as err:
            dora_axis(weight_shape, bad)
        assert err.value.key == "dora_scale"


def test_dora_is_applied_after_alpha_and_before_the_multiplier() -> None:
    """A1111 finalize_updown: decomposition of W + (alpha/r) up@down; the caller multiplies the returned delta."""
    g = torch.Generator().manual_seed(11)
    up, down, W = torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g), torch.randn(5, 4, generator=g)
    magnitude = torch.rand(1, 4, generator=g) + 0.5
    lora = Lora.from_tensors({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0),
                              "dora_scale": magnitude})
    delta = lora.weight_delta(W, LayerSpec("linear", (5, 4)))
    expected = dora_by_hand(W.double(), (up @ down).double() * 0.5, magnitude.double(), per_row=False)
    assert isinstance(delta, Dense) and rel_err(delta.delta, expected) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Second oracle: the LyCORIS trainer modules (real key names/layouts) and lycoris.functional bypass paths
# ---------------------------------------------------------------------------------------------------------------------
def lycoris_module(kind: str, org: nn.Module, **kwargs):
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.full import FullModule
    from lycoris.modules.glora import GLoRAModule
    from lycoris.modules.ia3 import IA3Module
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.norms import NormModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule, "ia3": IA3Module, "full": FullModule,
           "norm": NormModule, "glora": GLoRAModule, "diag-oft": DiagOFTModule, "boft": ButterflyOFTModule}[kind]
    module = cls("lycoris_test", org, 1.0, **kwargs)
    module.apply_to()  # as in training: the module takes over the layer's forward, then its parameters train
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking factors (several are zero at init)
        for name, p in module.named_parameters():
            if not name.startswith("org_") and p.is_floating_point():
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return module


LYCORIS_CASES = [
    ("locon", lambda: nn.Linear(10, 12), dict(lora_dim=4, alpha=2)),
    ("locon", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=4, alpha=1)),
    ("locon", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=4, alpha=2, use_tucker=True)),
    ("locon", lambda: nn.Linear(10, 12), dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=True)),
    ("locon", lambda: nn.Linear(10, 12), dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),
    ("locon", lambda: nn.Conv2d(6, 8, 3, 1, 1), dict(lora_dim=4, alpha=4, weight_decompose=True, wd_on_out=True)),
    ("locon", lambda: nn.Conv2d(6, 8, 3, 1, 1), dict(lora_dim=4, alpha=4, weight_decompose=True, wd_on_out=False)),
    ("loha", lambda: nn.Linear(10, 12), dict(lora_dim=3, alpha=1.5)),
    ("loha", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=3, alpha=1.5)),
    ("loha", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=3, alpha=1.5, use_tucker=True)),
    ("loha", lambda: nn.Linear(10, 12), dict(lora_dim=3, alpha=3, weight_decompose=True)),
    ("lokr", lambda: nn.Linear(64, 96), dict(lora_dim=2, alpha=1, factor=8)),
    ("lokr", lambda: nn.Linear(64, 96), dict(lora_dim=2, alpha=1, factor=8, decompose_both=True)),
    ("lokr", lambda: nn.Linear(16, 12), dict(lora_dim=8, alpha=3, factor=4)),  # both halves whole: alpha ignored
    ("lokr", lambda: nn.Conv2d(32, 48, 3, 2, 1), dict(lora_dim=2, alpha=1, factor=8)),
    ("lokr", lambda: nn.Conv2d(32, 48, 3, 2, 1), dict(lora_dim=2, alpha=1, factor=8, use_tucker=True)),
    ("ia3", lambda: nn.Linear(10, 12), {}),
    ("ia3", lambda: nn.Linear(10, 12), dict(train_on_input=True)),
    ("ia3", lambda: nn.Conv2d(6, 8, 3, 2, 1), {}),
    ("full", lambda: nn.Linear(10, 12), {}),
    ("full", lambda: nn.Conv2d(6, 8, 3, 2, 1), {}),
    ("norm", lambda: nn.LayerNorm(10), {}),
    ("norm", lambda: nn.GroupNorm(2, 8), {}),
    ("glora", lambda: nn.Linear(10, 12), dict(lora_dim=4, alpha=2)),
    ("glora", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=3, alpha=1.5)),
    ("glora", lambda: nn.Conv2d(6, 8, 1), dict(lora_dim=2, alpha=2)),
    ("diag-oft", lambda: nn.Linear(10, 12), dict(lora_dim=4)),
    ("diag-oft", lambda: nn.Linear(10, 12), dict(lora_dim=4, constraint=0.01)),
    ("diag-oft", lambda: nn.Conv2d(6, 8, 3, 2, 1), dict(lora_dim=2, rescaled=True)),
    ("boft", lambda: nn.Linear(10, 16), dict(lora_dim=2)),
    ("boft", lambda: nn.Conv2d(6, 16, 3, 2, 1), dict(lora_dim=4, constraint=0.01)),
]


def spec_of(org: nn.Module) -> LayerSpec:
    if isinstance(org, nn.Conv2d):
        return LayerSpec("conv", tuple(org.weight.shape), stride=org.stride, padding=org.padding)
    if isinstance(org, nn.GroupNorm):
        return LayerSpec("norm", tuple(org.weight.shape), num_groups=org.num_groups, eps=org.eps)
    if isinstance(org, nn.LayerNorm):
        return LayerSpec("norm", tuple(org.weight.shape), eps=org.eps)
    return LayerSpec("linear", tuple(org.weight.shape))


def lycoris_input(org: nn.Module, g: torch.Generator) -> Tensor:
    if isinstance(org, nn.Conv2d):
        return torch.randn(4, org.in_channels, 17, 17, generator=g)  # 4 x 9 x 9 output positions >= 32 * 3 * 3
    if isinstance(org, nn.GroupNorm):
        return torch.randn(2, org.num_channels, 5, 5, generator=g)
    return torch.randn(max(16, org.weight.shape[-1] + 4), org.weight.shape[-1], generator=g)


@pytest.mark.parametrize(("kind", "make_org", "kwargs"), LYCORIS_CASES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(LYCORIS_CASES)])
def test_matches_lycoris_modules(kind: str, make_org, kwargs: dict) -> None:
    """Keys and layouts as the LyCORIS trainer saves them; its own forward (multiplier 1) is the reference.

    (Its forward, not `get_diff_weight`: in lycoris-lora 4.1.3 LoHa/LoKr `get_diff_weight` applies alpha/r twice.)
    The inputs have at least as many rows/positions as the weight has columns, so equal outputs mean equal deltas.
    """
    torch.manual_seed(0)
    org = make_org()
    with torch.no_grad():
        if org.bias is not None:
            org.bias.normal_()
        if isinstance(org, nn.LayerNorm | nn.GroupNorm):
            org.weight.copy_(1 + 0.2 * torch.randn_like(org.weight))
    W, b = org.weight.detach().clone(), org.bias.detach().clone()
    spec = spec_of(org)
    x = lycoris_input(org, torch.Generator().manual_seed(1))
    module = lycoris_module(kind, org, **kwargs)
    state = {k: v.detach() for k, v in module.state_dict().items() if not k.startswith("org_")}
    algorithm = detect_algorithm(state)
    assert algorithm is not None and algorithm.name == {"locon": "lora", "diag-oft": "oft", "boft": "oft"}.get(kind,
                                                                                                                kind)
    assert algorithm.used_keys == frozenset(state), "every key a LyCORIS module saves is consumed"

    delta = algorithm.weight_delta(W, spec).materialize(spec.weight_shape)
    bias_delta = algorithm.bias_delta(b, spec)
    new_b = b if bias_delta is None else b + bias_delta
    with torch.no_grad():
        base = torch_layer(spec, x.double(), W.double(), b.double())
        lycoris_out = org(x).double() - base
        ours = torch_layer(spec, x.double(), W.double() + delta.double(), new_b.double()) - base
    assert lycoris_out.abs().max() > 1e-2 * base.abs().max()
    assert rel_err(ours, lycoris_out) < 1e-5
    assert rel_err(algorithm.bypass(x, W, spec), lycoris_out) < 1e-5


def test_bypass_matches_lycoris_functional() -> None:
    from lycoris.functional import locon, lokr

    g = torch.Generator().manual_seed(9)
    spec = LayerSpec("conv", (8, 6, 3, 3), stride=(2, 2), padding=(1, 1))
    x = torch.randn(2, 6, 9, 9, generator=g)
    W = torch.randn(spec.weight_shape, generator=g)
    extra = {"stride": spec.stride, "padding": spec.padding}
    down, up, mid = (torch.randn(3, 6, 1, 1, generator=g), torch.randn(8, 3, 1, 1, generator=g),
                     torch.randn(3, 3, 3, 3, generator=g))
    tucker = Lora.from_tensors({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid,
                                "alpha": torch.tensor(1.5)})
    expected = locon.bypass_forward_diff(x, None, down, up, mid, gamma=0.5, extra_args=extra)
    assert rel_err(tucker.bypass(x, W, spec), expected) < 1e-5
    down3 = torch.randn(3, 6, 3, 3, generator=g)
    locon_alg = Lora.from_tensors({"lora_up.weight": up, "lora_down.weight": down3, "alpha": torch.tensor(1.5)})
    expected = locon.bypass_forward_diff(x, None, down3, up, None, gamma=0.5, extra_args=extra)
    assert rel_err(locon_alg.bypass(x, W, spec), expected) < 1e-5
    # LoKr: out 8 = 2 x 4, in 6 = 2 x 3
    w1, w2a, w2b = torch.randn(2, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    kron = LoKr.from_tensors({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    expected = lokr.bypass_forward_diff(x, None, w1, None, None, None, w2a, w2b, None, gamma=1.0, extra_args=extra)
    assert rel_err(kron.bypass(x, W, spec), expected) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Detection and errors
# ---------------------------------------------------------------------------------------------------------------------
DETECTION = [
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)}, Lora),
    ({"lora_up.weight": ones(4, 2, 1, 1), "lora_down.weight": ones(2, 3, 1, 1), "lora_mid.weight": ones(2, 2, 3, 3)},
     Lora),
    ({"hada_w1_a": ones(4, 2), "hada_w1_b": ones(2, 3), "hada_w2_a": ones(4, 2), "hada_w2_b": ones(2, 3)}, LoHa),
    ({"lokr_w1": ones(2, 1), "lokr_w2": ones(2, 3)}, LoKr),
    ({"lokr_w1_a": ones(2, 1), "lokr_w1_b": ones(1, 1), "lokr_w2_a": ones(2, 1), "lokr_w2_b": ones(1, 3)}, LoKr),
    ({"diff": ones(4, 3), "diff_b": ones(4)}, FullDiff),
    ({"w_norm": ones(4), "b_norm": ones(4)}, NormDiff),
    ({"w_norm": ones(4)}, NormDiff),
    ({"weight": ones(4), "on_input": torch.tensor(False)}, IA3),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3), "alpha": torch.tensor(1.0),
      "dora_scale": ones(1, 3)}, Lora),
    ({"a1.weight": ones(2, 3), "a2.weight": ones(3, 2), "b1.weight": ones(2, 3), "b2.weight": ones(4, 2)}, GLoRA),
    ({"oft_blocks": ones(2, 3, 3), "rescale": ones(6, 1)}, OFT),
    ({"oft_diag": ones(2, 3, 3)}, OFT),
    ({"oft_blocks": ones(2, 3, 2, 2)}, OFT),
]

FOREIGN = [
    {},
    {"alpha": torch.tensor(1.0)},
    {"lora_up.weight": ones(4, 2)},  # half a LoRA
    {"lora_A.weight": ones(2, 3), "lora_B.weight": ones(4, 2)},  # PEFT names: the key parser normalizes them first
    {"hada_w1_a": ones(4, 2), "hada_w1_b": ones(2, 3), "hada_w2_a": ones(4, 2)},
    {"lokr_w1": ones(2, 2)},
    {"lokr_w1_a": ones(2, 1), "lokr_w2": ones(2, 2)},
    {"b_norm": ones(4)},
    {"rescale": ones(6, 1)},  # OFT's rescale without its blocks
    {"a1.weight": ones(2, 3), "a2.weight": ones(3, 2)},  # half a GLoRA
]


@pytest.mark.parametrize(("tensors", "cls"), DETECTION, ids=[c.__name__ + str(i) for i, (_, c) in enumerate(DETECTION)])
def test_detection_picks_the_class(tensors, cls) -> None:
    algorithm = detect_algorithm(tensors)
    assert type(algorithm) is cls
    assert algorithm.name == cls.name
    assert algorithm.tensors().keys() == tensors.keys()


@pytest.mark.parametrize("tensors", FOREIGN, ids=lambda t: "+".join(sorted(t)) or "empty")
def test_detection_returns_none_for_foreign_keys(tensors) -> None:
    assert detect_algorithm(tensors) is None


def test_detection_prefers_specific_key_sets_over_the_generic_ia3_weight() -> None:
    stray = {"weight": ones(4)}
    assert type(detect_algorithm({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3), **stray})) is Lora
    assert type(detect_algorithm({"diff": ones(4, 3), **stray})) is FullDiff
    assert type(detect_algorithm({"w_norm": ones(4), **stray})) is NormDiff
    assert ALGORITHMS[-1] is IA3


def test_unused_keys_are_left_out_of_used_keys() -> None:
    lora = detect_algorithm({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3), "bias": ones(4),
                             "hada_w1_a": ones(4, 2)})
    assert lora.used_keys == {"lora_up.weight", "lora_down.weight"}
    kron = detect_algorithm({"lokr_w1": ones(2, 1), "lokr_w1_a": ones(2, 1), "lokr_w1_b": ones(1, 1),
                             "lokr_w2": ones(2, 3)})
    assert kron.used_keys == {"lokr_w1", "lokr_w2"}  # a whole w1 wins over its factors (A1111)


INCONSISTENT = [
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(3, 5)}, "lora_up.weight"),
    ({"lora_up.weight": ones(4, 2, 3, 3), "lora_down.weight": ones(2, 5)}, "lora_up.weight"),
    ({"lora_up.weight": ones(4, 2, 1, 1), "lora_down.weight": ones(2, 5, 1, 1), "lora_mid.weight": ones(3, 2, 3, 3)},
     "lora_mid.weight"),
    ({"lora_up.weight": ones(4, 2, 1, 1), "lora_down.weight": ones(2, 5, 3, 3), "lora_mid.weight": ones(2, 2, 3, 3)},
     "lora_down.weight"),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 5), "alpha": ones(2)}, "alpha"),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 5), "dora_scale": torch.tensor(1.0)}, "dora_scale"),
    ({"hada_w1_a": ones(4, 2), "hada_w1_b": ones(3, 5), "hada_w2_a": ones(4, 2), "hada_w2_b": ones(2, 5)},
     "hada_w1_a"),
    ({"hada_w1_a": ones(4, 2), "hada_w1_b": ones(2, 5), "hada_w2_a": ones(4, 2), "hada_w2_b": ones(2, 6)},
     "hada_w2_a"),
    ({"hada_w1_a": ones(2, 4), "hada_w1_b": ones(2, 5), "hada_w2_a": ones(2, 4), "hada_w2_b": ones(2, 5),
      "hada_t1": ones(3, 2, 3, 3), "hada_t2": ones(2, 2, 3, 3)}, "hada_w1_a"),
    ({"lokr_w1_a": ones(2, 3), "lokr_w1_b": ones(2, 2), "lokr_w2": ones(2, 2)}, "lokr_w1_a"),
    ({"lokr_w1": ones(2, 2), "lokr_w2_a": ones(2, 3), "lokr_w2_b": ones(2, 2)}, "lokr_w2_a"),
    ({"lokr_w1": ones(2, 2), "lokr_w2_a": ones(2, 4), "lokr_w2_b": ones(2, 5), "lokr_t2": ones(3, 2, 3, 3)},
     "lokr_t2"),
    ({"w_norm": ones(4), "b_norm": ones(5)}, "b_norm"),
    ({"weight": ones(4), "on_input": torch.tensor([True, False])}, "on_input"),
]


@pytest.mark.parametrize(("tensors", "key"), INCONSISTENT, ids=[f"{k}-{i}" for i, (_, k) in enumerate(INCONSISTENT)])
def test_inconsistent_tensors_raise_shape_mismatch(tensors, key) -> None:
    with pytest.raises(ShapeMismatchError) as err:
        detect_algorithm(tensors)
    assert err.value.key == key
    assert isinstance(err.value, LoraFileError) and err.value.path is None


WRONG_TARGET = [
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)}, LayerSpec("linear", (5, 3)), "lora_up.weight"),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)}, LayerSpec("linear", (4, 6)), "lora_down.weight"),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)}, LayerSpec("norm", (4,)), "lora_up.weight"),
    # a kxk down on a linear layer whose width happens to match: refused, not silently flattened
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 2, 3, 3)}, LayerSpec("linear", (4, 18)),
     "lora_down.weight"),
    ({"lora_up.weight": ones(4, 2, 1, 1), "lora_down.weight": ones(2, 3, 3, 3)}, LayerSpec("conv", (4, 3, 1, 1)),
     "lora_down.weight"),
    ({"lora_up.weight": ones(4, 2, 1, 1), "lora_down.weight": ones(2, 3, 1, 1), "lora_mid.weight": ones(2, 2, 3, 3)},
     LayerSpec("conv", (4, 3, 5, 5)), "lora_mid.weight"),
    ({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3), "dora_scale": ones(1, 4)},
     LayerSpec("linear", (4, 3)), "dora_scale"),
    ({"hada_w1_a": ones(4, 2), "hada_w1_b": ones(2, 3), "hada_w2_a": ones(4, 2), "hada_w2_b": ones(2, 3)},
     LayerSpec("linear", (4, 4)), "hada_w1_a"),
    ({"lokr_w1": ones(2, 1), "lokr_w2": ones(2, 3)}, LayerSpec("linear", (4, 4)), "lokr_w2"),
    ({"lokr_w1": ones(2, 1), "lokr_w2": ones(2, 3, 3, 3)}, LayerSpec("conv", (4, 3, 1, 1)), "lokr_w2"),
    ({"diff": ones(4, 3)}, LayerSpec("linear", (3, 4)), "diff"),
    ({"diff": ones(4, 3), "diff_b": ones(3)}, LayerSpec("linear", (4, 3)), "diff_b"),
    ({"diff": ones(4, 3), "diff_b": ones(4)}, LayerSpec("embedding", (4, 3)), "diff_b"),
    ({"w_norm": ones(4)}, LayerSpec("linear", (4, 1)), "w_norm"),
    ({"w_norm": ones(4)}, LayerSpec("norm", (5,)), "w_norm"),
    ({"weight": ones(4)}, LayerSpec("linear", (3, 4)), "weight"),
    ({"weight": ones(4), "on_input": torch.tensor(True)}, LayerSpec("linear", (4, 3)), "weight"),
    ({"weight": ones(4)}, LayerSpec("norm", (4,)), "weight"),
]


@pytest.mark.parametrize(("tensors", "spec", "key"), WRONG_TARGET,
                         ids=[f"{k}-{i}" for i, (_, _, k) in enumerate(WRONG_TARGET)])
def test_check_shape_rejects_layers_that_do_not_fit(tensors, spec: LayerSpec, key: str) -> None:
    algorithm = detect_algorithm(tensors)
    with pytest.raises(ShapeMismatchError) as err:
        algorithm.check_shape(spec)
    assert err.value.key == key
    with pytest.raises(ShapeMismatchError):  # weight_delta checks too, before any math
        algorithm.weight_delta(torch.ones(spec.weight_shape), spec)


def test_weight_delta_refuses_a_weight_that_is_not_the_spec() -> None:
    lora = detect_algorithm({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)})
    with pytest.raises(ShapeMismatchError):
        lora.weight_delta(torch.ones(4, 4), LayerSpec("linear", (4, 3)))


def test_algorithms_are_immutable() -> None:
    lora = detect_algorithm({"lora_up.weight": ones(4, 2), "lora_down.weight": ones(2, 3)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        lora.up = ones(4, 2)
    with pytest.raises(TypeError):
        lora.tensors()["lora_up.weight"] = ones(4, 2)
    with pytest.raises(ValueError):
        LayerSpec("attention", (4, 4))
    with pytest.raises(ValueError):
        LayerSpec("conv", (4, 4, 3))  # Conv1d is not supported
