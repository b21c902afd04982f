"""Run by the AUTOMATIC1111 WebUI when the extension is installed and at every start (unless --skip-install), as
`python install.py` with the WebUI venv's python, cwd = WebUI root.

Installs only what lora_ext needs and is missing, never upgrades or downgrades an installed package, reports what it
did (`lora_ext:` lines on stdout): see lora_ext/install_plan.py. Never raises and always exits 0: a failed install must
not stop the WebUI. The logic is loaded by file path, not as `lora_ext.install_plan`, so that nothing else of lora_ext
(which needs torch and friends) is imported before its dependencies exist.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

_MANUAL = 'diffusers==0.30.3 (WebUI 1.10, transformers < 4.33) or "diffusers>=0.29" (newer transformers)'


def _install() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_ext", "install_plan.py")
    try:
        spec = importlib.util.spec_from_file_location("lora_ext_install_plan", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        module.main(sys.argv[1:])
    except (Exception, SystemExit) as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(f"lora_ext: ERROR: the installer failed ({detail}); the WebUI starts anyway. lora_ext needs torch, "
              f"safetensors, numpy, transformers, accelerate, Pillow and diffusers; install what is missing with "
              f'"{sys.executable}" -m pip install ..., for diffusers: {_MANUAL}', flush=True)


_install()
