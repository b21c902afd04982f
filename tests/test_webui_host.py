"""Host detection and what the glue registers in each host, with the WebUI's `modules` package faked (a recording
`script_callbacks`). The real Forge is in tests/webui/test_forge.py."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lora_ext.session import LoraSession
from lora_ext.webui import builtin, glue, host


@pytest.fixture
def fake_webui(monkeypatch, tmp_path):
    """A `modules.script_callbacks` that records registrations; a WebUI root on sys.path; fresh glue state."""
    calls: list[tuple[str, str]] = []
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_app_started", "on_model_loaded", "on_cfg_denoiser", "on_infotext_pasted", "on_script_unloaded",
                 "on_ui_settings", "on_before_ui"):
        setattr(callbacks, name, lambda fn, name=None, _kind=name: calls.append((_kind, name)))
    modules = types.ModuleType("modules")
    modules.__path__ = []
    modules.script_callbacks = callbacks
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "modules_forge", raising=False)
    monkeypatch.setattr(glue, "_state", None)
    return tmp_path, calls


def test_detects_forge_by_its_package_on_the_import_path(fake_webui):
    root, _ = fake_webui
    assert host.detect() == host.A1111
    (root / "modules_forge").mkdir()
    (root / "modules_forge" / "__init__.py").write_text("raise RuntimeError('detection must not import Forge')\n")
    assert host.detect() == host.FORGE
    assert "modules_forge" not in sys.modules


def test_in_forge_the_session_keeps_backups_on_the_cpu_and_follows_moves(fake_webui):
    root, _ = fake_webui
    assert host.session_options() == {}
    (root / "modules_forge").mkdir()
    (root / "modules_forge" / "__init__.py").write_text("")
    assert host.session_options() == {"backup_device": "cpu", "follow_moves": True}
    session = LoraSession(lambda m: None, resolver=None, **host.session_options())
    assert session.backup_device == "cpu" and session.follow_moves


class _ForgeObjects(SimpleNamespace):
    def shallow_copy(self) -> _ForgeObjects:
        return _ForgeObjects(**vars(self))


class _FakeLoraLoader:
    """The behaviour of Forge's `backend.patcher.lora.LoraLoader` that matters here: `refresh` puts backed-up
    Parameters back (new objects) and merges the new patches (a number added per key here)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.backup, self.online_backup, self.loaded_hash = model, {}, [], str([])

    def refresh(self, lora_patches: dict, offload_device: object = None) -> None:
        for key, w in self.backup.items():
            module, _, attr = key.rpartition(".")
            setattr(self.model.get_submodule(module), attr, nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for patches in lora_patches.values():
            for key, add in patches.items():
                module, _, attr = key.rpartition(".")
                owner = self.model.get_submodule(module)
                self.backup[key] = getattr(owner, attr).detach().clone()
                setattr(owner, attr, nn.Parameter(getattr(owner, attr) + add, requires_grad=False))
        self.loaded_hash = str(list(lora_patches))


def _forge_model() -> SimpleNamespace:
    unet = nn.Sequential(nn.Linear(4, 4))
    encoders = nn.ModuleDict({"clip_l": nn.Linear(4, 4)})
    kmodel = SimpleNamespace(diffusion_model=unet, lora_loader=_FakeLoraLoader(unet))  # Forge's KModel
    encoders.lora_loader = _FakeLoraLoader(encoders)  # Forge's ModelPatcher puts it on the module it patches
    objects = _ForgeObjects(unet=SimpleNamespace(model=kmodel, offload_device=torch.device("cpu")),
                            clip=SimpleNamespace(cond_stage_model=encoders,
                                                 patcher=SimpleNamespace(model=encoders, offload_device="cpu")))
    return SimpleNamespace(forge_objects=objects, forge_objects_original=objects.shallow_copy(),
                           forge_objects_after_applying_lora=None, current_lora_hash=str([]))


def test_forge_model_trees_and_publishing():
    model = _forge_model()
    assert host.is_forge_model(model) and not host.is_forge_model(SimpleNamespace(model=None))
    unet, encoder = host.unet_and_text_encoder(model)
    assert unet is model.forge_objects.unet.model.diffusion_model
    assert encoder is model.forge_objects.clip.cond_stage_model
    stale = _ForgeObjects(unet="what the built-in published last")
    model.forge_objects_after_applying_lora = stale
    host.publish(model)  # Forge samples with this right after activate()
    published = model.forge_objects_after_applying_lora
    assert published is not stale and published is not model.forge_objects
    assert vars(published) == vars(model.forge_objects)
    a1111 = SimpleNamespace(model=SimpleNamespace(diffusion_model="unet"), cond_stage_model="te")
    host.publish(a1111)
    assert host.unet_and_text_encoder(a1111) == ("unet", "te") and not hasattr(a1111, "forge_objects_after_"
                                                                                        "applying_lora")


def test_taking_the_tag_from_forges_builtin_restores_its_weights_and_clears_its_hash():
    model = _forge_model()
    unet = model.forge_objects.unet.model.diffusion_model
    encoders = model.forge_objects.clip.cond_stage_model
    before = {k: v.clone() for k, v in [*unet.state_dict().items(), *encoders.state_dict().items()]}
    # the built-in merged a LoRA into both (Forge does that when it loads the model for sampling)
    model.forge_objects.unet.model.lora_loader.refresh({("f", 0.8): {"0.weight": 1.0, "0.bias": 2.0}})
    encoders.lora_loader.refresh({("f", 0.8): {"clip_l.weight": 3.0}})
    model.current_lora_hash = "[['f', 0.8, 0.8, False]]"
    assert not torch.equal(unet[0].weight, before["0.weight"])
    assert builtin.restore_forge_builtin(model) == 3
    after = {k: v for k, v in [*unet.state_dict().items(), *encoders.state_dict().items()]}
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.current_lora_hash == builtin.FORGE_UNAPPLIED
    assert builtin.restore_forge_builtin(model) == 0  # nothing merged: nothing to do
