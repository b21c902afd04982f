"""A parsed LoRA file: its modules (each with its algorithm), metadata, bundled embeddings and architecture guess.

`parse_lora` validates everything that can be checked without a model: known keys, floating dtypes, finite values,
consistent factor shapes. Checks against a model (does the module exist, does its shape fit) belong to the patcher.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lora_ext.errors import LoraFileError, NonFiniteWeightError, ShapeMismatchError
from lora_ext.formats.algorithms import detect_algorithm
from lora_ext.formats.algorithms.base import COMMON_KEYS, Algorithm
from lora_ext.formats.arch import ArchGuess, detect_arch
from lora_ext.formats.keys import split_bundle_key, split_key
from lora_ext.formats.metadata import base_model_from_metadata

log = logging.getLogger(__name__)

_tokens = itertools.count(1)


@dataclass(frozen=True)
class LoraModule:
    """One module of a LoRA file: what the file calls it, its algorithm, and the file keys it came from."""

    name: str  # normalised module name as written in the file
    algorithm: Algorithm
    source_keys: tuple[str, ...]

    @property
    def dora_scale(self) -> Tensor | None:
        """The optional DoRA magnitude (held by the algorithm, which checks and applies it)."""
        return self.algorithm.dora_scale


@dataclass
class LoraNetwork:
    """A LoRA file in memory. `token` identifies this parse: a reloaded file gets a new token."""

    name: str
    path: Path | None
    metadata: dict[str, str]
    modules: dict[str, LoraModule]
    unknown_keys: list[str]
    bundled_embeddings: dict[str, dict[str, Tensor]]
    arch: ArchGuess
    nbytes: int
    token: int = field(default_factory=lambda: next(_tokens))
    derived: dict = field(default_factory=dict, repr=False)  # values computed from the tensors by users (cached)

    @property
    def algorithms(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for m in self.modules.values():
            counts[m.algorithm.name + ("+dora" if m.dora_scale is not None else "")] += 1
        return dict(counts)


def _check_tensor(path: Path | None, key: str, t: Tensor) -> None:
    if key.endswith("on_input") and t.numel() == 1:  # LyCORIS IA3 stores this flag as a 0-d int or bool
        return
    if not t.is_floating_point():
        raise LoraFileError(path, f"tensor has dtype {t.dtype}, expected a floating-point dtype", key=key,
                            hint="the file is damaged or is not a LoRA")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteWeightError(path, "tensor contains NaN or inf values", key=key,
                                   hint="the LoRA was saved from a diverged training run; use an earlier epoch")


def parse_lora(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *,
               path: str | Path | None = None, name: str | None = None) -> LoraNetwork:
    """Group tensors by module, pick each module's algorithm, validate. Raises LoraFileError subclasses."""
    path = Path(path) if path is not None else None
    metadata = dict(metadata or {})
    name = name or (path.stem if path else "lora")
    grouped: dict[str, dict[str, Tensor]] = defaultdict(dict)
    sources: dict[str, list[str]] = defaultdict(list)
    bundles: dict[str, dict[str, Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    nbytes = 0
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise LoraFileError(path, f"value is {type(t).__name__}, not a tensor", key=key)
        nbytes += t.numel() * t.element_size()
        bundle = split_bundle_key(key)
        if bundle is not None:
            _check_tensor(path, key, t)
            bundles[bundle[0]][bundle[1]] = t
            continue
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        _check_tensor(path, key, t)
        if split.suffix in grouped[split.module]:
            raise LoraFileError(path, f"two keys name the same tensor ({sources[split.module]} and {key})", key=key)
        grouped[split.module][split.suffix] = t
        sources[split.module].append(key)

    modules: dict[str, LoraModule] = {}
    for module_name, parts in grouped.items():
        try:
            algo = detect_algorithm(parts)
        except ShapeMismatchError as err:
            raise ShapeMismatchError(path, err.reason, key=f"{module_name}.{err.key}" if err.key else module_name,
                                     hint="the file is damaged or was written by a buggy tool") from None
        if algo is None:
            if set(parts) <= COMMON_KEYS:
                unknown.extend(sources[module_name])  # orphan alpha/scale without weights
                continue
            raise LoraFileError(path, f"unrecognised set of tensors {sorted(parts)} for module {module_name!r}",
                                key=sources[module_name][0], hint="not a LoRA/LyCORIS module this tool knows")
        leftover = set(parts) - set(algo.used_keys) - COMMON_KEYS
        if leftover:
            unknown.extend(f"{module_name}.{s}" for s in sorted(leftover))
        modules[module_name] = LoraModule(module_name, algo, tuple(sources[module_name]))

    if not modules and not bundles:
        raise LoraFileError(path, "no LoRA tensors found" + (f" (first keys: {list(tensors)[:3]})" if tensors else ""),
                            hint="this is not a LoRA file (maybe a full checkpoint or an embedding)")
    shapes = {m: {s: tuple(t.shape) for s, t in grouped[m].items()} for m in modules}
    arch = detect_arch(shapes, base_model_from_metadata(metadata))
    return LoraNetwork(name=name, path=path, metadata=metadata, modules=modules, unknown_keys=unknown,
                       bundled_embeddings=dict(bundles), arch=arch, nbytes=nbytes)


def load_lora(path: str | Path, *, name: str | None = None, device: str | torch.device = "cpu") -> LoraNetwork:
    """Read and parse a LoRA file (.safetensors, or legacy .pt/.ckpt/.bin through weights_only unpickling)."""
    from lora_ext.formats.legacy import load_any

    path = Path(path)
    tensors, metadata = load_any(path, device=device)
    return parse_lora(tensors, metadata, path=path, name=name)
