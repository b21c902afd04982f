"""Stable Diffusion WebUI Forge (a harness built with `HOST=forge`, SD_WEBUI_HOST=forge): lora_ext installed from its
URL through Forge's own installer owns `<lora:...>` (and `<lyco:...>`, which Forge lacks) and gives the images Forge's
built-in gives for every file both read, formats the built-in cannot read, and the base image back after every
generation.

The reference is the same Forge without lora_ext (its default data dir holds no extension): same checkpoint, seeds,
prompts. Images are compared as pixels (max difference <= 1 level: both merge in fp32 and round once to the weight's
dtype, in a different order of additions)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.webui.test_install import _call, _free_port

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
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
CAT = "a photo of a cat"
# generated in both Forges (ours must equal the built-in's), in this order: the last one checks the restore
SHARED = {"base": CAT, "lora": f"{CAT} <lora:full_lora:0.8>", "compvis": f"{CAT} <lora:full_lora_compvis:0.8>",
          "te_only": f"{CAT} <lora:full_lora:0.8:0>", "unet_only": f"{CAT} <lora:full_lora:0:0.8>",
          "multi": f"{CAT} <lora:full_lora:0.5> <lora:full_lora_compvis:-0.3>",
          "loha": f"{CAT} <lora:full_loha:0.8>", "lokr": f"{CAT} <lora:full_lokr:0.8>",
          "hires": f"{CAT} <lora:full_lora:0.8>", "base_again": CAT}
# only with lora_ext: Forge has no `lyco` tag, and its built-in skips diffusers/PEFT-named files ("version mismatch")
SKS = "a photo of sks"
LBW_BASE = ",".join(["1"] + ["0"] * 16)  # lora-block-weight's 17-value SD1 layout: the text encoder only
OURS_ONLY = {"lyco": f"{CAT} <lyco:full_lora:0.8>", "peft": f"{CAT} <lora:full_lora_peft:0.8>",
             "lbw_base": f"{CAT} <lora:full_lora:0.8:lbw={LBW_BASE}>", "dyn_full": f"{CAT} <lora:full_lora:0.8:dyn=4>",
             "late_unet": f"{CAT} <lora:full_lora:0.8:start=1>", "missing": f"{CAT} <lora:no_such_lora:1>",
             # full_lora_emb: full_lora + a bundled embedding "sks"; sksemb: the same vector as an embedding file
             "sks_plain": SKS, "bundled": f"{SKS} <lora:full_lora_emb:0.8>",
             "ti_file": f"{SKS}emb <lora:full_lora:0.8>", "sks_again": SKS,
             # a generation that fails after its first pass sampled with the LoRA (Forge's API needs
             # hr_additional_modules for hires), then the base image again: restored after the failure
             "fail": f"{CAT} <lora:full_lora:0.8>", "base_last": CAT}
OWN = "lora_ext_handle_lora_tags"
# then the setting hands the tag to Forge's built-in, which applies a LoRA, and takes it back while that LoRA is merged
HAND_BACK = [("options_off", {OWN: False}), ("back_lora", f"{CAT} <lora:full_lora:0.8>"), ("options_on", {OWN: True}),
             ("again_base", CAT), ("again_lora", f"{CAT} <lora:full_lora:0.8>")]
# Forge's API needs hr_additional_modules (None fails in processing.py) and its hires CFG defaults to 1
HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6,
         "hr_second_pass_steps": 1, "hr_additional_modules": ["Use same choices"], "hr_cfg": 7}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def _diff(a: str, b: str) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def _generate_all(mode: str, extra: list[str], prompts: dict[str, str], then: list[tuple[str, object]] = ()) -> dict:
    """Start Forge (`mode`), generate every prompt, then the steps of `then` ((key, prompt) or ("options...", {...})),
    stop; {images, infotexts, log, log_at (key -> length of the log when its step started), status_route}."""
    port = _free_port()
    start = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")
    subprocess.run(["bash", start, mode, port, *extra], check=True, timeout=900, env={**os.environ, "WAIT_S": "600"})
    try:
        url = f"http://127.0.0.1:{port}"
        if mode == "ui":
            with urllib.request.urlopen(url + "/", timeout=300) as r:
                assert r.status == 200
        log_file = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{port}.log")
        images, infotexts, log_at = {}, {}, {}
        for key, prompt in [*prompts.items(), *then]:
            log_at[key] = len(log_file.read_text(errors="replace"))
            if key.startswith("options"):
                _call(url, "/sdapi/v1/options", prompt)
                continue
            payload = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 1234,
                       "sampler_name": "Euler", "cfg_scale": 7, **(HIRES if key == "hires" else {})}
            if key == "fail":
                payload.update({k: v for k, v in HIRES.items() if k != "hr_additional_modules"})
                try:
                    _call(url, "/sdapi/v1/txt2img", payload)
                    images[key] = "no error"
                except urllib.error.HTTPError as err:
                    images[key] = f"HTTP {err.code}"
                continue
            out = _call(url, "/sdapi/v1/txt2img", payload)
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
    return {"images": images, "infotexts": infotexts, "log": log, "log_at": log_at, "status_route": status_route}


def _lycoris_files(lora: Path, folder: Path) -> None:
    """LoHa and LoKr files (LyCORIS key layouts, which Forge's built-in reads too) on the same 200 layers as `lora`:
    `full_loha` (hada_w1_a/b, hada_w2_a/b, rank 4) and `full_lokr` (lokr_w1 2x2, lokr_w2_a/b rank 4)."""
    import safetensors.torch
    import torch
    from safetensors import safe_open

    g = torch.Generator().manual_seed(11)
    with safe_open(str(lora), "pt") as f:
        shapes = {k.removesuffix(".lora_down.weight"): (f.get_slice(k.replace("lora_down", "lora_up")).get_shape()[0],
                                                        f.get_slice(k).get_shape()[1])
                  for k in f.keys() if k.endswith(".lora_down.weight")}  # noqa: SIM118
    loha, lokr = {}, {}
    for name, (out_f, in_f) in shapes.items():
        def rnd(*shape: int, std: float) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * std
        loha.update({f"{name}.hada_w1_a": rnd(out_f, 4, std=0.22), f"{name}.hada_w1_b": rnd(4, in_f, std=0.22),
                     f"{name}.hada_w2_a": rnd(out_f, 4, std=0.22), f"{name}.hada_w2_b": rnd(4, in_f, std=0.22),
                     f"{name}.alpha": torch.tensor(4.0)})
        lokr.update({f"{name}.lokr_w1": rnd(2, 2, std=1.0), f"{name}.lokr_w2_a": rnd(out_f // 2, 4, std=0.09),
                     f"{name}.lokr_w2_b": rnd(4, in_f // 2, std=0.09), f"{name}.alpha": torch.tensor(4.0)})
    safetensors.torch.save_file(loha, str(folder / "full_loha.safetensors"))
    safetensors.torch.save_file(lokr, str(folder / "full_lokr.safetensors"))


def _bundle_embedding(lora: Path, out: Path, embedding_file: Path) -> None:
    """`lora` plus a bundled textual inversion "sks" (A1111's `bundle_emb.<name>.string_to_param.*` layout) as `out`,
    and the same vector as a plain embedding file (Forge's own loader reads it) named "sksemb"."""
    import safetensors.torch
    import torch
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(7)) * 0.05
    safetensors.torch.save_file({**tensors, "bundle_emb.sks.string_to_param.*": vector}, str(out), metadata=metadata)
    embedding_file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"emb_params": vector}, str(embedding_file))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A data dir whose extensions/lora_ext was installed by Forge's own installer, and a models dir with the
    harness' checkpoint and LoRAs plus `full_lora` converted to diffusers/PEFT names by lora_ext's `convert`;
    (data, models, rc, output, versions before, versions after)."""
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
    harness_models = Path(os.environ["SD_WEBUI_DIR"], "models")
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "Stable-diffusion").symlink_to(harness_models / "Stable-diffusion", target_is_directory=True)
    (models / "VAE").mkdir()
    for f in (harness_models / "Lora").glob("*.safetensors"):
        (models / "Lora" / f.name).symlink_to(f)
    _bundle_embedding(harness_models / "Lora" / "full_lora.safetensors", models / "Lora" / "full_lora_emb.safetensors",
                      data / "embeddings" / "sksemb.safetensors")
    _lycoris_files(harness_models / "Lora" / "full_lora.safetensors", models / "Lora")
    subprocess.run([sys.executable, "-m", "lora_ext", "convert", str(harness_models / "Lora" / "full_lora.safetensors"),
                    "--to", "diffusers", "--out", str(models / "Lora" / "full_lora_peft.safetensors")],
                   check=True, cwd=REPO, capture_output=True, timeout=600)
    return data, models, proc.returncode, proc.stdout + proc.stderr, before, after


@pytest.fixture(scope="module")
def reference(installed):
    """reference(mode): the SHARED generations in Forge without lora_ext (its default data dir holds no extension),
    on the same models dir."""
    done: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in done:
            done[mode] = _generate_all(mode, ["--models-dir", str(installed[1])], SHARED)
        return done[mode]

    return get


def test_install_from_url_into_forge_changes_no_package(installed):
    data, _, rc, out, before, after = installed
    assert rc == 0, out[-4000:]
    assert "INSTALLED: ['lora_ext']" in out, out[-4000:]
    assert "lora_ext:" in out and "ERROR" not in out, out[-4000:]  # install.py ran, found what it needs
    assert before == after  # Forge's stack is untouched


@pytest.mark.parametrize("mode", ["api", "ui"])
def test_lora_ext_owns_the_tag_in_forge_and_gives_the_builtins_images(installed, reference, mode):
    data, models = installed[:2]
    ours = _generate_all(mode, ["--data-dir", str(data), "--models-dir", str(models)], {**SHARED, **OURS_ONLY},
                         HAND_BACK)
    ref = reference(mode)
    log = ours["log"][:ours["log_at"]["options_off"]]  # until the tag is handed back
    assert "lora_ext: <lora:...> and <lyco:...> tags are handled by lora_ext" in log, log[-6000:]
    assert "[LORA] Loaded" not in log and "activating extra network" not in log, log[-8000:]  # the built-in never ran
    # no traceback until the generation made to fail on purpose, except Forge's own scripts failing on script
    # arguments missing from an API call (UI mode: they print these with and without lora_ext when the first request
    # comes before the UI's default script arguments exist; seen in either run, depending on timing)
    before_fail = ours["log"][:ours["log_at"]["fail"]]
    assert _unexplained_tracebacks(before_fail) == 0 == _unexplained_tracebacks(ref["log"]), before_fail[-8000:]
    assert ours["status_route"] == 200  # our REST routes are mounted
    img, ref_img = ours["images"], ref["images"]
    report = {k: _diff(img[k], ref_img[k]) for k in SHARED}
    assert all(d <= 1 for d in report.values()), report  # the built-in's images
    for key in ("lora", "compvis", "te_only", "unet_only", "multi", "loha", "lokr"):
        assert _diff(img[key], img["base"]) > 8, key  # each LoRA image is a LoRA image
    assert img["base_again"] == img["base"] == img["base_last"]  # weights restored after every generation
    assert _diff(img["lyco"], img["lora"]) == 0  # same pixels (the PNG's infotext has the prompt as typed)
    assert _diff(img["peft"], img["lora"]) <= 1  # a file Forge's built-in skips (image = base with it)
    assert _diff(img["lbw_base"], img["te_only"]) == 0 and _diff(img["dyn_full"], img["lora"]) == 0
    assert _diff(img["late_unet"], img["lora"]) > 0 and _diff(img["late_unet"], img["te_only"]) > 0  # start=1
    assert _diff(img["missing"], img["base"]) == 0 and "no_such_lora" in log  # said in the console
    # the bundled embedding is the same vector Forge's own loader reads from an embedding file, gone afterwards
    assert _diff(img["bundled"], img["ti_file"]) <= 1 and _diff(img["bundled"], img["lora"]) > 0
    assert _diff(img["sks_again"], img["sks_plain"]) == 0
    assert img["fail"] == "HTTP 500"  # and base_last == base above: the failed generation's LoRA was restored
    # handed back: Forge's built-in applies its LoRA on the weights we restored (its image, bit for bit); taken back
    # while that LoRA is merged: its weights are restored before ours apply
    back = ours["log"][ours["log_at"]["options_off"]:ours["log_at"]["options_on"]]
    assert "tags are handled by extra_networks_lora" in back and "[LORA] Loaded" in back, back[-4000:]
    assert "tags are handled by lora_ext" in ours["log"][ours["log_at"]["options_on"]:ours["log_at"]["again_base"]]
    assert _diff(img["back_lora"], ref_img["lora"]) == 0
    assert img["again_base"] == img["base"]
    assert _diff(img["again_lora"], img["lora"]) == 0
    for key in ("lora", "multi", "hires"):
        ours_hashes = re.findall(r'Lora hashes: "[^"]*"', ours["infotexts"][key])
        assert ours_hashes and ours_hashes == re.findall(r'Lora hashes: "[^"]*"', ref["infotexts"][key]), \
            (ours["infotexts"][key], ref["infotexts"][key])


def _checkpoints_writable(tmp_path: Path, models: Path) -> Path:
    """A models dir whose Stable-diffusion folder the probe may write into (it holds a link to the harness checkpoint),
    with the LoRAs of `models`."""
    own = tmp_path / "models"
    (own / "Stable-diffusion").mkdir(parents=True)
    (own / "Lora").symlink_to(models / "Lora", target_is_directory=True)
    ckpt = Path(os.environ["SD_WEBUI_CKPT"])
    (own / "Stable-diffusion" / ckpt.name).symlink_to(ckpt)
    return own


def _unexplained_tracebacks(log: str) -> int:
    """Tracebacks in a Forge log other than its built-in scripts' "ValueError: not enough values to unpack" (their
    script arguments missing from an API call)."""
    return log.count("Traceback") - log.count("ValueError: not enough values to unpack")


def _probe(script: str, tmp_path: Path, *args: object, timeout: int = 1800, env: dict | None = None) -> dict:
    """Run tests/webui/SCRIPT with Forge's Python (an in-process Forge, see forge_inprocess.py), `env` added to the
    environment; its result.json."""
    proc = subprocess.run([os.environ["SD_WEBUI_PYTHON"], str(REPO / "tests" / "webui" / script), str(tmp_path),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    result_file = tmp_path / "result.json"
    assert result_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result_file.read_text())
    assert res["ok"], res.get("traceback")
    return res


def test_our_patcher_on_forges_modules_equals_its_builtin(tmp_path):
    """Issue 14's first measurement: our key map of Forge's module tree (`lora_ext.patch.forge`) and our patcher,
    applied in place on Forge's modules, give the image Forge's built-in gives for the same file and weight, restore
    bit for bit, and leave the next image equal to the base one."""
    res = _probe("forge_patch_probe.py", tmp_path, timeout=1500)
    assert res["arch"] == "sd1"
    for row in res["rows"]:
        assert row["applied"] == row["total"] == 200 and not row["unmatched"], row
        assert row["ours_vs_builtin"] <= 1 and row["effect"] > 0.5, row
        assert row["changed_after_restore"] == [] and row["base_again"] == 0, row


def _req(url: str, method: str, path: str, payload: dict | None = None) -> tuple[int, object]:
    req = urllib.request.Request(url + path, method=method, headers={"Content-Type": "application/json"},
                                 data=None if payload is None else json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _browser_tabs(url: str) -> dict:
    """Forge's page in chromium: the "LoRA Training" tab with its Train and Tools tabs (screenshots kept)."""
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import chromium_path

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/", wait_until="domcontentloaded", timeout=180_000)
            page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
            page.locator("button", has_text="LoRA Training").first.click(timeout=60_000)
            page.locator("#lora_ext_train_button").wait_for(state="visible", timeout=60_000)
            seen["model"] = page.locator("#lora_ext_pretrained_model").is_visible()
            # before the first generation Forge has loaded no model: the checkpoint selected in its UI is the base
            seen["tab_text"] = page.locator("#tab_lora_ext_training").inner_text(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "forge_training_tab.png"), full_page=True)
            page.locator("#lora_ext_tab_tools-button, button", has_text="Tools").first.click(timeout=60_000)
            page.wait_for_timeout(1500)
            seen["tools_text"] = page.locator("#lora_ext_tab_tools").inner_text(timeout=60_000)[:2000]
            page.screenshot(path=str(SCREENSHOTS / "forge_tools_tab.png"), full_page=True)
            # Forge's own: ui_extra_networks.py passes a function's name as _js, which gradio 4 cannot find
            seen["page_errors"] = [e for e in errors if "setupAllResizeHandles is not defined" not in e]
        finally:
            browser.close()
    return seen


def test_tab_tools_and_training_in_forges_ui(installed):
    """Forge's UI (gradio 4.40) in a real browser shows the training tab and the tools; a training job started through
    the REST route on Forge's own checkpoint hands the model off through Forge's memory manager, finishes, and its
    LoRA works in the next generation while the base image stays the same."""
    import numpy as np

    from tests.train.test_loop_train import write_images

    data, models = installed[:2]
    write_images(data / "datasets" / "cats", 4)
    port = _free_port()
    start = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")
    subprocess.run(["bash", start, "ui", port, "--data-dir", str(data), "--models-dir", str(models)], check=True,
                   timeout=900, env={**os.environ, "WAIT_S": "600"})
    url = f"http://127.0.0.1:{port}"
    gen = {"steps": 2, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7}
    try:
        seen = _browser_tabs(url)
        base = _call(url, "/sdapi/v1/txt2img", {"prompt": "a photo of sks", **gen})["images"][0]
        status, job = _req(url, "POST", "/lora_ext/train", {
            "train_data_dir": "datasets/cats", "output_name": "forge_trained", "resolution": 64,
            "min_bucket_reso": 64, "max_train_steps": 2, "learning_rate": 1e-2, "network_dim": 4, "preview": False,
            "seed": 3})
        assert status == 201, job
        deadline, view = time.time() + 1500, {}
        while time.time() < deadline:
            _, view = _req(url, "GET", f"/lora_ext/jobs/{job['id']}")
            if view["state"] not in ("queued", "running"):
                break
            time.sleep(2)
        base_after = _call(url, "/sdapi/v1/txt2img", {"prompt": "a photo of sks", **gen})["images"][0]
        trained = _call(url, "/sdapi/v1/txt2img", {"prompt": "a photo of sks <lora:forge_trained:1>", **gen})
    finally:
        subprocess.run(["bash", start, "stop", port], timeout=300)
    log = Path(os.environ["HARNESS_DIR"], "logs", f"webui-{port}.log").read_text(errors="replace")
    assert seen["model"] and not seen["page_errors"], seen
    assert "choose a base model" not in seen["tab_text"], seen["tab_text"][:3000]
    for word in ("Merge into checkpoint", "Merge LoRAs", "Resize", "Extract", "Convert"):
        assert word.lower() in seen["tools_text"].lower(), seen["tools_text"]
    assert view.get("state") == "finished", (view, log[-6000:])
    assert (models / "Lora" / "forge_trained.safetensors").exists()
    assert _diff(base_after, base) == 0  # the model Forge reloads after the job is the same model
    assert np.abs(_pixels(trained["images"][0]) - _pixels(base)).max() > 0
    assert 'Lora hashes: "forge_trained: ' in json.loads(trained["info"])["infotexts"][0]
    assert "lora_ext" not in "".join(line for line in log.splitlines() if "Error" in line or "Traceback" in line)


def test_each_image_of_a_batch_gets_its_own_loras_in_forge(installed, tmp_path):
    """Per-image LoRAs on Forge (its chunked UNet batches, its token-level text encoders): in-process Forge with
    lora_ext loaded by Forge's script loader; each image of a 4-image batch (no LoRA, one, two at other weights)
    equals the same prompt generated alone, plain, with an AND-part in every prompt and with hires fix; with the
    setting off, the first prompt's LoRAs go to every image as with Forge's built-in."""
    data, models = installed[:2]
    res = _probe("forge_batch_probe.py", tmp_path, data, models, timeout=1800)
    assert res["owner"].endswith("glue"), res["owner"]
    assert set(res["rows"]) == {"plain", "and", "hires"}
    for kind, row in res["rows"].items():
        assert all(d <= 1 for d in row["batch_vs_solo"]), (kind, row)
        assert all(e > 1 for e in row["effect"][1:]), (kind, row)  # each LoRA prompt differs from the plain one
        assert max(row["off_vs_solo"][1:]) > 8, (kind, row)  # the built-in's way: other images lose their LoRAs
        assert row["base_again"] == 0, (kind, row)
        # the marks are gone: each image's infotext prompt is what Forge writes without per-image LoRAs
        assert row["infotext_prompts"] == row["infotext_prompts_off"], (kind, row)
        assert not any(t.startswith(" ") for t in row["infotext_prompts"]), (kind, row)


def test_our_key_map_of_forges_trees_is_forges_own_sd1_sd2_sdxl(tmp_path):
    """Forge's module classes in tiny SD1, SD2 and SDXL shapes: every LoRA key Forge's built-in maps to a weight (kohya,
    compvis, diffusers and LyCORIS names) that ours maps too goes to the same weight, and every kohya key Forge maps
    ours maps, except two SDXL aliases Forge inherits from ComfyUI that A1111 (our reference) does not read:
    `lora_te_*` for SDXL's first encoder (kohya writes `lora_te1_*`) and `lora_unet_class_embedding_*` for its
    `label_emb` (diffusers calls it `add_embedding`)."""
    res = _probe("forge_keymap_probe.py", tmp_path, timeout=900)
    for arch, row in res["rows"].items():
        assert row["arch"] == arch and row["n_differ"] == 0, row
        assert row["same"] > 1900 and row["attention_kohya"] >= 280, row
        if arch == "sdxl":
            assert all(k.startswith(("lora_te_text_model_", "lora_unet_class_embedding_")) for k, _ in row["missing"])
            assert row["n_missing"] == 14, row  # 12 text-encoder layers of the tiny model + 2
        else:
            assert row["n_missing"] == 0, row


def test_fp8_unet_in_forge_takes_loras_as_bypass(installed, tmp_path):
    """Forge's "Diffusion in Low Bits: float8-e4m3fn": our LoRA on the FP8 UNet is at least as near the full-precision
    effect as the built-in's merge into FP8 weights, leaves the stored weights as they were, and the base image
    afterwards is the FP8 base image."""
    data, models = installed[:2]
    res = _probe("forge_fp8_probe.py", tmp_path, data, models, timeout=1800)
    assert "float8" in res["storage"] and res["fp8_weights"] > 100, res
    assert res["ours_effect"] > 0.5 * res["effect32"], res  # the LoRA does act on the FP8 UNet
    assert res["ours_error"] <= res["builtin_error"], res
    assert res["weights_unchanged"] and res["ours_base_again"] == 0, res


def test_gguf_unet_in_forge_takes_loras_as_bypass(installed, tmp_path):
    """A GGUF UNet in Forge (Q8_0 linear weights in the transformer blocks, the text encoder and VAE as a separate
    module): ours applies the LoRA as bypass on the packed layers. Its image is that of Forge's built-in in its exact
    "fp16 LoRA" mode (dequantize and merge in every forward) within a level or so, nearer the full-precision effect than
    the built-in's default (merging re-quantizes the weights), the packed weights are never written and the base
    image comes back bit for bit. (Forge f2.0.1 cannot load SD1/SDXL GGUF files by itself: see int_shapes in the
    probe.)"""
    data, models = installed[:2]
    own = _checkpoints_writable(tmp_path, models)
    res = _probe("forge_gguf_probe.py", tmp_path, data, own, timeout=1800)
    assert res["storage"] == "gguf" and res["packed_params"] == res["q8_tensors_written"] > 100, res
    assert res["ours_effect"] > 0.5 * res["effect32"], res  # the LoRA does act on the GGUF UNet
    assert res["ours_vs_online_max"] <= 1, res  # the exact reference: at most one level apart (measured: 1)
    assert res["ours_error"] <= res["baked_error"], res
    assert res["ours_same_under_fp16_lora_setting"] == 0, res  # Forge's LoRA mode setting does not touch ours
    assert res["weights_unchanged"] and res["ours_base_again"] == 0, res


@pytest.mark.parametrize("arch", ["sdxl"])
def test_sdxl_in_forge_gives_the_builtins_images(installed, tmp_path, arch):
    """A full-size SDXL-shaped checkpoint in Forge (two text encoders, `clip_l` and `clip_g`): ours gives the built-in's
    image (max difference 1 level) for a kohya LoRA at 0.8, text encoders only and UNet only, with the same "Lora
    hashes", and the base image after it bit for bit. The checkpoint (6.9 GB) is built once per run, or reused from
    LORA_EXT_FORGE_FULL_DIR/ARCH (ARCH.safetensors + ARCH_lora.safetensors, made by tests/webui/make_full_ckpt.py).
    (An SD2-shaped random checkpoint built the same way draws black images in Forge, where no LoRA can show: not
    used.)"""
    data = installed[0]
    root = os.environ.get("LORA_EXT_FORGE_FULL_DIR")
    cache = Path(root) / arch if root else tmp_path / arch
    ckpt, lora = cache / f"{arch}.safetensors", cache / f"{arch}_lora.safetensors"
    if not (ckpt.exists() and lora.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "tests" / "webui" / "make_full_ckpt.py"), arch, str(ckpt),
                        str(lora)], check=True, cwd=REPO, timeout=1800)
    models = tmp_path / "models"
    for sub in ("Stable-diffusion", "Lora", "VAE"):
        (models / sub).mkdir(parents=True)
    (models / "Stable-diffusion" / ckpt.name).symlink_to(ckpt)
    (models / "Lora" / lora.name).symlink_to(lora)
    res = _probe("forge_full_probe.py", tmp_path, data, models, lora.stem, timeout=2400,
                 env={"SD_WEBUI_CKPT": str(ckpt)})
    assert (res["model_class"], res["encoders"]) == ("StableDiffusionXL", ["clip_g", "clip_l"]), res
    assert res["base_saturated"] < 0.5, res  # an image, not a black or white square
    for key, row in res["rows"].items():
        assert row["builtin_effect"] > 2, (key, row)  # the LoRA visibly changes the image
        assert row["ours_vs_builtin"] <= 1, (key, row)
        assert row["ours_hashes"] == row["builtin_hashes"] and lora.stem in row["ours_hashes"], (key, row)
    assert res["ours_base_again"] == 0, res


def test_infotext_paste_and_sd_lora_in_forge(installed, tmp_path):
    """Pasting an infotext in Forge names the local file with the hash it records (a renamed file is found; Forge's
    hash is the whole file's), and "Add network to prompt" (`sd_lora`) adds its LoRA at the default multiplier."""
    data, models = installed[:2]
    own = tmp_path / "models"
    (own / "Lora").mkdir(parents=True)
    (own / "Stable-diffusion").symlink_to(models / "Stable-diffusion", target_is_directory=True)
    for name in ("full_lora", "full_lora_compvis"):
        shutil.copyfile(models / "Lora" / f"{name}.safetensors", own / "Lora" / f"{name}.safetensors")
    res = _probe("forge_paste_probe.py", tmp_path, data, own, timeout=1800)
    assert res["hashes"] and res["hashes"].startswith("full_lora: "), res
    assert res["pasted"] == "a photo of a cat <lora:renamed_copy:0.8>", res  # preferred name: Filename
    assert res["pasted_alias"] == "a photo of a cat <lora:full_lora:0.8>", res  # the file's alias (its metadata)
    assert res["pasted_alias_vs_original"] == 0, res
    assert res["sd_lora_diff"] == 0 and res["sd_lora_effect"] > 2, res
    assert res["sd_lora_hashes"] and "full_lora_compvis: " in res["sd_lora_hashes"], res


def test_loras_follow_the_refiner_in_forge(installed, tmp_path):
    """The refiner taking over mid-generation in Forge (the model reloaded at the switch): the LoRA is in the UNet at
    every step, before and after the switch; the image equals the same generation without a refiner (the refiner is a
    copy of the base) and the built-in's; the base image afterwards is the base image."""
    data, models = installed[:2]
    own = _checkpoints_writable(tmp_path, models)
    res = _probe("forge_refiner_probe.py", tmp_path, data, own, timeout=1800)
    assert res["models_at_step"] and res["models_at_step"][-1].startswith(res["refiner"]), res  # it did take over
    assert len(set(res["models_at_step"])) == 2 and res["infotext_refiner"], res
    assert all(res["merged_at_step"]), res  # on the base model and on the refiner
    assert res["refiner_itself"] <= 1 and res["effect"] > 2, res
    assert res["vs_no_refiner"] <= 1 and res["vs_builtin"] <= 1, res
    assert res["base_again"] == 0 and res["hashes"], res
