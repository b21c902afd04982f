"""What the patcher did, as data: coverage per network (applied / unmatched per UNet block and text encoder), errors,
work done and time spent. Callers (CLI, WebUI) decide how to show it; the patcher never prints."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

_UNET_BLOCK = re.compile(r"(down_blocks|up_blocks|input_blocks|output_blocks)[._](\d+)")


def key_group(module_name: str) -> str:
    """Coarse location of a file's module name, for coverage reports: "te1", "te2", "unet:down_blocks.1",
    "unet:input_blocks.4", "unet:mid", "unet:other", or "other"."""
    n = module_name
    if n.startswith(("lora_te2_", "text_encoder_2.")):
        return "te2"
    if n.startswith(("lora_te_", "lora_te1_", "text_encoder.")):
        return "te1"
    if n.startswith(("lora_unet_", "lycoris_", "unet.", "diffusion_model.")) or _UNET_BLOCK.search(n) or "mid" in n:
        m = _UNET_BLOCK.search(n)
        if m:
            return f"unet:{m.group(1)}.{m.group(2)}"
        if "mid_block" in n or "middle_block" in n:
            return "unet:mid"
        return "unet:other"
    return "other"


@dataclass
class NetworkReport:
    name: str
    path: str | None
    lora_arch: str | None
    arch_evidence: str
    modules_total: int
    modules_applied: int = 0
    applied_by_group: dict[str, int] = field(default_factory=dict)  # "unet:IN04"/"te1"... -> count
    unmatched: list[str] = field(default_factory=list)  # module names of the file that no layer answers to
    unknown_keys: list[str] = field(default_factory=list)  # tensor keys that are not LoRA tensors
    skipped_zero: int = 0  # modules skipped because their multiplier is 0
    error: str | None = None  # set when the network was refused (apply(..., skip_bad=True))

    @property
    def unmatched_by_group(self) -> dict[str, int]:
        return dict(Counter(key_group(n) for n in self.unmatched))

    @property
    def ok(self) -> bool:
        return self.error is None and not self.unmatched and not self.unknown_keys

    def summary(self) -> str:
        if self.error:
            return f"{self.name}: NOT applied: {self.error}"
        text = f"{self.name}: {self.modules_applied}/{self.modules_total} modules applied"
        if self.unmatched:
            groups = ", ".join(f"{g}: {c}" for g, c in sorted(self.unmatched_by_group.items()))
            text += f"; {len(self.unmatched)} unmatched ({groups}; e.g. {self.unmatched[0]})"
        if self.unknown_keys:
            text += f"; {len(self.unknown_keys)} unknown keys (e.g. {self.unknown_keys[0]})"
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unmatched_by_group"] = self.unmatched_by_group
        return d


@dataclass
class PatchReport:
    networks: list[NetworkReport] = field(default_factory=list)
    layers_recomputed: int = 0  # weights (or q/k/v-fused weights) written from their backup plus deltas
    layers_restored: int = 0  # weights copied back from their backup
    layers_unchanged: int = 0  # weights whose set of LoRAs and multipliers did not change
    stale_backups: int = 0  # backups dropped because someone else changed their weight (e.g. a checkpoint reload)
    backup_bytes: int = 0  # memory held by backups after this call
    seconds: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [f"{n.name}: {n.error}" for n in self.networks if n.error]

    def to_dict(self) -> dict:
        return {
            "networks": [n.to_dict() for n in self.networks],
            "layers_recomputed": self.layers_recomputed,
            "layers_restored": self.layers_restored,
            "layers_unchanged": self.layers_unchanged,
            "stale_backups": self.stale_backups,
            "backup_bytes": self.backup_bytes,
            "seconds": self.seconds,
        }
