"""What the patcher did, as data: coverage per network (applied / unmatched per UNet block and text encoder), errors,
work done and time spent. Callers (CLI, WebUI) decide how to show it; the patcher never prints."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from lora_ext.formats.layouts import unet_block

# The one grouping of coverage, for what was applied (by target) and what was not (by file module name), in order:
# the text encoders, the UNet's A1111 blocks (the names of block weights, `lora_ext.formats.layouts`), the UNet outside
# them (time embedding, conv_out, ...), anything else.
GROUPS = ("te1", "te2", *(f"unet:IN{i:02d}" for i in range(12)), "unet:M00", *(f"unet:OUT{i:02d}" for i in range(12)),
          "unet:BASE", "other")
_TE2 = ("lora_te2_", "text_encoder_2.")
# kohya, diffusers/PEFT, and a PEFT adapter of a lone text encoder (transformers 4 and >= 5.6 spellings)
_TE1 = ("lora_te_", "lora_te1_", "text_encoder.", "text_model.", "encoder.layers.", "embeddings.", "final_layer_norm")
_UNET = ("lora_unet_", "lycoris_", "oft_unet_", "unet.", "model.diffusion_model.", "diffusion_model.")
# UNet modules outside the blocks, for names without a prefix (a bare diffusers/ldm path)
_UNET_BASE = re.compile(r"^(conv_out|conv_norm_out|time_embedding|add_embedding|class_embedding|time_embed|label_emb)"
                        r"([._]|$)")


def target_group(component: str, block: str) -> str:
    """The coverage group of a model layer (a `Target`'s component and block): "te1", "te2", "unet:IN04", ..."""
    return component if component != "unet" else f"unet:{block}"


def key_group(module_name: str) -> str:
    """The coverage group of a file's module name, the same as `target_group` of the layer it names: "te1", "te2",
    "unet:IN00".."unet:IN11", "unet:M00", "unet:OUT00".."unet:OUT11", "unet:BASE", or "other". Blocks are read from
    diffusers paths (down_blocks/mid_block/up_blocks) and compvis ones (input_blocks/middle_block/output_blocks)."""
    if module_name.startswith(_TE2):
        return "te2"
    if module_name.startswith(_TE1):
        return "te1"
    prefix = next((p for p in _UNET if module_name.startswith(p)), None)
    block = unet_block(module_name[len(prefix):] if prefix else module_name)
    if block is not None:
        return f"unet:{block}"
    return "unet:BASE" if prefix or _UNET_BASE.match(module_name) else "other"


def group_order(group: str) -> int:
    """Sort key of a group name (GROUPS order; unknown names last)."""
    return GROUPS.index(group) if group in GROUPS else len(GROUPS)


@dataclass
class NetworkReport:
    name: str
    path: str | None
    lora_arch: str | None
    arch_evidence: str
    modules_total: int
    modules_applied: int = 0
    applied_by_group: dict[str, int] = field(default_factory=dict)  # GROUPS ("te1", "unet:IN04", ...) -> count
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
            groups = ", ".join(f"{g}: {c}" for g, c in sorted(self.unmatched_by_group.items(),
                                                               key=lambda gc: group_order(gc[0])))
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
    layers_bypassed: int = 0  # layers whose LoRAs were left to the bypass (not merged)
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
            "layers_bypassed": self.layers_bypassed,
            "stale_backups": self.stale_backups,
            "backup_bytes": self.backup_bytes,
            "seconds": self.seconds,
        }
