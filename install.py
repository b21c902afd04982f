"""Run by the AUTOMATIC1111 WebUI when the extension is installed or at start-up.

Contract: install only what is missing, never upgrade or downgrade what the WebUI pinned (torch, transformers, gradio).
For now it only reports what is missing; the version-aware installer comes with the WebUI integration.
"""

from __future__ import annotations

import importlib.util

# import name -> pip requirement, chosen to be compatible with A1111 v1.10's pins
REQUIREMENTS = {
    "safetensors": "safetensors",
    "diffusers": "diffusers",
}


def missing() -> dict[str, str]:
    return {mod: req for mod, req in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None}


def main() -> None:
    todo = missing()
    if not todo:
        print("lora_ext: all requirements present, nothing installed")
        return
    # Version-aware installation (compatible with the WebUI's pins) comes with the WebUI integration; until then we
    # only report, so that nothing in the WebUI's environment can change behind the user's back.
    for mod, req in todo.items():
        print(f"lora_ext: {mod} is missing; the WebUI integration will install {req!r} (not installed yet)")


main()
