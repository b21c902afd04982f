"""Which WebUI lora_ext was loaded into. Only `lora_ext.webui` asks; the answer decides what the glue registers.

- AUTOMATIC1111 v1.10 (`a1111`): the ldm/sgm model tree the patcher adapts; lora_ext owns the `<lora:...>` tag.
- Stable Diffusion WebUI Forge (`forge`): same extension API, but its own model runtime (`backend/`,
  `sd_model.forge_objects`, LoRAs published through `forge_objects_after_applying_lora`), which lora_ext does not
  adapt yet. Until it does, the glue leaves the tag, the model and the REST routes to Forge and says so once at start
  (taking the tag would break every LoRA there: `AttributeError: 'StableDiffusion' object has no attribute 'model'`).

Detection looks for Forge's own top-level packages on the WebUI's import path (`modules_forge`, which Forge's
`webui.py` imports before any extension loads); nothing is imported to find out.
"""

from __future__ import annotations

import importlib.util
import sys

A1111 = "a1111"
FORGE = "forge"


def detect() -> str:
    """`forge` when Forge's `modules_forge` package is loaded or importable, else `a1111`."""
    if "modules_forge" in sys.modules:
        return FORGE
    try:
        found = importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        found = False
    return FORGE if found else A1111
