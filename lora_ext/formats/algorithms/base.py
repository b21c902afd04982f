"""Shared records and the `Algorithm` contract for the LoRA algorithm registry.

An algorithm object holds the tensors of ONE module of a LoRA file (suffix keys such as "lora_up.weight", already
stripped of the module name) and turns them into a weight delta for one target layer. Everything here is pure tensor
math: no I/O, no WebUI, no globals. Conventions follow AUTOMATIC1111 v1.10 (the reference host), LyCORIS and ComfyUI:

* the delta is computed in float32 on the device of the target weight;
* the alpha scale (``alpha / rank``, or an explicit ``scale`` key) is applied, the user multiplier is NOT;
* a ``dora_scale`` key turns on weight decomposition (see `lora_ext.formats.algorithms.dora`);
* "flattened" means the ``(out, in * kh * kw)`` view of a weight, the space in which conv LoRA factors multiply.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ext.errors import NonFiniteWeightError, ShapeMismatchError
from lora_ext.formats.algorithms.dora import apply_dora, dora_axis

ALPHA_KEY = "alpha"
SCALE_KEY = "scale"
DORA_KEY = "dora_scale"
COMMON_KEYS = frozenset({ALPHA_KEY, SCALE_KEY, DORA_KEY})
COMMON_SUFFIXES: Mapping[str, str] = MappingProxyType({
    ".alpha": ALPHA_KEY,
    ".scale": SCALE_KEY,
    ".dora_scale": DORA_KEY,
    ".lora_magnitude_vector": DORA_KEY,  # PEFT DoRA: per-output-row magnitude
    ".lora_magnitude_vector.default": DORA_KEY,
    ".lora_magnitude_vector.default.weight": DORA_KEY,
})
"""File-key suffix -> normalised suffix of the optional keys any algorithm may carry."""

Random = Callable[..., Tensor]
"""`rnd(*shape)`: random values of a given shape (the dtype and scale are the caller's), for `Algorithm.synthesize`."""

LAYER_KINDS = ("linear", "conv", "norm", "embedding")


@dataclass(frozen=True, eq=False)
class LowRank:
    """A delta that is exactly ``scale * (up @ down)`` in the flattened weight space.

    up: (out, r) float32; down: (r, in_flat) float32 with in_flat = prod(weight.shape[1:]); both on one device.
    """

    up: Tensor
    down: Tensor
    scale: float

    def materialize(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """The dense delta, reshaped to `shape` (the target weight's shape), float32."""
        return (self.up @ self.down).mul_(self.scale).reshape(shape)


@dataclass(frozen=True, eq=False)
class Dense:
    """A full delta with the target weight's shape (float32)."""

    delta: Tensor

    def materialize(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """The delta reshaped to `shape` (a no-op for a delta built for that layer)."""
        return self.delta.reshape(shape)


@dataclass(frozen=True)
class LayerSpec:
    """What the algorithms need to know of the target layer.

    kind: "linear" (weight (out, in)), "conv" (Conv2d, weight (out, in/groups, kh, kw)), "norm" (GroupNorm or LayerNorm,
    weight = the affine weight, e.g. (C,)), "embedding" (weight (num_embeddings, dim)). stride/padding/dilation/groups
    are the conv's; `num_groups` (GroupNorm; None = LayerNorm over `weight_shape`) and `eps` are the norm's.
    """

    kind: str
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    num_groups: int | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if self.kind == "conv" and len(self.weight_shape) != 4:
            raise ValueError(f"only Conv2d layers are supported, got a conv weight of shape {self.weight_shape}")
        object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_flat(self) -> int:
        """prod(weight_shape[1:]): the width of the flattened weight."""
        return math.prod(self.weight_shape[1:])


def _scalar(tensors: Mapping[str, Tensor], key: str) -> float | None:
    value = tensors.get(key)
    if value is None:
        return None
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ShapeMismatchError(None, f"{key} must hold one number, got a tensor of shape {tuple(t.shape)}", key=key)
    number = float(t.reshape(()).item())
    if not math.isfinite(number):
        raise NonFiniteWeightError(None, f"{key} is {number}", key=key)
    return number


@dataclass(frozen=True, eq=False)
class ModuleExtras:
    """The optional keys every algorithm may carry: "alpha", "scale" and "dora_scale"."""

    alpha: float | None = None
    scale: float | None = None
    dora_scale: Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> ModuleExtras:
        """Read the common keys. Raises ShapeMismatchError if alpha/scale is not a single number."""
        dora_scale = tensors.get(DORA_KEY)
        if dora_scale is not None and (dora_scale.dim() == 0 or dora_scale.numel() == 0):
            raise ShapeMismatchError(
                None, f"dora_scale must be a vector or (1, in, ...) / (out, 1, ...), got {tuple(dora_scale.shape)}",
                key=DORA_KEY,
            )
        return cls(_scalar(tensors, ALPHA_KEY), _scalar(tensors, SCALE_KEY), dora_scale)


def is_all_ones(dims: tuple[int, ...] | torch.Size) -> bool:
    return all(d == 1 for d in dims)


def input_fits(factor_shape: tuple[int, ...] | torch.Size, weight_shape: tuple[int, ...]) -> bool:
    """Does a "down"-like factor (rank, in[, kh, kw]) or flattened (rank, in*kh*kw) fit the input side of a weight?

    A flattened 2-D factor fits when its width is in_flat; a 4-D one must have the weight's input channels and kernel
    (or be 1x1 on a weight without a spatial kernel: linear factors and 1x1 conv factors are interchangeable).
    """
    if math.prod(factor_shape[1:]) != math.prod(weight_shape[1:]):
        return False
    if len(factor_shape) <= 2:
        return True
    tail, weight_tail = tuple(factor_shape[2:]), tuple(weight_shape[2:])
    return tail == weight_tail or (is_all_ones(tail) and is_all_ones(weight_tail))


def as_f32(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor | None, spec: LayerSpec) -> Tensor:
    """The target layer's own operation with the given weight and bias (shapes as the layer's)."""
    if spec.kind == "linear":
        return F.linear(x, weight, bias)
    if spec.kind == "conv":
        return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    if spec.kind == "embedding":
        if bias is not None:
            raise ShapeMismatchError(None, "an embedding has no bias")
        return F.embedding(x, weight)
    if spec.num_groups is not None:
        return F.group_norm(x, spec.num_groups, weight, bias, spec.eps)
    return F.layer_norm(x, spec.weight_shape, weight, bias, spec.eps)


def bias_shape(spec: LayerSpec) -> tuple[int, ...]:
    """The bias shape of the layer: (out,) for linear/conv, the weight's shape for a norm."""
    if spec.kind == "norm":
        return spec.weight_shape
    return (spec.out_features,)


def check_bias(key: str, bias: Tensor | None, spec: LayerSpec) -> None:
    """Raise ShapeMismatchError if a bias delta cannot apply to the layer."""
    if bias is None:
        return
    if spec.kind == "embedding":
        raise ShapeMismatchError(None, "an embedding layer has no bias to add this bias delta to", key=key)
    if bias.numel() != math.prod(bias_shape(spec)):
        raise ShapeMismatchError(
            None,
            f"bias delta has shape {tuple(bias.shape)} but the layer's bias has shape {bias_shape(spec)}",
            key=key,
        )


class Algorithm(ABC):
    """One module's data for one target layer (immutable after construction).

    Subclasses are frozen dataclasses holding the module's tensors as stored in the file (any float dtype, any
    device) plus `extras` (alpha, scale, dora_scale). Shapes are checked in `from_tensors` (factors consistent with each
    other) and in `check_shape` (factors fit the target layer); both raise ShapeMismatchError with the suffix key.
    """

    # --- what each algorithm declares (every table outside this package is built from these) ----------------------
    name: ClassVar[str]
    """Short name, as shown in listings ("lora", "loha", ...)."""
    suffixes: ClassVar[Mapping[str, str]]
    """File-key suffix -> normalised suffix for this algorithm's own tensors (the common keys are not repeated)."""
    guarded_suffixes: ClassVar[Mapping[str, str]] = MappingProxyType({})
    """Suffixes too generic to accept after any module name (IA3's ".weight"): only after a kohya/LyCORIS prefix."""
    anchors: ClassVar[tuple[str, ...]]
    """Normalised suffixes of which each module of this algorithm has exactly one (counting modules in a header)."""
    bias_key: ClassVar[str | None] = None
    """The normalised suffix of the bias delta, None when the algorithm has none."""
    reads_current_weight: ClassVar[bool] = False
    """True when the delta depends on the layer's current weight (IA3), so merges run one LoRA after the other."""
    uses_alpha: ClassVar[bool] = True
    """False for algorithms without a rank, where an "alpha" key has no effect."""

    extras: ModuleExtras
    source: Mapping[str, Tensor]  # the tensors this module consumed (suffix -> tensor)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> Algorithm | None:
        """Build from one module's tensors; None when the keys are not this algorithm's.

        Raises ShapeMismatchError(None, reason, key=suffix) when the keys fit but the shapes are inconsistent.
        """

    @classmethod
    def input_width(cls, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        """The input width of the layer a module was made for, read from its tensor shapes (normalised suffix ->
        shape); None when this algorithm's keys do not say it. Exact for linear layers (what architecture detection
        reads); for a conv, a factor stored flattened gives in * kh * kw."""
        return None

    @classmethod
    @abstractmethod
    def synthesize(cls, spec: LayerSpec, rank: int, rnd: Random, with_bias: bool) -> dict[str, Tensor] | None:
        """Random tensors (normalised suffix -> tensor) of a plausible module for the layer `spec`, drawn with `rnd`;
        None when the algorithm does not apply to that kind of layer. Used by `lora_ext.patch.synth` for demos,
        benchmarks and tests; "alpha" and "dora_scale" are added by the caller."""

    # --- description --------------------------------------------------------------------------------------------
    @property
    def used_keys(self) -> frozenset[str]:
        """The suffix keys this module consumed (the common alpha/scale/dora_scale included when present)."""
        return frozenset(self.source)

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The "dim" that alpha divides (A1111 semantics); None when the algorithm has none."""

    @property
    def alpha(self) -> float | None:
        return self.extras.alpha

    @property
    def dora_scale(self) -> Tensor | None:
        return self.extras.dora_scale

    def scale(self) -> float:
        """A1111 `calc_scale`: an explicit "scale" key wins, else alpha / rank when both are known, else 1.0."""
        if self.extras.scale is not None:
            return self.extras.scale
        if self.rank is not None and self.extras.alpha is not None:
            return self.extras.alpha / self.rank
        return 1.0

    def tensors(self) -> Mapping[str, Tensor]:
        """The tensors this module was built from (suffix -> tensor, as stored in the file)."""
        return self.source

    @property
    def has_bias_delta(self) -> bool:
        return self.bias_key is not None and self.bias_key in self.source

    @property
    def needs_current_weight(self) -> bool:
        """True when the delta reads the layer's current weight: IA3, or any module with a DoRA magnitude."""
        return self.reads_current_weight or self.extras.dora_scale is not None

    # --- shape checks ---------------------------------------------------------------------------------------------
    def check_shape(self, spec: LayerSpec) -> None:
        """Raise ShapeMismatchError(None, reason, key=...) if this module cannot apply to the layer `spec`."""
        self._check_target(spec)
        if self.extras.dora_scale is not None:
            dora_axis(spec.weight_shape, tuple(self.extras.dora_scale.shape))
        check_bias(self.bias_key or "", self._bias_tensor(), spec)

    @abstractmethod
    def _check_target(self, spec: LayerSpec) -> None:
        """Algorithm-specific part of `check_shape`."""

    def _bias_tensor(self) -> Tensor | None:
        return self.source.get(self.bias_key) if self.bias_key is not None else None

    def _check_weight(self, orig_weight: Tensor, spec: LayerSpec) -> None:
        if tuple(orig_weight.shape) != spec.weight_shape:
            raise ShapeMismatchError(
                None, f"weight has shape {tuple(orig_weight.shape)} but the layer spec says {spec.weight_shape}"
            )
        self.check_shape(spec)

    # --- math -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def _delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None) -> LowRank | Dense:
        """The alpha-scaled delta before DoRA, float32 on orig_weight.device (shapes already checked)."""

    def weight_delta(self, orig_weight: Tensor, spec: LayerSpec, dyn: int | None = None) -> LowRank | Dense:
        """The delta to add to `orig_weight` (alpha scale applied, multiplier NOT applied), float32 on its device.

        LowRank when the delta is exactly a low-rank product in the flattened space, else Dense. With a dora_scale the
        result is the decomposed delta W' - W (Dense), computed from W + scaled delta as A1111 does. `orig_weight` is
        the layer's current weight (IA3 and DoRA read it); it is not modified. `dyn` (DyLoRA) is used by LoRA only.
        """
        self._check_weight(orig_weight, spec)
        delta = self._delta(orig_weight, spec, dyn)
        if self.extras.dora_scale is None:
            return delta
        return Dense(apply_dora(orig_weight, delta.materialize(spec.weight_shape), self.extras.dora_scale))

    def bias_delta(self, orig_bias: Tensor | None, spec: LayerSpec) -> Tensor | None:
        """The delta to add to the layer's bias (not alpha-scaled, like A1111), float32; None if the module has none.

        Shaped like `orig_bias` when given (else the layer's bias shape) and on its device (else the delta's device).
        A delta is returned even when the layer has no bias: the caller decides whether to create one.
        """
        bias = self._bias_tensor()
        if bias is None:
            return None
        check_bias(self.bias_key or "", bias, spec)
        if orig_bias is not None:
            return bias.to(device=orig_bias.device, dtype=torch.float32).reshape(orig_bias.shape)
        return bias.to(dtype=torch.float32).reshape(bias_shape(spec))

    def bypass(self, x: Tensor, orig_weight: Tensor, spec: LayerSpec, dyn: int | None = None) -> Tensor:
        """The extra output for input `x`: layer(x; W + dW, b + db) - layer(x; W, b), multiplier NOT applied.

        Computed in x's dtype on x's device (the weight's dtype for integer embedding indices). This default runs the
        layer's op with the materialized delta; LoRA overrides it with the low-rank path.
        """
        dtype = x.dtype if x.is_floating_point() else orig_weight.dtype
        delta = self.weight_delta(orig_weight.to(x.device), spec, dyn).materialize(spec.weight_shape)
        bias = self.bias_delta(None, spec)
        return layer_forward(
            x,
            delta.to(dtype),
            None if bias is None else bias.to(device=x.device, dtype=dtype),
            spec,
        )


def tensor_source(tensors: Mapping[str, Tensor], keys: tuple[str, ...]) -> Mapping[str, Tensor]:
    """The read-only subset of `tensors` named by `keys` plus the common keys (for `Algorithm.source`)."""
    picked = {k: tensors[k] for k in (*keys, *sorted(COMMON_KEYS)) if k in tensors}
    return MappingProxyType(picked)
