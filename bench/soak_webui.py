"""Soak run in the real WebUI (issue 13): N random generations mixing every apply mode on the tiny checkpoints
(merged, schedules in merge and bypass mode, windows, lbw, per-image batches, hires fix, interrupted generations,
model switches, hand-back to the built-in and back). Prints one JSON object: failures, the weights against the fresh
load at the end (bit for bit), resident memory every 100 generations and its growth per 100 generations.

    source $HARNESS_DIR/harness.env        # ../shared/webui/README.md
    python bench/soak_webui.py [--n 1000] [--arch sd1|sdxl]

Not a CI test (minutes of CPU); the scenario itself is `scenario_soak` in tests/webui/driver.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    args = ap.parse_args()
    if not os.environ.get("SD_WEBUI_DIR"):
        sys.exit("SD_WEBUI_DIR is not set: source the WebUI harness's harness.env first (../shared/webui/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LORA_EXT_SOAK_N": str(args.n)}
        python = os.environ.get("SD_WEBUI_PYTHON", sys.executable)
        subprocess.run([python, str(ROOT / "tests" / "webui" / "driver.py"), "soak", tmp, "--arch", args.arch],
                       env=env, check=False, capture_output=True, text=True, timeout=6 * 3600)
        result = json.loads((Path(tmp) / "result.json").read_text())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
