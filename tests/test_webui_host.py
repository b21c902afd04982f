"""Host detection and what the glue registers in each host, with the WebUI's `modules` package faked (a recording
`script_callbacks`). The real Forge is in tests/webui/test_forge.py."""

from __future__ import annotations

import sys
import types

import pytest

from lora_ext.webui import glue, host


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


def test_in_forge_the_glue_takes_nothing_and_says_so_once(fake_webui, capsys):
    root, calls = fake_webui
    (root / "modules_forge").mkdir()
    (root / "modules_forge" / "__init__.py").write_text("")
    glue.setup()
    assert calls == [("on_app_started", "lora_ext_forge_notice")]  # no tag, no model hooks, no routes, no settings
    assert glue._state is None
    callback = glue._on_app_started_forge
    callback(None, None)
    out = capsys.readouterr().out
    assert out.count("lora_ext:") == 1 and "Forge" in out and "left to Forge's built-in" in out
