"""LoRA algorithms: pure tensor math turning one module's tensors into a weight delta or a bypass output.

One file per algorithm, registered in `ALGORITHMS`. Detection is a loop over that table: each class's `from_tensors`
returns None when the keys are not its own (ComfyUI `weight_adapter` style), so the first class that accepts the keys
wins. The order goes from the most specific key set to the most generic ("weight" alone means IA3).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lora_ext.formats.algorithms.base import Algorithm, Dense, LayerSpec, LowRank, ModuleExtras
from lora_ext.formats.algorithms.dora import apply_dora, dora_axis, weight_norm
from lora_ext.formats.algorithms.full import FullDiff
from lora_ext.formats.algorithms.glora import GLoRA
from lora_ext.formats.algorithms.ia3 import IA3
from lora_ext.formats.algorithms.loha import LoHa
from lora_ext.formats.algorithms.lokr import LoKr
from lora_ext.formats.algorithms.lora import Lora
from lora_ext.formats.algorithms.norm import NormDiff
from lora_ext.formats.algorithms.oft import OFT

ALGORITHMS: tuple[type[Algorithm], ...] = (Lora, LoHa, LoKr, GLoRA, OFT, FullDiff, NormDiff, IA3)
"""The registry. Adding an algorithm: one file declaring its class, one entry here (docs/adding-an-algorithm.md)."""


def algorithm_named(name: str) -> type[Algorithm]:
    """The registered class called `name` ("lora", "loha", ...); ValueError naming the known ones otherwise."""
    for cls in ALGORITHMS:
        if cls.name == name:
            return cls
    raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(cls.name for cls in ALGORITHMS)}")


def detect_algorithm(tensors: Mapping[str, Tensor]) -> Algorithm | None:
    """The algorithm of one module's tensors (suffix keys), or None if no registered algorithm knows the keys.

    Raises ShapeMismatchError (with the suffix key) when an algorithm's keys are present but inconsistent.
    """
    for cls in ALGORITHMS:
        algorithm = cls.from_tensors(tensors)
        if algorithm is not None:
            return algorithm
    return None


__all__ = [
    "ALGORITHMS",
    "IA3",
    "Algorithm",
    "Dense",
    "FullDiff",
    "GLoRA",
    "LayerSpec",
    "LoHa",
    "LoKr",
    "Lora",
    "LowRank",
    "ModuleExtras",
    "NormDiff",
    "OFT",
    "algorithm_named",
    "apply_dora",
    "detect_algorithm",
    "dora_axis",
    "weight_norm",
]
