"""Test-side LoRA construction, independent of lora_ext's key maps: names are spelled here from the module paths of
the model (the way kohya sd-scripts spells them), and expected weights are computed here from the published formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
        "attn2.to_out.0")
TE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def te_path(path: str) -> str:
    """transformers >= 5.6 CLIPTextModel drops 'text_model.'; kohya names always have it."""
    return path if path.startswith("text_model.") or path == "text_projection" else "text_model." + path


@dataclass
class Entry:
    """One LoRA module: which parameter it patches (component, module path) and its tensors."""

    component: str  # "unet" | "te1" | "te2"
    path: str  # module path in the diffusers/transformers model as named_modules() gives it
    algo: str
    tensors: dict[str, Tensor]  # suffix -> tensor

    def delta(self, w0: Tensor) -> Tensor:
        """Published formulas (fp32)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        alpha = float(t["alpha"]) if "alpha" in t else None
        if self.algo == "lora":
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            r = down.shape[0]
            d = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
            return (d * ((alpha / r) if alpha is not None else 1.0)).reshape(w0.shape)
        if self.algo == "loha":
            r = t["hada_w1_b"].shape[0]
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            return (d * ((alpha / r) if alpha is not None else 1.0)).reshape(w0.shape)
        if self.algo == "full":
            return t["diff"].reshape(w0.shape)
        raise ValueError(self.algo)


def modules_of(pipe) -> dict[str, dict[str, nn.Module]]:
    comps = {"unet": dict(pipe.unet.named_modules()), "te1": dict(pipe.text_encoder.named_modules())}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["te2"] = dict(pipe.text_encoder_2.named_modules())
    return comps


def make_entries(pipe, algo: str = "lora", rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                 std: float = 0.1, components=("unet", "te1", "te2"), every: int = 1) -> list[Entry]:
    g = torch.Generator().manual_seed(seed)
    entries = []
    for comp, mods in modules_of(pipe).items():
        if comp not in components:
            continue
        wanted = ATTN if comp == "unet" else TE
        names = sorted(p for p in mods if p.endswith(wanted))[::every]
        for path in names:
            w = mods[path].weight
            out_f, in_f = w.shape[0], w.shape[1]
            tensors: dict[str, Tensor] = {}
            if algo == "lora":
                tensors["lora_down.weight"] = torch.randn(rank, in_f, generator=g) * std
                tensors["lora_up.weight"] = torch.randn(out_f, rank, generator=g) * std
            elif algo == "loha":
                tensors["hada_w1_a"] = torch.randn(out_f, rank, generator=g) * 0.5
                tensors["hada_w1_b"] = torch.randn(rank, in_f, generator=g) * 0.5
                tensors["hada_w2_a"] = torch.randn(out_f, rank, generator=g) * 0.5
                tensors["hada_w2_b"] = torch.randn(rank, in_f, generator=g) * 0.5
            elif algo == "full":
                tensors["diff"] = torch.randn(out_f, in_f, generator=g) * std * 0.1
            if alpha is not None and algo != "full":
                tensors["alpha"] = torch.tensor(alpha)
            entries.append(Entry(comp, path, algo, tensors))
    return entries


def kohya_name(entry: Entry, sdxl: bool, unet_compvis: dict[str, str] | None = None) -> str:
    if entry.component == "unet":
        path = unet_compvis[entry.path] if unet_compvis is not None else entry.path
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"te1": "lora_te1_" if sdxl else "lora_te_", "te2": "lora_te2_"}[entry.component]
    return prefix + te_path(entry.path).replace(".", "_")


def peft_name(entry: Entry) -> str:
    prefix = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[entry.component]
    return prefix + (entry.path if entry.component == "unet" else te_path(entry.path))


def to_state_dict(entries: list[Entry], style: str, sdxl: bool = False,
                  unet_compvis: dict[str, str] | None = None) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for e in entries:
        if style == "peft":
            base = peft_name(e)
            mapping = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
            for k, v in e.tensors.items():
                if k == "alpha":
                    continue  # PEFT files carry no alpha (scale 1 = alpha == rank); the entry must not either
                sd[f"{base}.{mapping.get(k, k)}"] = v.contiguous()
        else:
            base = kohya_name(e, sdxl, unet_compvis if style == "compvis" else None)
            for k, v in e.tensors.items():
                sd[f"{base}.{k}"] = v.contiguous()
    return sd


def expected_state(pipe, entries: list[Entry], te: float, unet: float,
                   original: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """original: component -> {param name: tensor}. Returns the expected params after merging (fp32 math)."""
    mods = modules_of(pipe)
    out = {c: {k: v.clone() for k, v in sd.items()} for c, sd in original.items()}
    for e in entries:
        key = f"{e.path}.weight"
        w0 = original[e.component][key]
        mult = unet if e.component == "unet" else te
        out[e.component][key] = (w0.float() + mult * e.delta(w0)).to(w0.dtype)
        assert mods[e.component][e.path].weight.shape == w0.shape
    return out


def snapshot(pipe) -> dict[str, dict[str, Tensor]]:
    comps = {"unet": pipe.unet, "te1": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["te2"] = pipe.text_encoder_2
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}


def assert_bit_identical(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> None:
    for comp in a:
        for k, v in a[comp].items():
            w = b[comp][k]
            if not torch.equal(v, w):
                diff = (v.float() - w.float()).abs().max().item()
                raise AssertionError(f"{comp}:{k} differs from the original (max |diff| {diff})")
