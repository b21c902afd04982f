"""The training tab and training REST routes inside a real AUTOMATIC1111 WebUI v1.10 server (../shared/webui/README.md):
one server (UI mode, which also serves the API, with --api-auth) in a temporary --data-dir with this repository linked
as extensions/lora_ext, and a small probe extension beside it that records every `send_model_to_cpu` /
`send_model_to_device` call of the WebUI (whether the queue lock was held, the model's device) and hashes the loaded
model's weights, so the GPU hand-off can be seen from outside. On a CPU the hand-off runs the same path (the model is
moved to the CPU and back to `shared.device`, both the CPU here).

What the server goes through (fixture `flow`, once): auth refused without/with wrong credentials; weights hashed and
images made with a fixed seed (plain, and with the harness's tiny LoRA); bad training requests (4xx with detail,
nothing started); a training job on the current checkpoint (no pretrained_model) with a tiny dataset in the data dir;
then the listings, the weights and the same images again, and an image with the new LoRA.

The server is started with `start_webui.sh` and a short WAIT_S, then awaited through its log ("Startup time:", printed
after the app_started callbacks): polling the HTTP port during start-up can land between A1111's setup_middleware and
create_api, and starlette then refuses the API's middleware ("Cannot add middleware after an application has started").
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.webui.test_install import _free_port

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
AUTH = ("trainer", "s3cret")
NEW = "trained_here"
REF_LORA = "tiny_lora"  # the harness's random LoRA, copied into the server's LoRA folder
GEN = {"steps": 3, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7}
TRAIN = {"train_data_dir": "datasets/cats", "output_name": NEW, "resolution": 64, "min_bucket_reso": 64,
         "max_train_steps": 6, "learning_rate": 1e-2, "network_dim": 4, "preview": False, "seed": 3}

PROBE = textwrap.dedent('''
    """Test probe (tests/webui/test_training.py): records the WebUI's model moves; hashes the loaded weights."""
    import hashlib

    from modules import call_queue, script_callbacks, sd_models, shared

    EVENTS = []


    def _device(m):
        return str(next(m.parameters()).device)


    def _wrap(name):
        original = getattr(sd_models, name)
        if getattr(original, "_probe", False):
            return

        def moved(m, *args, **kwargs):
            row = {"call": name, "lock_held": call_queue.queue_lock._lock.locked(),
                   "is_loaded_model": m is sd_models.model_data.sd_model, "device_before": _device(m)}
            EVENTS.append(row)
            result = original(m, *args, **kwargs)
            row["device_after"] = _device(m)
            return result

        moved._probe = True
        setattr(sd_models, name, moved)


    _wrap("send_model_to_cpu")
    _wrap("send_model_to_device")


    def _weights():
        with call_queue.queue_lock:
            model = sd_models.model_data.sd_model
            h = hashlib.sha256()
            for key, value in sorted(model.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            return {"sha256": h.hexdigest(), "device": _device(model), "shared_device": str(shared.device)}


    def _routes(demo, app):
        app.add_api_route("/lora_ext_probe/events", lambda: EVENTS, methods=["GET"])
        app.add_api_route("/lora_ext_probe/weights", _weights, methods=["GET"])


    script_callbacks.on_app_started(_routes)
''')


# ------------------------------------------------------------------------------------------------------- server


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.lora = root / "Lora"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{self.port}.log")
        self.start_script = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")

    def start(self) -> None:
        (self.data / "extensions").mkdir(parents=True)
        (self.data / "extensions" / "lora_ext").symlink_to(REPO, target_is_directory=True)
        probe = self.data / "extensions" / "lora_ext_probe" / "scripts"
        probe.mkdir(parents=True)
        (probe / "lora_ext_probe.py").write_text(PROBE)
        self.lora.mkdir()
        shutil.copy(Path(os.environ["SD_WEBUI_DIR"], "models", "Lora", f"{REF_LORA}.safetensors"), self.lora)
        from tests.train.test_loop_train import write_images

        write_images(self.data / "datasets" / "cats", 2)
        # the WebUI runs each extension's install.py at start; the harness starts it with --skip-prepare-environment,
        # so run ours as the WebUI would (it adds diffusers, which the training child process imports)
        subprocess.run([os.environ.get("SD_WEBUI_PYTHON", sys.executable), str(REPO / "install.py")], check=True,
                       cwd=os.environ["SD_WEBUI_DIR"], timeout=900)
        models = os.path.join(os.environ["SD_WEBUI_DIR"], "models")
        subprocess.run(["bash", self.start_script, "ui", self.port, "--data-dir", str(self.data), "--models-dir",
                        models, "--lora-dir", str(self.lora), "--api-auth", f"{AUTH[0]}:{AUTH[1]}"], check=True,
                       timeout=120, env={**os.environ, "WAIT_S": "1"})
        deadline = time.time() + 600
        while "Startup time:" not in self._log_text():
            pid = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{self.port}.pid")
            if time.time() > deadline or not pid.exists() or not Path(f"/proc/{pid.read_text().strip()}").exists():
                raise RuntimeError(f"the WebUI did not start:\n{self._log_text()[-5000:]}")
            time.sleep(1)

    def stop(self) -> None:
        subprocess.run(["bash", self.start_script, "stop", self.port], timeout=120)

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def call(self, method: str, path: str, payload: dict | None = None, auth: tuple[str, str] | None = AUTH):
        """(status, JSON body) of a request; 4xx/5xx answers are returned, not raised."""
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=None if payload is None else json.dumps(payload).encode())
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, body.decode(errors="replace")

    def get(self, path: str, **kw):
        status, body = self.call("GET", path, **kw)
        assert status == 200, (path, status, body)
        return body

    def txt2img(self, prompt: str):
        import numpy as np
        from PIL import Image

        status, body = self.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, **GEN})
        assert status == 200, (prompt, status, body)
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        return np.asarray(image).astype(np.int16), json.loads(body["info"])["infotexts"][0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.environ.get("SD_WEBUI_DIR"):
        pytest.skip("SD_WEBUI_DIR not set")
    srv = Server(tmp_path_factory.mktemp("training-webui"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def flow(server):
    """Everything the API tests assert on, in the order a user would do it (see the module docstring)."""
    import numpy as np

    s, out = server, {}
    out["unauthenticated"] = [s.call("GET", "/lora_ext/jobs", auth=None)[0],
                              s.call("GET", "/lora_ext/jobs", auth=(AUTH[0], "wrong"))[0],
                              s.call("POST", "/lora_ext/train", TRAIN, auth=None)[0],
                              s.call("GET", "/lora_ext/runs", auth=None)[0]]
    out["jobs_after_unauthenticated"] = s.get("/lora_ext/jobs")["jobs"]

    out["weights_before"] = s.get("/lora_ext_probe/weights")
    base_before, _ = s.txt2img("a photo of sks")
    ref_before, ref_info = s.txt2img(f"a photo of sks <lora:{REF_LORA}:1>")
    out["ref_effect"] = float(np.abs(ref_before - base_before).mean())
    out["ref_infotext"] = ref_info
    out["weights_after_generating"] = s.get("/lora_ext_probe/weights")
    out["events_before"] = len(s.get("/lora_ext_probe/events"))

    outside = s.root / "outside"
    from tests.train.test_loop_train import write_images

    write_images(outside, 1)
    bad = {"path outside the roots": ({**TRAIN, "train_data_dir": str(outside)}, 403),
           "climbing out": ({**TRAIN, "train_data_dir": "datasets/../../outside"}, 403),
           "model outside the roots": ({**TRAIN, "pretrained_model": str(outside / "img0.png")}, 403),
           "output name a/b": ({**TRAIN, "output_name": "a/b"}, 400),
           "rank 0": ({**TRAIN, "network_dim": 0}, 400),
           "output_dir set": ({**TRAIN, "output_dir": "/tmp"}, 400)}
    out["bad"] = {label: {"expected": expected, "got": s.call("POST", "/lora_ext/train", values)}
                  for label, (values, expected) in bad.items()}
    out["jobs_after_bad"] = s.get("/lora_ext/jobs")["jobs"]
    out["runs_dir_after_bad"] = (s.root / "lora_ext_runs").exists()

    status, job = s.call("POST", "/lora_ext/train", TRAIN)
    out["start"] = (status, job)
    assert status == 201, job
    seen_states = []
    deadline = time.time() + 600
    while True:
        view = s.get(f"/lora_ext/jobs/{job['id']}")
        seen_states.append(view["state"])
        if view["state"] not in ("queued", "running") or time.time() > deadline:
            break
        time.sleep(0.5)
    out["job"], out["seen_states"] = view, seen_states
    # the listing right after "finished", and how long it took the new file to appear (no refresh, no restart)
    t0, listed, polls = time.time(), {}, []
    while time.time() - t0 < 10:
        listed = {"lora_ext": [r["name"] for r in s.get("/lora_ext/loras")],
                  "sdapi": [r["name"] for r in s.get("/sdapi/v1/loras")]}
        polls.append((round(time.time() - t0, 3), NEW in listed["lora_ext"], NEW in listed["sdapi"]))
        if NEW in listed["lora_ext"] and NEW in listed["sdapi"]:
            break
        time.sleep(0.2)
    out["listed"], out["listed_after_s"], out["polls"] = listed, time.time() - t0, polls

    out["events"] = s.get("/lora_ext_probe/events")[out["events_before"]:]
    out["weights_after_training"] = s.get("/lora_ext_probe/weights")
    base_after, _ = s.txt2img("a photo of sks")
    ref_after, _ = s.txt2img(f"a photo of sks <lora:{REF_LORA}:1>")
    new_img, new_info = s.txt2img(f"a photo of sks <lora:{NEW}:1>")
    out["base_diff"] = int(np.abs(base_after - base_before).max())
    out["ref_diff"] = int(np.abs(ref_after - ref_before).max())
    out["new_effect"] = {"max": int(np.abs(new_img - base_after).max()),
                         "mean": float(np.abs(new_img - base_after).mean())}
    out["new_infotext"] = new_info
    out["weights_at_end"] = s.get("/lora_ext_probe/weights")
    out["log"] = s._log_text()
    return out


# -------------------------------------------------------------------------------------------------------- tests


def test_training_tab_loads_in_ui_mode(server):
    config = server.get("/config", auth=None)
    components = config["components"]
    ids = {c["props"].get("elem_id") for c in components}
    tabs = [c["props"].get("label") for c in components if c.get("type") == "tabitem"]
    assert "LoRA Training" in tabs, tabs
    for elem in ("tab_lora_ext_training", "lora_ext_train_button", "lora_ext_pretrained_model",
                 "lora_ext_train_data_dir", "lora_ext_output_name", "lora_ext_progress", "lora_ext_send_button"):
        assert elem in ids, elem
    # the current checkpoint is the default base model
    model = next(c for c in components if c["props"].get("elem_id") == "lora_ext_pretrained_model")
    assert model["props"]["value"] == "(current WebUI checkpoint)", model["props"]
    _screenshot(server)


def _screenshot(server: Server) -> None:
    """The tab in a real browser (when chromium and Playwright are there): visible, with its Train button."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(server.url + "/", wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
            page.locator("#tabs > .tab-nav button", has_text="LoRA Training").click(timeout=60_000)
            button = page.locator("#lora_ext_train_button")
            button.wait_for(state="visible", timeout=60_000)
            assert page.locator("#lora_ext_pretrained_model").is_visible()
            page.screenshot(path=str(SCREENSHOTS / "webui_training_tab.png"), full_page=True)
        finally:
            browser.close()


def test_api_auth_guards_the_training_routes(flow):
    assert flow["unauthenticated"] == [401, 401, 401, 401]
    assert flow["jobs_after_unauthenticated"] == []


def test_bad_input_gets_4xx_with_detail_and_starts_nothing(flow):
    for label, row in flow["bad"].items():
        status, body = row["got"]
        assert status == row["expected"], (label, status, body)
        assert isinstance(body, dict) and body.get("detail"), (label, body)
    assert "outside the folders" in flow["bad"]["path outside the roots"]["got"][1]["detail"]
    assert flow["bad"]["output name a/b"]["got"][1]["field"] == "output_name"
    assert flow["bad"]["rank 0"]["got"][1]["field"] == "network_dim"
    assert flow["jobs_after_bad"] == [] and flow["runs_dir_after_bad"] is False


def test_a_job_runs_on_the_current_checkpoint_and_lands_in_the_lora_folder(flow, server):
    status, started = flow["start"]
    assert status == 201 and started["state"] in ("queued", "running")
    job = flow["job"]
    assert (job["state"], job["step"], job["total_steps"]) == ("finished", 6, 6), job
    out = server.lora / f"{NEW}.safetensors"
    assert Path(job["output"]) == out and out.is_file() and out.with_suffix(".json").is_file()
    from lora_ext.formats.safetensors_io import read_metadata

    ckpt = os.path.basename(os.environ["SD_WEBUI_CKPT"])  # trained on the loaded checkpoint (no pretrained_model given)
    assert read_metadata(out)["ss_sd_model_name"] == ckpt
    assert ckpt in json.loads(out.with_suffix(".json").read_text())["description"]
    assert job["warnings"] == [] and job["error"] is None


def test_model_is_handed_off_and_comes_back_unchanged(flow):
    before, after = flow["weights_before"], flow["weights_after_training"]
    assert flow["weights_after_generating"]["sha256"] == before["sha256"]  # LoRA weights restored after generating
    assert after["sha256"] == before["sha256"] and flow["weights_at_end"]["sha256"] == before["sha256"]
    assert after["device"] == after["shared_device"]  # back on the WebUI's device
    moves = [(e["call"], e["lock_held"], e["is_loaded_model"]) for e in flow["events"]]
    assert moves == [("send_model_to_cpu", True, True), ("send_model_to_device", True, True)], flow["events"]
    assert flow["events"][0]["device_after"] == "cpu"
    assert flow["events"][1]["device_after"] == after["shared_device"]
    # the same seed gives the same pixels after the job: the plain model and a LoRA merged by lora_ext
    assert flow["ref_effect"] > 0.5 and f"Lora hashes: \"{REF_LORA}: " in flow["ref_infotext"]
    assert flow["base_diff"] == 0 and flow["ref_diff"] == 0


def test_new_lora_is_listed_at_once_and_usable(flow):
    assert NEW in flow["listed"]["lora_ext"] and NEW in flow["listed"]["sdapi"], flow["listed"]
    assert flow["polls"][0][1:] == (True, True), flow["polls"]  # listed when the job says "finished"
    assert f"Lora hashes: \"{NEW}: " in flow["new_infotext"], flow["new_infotext"]
    assert flow["new_effect"]["max"] > 0 and flow["new_effect"]["mean"] > 0.5, flow["new_effect"]
