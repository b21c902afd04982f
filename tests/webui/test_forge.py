"""Stable Diffusion WebUI Forge (a harness built with `HOST=forge`, SD_WEBUI_HOST=forge): until lora_ext supports
Forge's model runtime, an installed lora_ext must leave `<lora:...>` to Forge's built-in and say so once.

Installed from its URL through Forge's own installer (clone + install.py) into a temporary `--data-dir`; the images of
a Forge with lora_ext are compared with those of the same Forge without it (same checkpoint, seed and LoRA): the LoRA
must change the image exactly as the built-in alone does. Before this, every LoRA image equalled the base image
(`AttributeError: 'StableDiffusion' object has no attribute 'model'` in lora_ext on every generation)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lora_ext.webui.glue import FORGE_NOTICE
from tests.webui.test_install import _call, _free_port

REPO = Path(__file__).resolve().parents[2]
FORGE = os.environ.get("SD_WEBUI_HOST") == "forge"
pytestmark = pytest.mark.skipif(not FORGE, reason="needs a Forge harness (HOST=forge setup.sh; SD_WEBUI_HOST=forge)")

INSTALL = textwrap.dedent("""
    import os, sys
    webui, data, url = sys.argv[1:4]
    os.chdir(webui); sys.path.insert(0, webui)
    sys.argv = ["launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--always-cpu", "--data-dir", data]
    from modules import shared_init
    shared_init.initialize()
    from modules import extensions, ui_extensions
    extensions.list_extensions()
    _, msg = ui_extensions.install_extension_from_url(None, url, None)
    print("INSTALL-MESSAGE:", msg)
    extensions.list_extensions()
    print("INSTALLED:", [e.name for e in extensions.extensions if not e.is_builtin])
""")
VERSIONS = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in ('torch', "
            "'transformers', 'diffusers', 'accelerate', 'safetensors', 'gradio', 'numpy', 'peft', 'pydantic')}))")
PROMPTS = {"base": "a photo of a cat", "lora": "a photo of a cat <lora:full_lora:0.8>",
           "compvis": "a photo of a cat <lora:full_lora_compvis:0.8>",
           "te_only": "a photo of a cat <lora:full_lora:0.8:0>"}


def _generate_all(mode: str, extra: list[str]) -> dict:
    """Start Forge (`mode`), generate every prompt of PROMPTS, stop; {images, infotexts, log, status_route}."""
    port = _free_port()
    start = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")
    subprocess.run(["bash", start, mode, port, *extra], check=True, timeout=900, env={**os.environ, "WAIT_S": "600"})
    try:
        url = f"http://127.0.0.1:{port}"
        if mode == "ui":
            with urllib.request.urlopen(url + "/", timeout=300) as r:
                assert r.status == 200
        images, infotexts = {}, {}
        for key, prompt in PROMPTS.items():
            out = _call(url, "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                   "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7})
            images[key] = out["images"][0]
            infotexts[key] = json.loads(out["info"])["infotexts"][0]
        try:
            _call(url, "/lora_ext/status")
            status_route = 200
        except urllib.error.HTTPError as err:
            status_route = err.code
    finally:
        subprocess.run(["bash", start, "stop", port], timeout=300)
    log = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{port}.log").read_text(errors="replace")
    return {"images": images, "infotexts": infotexts, "log": log, "status_route": status_route}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A data dir whose extensions/lora_ext was installed by Forge's own installer; (data, rc, output, versions
    before, versions after)."""
    tmp_path = tmp_path_factory.mktemp("forge-install")
    py = os.environ["SD_WEBUI_PYTHON"]
    data = tmp_path / "data"
    (data / "extensions").mkdir(parents=True)
    script = tmp_path / "install.py"
    script.write_text(INSTALL)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lora_ext").symlink_to(REPO, target_is_directory=True)
    before = json.loads(subprocess.run([py, "-c", VERSIONS], capture_output=True, text=True, check=True).stdout)
    proc = subprocess.run([py, str(script), os.environ["SD_WEBUI_DIR"], str(data), f"file://{tmp_path}/src/lora_ext"],
                          capture_output=True, text=True, timeout=900)
    after = json.loads(subprocess.run([py, "-c", VERSIONS], capture_output=True, text=True, check=True).stdout)
    return data, proc.returncode, proc.stdout + proc.stderr, before, after


@pytest.fixture(scope="module")
def reference():
    """reference(mode): the same generations in Forge without lora_ext (its default data dir holds no extension)."""
    done: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in done:
            done[mode] = _generate_all(mode, [])
        return done[mode]

    return get


def test_install_from_url_into_forge_changes_no_package(installed):
    data, rc, out, before, after = installed
    assert rc == 0, out[-4000:]
    assert "INSTALLED: ['lora_ext']" in out, out[-4000:]
    assert "lora_ext:" in out and "ERROR" not in out, out[-4000:]  # install.py ran, found what it needs
    assert before == after  # Forge's stack is untouched


@pytest.mark.parametrize("mode", ["api", "ui"])
def test_forge_keeps_its_own_lora_and_we_say_so_once(installed, reference, mode):
    data = installed[0]
    models = os.path.join(os.environ["SD_WEBUI_DIR"], "models")
    ours = _generate_all(mode, ["--data-dir", str(data), "--models-dir", models])
    log, ref = ours["log"], reference(mode)
    ours_lines = [line for line in log.splitlines()
                  if "lora_ext" in line and "--data-dir" not in line and "GET /lora_ext/status" not in line]
    assert ours_lines == [FORGE_NOTICE], ours_lines  # one line, and no error or traceback of ours
    assert "activating extra network" not in log, log[-8000:]
    # Forge's own scripts print the same errors with and without lora_ext (UI mode, API calls without script args)
    assert log.count("Traceback") == ref["log"].count("Traceback"), log[-8000:]
    assert ours["status_route"] == 404  # nothing of ours is mounted on Forge yet
    images = ours["images"]
    assert images["lora"] != images["base"] and images["compvis"] != images["base"]
    assert images["te_only"] != images["base"]
    assert images == ref["images"]  # pixel for pixel what Forge's built-in gives without lora_ext
    assert 'Lora hashes: "full_lora: ' in ours["infotexts"]["lora"]  # the built-in's infotext
    assert ours["infotexts"]["lora"] == ref["infotexts"]["lora"]


def test_our_patcher_on_forges_modules_equals_its_builtin(tmp_path):
    """Issue 14's first measurement: our key map of Forge's module tree (`lora_ext.patch.forge`) and our patcher,
    applied in place on Forge's modules, give the image Forge's built-in gives for the same file and weight, restore
    bit for bit, and leave the next image equal to the base one."""
    proc = subprocess.run([os.environ["SD_WEBUI_PYTHON"], str(REPO / "tests" / "webui" / "forge_patch_probe.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=1500)
    result_file = tmp_path / "result.json"
    assert result_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result_file.read_text())
    assert res["ok"], res.get("traceback")
    assert res["arch"] == "sd1"
    for row in res["rows"]:
        assert row["applied"] == row["total"] == 200 and not row["unmatched"], row
        assert row["ours_vs_builtin"] <= 1 and row["effect"] > 0.5, row
        assert row["changed_after_restore"] == [] and row["base_again"] == 0, row
