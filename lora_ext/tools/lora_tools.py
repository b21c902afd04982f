"""LoRA-to-LoRA tools: `merge-loras`, `resize`, `extract`, `convert`.

All of them work per layer of a key map (the model's, with `--model`, else the family's shipped configs on the meta
device), so files that spell layers differently (kohya diffusers/compvis names, PEFT dotted names, LyCORIS) meet on
the same layer. Each layer's delta is what the patcher would add (`Algorithm.weight_delta`, multiplier included):
- low-rank deltas stay factored: several LoRAs concatenate their ranks (exact), and their SVD is taken through QR of
  the factors (exact and cheap: the work is rank x rank, never out x in);
- other deltas (LoHa, LoKr, full, DoRA, IA3) are materialized and decomposed by a full SVD.
Outputs are kohya LoRA files (`lora_down`/`lora_up`/`alpha`, what every host reads), or diffusers/PEFT names with
`convert --to diffusers`. Every output is written atomically, never over an existing file without `overwrite`, and
read back through the engine (parsed, planned against the key map: 0 unmatched modules) before it is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lora_ext.formats.algorithms.base import LowRank
from lora_ext.formats.algorithms.lora import DOWN, MID, UP
from lora_ext.formats.network import LoraNetwork, load_lora, parse_lora
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.formats.safetensors_stream import TensorFiles
from lora_ext.patch.keymap import ModelAdapter, Target, TextEncoderPart, build_adapter
from lora_ext.patch.patcher import ActiveLora, Patcher, max_abs_of, merge_weight
from lora_ext.tools.common import ToolError, check_output, dtype_arg

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_ITERATIONS = 4


def svd_device() -> torch.device:
    """Where decompositions run: the GPU when there is one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")  # hashes of the old tensors: A1111 would show them
Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------------------------------------ key maps


def family_adapter(arch: str) -> ModelAdapter:
    """The key map of a family's real model (shipped configs), on the meta device: names and shapes only."""
    from lora_ext import families
    from lora_ext.models import assets
    from lora_ext.models.loading import empty_diffusers_model, empty_text_encoder

    name = families.shipped_config(arch)
    unet_cfg = assets.load_config(name, "unet")
    parts = [TextEncoderPart("te1", empty_text_encoder(assets.load_config(name, "text_encoder")), "hf")]
    if arch == "sdxl":
        parts.append(TextEncoderPart("te2", empty_text_encoder(assets.load_config(name, "text_encoder_2")), "hf"))
    return build_adapter(arch, empty_diffusers_model("UNet2DConditionModel", unet_cfg), unet_cfg, "diffusers", parts)


def adapter_for(nets: Sequence[LoraNetwork], model: str | Path | None):
    """(key map, opened model files or None): the model's when given, else the family the files were made for."""
    if model is not None:
        from lora_ext.tools.model_files import open_model

        files = open_model(model)
        return files.adapter, files
    archs = {n.arch.arch for n in nets if n.arch.arch is not None}
    if len(archs) != 1:
        what = "different families (" + ", ".join(sorted(archs)) + ")" if archs else "no recognisable family"
        raise ToolError(f"the LoRA files show {what}; pass --model with the base model they were made for")
    return family_adapter(archs.pop()), None


# ------------------------------------------------------------------------------------------------ layer deltas


@dataclass
class LayerDelta:
    """The summed delta of one layer: low-rank factors (scale folded into `up`) and/or a dense part, 2-D
    ([out, in_flat])."""

    target: Target
    up: Tensor | None = None
    down: Tensor | None = None
    dense: Tensor | None = None

    @property
    def shape2d(self) -> tuple[int, int]:
        s = self.target.spec.weight_shape
        return s[0], math.prod(s[1:])

    def materialize(self) -> Tensor:
        out = torch.zeros(self.shape2d) if self.dense is None else self.dense.clone()
        if self.up is not None:
            out.addmm_(self.up, self.down)
        return out

    def svd(self, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor, float, bool]:
        """(U, S, Vh, |delta|_F^2, complete), S descending, on the GPU when there is one (results on the CPU);
        `complete`: S holds every non-zero singular value (else only the leading ones: randomized).

        Purely low-rank deltas: exact, through QR of the factors (the work is rank x rank). Dense deltas: a full SVD,
        or with `rank` much smaller than the matrix a randomized one (`torch.svd_lowrank`, 10 extra columns, 4 power
        iterations); its truncation error is exact all the same (|A|^2 - |S_k|^2: the factors are orthonormal), and it
        is within 1e-3 of the optimal one on the layers tested (tests/tools)."""
        dev = svd_device()
        complete = True
        if self.dense is None and self.up is not None:
            up, down = self.up.to(dev), self.down.to(dev)
            qu, ru = torch.linalg.qr(up)  # [out, R], [R, R]
            qd, rd = torch.linalg.qr(down.T)  # [in, R], [R, R]
            u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
            u, vh = qu @ u, vh @ qd.T
            total = float((s.double() ** 2).sum())
        else:
            a = self.materialize().to(dev)
            total = float(a.double().pow(2).sum())
            if rank is not None and min(a.shape) > 4 * (rank + RANDOMIZED_OVERSAMPLE):
                u, s, v = torch.svd_lowrank(a, q=rank + RANDOMIZED_OVERSAMPLE, niter=RANDOMIZED_ITERATIONS)
                vh = v.T
                complete = False
            else:
                u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u.cpu(), s.cpu(), vh.cpu(), total, complete


def layer_deltas(adapter: ModelAdapter, actives: Sequence[ActiveLora], files=None) -> tuple[dict[str, LayerDelta],
                                                                                          dict[str, list[str]]]:
    """Per target key, the sum of the LoRAs' deltas (with their multipliers), and the unmatched modules by file."""
    report, _, weight_work, bias_work = Patcher(adapter).plan(actives)
    unmatched = {n.name: list(n.unmatched) for n in report.networks if n.unmatched}
    if bias_work:
        c = next(iter(bias_work.values()))[0]
        raise ToolError(f"{c.network.name}: module {c.module.name} changes a bias; LoRA files (lora_up/lora_down) "
                        "cannot hold bias deltas, so this tool cannot write it")
    out: dict[str, LayerDelta] = {}
    with TensorFiles() as handles, torch.no_grad():
        for contribs in weight_work.values():
            target = contribs[0].target
            spec = target.spec
            layer = LayerDelta(target)
            rows, cols = layer.shape2d
            if any(c.module.algorithm.needs_current_weight for c in contribs):
                if files is None:
                    c = next(c for c in contribs if c.module.algorithm.needs_current_weight)
                    raise ToolError(f"{c.network.name}: {c.module.algorithm.name} modules (e.g. {c.module.name}) "
                                    "depend on the base weights; pass --model with the base model")
                weight = files.stored(target.module, target.weight_attr, handles).float()
                merged = weight.clone()  # in order, with the patcher's own arithmetic (DoRA/IA3 read the weight)
                merge_weight(merged, weight, contribs, max_abs_of(weight))
                layer.dense = (merged - weight).reshape(rows, cols)
                out[target.key] = layer
                continue
            shape_only = torch.zeros(()).expand(spec.weight_shape)
            ups, downs = [], []
            for c in contribs:
                d = c.module.algorithm.weight_delta(shape_only, spec, dyn=c.dyn)
                if isinstance(d, LowRank):
                    ups.append(d.up.float() * (float(d.scale) * c.multiplier))
                    downs.append(d.down.float())
                else:
                    dense = d.delta.float().reshape(rows, cols) * c.multiplier
                    layer.dense = dense if layer.dense is None else layer.dense.add_(dense)
            if ups:
                layer.up, layer.down = torch.cat(ups, 1), torch.cat(downs, 0)
            out[target.key] = layer
    return out, unmatched


# ------------------------------------------------------------------------------------------------- rank choice


def dynamic_rank(s: Tensor, method: str, param: float) -> int:
    """kohya resize_lora.py's rules: sv_ratio keeps singular values > s[0] / param; sv_fro the fewest whose
    Frobenius share reaches param; sv_cumulative the fewest whose sum share reaches param. Clamped to [1, len - 1]
    as kohya does (at least 1, never the full length)."""
    n = len(s)
    if method == "sv_ratio":
        if param < 1:
            raise ToolError(f"sv_ratio must be >= 1 (largest / smallest kept singular value), got {param}")
        index = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        if not 0 < param <= 1:
            raise ToolError(f"sv_fro must be in (0, 1] (share of the Frobenius norm kept), got {param}")
        sq = s.double() ** 2
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(param ** 2, dtype=torch.double)))
        index += 1
    elif method == "sv_cumulative":
        if not 0 < param <= 1:
            raise ToolError(f"sv_cumulative must be in (0, 1] (share of the singular values' sum kept), got {param}")
        sd = s.double()
        index = int(torch.searchsorted(torch.cumsum(sd, 0) / sd.sum(), torch.tensor(param, dtype=torch.double))) + 1
    else:
        raise ToolError(f"unknown dynamic method {method!r}; valid: {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(index, n - 1)) if n > 1 else 1


def numerical_rank(s: Tensor, shape: tuple[int, int]) -> int:
    """How many singular values are above float32 rounding of the largest (the exact rank, to rounding)."""
    if not len(s) or float(s[0]) == 0.0:
        return 1
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


# ----------------------------------------------------------------------------------------------------- writing


@dataclass
class LayerResult:
    name: str
    rank: int
    relative_error: float  # ||delta - written|| / ||delta|| (Frobenius)
    energy_kept: float  # share of the squared Frobenius norm kept


@dataclass
class ToolReport:
    tool: str
    out: Path
    layers: list[LayerResult] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def overall_error(self) -> float:
        return self.extra.get("overall_relative_error", 0.0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d

    def lines(self) -> list[str]:
        ranks = sorted({layer.rank for layer in self.layers})
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no layers"
        worst = max(self.layers, key=lambda r: r.relative_error, default=None)
        out = [f"{self.tool}: {len(self.layers)} layers, {rank_text}, overall relative error "
               f"{self.overall_error:.3g} in {self.seconds:.1f} s"]
        if worst is not None and worst.relative_error > 0:
            out.append(f"  largest layer error {worst.relative_error:.3g} ({worst.name}, rank {worst.rank}, "
                       f"energy kept {worst.energy_kept:.4f})")
        for key, value in self.extra.items():
            if key != "overall_relative_error":
                out.append(f"  {key}: {value}")
        for name, keys in self.unmatched.items():
            out.append(f"  warning: {name}: {len(keys)} modules match no layer of the model (e.g. {keys[0]}); "
                       "they are not in the output")
        if self.skipped:
            out.append(f"  {len(self.skipped)} layers unchanged, skipped (e.g. {self.skipped[0]})")
        out.append(f"wrote {self.out}")
        return out


def kohya_name(adapter: ModelAdapter, target: Target) -> str:
    """The module name sd-scripts writes: diffusers paths for SD1/SD2, compvis paths for SDXL's UNet."""
    return target.spellings["kohya_compvis" if adapter.arch == "sdxl" else "kohya_diffusers"]


def _factor_tensors(target: Target, up: Tensor, down: Tensor, alpha: float, dtype: torch.dtype
                    ) -> dict[str, Tensor]:
    """kohya tensors for up [out, r] @ down [r, in_flat]: conv layers get [r, in, kh, kw] / [out, r, 1, 1]."""
    shape = target.spec.weight_shape
    r = up.shape[1]
    if target.spec.kind == "conv":
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return {"lora_down.weight": down.to(dtype).contiguous(), "lora_up.weight": up.to(dtype).contiguous(),
            "alpha": torch.tensor(float(alpha), dtype=dtype)}


def _truncate(layer: LayerDelta, rank: int | None, dynamic: tuple[str, float] | None,
              ) -> tuple[Tensor, Tensor, LayerResult, float]:
    """Best rank-k factors of the layer's delta (Eckart-Young), sqrt(S) on both sides."""
    u, s, vh, total, complete = layer.svd(rank if dynamic is None else None)
    if dynamic is not None:
        k = dynamic_rank(s, *dynamic)
        if rank is not None:
            k = min(k, rank)
    elif rank is not None:
        k = rank
    else:
        k = numerical_rank(s, layer.shape2d)
    k = max(1, min(k, len(s)))
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    if complete:  # the discarded energy, summed directly (|A|^2 - kept would cancel to sqrt(eps) for exact fits)
        tail = float((s[k:].double() ** 2).sum())
    else:
        tail = float((layer.materialize().double() - (up.double() @ down.double())).pow(2).sum())
    kept = max(total - tail, 0.0)
    err = math.sqrt(tail / total) if total > 0 else 0.0
    return up, down, LayerResult(layer.target.key, k, err, kept / total if total > 0 else 1.0), total


def _overall(results: Sequence[LayerResult], norms2: Mapping[str, float]) -> float:
    """Relative Frobenius error over all layers together: sqrt(sum err_i^2 |d_i|^2 / sum |d_i|^2)."""
    den = sum(norms2.get(r.name, 0.0) for r in results)
    num = sum(r.relative_error ** 2 * norms2.get(r.name, 0.0) for r in results)
    return math.sqrt(num / den) if den > 0 else 0.0


def _write(out: Path, tensors: dict[str, Tensor], metadata: dict[str, str], adapter: ModelAdapter, *,
           overwrite: bool) -> None:
    """Write atomically after reading the result back through the engine: it parses, and every module it holds
    matches a layer of the key map."""
    net = parse_lora(tensors, metadata, path=out, name=out.stem)
    report = Patcher(adapter).check([ActiveLora(net)])
    rep = report.networks[0]
    if rep.error or rep.unmatched or rep.unknown_keys:
        problem = rep.error or f"{len(rep.unmatched or rep.unknown_keys)} unmatched modules"
        raise ToolError(f"{out}: internal error: the result does not read back cleanly ({problem}); nothing written")
    save_safetensors_atomic(tensors, out, metadata, overwrite=overwrite)


def _base_metadata(nets: Sequence[LoraNetwork]) -> dict[str, str]:
    meta = dict(nets[0].metadata) if nets else {}
    for key in _STALE_METADATA:
        meta.pop(key, None)
    return meta


def _out_dtype(value: str | None, nets: Sequence[LoraNetwork]) -> torch.dtype:
    dt = dtype_arg(value)
    if dt is not None:
        return dt
    for net in nets:  # the first input's factor dtype
        for m in net.modules.values():
            for t in m.algorithm.tensors().values():
                if t.is_floating_point() and t.dim() >= 2:
                    return t.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------ merge-loras


def merge_loras(inputs: Sequence[tuple[Path, float]], out: str | Path, *, rank: int | None = None,
                model: str | Path | None = None, dtype: str | None = None, overwrite: bool = False,
                allowed_dirs: Sequence[Path] | None = None, progress: Progress | None = None) -> ToolReport:
    """Several LoRAs with weights -> one file. Exact (ranks concatenated, or the exact SVD of other deltas) without
    `rank`; with `rank`, the best rank-`rank` approximation of each layer's summed delta."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite=overwrite, allowed_dirs=allowed_dirs)
    if not inputs:
        raise ToolError("no LoRA given")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank must be >= 1, got {rank}")
    nets = [load_lora(p) for p, _ in inputs]
    adapter, files = adapter_for(nets, model)
    actives = [ActiveLora(n, te=w, unet=w) for n, (_, w) in zip(nets, inputs)]
    layers, unmatched = layer_deltas(adapter, actives, files)
    odt = _out_dtype(dtype, nets)
    tensors: dict[str, Tensor] = {}
    report = ToolReport("merge-loras", out, unmatched=unmatched)
    norms2: dict[str, float] = {}
    for i, (key, layer) in enumerate(layers.items()):
        name = kohya_name(adapter, layer.target)
        if rank is None and layer.dense is None:
            up, down = layer.up, layer.down
            result = LayerResult(key, up.shape[1], 0.0, 1.0)
        else:
            up, down, result, norms2[key] = _truncate(layer, rank, None)
        tensors.update({f"{name}.{k}": v for k, v in _factor_tensors(layer.target, up, down, up.shape[1],
                                                                     odt).items()})
        report.layers.append(result)
        if progress is not None:
            progress(i + 1, len(layers), key)
    report.extra["overall_relative_error"] = _overall(report.layers, norms2)
    meta = _base_metadata(nets)
    ranks = sorted({r.rank for r in report.layers})
    meta.update({"ss_network_module": "networks.lora",
                 "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
                 "ss_network_alpha": str(float(ranks[0])) if len(ranks) == 1 else "Dynamic",
                 "lora_ext.merged_from": json.dumps([{"file": p.name, "weight": w} for p, w in inputs]),
                 "ss_training_comment": f"merged from {len(inputs)} LoRAs by lora_ext merge-loras"
                 + (f" at rank {rank}" if rank else " (exact)")})
    _write(out, tensors, meta, adapter, overwrite=overwrite)
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------------------ resize


def resize_lora(src: str | Path, out: str | Path, *, rank: int | None = None, dynamic: str | None = None,
                param: float | None = None, model: str | Path | None = None, dtype: str | None = None,
                overwrite: bool = False, allowed_dirs: Sequence[Path] | None = None,
                progress: Progress | None = None) -> ToolReport:
    """A LoRA at a lower (fixed or per-layer dynamic) rank: the best approximation of each layer's delta."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite=overwrite, allowed_dirs=allowed_dirs)
    if dynamic is None and rank is None:
        raise ToolError("give --rank N, or --dynamic METHOD --param P (with --rank as the largest rank allowed)")
    if dynamic is not None and param is None:
        raise ToolError(f"--dynamic {dynamic} needs --param (e.g. 2 for sv_ratio, 0.9 for sv_fro)")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank must be >= 1, got {rank}")
    net = load_lora(src)
    adapter, files = adapter_for([net], model)
    layers, unmatched = layer_deltas(adapter, [ActiveLora(net)], files)
    odt = _out_dtype(dtype, [net])
    report = ToolReport("resize", out, unmatched=unmatched)
    tensors: dict[str, Tensor] = {}
    norms2: dict[str, float] = {}
    for i, (key, layer) in enumerate(layers.items()):
        up, down, result, norms2[key] = _truncate(layer, rank, (dynamic, float(param)) if dynamic else None)
        name = kohya_name(adapter, layer.target)
        tensors.update({f"{name}.{k}": v for k, v in _factor_tensors(layer.target, up, down, result.rank,
                                                                     odt).items()})
        report.layers.append(result)
        if progress is not None:
            progress(i + 1, len(layers), key)
    report.extra["overall_relative_error"] = _overall(report.layers, norms2)
    meta = _base_metadata([net])
    old_dim = meta.get("ss_network_dim", "?")
    new = "Dynamic" if dynamic else str(rank)
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": new,
                 "ss_network_alpha": "Dynamic" if dynamic else str(float(rank)),
                 "ss_training_comment": (f"dynamic resize with {dynamic}: {param} from {old_dim}" if dynamic else
                                         f"resized from {old_dim} to {rank}") + "; " +
                 meta.get("ss_training_comment", "")})
    _write(out, tensors, meta, adapter, overwrite=overwrite)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------------- extract


def extract_lora(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int, conv_rank: int | None = None,
                 min_diff: float = 1e-6, dtype: str | None = None, overwrite: bool = False,
                 allowed_dirs: Sequence[Path] | None = None, progress: Progress | None = None) -> ToolReport:
    """A LoRA from the difference of a tuned checkpoint and its base: per linear (and 1x1 conv) layer the best
    rank-`rank` factors; kxk convs with `conv_rank` (LoCon), else skipped; layers whose largest change is at most
    `min_diff` are skipped (text encoders that were not trained, for example)."""
    from lora_ext.tools.model_files import open_model

    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite=overwrite, allowed_dirs=allowed_dirs)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ToolError("--rank and --conv-rank must be >= 1")
    a, b = open_model(base), open_model(tuned)
    if a.arch != b.arch:
        raise ToolError(f"{tuned} is {b.arch} but {base} is {a.arch}; extract needs the tuned model and its base")
    report = ToolReport("extract", out)
    odt = dtype_arg(dtype) or torch.float32
    tensors: dict[str, Tensor] = {}
    targets = [t for t in a.adapter.targets.values() if t.spec.kind in ("linear", "conv")]
    norms2: dict[str, float] = {}

    b_targets = b.adapter.targets
    with TensorFiles() as handles:
        for i, target in enumerate(targets):
            if progress is not None:
                progress(i + 1, len(targets), target.key)
            other = b_targets.get(target.key)
            if other is None or other.spec.weight_shape != target.spec.weight_shape:
                raise ToolError(f"{tuned}: layer {target.key} differs in shape from the base; not the same model")
            spec = target.spec
            kxk = spec.kind == "conv" and math.prod(spec.weight_shape[2:]) > 1
            if kxk and conv_rank is None:
                continue
            diff = (b.stored(other.module, other.weight_attr, handles).float()
                    - a.stored(target.module, target.weight_attr, handles).float())
            if float(diff.abs().max()) <= min_diff:
                report.skipped.append(target.key)
                continue
            layer = LayerDelta(target, dense=diff.reshape(spec.weight_shape[0], -1))
            up, down, result, norms2[target.key] = _truncate(layer, conv_rank if kxk else rank, None)
            tensors.update({f"{kohya_name(a.adapter, target)}.{k}": v
                            for k, v in _factor_tensors(target, up, down, result.rank, odt).items()})
            report.layers.append(result)
    if not tensors:
        raise ToolError(f"{tuned}: no layer differs from {base} by more than {min_diff}; nothing to extract")
    report.extra["overall_relative_error"] = _overall(report.layers, norms2)
    from lora_ext.train.export import base_model_version, modelspec_architecture

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
            "ss_base_model_version": base_model_version(a.arch), "ss_v2": str(a.arch == "sd2"),
            "modelspec.architecture": f"{modelspec_architecture(a.arch)}/lora", "modelspec.title": out.stem,
            "ss_training_comment": f"extracted from {Path(tuned).name} - {Path(base).name} by lora_ext",
            "lora_ext.extracted_from": json.dumps({"base": Path(base).name, "tuned": Path(tuned).name,
                                                   "rank": rank, "conv_rank": conv_rank})}
    if conv_rank is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
    _write(out, tensors, meta, a.adapter, overwrite=overwrite)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------------- convert


def convert_lora(src: str | Path, out: str | Path, *, to: str, model: str | Path | None = None,
                 dtype: str | None = None, overwrite: bool = False, allowed_dirs: Sequence[Path] | None = None
                 ) -> ToolReport:
    """Rename a LoRA's modules to kohya names (`lora_unet_*`, `lora_te*_`: every host reads them) or to diffusers/PEFT
    names (`unet.*.lora_A.weight`, `text_encoder.*`), optionally changing the dtype; metadata kept.

    Plain LoRA modules are renamed tensor for tensor (bitwise). PEFT files have no alpha (scale 1): going to
    diffusers, a module whose alpha differs from its rank gets the scale folded into `lora_B` (one rounding);
    going to kohya, PEFT modules get alpha = rank. Other algorithms (LoHa, LoKr, ...) keep their tensors under
    kohya names; diffusers names exist for plain LoRA only (they are refused there)."""
    t0 = time.perf_counter()
    out = Path(out)
    if to not in ("kohya", "diffusers"):
        raise ToolError(f"--to must be kohya or diffusers, got {to!r}")
    check_output(out, overwrite=overwrite, allowed_dirs=allowed_dirs)
    net = load_lora(src)
    adapter, _ = adapter_for([net], model)
    odt = dtype_arg(dtype)
    report = ToolReport("convert", out)
    tensors: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for mname, module in net.modules.items():
        target = adapter.lookup(mname)
        if target is None:
            unmatched.append(mname)
            continue
        algo = module.algorithm
        parts = algo.tensors()  # normalised suffixes (kohya's), the common alpha/scale/dora_scale keys included
        if to == "kohya":
            base = kohya_name(adapter, target)
            renamed = dict(parts)
            if algo.name == "lora" and "alpha" not in renamed and algo.rank:
                renamed["alpha"] = torch.tensor(float(algo.alpha if algo.alpha is not None else algo.rank))
        else:
            if algo.name != "lora" or module.dora_scale is not None:
                raise ToolError(f"{src} [{mname}]: {algo.name}{'+DoRA' if module.dora_scale is not None else ''} "
                                "modules have no diffusers/PEFT names; keep this file in kohya format")
            if MID in parts:
                raise ToolError(f"{src} [{mname}]: LoCon mid (CP) factors have no diffusers names")
            base = target.spellings["peft"]
            up, down = parts[UP], parts[DOWN]
            scale = algo.scale()
            if scale != 1.0:
                up = (up.float() * scale).to(up.dtype)
            renamed = {"lora_A.weight": down, "lora_B.weight": up}
        for suffix, t in renamed.items():
            if odt is not None and t.is_floating_point():
                t = t.to(odt)
            tensors[f"{base}.{suffix}"] = t.contiguous()
        report.layers.append(LayerResult(target.key, int(algo.rank or 0), 0.0, 1.0))
    if unmatched:
        report.unmatched = {net.name: unmatched}
        raise ToolError(f"{src}: {len(unmatched)} modules match no layer of the {adapter.arch} model (e.g. "
                        f"{unmatched[0]}); pass --model with the base model, or the file is for another model")
    for name, vectors in net.bundled_embeddings.items():
        for suffix, t in vectors.items():
            tensors[f"bundle_emb.{name}.{suffix}"] = t if odt is None else t.to(odt)
    meta = _base_metadata([net]) if odt is not None else dict(net.metadata)
    _write(out, tensors, meta, adapter, overwrite=overwrite)
    report.seconds = time.perf_counter() - t0
    return report

