"""What the WebUI's `lora` extra network does, without the WebUI: turn the tags of one generation into an active LoRA
set on A1111's model object, and report every problem as a sentence for the user.

Contract
- `activate(sd_model, tags)` makes the model's weights reflect exactly `tags` (each tag's A1111 argument list, e.g.
  `["name", "0.8"]`), replacing whatever the previous call applied. A tag that cannot be used (bad syntax, file not
  found, unreadable file, wrong model family, bad tensors) is left out and described in `Activation.problems`; the
  others are applied. Never raises for a user's input.
- `restore()` puts every weight back bit-exactly; `forget_model()` restores and drops every reference to the model
  (call it before the WebUI replaces or reloads the model).
- `start=`/`stop=` (lora-block-weight's step window): the text encoder gets the LoRA for the whole generation (the
  conditioning is computed once, before sampling); the UNet gets it for sampling steps `start <= step < stop`.
  `activate` merges the UNet part as for step 0; `at_step(step, total)`, called before each sampling step, re-merges
  only the layers whose multiplier changes at that step (twice per window at most).
- One controller per process (the WebUI has one current model); calls are serialized with a lock because the UI and
  the API can both start generations.

Nothing here imports the WebUI: `lora_ext.webui.glue` maps A1111's objects onto these calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lora_ext.errors import LoraExtError
from lora_ext.formats.network import LoraNetwork
from lora_ext.patch.cache import LoraCache
from lora_ext.patch.patcher import ActiveLora, Patcher
from lora_ext.patch.report import PatchReport
from lora_ext.prompt import LoraRef, parse_tag

log = logging.getLogger(__name__)

_INFOTEXT_DROP = str.maketrans("", "", ":,")  # A1111 removes these from names in "Lora hashes"


class Resolver(Protocol):
    """Finds LoRA files by the name a prompt uses (A1111 rules: file stem, then alias)."""

    def resolve(self, name: str) -> Path | None: ...

    def shorthash(self, path: Path) -> str | None: ...


@dataclass
class Activation:
    """The outcome of one `activate` call."""

    refs: list[LoraRef] = field(default_factory=list)  # tags that parsed, in prompt order
    applied: list[str] = field(default_factory=list)  # names (as written in the prompt) merged into the weights
    networks: list[LoraNetwork] = field(default_factory=list)  # the applied files, parsed (bundled embeddings)
    hashes: dict[str, str] = field(default_factory=dict)  # infotext "Lora hashes": name -> 12-hex hash
    problems: list[str] = field(default_factory=list)  # one sentence per problem, for the console, UI and comments
    report: PatchReport | None = None


def tag_text(items: Sequence[str], kind: str = "lora") -> str:
    """The prompt text of a tag from A1111's argument list (`ExtraNetworkParams.items`)."""
    return "<" + ":".join([kind, *items]) + ">"


class LoraController:
    def __init__(self, resolver: Resolver, *, cache: LoraCache | None = None, retain_bytes: int | None = None,
                 backup_device: str = "auto") -> None:
        self.resolver = resolver
        self.cache = cache or LoraCache()
        self._retain_bytes = retain_bytes
        self.backup_device = backup_device
        self._lock = threading.RLock()
        self._patcher: Patcher | None = None
        self._model: Any = None  # the patcher's adapter holds the model anyway; forget_model() drops both
        self.last: Activation | None = None
        self._windowed: list[tuple[ActiveLora, LoraRef]] = []  # the active set when some LoRA has start=/stop=
        self._step_key: tuple | None = None

    # ---------------------------------------------------------------------------------------------------- state

    @property
    def patcher(self) -> Patcher | None:
        return self._patcher

    @property
    def retain_bytes(self) -> int | None:
        """Bytes of backups of restored layers kept for the next generation (None: all, 0: free on restore)."""
        return self._retain_bytes

    @retain_bytes.setter
    def retain_bytes(self, value: int | None) -> None:
        with self._lock:
            self._retain_bytes = value
            if self._patcher is not None:
                self._patcher.retain_bytes = value

    @property
    def is_pristine(self) -> bool:
        return self._patcher is None or self._patcher.is_pristine

    def _patcher_for(self, sd_model: Any) -> Patcher:
        if self._patcher is not None and self._model is sd_model:
            return self._patcher
        self.forget_model()
        from lora_ext.patch.ldm import adapter_for_ldm

        self._patcher = Patcher(adapter_for_ldm(sd_model), backup_device=self.backup_device,
                                retain_bytes=self._retain_bytes)
        self._model = sd_model
        return self._patcher

    def load(self, path: Path, name: str | None = None) -> LoraNetwork:
        """The parsed file, through the shared cache (serialized with generations: the cache is not thread-safe)."""
        with self._lock:
            return self.cache.get(path, name=name)

    # ---------------------------------------------------------------------------------------------------- actions

    def activate(self, sd_model: Any, tags: Sequence[Sequence[str]], *, kind: str = "lora") -> Activation:
        """Apply the LoRAs of `tags` (A1111 argument lists) to `sd_model`, dropping the unusable ones with a problem
        sentence each."""
        with self._lock:
            act = Activation()
            actives: list[ActiveLora] = []
            sources: list[tuple[LoraRef, Path]] = []
            for items in tags:
                text = tag_text(items, kind)
                try:
                    ref = parse_tag(text)
                except LoraExtError as err:
                    act.problems.append(f"{text}: {err}")
                    continue
                act.refs.append(ref)
                path = self.resolver.resolve(ref.name)
                if path is None:
                    act.problems.append(f"Lora not found: {ref.name} ({text}); check the name in your LoRA folder, "
                                        "or refresh the list if you just added the file")
                    continue
                try:
                    net = self.cache.get(path, name=ref.name)
                except LoraExtError as err:
                    act.problems.append(f"{text}: {err}")
                    continue
                except OSError as err:
                    act.problems.append(f"{text}: cannot read {path}: {err}")
                    continue
                lora = ActiveLora(net, te=ref.te, unet=ref.unet, dyn=ref.dyn, block_weights=ref.lbw)
                sources.append((ref, path))
                actives.append(lora)
            try:
                patcher = self._patcher_for(sd_model)
            except (ValueError, LoraExtError) as err:
                act.problems.append(f"LoRAs not applied: this model is not supported ({err})")
                return self._finish(act)
            windowed = any(r.start is not None or r.stop is not None for r, _ in sources)
            self._windowed = list(zip(actives, [r for r, _ in sources], strict=True)) if windowed else []
            first = self._for_step(0, None) if windowed else actives
            self._step_key = tuple(a.unet for a in first) if windowed else None
            report = patcher.apply(first, skip_bad=True)
            act.report = report
            for lora, (ref, path), rep in zip(actives, sources, report.networks, strict=True):
                if rep.error:
                    act.problems.append(f"{ref.name}: not applied: {rep.error}")
                    continue
                act.applied.append(ref.name)
                act.networks.append(lora.network)
                if rep.unmatched or rep.unknown_keys:
                    act.problems.append(_coverage_problem(ref.name, rep.modules_applied, rep.modules_total,
                                                          rep.unmatched, rep.unknown_keys))
                short = self._shorthash(path)
                if short:
                    act.hashes[ref.name.translate(_INFOTEXT_DROP)] = short
            return self._finish(act)

    def _for_step(self, step: int, total: int | None) -> list[ActiveLora]:
        """The active set at a sampling step: windowed LoRAs keep their text-encoder part, their UNet part is on
        only inside the window (`total` None: before sampling, as for step 0 of an unknown count)."""
        out = []
        for lora, ref in self._windowed:
            inside = step in ref.active_steps(total if total is not None else 1 << 30)
            out.append(lora if inside else ActiveLora(lora.network, te=lora.te, unet=0.0, dyn=lora.dyn,
                                                      block_weights=lora.block_weights))
        return out

    def at_step(self, step: int, total: int) -> PatchReport | None:
        """Before sampling step `step` (0-based) of `total`: update the UNet part of windowed LoRAs. No-op (None)
        when no active LoRA has a window or nothing changes at this step."""
        with self._lock:
            if not self._windowed or self._patcher is None:
                return None
            actives = self._for_step(step, total)
            key = tuple(a.unet for a in actives)
            if key == self._step_key:
                return None
            self._step_key = key
            return self._patcher.apply(actives, skip_bad=True)

    def _shorthash(self, path: Path) -> str | None:
        try:
            return self.resolver.shorthash(path)
        except (OSError, LoraExtError) as err:
            log.warning("lora_ext: cannot hash %s for the infotext: %s", path, err)
            return None

    def _finish(self, act: Activation) -> Activation:
        self.last = act
        return act

    def restore(self) -> PatchReport | None:
        """Put every weight back (bit-exact). Safe to call at any time, also twice."""
        with self._lock:
            self._windowed = []
            if self._patcher is None:
                return None
            return self._patcher.restore()

    def forget_model(self) -> None:
        """Restore the current model's weights and drop every reference to it and its backups."""
        with self._lock:
            if self._patcher is not None:
                try:
                    self._patcher.release()
                finally:
                    self._patcher = None
                    self._model = None


def _coverage_problem(name: str, applied: int, total: int, unmatched: Sequence[str], unknown: Sequence[str]) -> str:
    parts = []
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        parts.append(f"{len(unmatched)} of {total} modules match no layer of this model ({shown})")
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        parts.append(f"{len(unknown)} keys are not LoRA tensors ({shown})")
    return (f"{name}: applied {applied} of {total} modules; " + "; ".join(parts) +
            ". The file may be for another model family, or use key names lora_ext does not know")
