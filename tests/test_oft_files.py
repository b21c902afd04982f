"""OFT files as kohya sd-scripts writes them (networks/oft.py: `oft_unet_<diffusers path>` modules with `oft_blocks`
and the constraint as `alpha`), which A1111 v1.10's built-in ignores (0 matched keys): every module reaches its layer,
and the merged weight is the published formula (blockwise R^T W, R the Cayley transform, |Q| clamped to
alpha * out_features), computed by hand."""

from __future__ import annotations

import math

import torch

from lora_ext.formats.network import parse_lora
from lora_ext.models.tiny import build_tiny_pipeline
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline


def _kohya_oft(pipe, g: torch.Generator, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in path and path.endswith(("to_q", "to_k", "to_v")):
            n = 4
            size = module.out_features // n
            name = "oft_unet_" + path.replace(".", "_")
            out[f"{name}.oft_blocks"] = torch.randn(n, size, size, generator=g) * 0.2
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _by_hand(w: torch.Tensor, blocks: torch.Tensor, alpha: float, mult: float) -> torch.Tensor:
    q = (blocks - blocks.transpose(1, 2)).double()
    constraint = alpha * w.shape[0]
    norm = math.sqrt(float((q ** 2).sum()))
    if norm > constraint:  # kohya always rescales by (min(|Q|, c) + 1e-8) / (|Q| + 1e-8)
        q = q * ((constraint + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    r = torch.stack([(eye + qi) @ torch.linalg.inv(eye - qi) for qi in q])
    k, n, _ = r.shape
    wd = w.double()
    new = torch.stack([r[b].T @ wd[b * n:(b + 1) * n] for b in range(k)]).reshape(w.shape)
    return wd + mult * (new - wd)


def test_kohya_oft_file_applies_every_module_by_the_formula():
    pipe = build_tiny_pipeline("sd15", seed=0)
    tensors = _kohya_oft(pipe, torch.Generator().manual_seed(1), alpha=1e-3)
    net = parse_lora(tensors, {"ss_network_module": "networks.oft"}, name="kohya_oft")
    assert net.algorithms == {"oft": len(tensors) // 2} and not net.unknown_keys
    mods = dict(pipe.unet.named_modules())
    before = {p: mods[p].weight.detach().clone() for p in mods if isinstance(mods[p], torch.nn.Linear)}
    rep = Patcher(adapter_for_pipeline(pipe)).apply([ActiveLora(net, 0.7, 0.7)]).networks[0]
    assert rep.modules_applied == len(tensors) // 2 and not rep.unmatched
    checked = 0
    for key in tensors:
        if not key.endswith(".oft_blocks"):
            continue
        path = next(p for p in before if "oft_unet_" + p.replace(".", "_") == key[: -len(".oft_blocks")])
        want = _by_hand(before[path], tensors[key], 1e-3, 0.7)
        got = mods[path].weight.detach().double()
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()), path
        checked += 1
    assert checked > 10
