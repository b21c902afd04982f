"""Install from a URL through the WebUI's own installer (Extensions > Install from URL: git clone + install.py), start
the WebUI as a server, and check over HTTP that our network owns the tag and applies it.

The URL is this repository (its committed HEAD: commit before running). Everything happens in a temporary
`--data-dir`, so the shared harness keeps no trace of it."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import textwrap
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

INSTALL = textwrap.dedent("""
    import os, sys
    webui, data, url = sys.argv[1:4]
    os.chdir(webui); sys.path.insert(0, webui)
    sys.argv = ["launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
                "--data-dir", data]
    from modules import shared_init
    shared_init.initialize()
    from modules import extensions, ui_extensions
    extensions.list_extensions()
    _, msg = ui_extensions.install_extension_from_url(None, url, None)
    print("INSTALL-MESSAGE:", msg)
    extensions.list_extensions()
    print("INSTALLED:", [e.name for e in extensions.extensions if not e.is_builtin])
""")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _call(url: str, path: str, payload: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=None if payload is None else json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A data dir whose extensions/lora_ext was installed by the WebUI's own installer; (data dir, its output)."""
    if not os.environ.get("SD_WEBUI_DIR"):
        pytest.skip("SD_WEBUI_DIR not set")
    tmp_path = tmp_path_factory.mktemp("install")
    webui = os.environ["SD_WEBUI_DIR"]
    py = os.environ["SD_WEBUI_PYTHON"]
    data = tmp_path / "data"
    (data / "extensions").mkdir(parents=True)
    script = tmp_path / "install.py"
    script.write_text(INSTALL)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lora_ext").symlink_to(REPO, target_is_directory=True)  # the URL's last part names the folder
    proc = subprocess.run([py, str(script), webui, str(data), f"file://{tmp_path}/src/lora_ext"], capture_output=True,
                          text=True, timeout=900)
    return data, proc.returncode, proc.stdout + proc.stderr


def test_install_from_url_runs_install_py(installed):
    data, rc, out = installed
    assert rc == 0, out[-4000:]
    assert "INSTALLED: ['lora_ext']" in out, out[-4000:]
    assert "lora_ext:" in out, out[-4000:]  # install.py ran and said what it did
    assert (data / "extensions" / "lora_ext" / "scripts" / "lora_ext_glue.py").exists()
    # the second run of install.py (the WebUI runs it at every start) installs nothing and is quick
    again = subprocess.run([os.environ["SD_WEBUI_PYTHON"], "install.py"], cwd=data / "extensions" / "lora_ext",
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.environ["SD_WEBUI_DIR"]})
    assert again.returncode == 0 and "nothing installed" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("mode", ["api", "ui"])
def test_installed_extension_owns_the_tag(installed, mode):
    data, rc, out = installed
    assert rc == 0, out[-4000:]
    webui = os.environ["SD_WEBUI_DIR"]
    port = _free_port()
    start = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")
    models = os.path.join(webui, "models")
    subprocess.run(["bash", start, mode, port, "--data-dir", str(data), "--models-dir", models], check=True,
                   timeout=600)
    try:
        url = f"http://127.0.0.1:{port}"
        if mode == "ui":  # the gradio page is served, with the built-in's Lora cards page still there
            with urllib.request.urlopen(url + "/", timeout=120) as r:
                assert r.status == 200
        status = _call(url, "/lora_ext/status")
        assert status["handles_tags"] is True and status["owner"].startswith("lora_ext"), status
        base = _call(url, "/sdapi/v1/txt2img", {"prompt": "a photo of a cat", "steps": 3, "width": 64, "height": 64,
                                                "seed": 1234, "sampler_name": "Euler"})
        with_lora = _call(url, "/sdapi/v1/txt2img", {"prompt": "a photo of a cat <lora:tiny_lora:0.8>", "steps": 3,
                                                     "width": 64, "height": 64, "seed": 1234,
                                                     "sampler_name": "Euler"})
        info = json.loads(with_lora["info"])
        assert 'Lora hashes: "tiny_lora: 60a6da50f3eb"' in info["infotexts"][0], info["infotexts"][0]
        assert base["images"][0] != with_lora["images"][0]
        from PIL import Image

        Image.open(io.BytesIO(base64.b64decode(with_lora["images"][0]))).load()  # a decodable PNG
        assert _call(url, "/lora_ext/status")["active"] == []  # restored after the generation
        log = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{port}.log").read_text()
        assert "tags are handled by lora_ext" in log
    finally:
        subprocess.run(["bash", start, "stop", port], timeout=120)


@pytest.fixture(autouse=True)
def _needs_webui():
    if not os.environ.get("SD_WEBUI_DIR"):
        pytest.skip("SD_WEBUI_DIR not set")
