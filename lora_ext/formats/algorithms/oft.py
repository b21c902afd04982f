"""OFT (orthogonal fine-tuning): the layer's output channels are rotated block by block.

    W' = diag(R_1 .. R_k)^T W        (each R_i acts on the block_size output rows of block i)
    dW = W' - W = (R - I)^T W        (times the multiplier: linear, as A1111 and kohya apply it)

Layouts (one module's keys):
- `oft_blocks` (num_blocks, block_size, block_size), LyCORIS "diag-oft" and kohya sd-scripts' networks/oft.py: R is
  the Cayley transform of the skew part, Q = B - B^T, R = (I + Q)(I - Q)^-1. `alpha` is a constraint, not a scale:
  when alpha > 0, Q is scaled down so that |Q|_F <= alpha * out_features (LyCORIS, A1111; kohya sd-scripts always
  clamps, which with its epsilon differs in the last bits only). Optional `rescale` (out, 1, ...): W' = rescale * R^T W.
- `oft_diag` (num_blocks, block_size, block_size), old LyCORIS: the blocks are R itself.
- `oft_blocks` (m, num_blocks, b, b), LyCORIS BOFT (butterfly OFT): m butterfly factors, each a block-diagonal
  rotation of the output rows after a butterfly permutation; R = R_{m-1} ... R_0 in that order.

The multiplier scales dW (as A1111 v1.10 and kohya do); for `rescale` files at a multiplier other than 1, LyCORIS
instead scales R - I inside the rescale (rare files; the difference is said in the README). The delta reads the
current weight, so merges run in order. Conv layers are rotated on their output channels like linear layers.
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

BLOCKS, DIAG, RESCALE = "oft_blocks", "oft_diag", "rescale"


def cayley(blocks: Tensor, constraint: float | None) -> Tensor:
    """R = (I + Q)(I - Q)^-1 with Q = B - B^T, |Q| clamped to `constraint` when it is > 0 (float32)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint is not None and constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_rows(r: Tensor, w: Tensor) -> Tensor:
    """diag(r_1 .. r_k)^T applied to the rows of w (k blocks of r.shape[-1] rows)."""
    k, n, _ = r.shape
    rest = w.shape[1:]
    return torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *rest)).reshape(k * n, *rest)


def butterfly(rs: Tensor, w: Tensor) -> Tensor:
    """LyCORIS BOFT: for each factor i, group the rows by the butterfly of stride 2^i * b/2, rotate each group of b
    rows by its block, ungroup."""
    m, _, b, _ = rs.shape
    half = b // 2
    rest = w.shape[1:]
    x = w
    for i in range(m):
        k = (2 ** i) * half
        c = x.shape[0] // (2 * k)
        x = x.reshape(c, 2, k, *rest).transpose(1, 2).reshape(-1, *rest)  # (c g k) -> (c k g)
        x = torch.einsum("dij,dj...->di...", rs[i], x.reshape(-1, b, *rest)).reshape(-1, *rest)
        x = x.reshape(c, k, 2, *rest).transpose(1, 2).reshape(-1, *rest)  # (c k g) -> (c g k)
    return x


@dataclass(frozen=True, eq=False)
class OFT(Algorithm):
    """OFT / BOFT module: "oft_blocks" (3-D OFT, 4-D BOFT) or "oft_diag", optional "rescale"."""

    name: ClassVar[str] = "oft"
    suffixes: ClassVar[Mapping[str, str]] = MappingProxyType(
        {f".{BLOCKS}": BLOCKS, f".{DIAG}": DIAG, f".{RESCALE}": RESCALE})
    anchors: ClassVar[tuple[str, ...]] = (BLOCKS, DIAG)
    reads_current_weight: ClassVar[bool] = True
    uses_alpha: ClassVar[bool] = False  # alpha is OFT's norm constraint, not a scale

    blocks: Tensor
    is_r: bool  # old "oft_diag": the blocks are R
    rescale_t: Tensor | None
    extras: ModuleExtras
    source: Mapping[str, Tensor]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> OFT | None:
        key = BLOCKS if BLOCKS in tensors else DIAG if DIAG in tensors else None
        if key is None:
            return None
        blocks = tensors[key]
        if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2] or (key == DIAG and blocks.dim() != 3):
            raise ShapeMismatchError(None, f"{key} has shape {tuple(blocks.shape)}; expected (blocks, size, size)"
                                     + (" or (factors, blocks, size, size)" if key == BLOCKS else ""), key=key)
        if blocks.dim() == 4 and blocks.shape[-1] % 2:
            raise ShapeMismatchError(None, f"BOFT blocks of odd size {blocks.shape[-1]}", key=key)
        keys = (key, RESCALE) if RESCALE in tensors else (key,)
        return cls(blocks, key == DIAG, tensors.get(RESCALE), ModuleExtras.from_tensors(tensors),
                   tensor_source(tensors, keys))

    @classmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """LyCORIS diag-oft blocks: `rank` blocks when they divide the output channels, else one per 4 channels."""
        if spec.kind not in ("linear", "conv"):
            return None
        out = spec.weight_shape[0]
        n = rank if rank > 0 and out % rank == 0 else max(1, out // 4)
        if out % n:
            return None
        return {BLOCKS: rnd(n, out // n, out // n) * 0.05}

    @property
    def rank(self) -> None:
        return None

    @property
    def is_boft(self) -> bool:
        return self.blocks.dim() == 4

    def _rows(self) -> int:
        b = self.blocks
        return int(b.shape[1] * b.shape[2]) if self.is_boft else int(b.shape[0] * b.shape[1])

    def _check_target(self, spec: LayerSpec) -> None:
        if spec.kind not in ("linear", "conv"):
            raise ShapeMismatchError(None, f"OFT cannot target a {spec.kind} layer", key=BLOCKS)
        out = spec.weight_shape[0]
        if self._rows() != out:
            raise ShapeMismatchError(None, f"the blocks rotate {self._rows()} output channels, the layer weight is "
                                     f"{spec.weight_shape}", key=DIAG if self.is_r else BLOCKS)
        if self.is_boft and (out // self.blocks.shape[-1]) % (2 ** (self.blocks.shape[0] - 1)):
            raise ShapeMismatchError(None, f"{self.blocks.shape[0]} butterfly factors do not fit {out} channels in "
                                     f"blocks of {self.blocks.shape[-1]}", key=BLOCKS)
        if self.rescale_t is not None and self.rescale_t.numel() != out:
            raise ShapeMismatchError(None, f"rescale has {self.rescale_t.numel()} values for {out} output channels",
                                     key=RESCALE)

    def rotation(self, device: torch.device) -> Tensor:
        """The blocks of R (float32)."""
        blocks = as_f32(self.blocks, device)
        if self.is_r:
            return blocks
        out = self._rows()
        alpha = self.extras.alpha
        return cayley(blocks, None if alpha is None else alpha * out)

    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> Dense:
        device = orig_weight.device
        w = orig_weight.to(torch.float32)
        r = self.rotation(device)
        rotated = butterfly(r, w) if self.is_boft else rotate_rows(r, w)
        if self.rescale_t is not None:
            rotated = as_f32(self.rescale_t, device).reshape(-1, *([1] * (w.dim() - 1))) * rotated
        return Dense(rotated - w)
