"""What the in-process Forge probes share (run with Forge's Python, `$SD_WEBUI_PYTHON tests/webui/forge_*_probe.py OUT
...`): the result file protocol the tests read, and starting Forge in this process as its `webui.py` does.

Forge needs `--always-cpu` in `sys.argv` before any of its modules is imported (its memory manager reads the device
flags at import); `import webui` runs `initialize_forge()` and the WebUI's initialisation (extensions of the data dir
included); the model is loaded at the first generation unless `load_model` is asked for."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def probe_main(run: Callable[..., dict]) -> None:
    """`run(*sys.argv[2:])` -> OUT/result.json (`ok`, or `ok: false` and the traceback); then leave at once (Forge
    keeps threads alive)."""
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    try:
        result = run(*sys.argv[2:])
        result["ok"] = True
    except BaseException:  # noqa: BLE001 - the test reads the traceback
        result.update(ok=False, traceback=traceback.format_exc())
    (out / "result.json").write_text(json.dumps(result, indent=1))
    os._exit(0)


def forge_argv(*extra: str) -> None:
    """cd into the Forge tree, put it (and its vendored packages) on the import path, and set Forge's flags."""
    webui = os.path.abspath(os.environ["SD_WEBUI_DIR"])
    os.chdir(webui)
    sys.path[:0] = [webui, os.path.join(webui, "packages_3rdparty")]
    sys.argv = ["webui.py", "--always-cpu", *extra]


def start_forge(data: str | None = None, models: str | None = None, *, app_started: bool = True) -> None:
    """Forge in this process with the harness checkpoint (`--data-dir DATA --models-dir MODELS` when given: the
    extensions of DATA load), the app-started callbacks run (our glue takes the tag there) and the model loaded."""
    dirs = ["--data-dir", data, "--models-dir", models] if data else []
    forge_argv("--skip-prepare-environment", "--skip-torch-cuda-test", "--ckpt", os.environ["SD_WEBUI_CKPT"],
               "--nowebui", "--do-not-download-clip", "--no-download-sd-model", *dirs)
    import webui as _webui  # noqa: F401  (Forge's webui.py initializes Forge on import)
    from modules import script_callbacks, sd_models
    from modules_forge import main_entry

    script_callbacks.before_ui_callback()
    if app_started:
        script_callbacks.app_started_callback(None, None)
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()


def forget_conditionings() -> None:
    """Empty the WebUI's conditioning caches (keyed by prompt text and the parsed tags, not by who applies them), so
    that two handlers given the same prompt in one process each encode it."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if isinstance(cls.__dict__.get(attr), list):
                setattr(cls, attr, [None, None])


def txt2img(prompt: str, *, steps: int = 2, size: int = 64, forget: bool = True, **kw):
    """One image of the loaded model (Euler, seed 1234, CFG 7, `steps` steps at `size` px; `kw`: more arguments of
    the processing object): (its pixels as a float64 array, its infotext as a UI or API generation writes it: the
    prompt as typed; a processing object without scripts, as here, leaves the tags out of its per-image infotexts).
    `forget`: recompute the conditionings (see `forget_conditionings`)."""
    import numpy as np
    from modules import processing, shared

    if forget:
        forget_conditionings()
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt="", steps=steps, width=size, height=size,
        sampler_name="Euler", seed=1234, cfg_scale=7, do_not_save_samples=True, do_not_save_grid=True, **kw)
    res = processing.process_images(p)
    info = res.infotext(p, 0)
    p.close()
    return np.asarray(res.images[0]).astype(np.float64), info


def load_model(storage: str, checkpoint: str | None = None, modules: list[str] | None = None) -> None:
    """(Re)load the model as Forge's top bar would: "Diffusion in Low Bits" = `storage`; with `checkpoint` (a file in
    the models folder), that checkpoint and the "VAE / Text Encoder" `modules`."""
    from modules import sd_models, shared
    from modules_forge import main_entry

    shared.opts.set("forge_unet_storage_dtype", storage)
    if checkpoint is not None:
        sd_models.list_models()
        info = next(i for i in sd_models.checkpoints_list.values() if i.filename == str(checkpoint))
        shared.opts.set("sd_model_checkpoint", info.title)
        shared.opts.set("forge_additional_modules", [str(m) for m in modules or []])
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()
