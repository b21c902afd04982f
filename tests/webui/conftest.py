"""Tests against a real AUTOMATIC1111 WebUI v1.10 (../shared/webui/README.md). They run when SD_WEBUI_DIR is set
(`source $HARNESS_DIR/harness.env`) and skip otherwise. Each scenario runs once per session in its own WebUI
process (tests/webui/driver.py, with $SD_WEBUI_PYTHON); the tests assert on what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WEBUI = os.environ.get("SD_WEBUI_DIR")
DRIVER = Path(__file__).with_name("driver.py")


HOST = os.environ.get("SD_WEBUI_HOST", "a1111")
FORGE_TESTS = ("test_forge.py",)  # the rest is written for AUTOMATIC1111 (tiny models, its module tree)


def pytest_collection_modifyitems(config, items):
    if not WEBUI:
        skip = pytest.mark.skip(reason="SD_WEBUI_DIR not set (real-WebUI tests skipped; see docs/testing.md)")
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/webui" not in path:
            continue
        # under pytest-xdist (`bash dev.sh test` runs `-n auto --dist loadgroup`): every real-WebUI test on one worker,
        # so that one WebUI server runs at a time (each needs GBs; A1111's and Forge's never side by side)
        item.add_marker(pytest.mark.xdist_group("real-webui"))
        if not WEBUI:
            item.add_marker(skip)
        elif (HOST == "forge") != path.endswith(FORGE_TESTS):
            item.add_marker(pytest.mark.skip(reason=f"written for the other host (SD_WEBUI_HOST={HOST})"))


def scenario_runner(tmp_path_factory, script: Path):
    """run(scenario, arch="sd1", *webui_args) -> the result dict that `script` (driver.py or driver_api.py, run with
    $SD_WEBUI_PYTHON) wrote for that scenario; each scenario runs once per session."""
    results: dict[tuple, dict] = {}

    def run(scenario: str, arch: str = "sd1", *extra: str) -> dict:
        key = (scenario, arch, extra)
        if arch == "sdxl" and not os.environ.get("SD_WEBUI_CKPT_SDXL"):
            pytest.skip("this harness has no SDXL checkpoint (built with SDXL=0; rebuild with SDXL=1)")
        if key not in results:
            out = tmp_path_factory.mktemp(f"{script.stem}-{scenario}-{arch}")
            cmd = [os.environ.get("SD_WEBUI_PYTHON", sys.executable), str(script), scenario, str(out), "--arch", arch,
                   *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            result_file = out / "result.json"
            if not result_file.exists():
                pytest.fail(f"{script.name} {scenario} wrote no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                            f"{proc.stderr[-5000:]}")
            res = json.loads(result_file.read_text())
            res["_out"] = str(out)
            res["_log"] = proc.stdout[-20000:] + proc.stderr[-20000:]
            if not res.get("ok"):
                pytest.fail(f"{script.name} {scenario} failed:\n{res.get('error')}\n--- log ---\n{res['_log'][-6000:]}")
            results[key] = res
        return results[key]

    return run


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """driver(scenario, arch="sd1", *webui_args) -> the scenario's result dict (cached per session)."""
    return scenario_runner(tmp_path_factory, DRIVER)
