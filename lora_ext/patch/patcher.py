"""The weight patcher: merge a set of LoRAs into a model's weights, switch sets fast, restore bit-exactly.

Contract
- `apply(loras)` makes the model's weights equal to original + sum of each LoRA's delta times its multiplier
  (te/unet, block weights). Only the weights whose set of (LoRA, multiplier, dyn) changed since the last call are
  rewritten; each is computed from its backup in one pass (`addmm` straight into the weight when it is fp32), with the
  deltas in fp32 and one cast at the end.
- The original of each touched weight is copied once, when first touched (on the model's device when memory allows,
  else CPU). Restoring copies it back: never subtracts. Backups of restored weights are kept (up to `retain_bytes`)
  so that the next LoRA on those layers costs one pass, and are dropped, not restored, if anyone else writes the
  weight in the meantime (a checkpoint loaded in place): the parameter's version counter tells.
- Everything that can be checked is checked before any weight changes: architecture, key matching, shapes, finiteness
  of the LoRA tensors. A LoRA refused there raises before anything is written (the model keeps the state of the
  previous call), or, with `skip_bad=True`, is left out and reported. A result that could overflow the weight's dtype
  (bound from the factors' norms and the original's max) is computed in a scratch buffer and checked with `isfinite`
  before it is written. If anything fails while writing (including KeyboardInterrupt), every weight is restored to its
  original before the exception propagates.
- Returns a `PatchReport`; never prints.

A1111 semantics kept: the text-encoder multiplier applies to text-encoder layers, the UNet multiplier to UNet layers;
DoRA and IA3 see the weight as left by the LoRAs before them in the list (A1111 applies networks in order).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lora_ext import families
from lora_ext.errors import (
    ArchitectureMismatchError,
    LoraExtError,
    LoraFileError,
    ModelLoadError,
    NonFiniteWeightError,
    ShapeMismatchError,
)
from lora_ext.formats.algorithms.base import LowRank
from lora_ext.formats.network import LoraModule, LoraNetwork
from lora_ext.patch.keymap import ModelAdapter, Target
from lora_ext.patch.quant import quantized
from lora_ext.patch.report import NetworkReport, PatchReport, target_group

log = logging.getLogger(__name__)


class BlockMultipliers(Protocol):
    def multiplier_for(self, block: str) -> float: ...


@dataclass(frozen=True)
class ActiveLora:
    """One entry of the active set: a parsed LoRA and how strongly to apply it."""

    network: LoraNetwork
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    block_weights: BlockMultipliers | None = None

    def multiplier(self, target: Target) -> float:
        m = self.unet if target.component == "unet" else self.te
        if self.block_weights is not None:
            m *= float(self.block_weights.multiplier_for(target.block))
        return float(m)


@dataclass(frozen=True)
class _Contribution:
    network: LoraNetwork
    module: LoraModule
    target: Target
    multiplier: float
    dyn: int | None
    lora: ActiveLora | None = None  # the entry of the active set it comes from (identity: the same file may be twice)

    def signature(self) -> tuple:
        return (self.network.token, self.module.name, self.target.chunk, self.multiplier, self.dyn)


_WRITING = ("<being written>",)  # signature of a slot whose weight may be half-written


@dataclass
class _Slot:
    """A parameter we have touched: its backup and what is currently merged into it (() = nothing: pristine).

    `param_obj` and `version` detect writes by others: we write through `.data`, which does not bump the parameter's
    version counter, while `load_state_dict` and other in-place writes do. A slot whose parameter was replaced or
    written by someone else holds a stale backup and is dropped, never restored."""

    owner: torch.nn.Module
    attr: str
    backup: Tensor
    max_abs: float
    param_obj: Tensor
    version: int | None
    signature: tuple = ()

    @property
    def param(self) -> Tensor:
        return getattr(self.owner, self.attr)

    @property
    def nbytes(self) -> int:
        return self.backup.numel() * self.backup.element_size()

    def is_current(self) -> bool:
        return self.param is self.param_obj and (self.version is None or _version_of(self.param_obj) == self.version)

    def moved(self) -> bool:
        """The parameter object was replaced by one of the same shape and dtype (a host that moves weights between
        devices by assigning new Parameters, as Forge's memory manager does)."""
        param = self.param
        return (param is not self.param_obj and isinstance(param, Tensor) and param.shape == self.param_obj.shape
                and param.dtype == self.param_obj.dtype)

    def rebind(self) -> None:
        self.param_obj = self.param
        self.version = _version_of(self.param_obj)


def _version_of(t: Tensor) -> int | None:
    """The tensor's version counter; None for an inference tensor, which has none (Forge loads its weights under
    `torch.inference_mode()`): for those, only a replaced parameter object is detected."""
    if t.is_inference():
        return None
    return t._version


_SlotKey = tuple[int, str]


@contextlib.contextmanager
def _exact_math() -> Iterator[None]:
    """No gradient tracking and no autocast: a host may call us inside `torch.autocast` (A1111 activates extra
    networks under `devices.autocast()`), which would silently compute the merge in half precision. Inference mode:
    Forge loads its weights as inference tensors, which take in-place writes only there (normal tensors take them
    too, and writing through `.data` leaves their version counters alone either way)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _slot_key(module: torch.nn.Module, attr: str) -> _SlotKey:
    return (id(module), attr)


def _arch_label(arch: str | None) -> str:
    return families.label(arch, "an unknown model family")


class Patcher:
    """Merges LoRAs into the weights of the model an adapter describes. Not thread-safe: one patcher per model."""

    def __init__(self, adapter: ModelAdapter, *, backup_device: str = "auto", gpu_reserve_bytes: int = 1 << 30,
                 retain_bytes: int | None = None, follow_moves: bool = False) -> None:
        """backup_device: "auto" (the weight's device when it has room, else CPU), "cpu" or "same".
        retain_bytes: how many bytes of backups of *restored* weights to keep for the next apply (a switch then costs
        one pass per layer instead of a fresh copy); None = as many as the layers touched, 0 = free on restore.
        follow_moves: the host moves weights between devices by replacing their Parameter objects (Forge): a weight
        with LoRAs merged whose Parameter was replaced by one of the same shape and dtype is the same weight moved
        (nobody else writes a merged weight there), so it is restored and re-merged where it is now, instead of being
        dropped as changed by someone else. Weights without LoRAs merged are still dropped when replaced (their
        backups are re-taken at the next use)."""
        if backup_device not in ("auto", "cpu", "same"):
            raise ValueError("backup_device must be 'auto', 'cpu' or 'same'")
        self.adapter = adapter
        self.backup_device = backup_device
        self.gpu_reserve_bytes = gpu_reserve_bytes
        self.retain_bytes = retain_bytes
        self.follow_moves = follow_moves
        self._slots: dict[_SlotKey, _Slot] = {}
        self.active: tuple[ActiveLora, ...] = ()
        self.diverted: list[_Contribution] = []  # what the last `apply(..., divert=...)` left to the caller

    # ------------------------------------------------------------------------------------------------------ queries

    @property
    def backup_bytes(self) -> int:
        return sum(s.backup.numel() * s.backup.element_size() for s in self._slots.values())

    @property
    def is_pristine(self) -> bool:
        """True when no weight differs from the original (nothing merged)."""
        return all(not s.signature for s in self._slots.values())

    @property
    def merged_layers(self) -> int:
        return sum(1 for s in self._slots.values() if s.signature)

    # ------------------------------------------------------------------------------------------------------ planning

    def _plan_network(self, lora: ActiveLora) -> tuple[NetworkReport, list[_Contribution]]:
        net = lora.network
        rep = NetworkReport(name=net.name, path=str(net.path) if net.path else None, lora_arch=net.arch.arch,
                            arch_evidence=net.arch.evidence, modules_total=len(net.modules),
                            unknown_keys=list(net.unknown_keys))
        if net.arch.arch is not None and net.arch.arch != self.adapter.arch:
            raise ArchitectureMismatchError(net.path or net.name, _arch_label(net.arch.arch),
                                            _arch_label(self.adapter.arch), net.arch.evidence)
        contribs: list[_Contribution] = []
        mismatched: list[str] = []
        groups: dict[str, int] = defaultdict(int)
        for mname, module in net.modules.items():
            target = self.adapter.lookup(mname)
            if target is None:
                rep.unmatched.append(mname)
                continue
            try:
                module.algorithm.check_shape(target.spec)  # the DoRA magnitude's shape included
            except ShapeMismatchError as err:
                mismatched.append(mname)
                if len(mismatched) == 1:
                    first = (mname, err.reason, target)
                continue
            multiplier = lora.multiplier(target)
            if multiplier == 0.0:
                rep.skipped_zero += 1
                continue
            contribs.append(_Contribution(net, module, target, multiplier, lora.dyn, lora))
            groups[target_group(target.component, target.block)] += 1
        if mismatched:
            mname, reason, target = first
            if len(mismatched) > len(net.modules) // 2:
                raise ArchitectureMismatchError(
                    net.path or net.name, _arch_label(net.arch.arch), _arch_label(self.adapter.arch),
                    f"{len(mismatched)} of {len(net.modules)} modules have shapes that do not fit this model, "
                    f"e.g. {mname}: {reason}")
            raise ShapeMismatchError(net.path, f"{reason}; the layer {target.key} has weight shape "
                                     f"{tuple(target.spec.weight_shape)}", key=mname,
                                     hint="the file does not fit this model (damaged, or made for another model)")
        if net.modules and len(rep.unmatched) == len(net.modules):
            raise LoraFileError(net.path, f"none of its {len(net.modules)} modules matches a layer of this "
                                f"{_arch_label(self.adapter.arch)} model (e.g. {rep.unmatched[0]})",
                                hint="it was made for another model type or uses a naming this tool does not know")
        rep.modules_applied = len(contribs)
        rep.applied_by_group = dict(groups)
        return rep, contribs

    # ------------------------------------------------------------------------------------------------------- apply

    def apply(self, loras: Sequence[ActiveLora], *, skip_bad: bool = False,
              divert: Callable[[_Contribution], bool] | None = None) -> PatchReport:
        """Make the model's weights reflect exactly `loras` (an empty list restores everything).

        skip_bad=False: any refused LoRA raises its typed error and nothing changes.
        skip_bad=True: refused LoRAs are left out and described in the report (`NetworkReport.error`).
        divert: contributions for which it returns True are not merged but left in `self.diverted` (planned and
        checked like the others) for the caller to apply another way (`lora_ext.patch.bypass`).
        """
        t0 = time.perf_counter()
        report, kept, weight_work, bias_work = self.plan(loras, skip_bad=skip_bad)
        self.diverted = []
        if divert is not None:
            chosen = {id(c) for cs in weight_work.values() for c in cs if divert(c)}  # one call per contribution
            for work_map in (weight_work, bias_work):  # a bias contribution is the same object as its weight's
                for key, cs in list(work_map.items()):
                    kept = [c for c in cs if id(c) not in chosen]
                    if work_map is weight_work:
                        self.diverted += [c for c in cs if id(c) in chosen]
                    if kept:
                        work_map[key] = kept
                    else:
                        del work_map[key]
            report.layers_bypassed = len({id(c.target.module) for c in self.diverted})
        work = {**{k: ("weight", v) for k, v in weight_work.items()}, **{k: ("bias", v) for k, v in bias_work.items()}}
        signatures = {k: tuple(c.signature() for c in v) for k, (_, v) in work.items()}
        report.stale_backups = self._drop_stale()
        try:
            with _exact_math():
                self._write_all(work, signatures, report)
        except BaseException:
            self.restore()
            raise
        self.active = tuple(kept)
        self._trim_retained()
        report.backup_bytes = self.backup_bytes
        report.seconds = time.perf_counter() - t0
        return report

    def plan(self, loras: Sequence[ActiveLora], *, skip_bad: bool = False
             ) -> tuple[PatchReport, list[ActiveLora], dict[_SlotKey, list[_Contribution]],
                        dict[_SlotKey, list[_Contribution]]]:
        """Every check `apply` makes, and what it would write: (report, accepted LoRAs, weight work, bias work), the
        work keyed by (id(module), attribute) in application order. Touches no weight (the model-tools use it on a
        model skeleton whose weights stream from a file)."""
        report = PatchReport()
        weight_work: dict[_SlotKey, list[_Contribution]] = defaultdict(list)
        bias_work: dict[_SlotKey, list[_Contribution]] = defaultdict(list)
        kept: list[ActiveLora] = []
        for lora in loras:
            try:
                rep, contribs = self._plan_network(lora)
            except LoraExtError as err:
                if not skip_bad:
                    raise
                report.networks.append(_refused(lora, err))
                continue
            report.networks.append(rep)
            kept.append(lora)
            for c in contribs:
                t = c.target
                weight_work[_slot_key(t.module, t.weight_attr)].append(c)
                if t.bias_attr is not None and c.module.algorithm.has_bias_delta:
                    bias_work[_slot_key(t.module, t.bias_attr)].append(c)
        return report, kept, weight_work, bias_work

    def _write_all(self, work: dict, signatures: dict, report: PatchReport) -> None:
        for key, slot in self._slots.items():
            if key not in work and slot.signature:
                self._restore_slot(slot)
                report.layers_restored += 1
        for key, (what, contribs) in work.items():
            slot = self._slots.get(key)
            if slot is not None and slot.signature == signatures[key]:
                report.layers_unchanged += 1
                continue
            target = contribs[0].target
            attr = target.weight_attr if what == "weight" else target.bias_attr
            kind = quantized(getattr(target.module, attr))
            if kind is not None:  # callers divert these (`bypass.needs_bypass`); merging would corrupt the packing
                raise ModelLoadError(f"the layer {target.key} stores its {attr} quantized ({kind}): a LoRA cannot be "
                                     "merged into it, only applied as bypass (lora_ext.patch.bypass)")
            slot = slot or self._backup(target.module, attr)
            slot.signature = _WRITING
            if what == "weight":
                self._write_weight(slot, contribs)
            else:
                self._write_bias(slot, contribs)
            slot.signature = signatures[key]
            report.layers_recomputed += 1

    def check(self, loras: Sequence[ActiveLora]) -> PatchReport:
        """What `apply(loras, skip_bad=True)` would do, without touching any weight."""
        report = PatchReport()
        for lora in loras:
            try:
                rep, _ = self._plan_network(lora)
            except LoraExtError as err:
                rep = _refused(lora, err)
            report.networks.append(rep)
        return report

    def restore(self) -> PatchReport:
        """Copy every merged weight's backup back (bit-exact). Backups are kept up to `retain_bytes` for the next
        apply; `release()` frees them all."""
        t0 = time.perf_counter()
        report = PatchReport()
        report.stale_backups = self._drop_stale()
        with _exact_math():
            for slot in self._slots.values():
                if slot.signature:
                    self._restore_slot(slot)
                    report.layers_restored += 1
        self.active = ()
        self.diverted = []
        self._trim_retained()
        report.backup_bytes = self.backup_bytes
        report.seconds = time.perf_counter() - t0
        return report

    def release(self) -> PatchReport:
        """Restore, then free every backup (e.g. before the model is unloaded or its weights are replaced)."""
        report = self.restore()
        self._slots.clear()
        report.backup_bytes = 0
        return report

    def _drop_stale(self) -> int:
        """Forget slots whose parameter someone else replaced or wrote (e.g. a new checkpoint loaded in place); with
        `follow_moves`, merged weights the host moved are followed instead."""
        stale = []
        for key, slot in self._slots.items():
            if slot.is_current():
                continue
            if self.follow_moves and slot.signature and slot.moved():
                slot.rebind()
                continue
            stale.append(key)
        merged = 0
        for key in stale:
            slot = self._slots.pop(key)
            merged += bool(slot.signature)
        if merged:  # someone rewrote weights while our LoRAs were merged in them: worth knowing
            log.warning("%d weights with LoRAs merged were changed outside the patcher (e.g. a checkpoint reloaded in "
                        "place); their backups are dropped, not restored", merged)
        elif stale:  # backups kept for fast switching of weights someone else changed since: normal, just drop them
            log.debug("%d retained backups dropped: their weights were changed outside the patcher", len(stale))
        return len(stale)

    def _trim_retained(self) -> None:
        limit = self.retain_bytes
        if limit is None:
            return
        retained = sum(s.nbytes for s in self._slots.values() if not s.signature)
        for key in [k for k, s in self._slots.items() if not s.signature]:
            if retained <= limit:
                break
            retained -= self._slots.pop(key).nbytes

    # ------------------------------------------------------------------------------------------------------ backups

    def _backup_device(self, param: Tensor) -> torch.device:
        if self.backup_device == "cpu" or param.device.type == "cpu":
            return torch.device("cpu")
        if self.backup_device == "same":
            return param.device
        nbytes = param.numel() * param.element_size()
        if param.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(param.device)
            if free - nbytes > self.gpu_reserve_bytes:
                return param.device
            return torch.device("cpu")
        return param.device

    def _backup(self, owner: torch.nn.Module, attr: str) -> _Slot:
        param = getattr(owner, attr)
        with torch.no_grad():
            device = self._backup_device(param)
            backup = param.detach().to(device=device, copy=True)
            if device.type == "cpu" and param.device.type == "cuda":
                backup = backup.pin_memory()
            max_abs = max_abs_of(param)
        slot = _Slot(owner, attr, backup, max_abs, param_obj=param, version=_version_of(param))
        self._slots[_slot_key(owner, attr)] = slot
        return slot

    @staticmethod
    def _restore_slot(slot: _Slot) -> None:
        with _exact_math():
            slot.param.data.copy_(slot.backup, non_blocking=False)
        slot.signature = ()

    # ------------------------------------------------------------------------------------------------------ writing

    def _write_weight(self, slot: _Slot, contribs: list[_Contribution]) -> None:
        param = slot.param.data
        merge_weight(param, slot.backup.to(param.device, non_blocking=True), contribs, slot.max_abs)

    def _write_bias(self, slot: _Slot, contribs: list[_Contribution]) -> None:
        param = slot.param.data
        merge_bias(param, slot.backup.to(param.device, non_blocking=True), contribs)


# ---------------------------------------------------------------------------------------------------- the arithmetic
# Module-level so that the model tools (lora_ext.tools.merge_model) write a streamed checkpoint with the very same
# operations, in the same order, as the patcher writes a loaded model: a merged file equals the patched model bitwise.


def max_abs_of(t: Tensor) -> float:
    """max |t| in one pass, without an |t| temporary (0 for empty or non-floating tensors)."""
    if not t.numel() or not t.is_floating_point():
        return 0.0
    if t.element_size() == 1:  # float8 storage (A1111's "FP8 weight"): no aminmax kernel on CPU; a small upcast
        t = t.detach().to(torch.float16)
    lo, hi = torch.aminmax(t.detach())
    return max(abs(float(lo)), abs(float(hi)))


def merge_weight(out: Tensor, original: Tensor, contribs: list[_Contribution], max_abs: float) -> None:
    """out := original + the contributions' deltas (each times its multiplier), per q/k/v chunk where the weight is
    fused; `max_abs` = max |original| (for the overflow bound). `out` and `original` have the same shape and dtype."""
    by_rows: dict[int | None, list[_Contribution]] = defaultdict(list)
    for c in contribs:
        by_rows[c.target.chunk].append(c)
    with _exact_math():
        if len(by_rows) < 3 and any(k is not None for k in by_rows):
            out.copy_(original)  # rows of a fused q/k/v weight that no LoRA touches return to the original
        for cs in by_rows.values():
            rows = cs[0].target.rows()
            w0 = original if rows is None else original[rows]
            region = out if rows is None else out[rows]
            _merge_region(w0, region, cs, max_abs)


def _merge_region(w0: Tensor, out: Tensor, cs: list[_Contribution], max_abs: float) -> None:
    spec = cs[0].target.spec
    sequential = any(c.module.algorithm.needs_current_weight for c in cs)
    if sequential:
        acc = w0.to(torch.float32, copy=True)
        for c in cs:  # DoRA (inside weight_delta) and IA3 read the weight as the LoRAs before them left it
            delta = c.module.algorithm.weight_delta(acc, spec, dyn=c.dyn).materialize(acc.shape)
            acc.add_(delta, alpha=c.multiplier)
        _commit(acc, out, cs)
        return
    ups, downs, dense, bound = [], [], None, 0.0
    for c in cs:
        d = c.module.algorithm.weight_delta(w0, spec, dyn=c.dyn)  # w0 only gives the shape in this branch
        if isinstance(d, LowRank):
            s = float(d.scale) * c.multiplier
            up = d.up.to(out.device, torch.float32)
            down = d.down.to(out.device, torch.float32)
            ups.append(up * s)
            downs.append(down)
            bound += abs(s) * _factor_bound(c, d)
        else:
            delta = d.delta.to(out.device, torch.float32).reshape(out.shape) * c.multiplier
            dense = delta if dense is None else dense.add_(delta)
            bound += float(delta.abs().max())
    rows = out.shape[0]
    safe = max_abs + bound < 0.5 * torch.finfo(out.dtype).max and bound == bound  # not NaN
    if safe and dense is None and out.dtype == torch.float32 and out.is_contiguous():
        # one pass: out = w0 + U @ D, read the backup once, write the weight once
        torch.addmm(w0.reshape(rows, -1), _cat(ups, 1), _cat(downs, 0), out=out.view(rows, -1))
        return
    acc = w0.to(torch.float32, copy=True).reshape(rows, -1)
    if ups:
        acc.addmm_(_cat(ups, 1), _cat(downs, 0))
    if dense is not None:
        acc.add_(dense.reshape(rows, -1))
    _commit(acc.reshape(out.shape), out, cs, checked=safe)


def _factor_bound(c: _Contribution, d: LowRank) -> float:
    """max_ij |(up @ down)_ij| <= max_i |up_i| * max_j |down_:j| (Cauchy-Schwarz); cached per parsed module."""
    key = ("factor_bound", c.module.name, c.dyn)
    bound = c.network.derived.get(key)
    if bound is None:
        bound = float(d.up.float().norm(dim=1).max()) * float(d.down.float().norm(dim=0).max())
        c.network.derived[key] = bound
    return bound


def merge_bias(out: Tensor, original: Tensor, contribs: list[_Contribution]) -> None:
    """out := original + the contributions' bias deltas (algorithms that train biases)."""
    with _exact_math():
        acc = original.to(torch.float32, copy=True)
        for c in contribs:
            rows = c.target.rows()
            region = acc if rows is None else acc[rows]
            delta = c.module.algorithm.bias_delta(region, c.target.spec)
            if delta is not None:
                region.add_(delta.to(acc.device, torch.float32).reshape(region.shape), alpha=c.multiplier)
        _commit(acc, out, contribs)


def _commit(acc: Tensor, out: Tensor, cs: list[_Contribution], checked: bool = False) -> None:
    if not checked:
        limit = torch.finfo(out.dtype).max
        if not bool(torch.isfinite(acc).all()) or float(acc.abs().max()) > limit:
            names = ", ".join(sorted({c.network.name for c in cs}))
            c = cs[0]
            raise NonFiniteWeightError(
                c.network.path, f"merging ({names}) makes layer {c.target.key} non-finite in {out.dtype}",
                key=c.module.name, hint="lower the LoRA weight or use a LoRA that did not diverge")
    out.copy_(acc.reshape(out.shape))


def _refused(lora: ActiveLora, err: Exception) -> NetworkReport:
    net = lora.network
    return NetworkReport(name=net.name, path=str(net.path) if net.path else None, lora_arch=net.arch.arch,
                         arch_evidence=net.arch.evidence, modules_total=len(net.modules), error=str(err))


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
