"""Oracle: diffusers' own LoRA loader. For kohya files (SD1 diffusers-style and compvis names, SDXL te1/te2) our merged
weights equal `load_lora_weights` + `fuse_lora` within 1e-6 relative, and generated images match."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lora_ext.formats.network import parse_lora
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from tests.lora_factory import make_entries, snapshot, to_state_dict
from tests.stack import require_diffusers_lora_loader

pytestmark = pytest.mark.slow


def _tiny(arch):
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch, seed=0)


def _diffusers_fused(pipe, path, scale):
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="oracle")
    ref.fuse_lora(lora_scale=scale, adapter_names=["oracle"])
    ref.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    return ref


def _compare(ours, theirs, rtol=1e-6):
    n = 0
    for comp in theirs:
        for k, w in theirs[comp].items():
            g = ours[comp][k]
            err = (g.float() - w.float()).abs().max().item()
            scale = w.float().abs().max().item() or 1.0
            assert err <= rtol * scale, f"{comp}:{k}: max err {err:.3g} vs scale {scale:.3g}"
            n += 1
    return n


@pytest.mark.parametrize("arch,style", [("sd15", "kohya"), ("sd15", "peft"), ("sdxl", "compvis")])
def test_weights_match_diffusers_fuse(tmp_path, arch, style):
    from lora_ext.formats.layouts import unet_module_map

    require_diffusers_lora_loader()
    pipe = _tiny(arch)
    sdxl = arch == "sdxl"
    entries = make_entries(pipe, "lora", rank=4, alpha=None if style == "peft" else 3.0, seed=100)
    compvis = unet_module_map(dict(pipe.unet.config)) if style == "compvis" else None
    sd = to_state_dict(entries, style, sdxl=sdxl, unet_compvis=compvis)
    path = tmp_path / "oracle_lora.safetensors"
    save_safetensors_atomic(sd, path)

    ref = _diffusers_fused(pipe, path, 0.8)
    theirs = snapshot(ref)
    original = snapshot(pipe)
    # diffusers must actually have applied the LoRA to every component, or the comparison proves nothing
    for comp in theirs:
        assert any(not torch.equal(theirs[comp][k], original[comp][k]) for k in theirs[comp]), comp

    patcher = Patcher(adapter_for_pipeline(pipe))
    rep = patcher.apply([ActiveLora(parse_lora(sd, path=path), te=0.8, unet=0.8)]).networks[0]
    assert not rep.unmatched and rep.modules_applied == len(entries)
    assert _compare(snapshot(pipe), theirs) > 0

    # images: our patched pipeline vs diffusers' fused one
    from lora_ext.app.generate import generate_image

    kw = dict(seed=3, steps=3, width=64, height=64, cfg=5.0)
    ours = np.asarray(generate_image(pipe, "a photo of a cat", **kw), dtype=np.int16)
    theirs_img = np.asarray(generate_image(ref, "a photo of a cat", **kw), dtype=np.int16)
    patcher.restore()
    base = np.asarray(generate_image(pipe, "a photo of a cat", **kw), dtype=np.int16)
    assert np.abs(ours - theirs_img).max() <= 1
    assert np.abs(ours - base).max() > 5  # the LoRA visibly changed the image


def test_sd15_compvis_names_equal_diffusers_names():
    """diffusers' loader does not read SD1 compvis-style kohya names (lora_unet_input_blocks_...), so the oracle is
    transitive: the same LoRA under compvis names must give bit-identical weights to the diffusers-named file, which
    the test above checks against diffusers."""
    from lora_ext.formats.layouts import unet_module_map

    pipe = _tiny("sd15")
    entries = make_entries(pipe, "lora", rank=4, alpha=3.0, seed=101)
    compvis = unet_module_map(dict(pipe.unet.config))
    results = []
    for style in ("kohya", "compvis"):
        sd = to_state_dict(entries, style, unet_compvis=compvis if style == "compvis" else None)
        assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in sd) == (style == "compvis")
        patcher = Patcher(adapter_for_pipeline(pipe))
        rep = patcher.apply([ActiveLora(parse_lora(sd), te=0.8, unet=0.8)]).networks[0]
        assert not rep.unmatched and rep.modules_applied == len(entries)
        results.append(snapshot(pipe))
        patcher.restore()
    for comp in results[0]:
        for k, v in results[0][comp].items():
            assert torch.equal(v, results[1][comp][k]), k
