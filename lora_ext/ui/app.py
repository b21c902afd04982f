"""The standalone app: `python -m lora_ext ui [--host H] [--port P] [--lora-dir DIR] [--models-dir DIR]
[--datasets-dir DIR] [--auth USER:PASS]`.

The same training tab as inside the WebUI (lora_ext.ui.tab) plus a Generate tab (a prompt with `<lora:...>` tags
through the same activation path as the CLI, lora_ext.session) and a Library tab (the catalogue with its metadata),
served with the REST API of lora_ext.ui.rest on one FastAPI app. Prints its URL when it is ready.
"""

from __future__ import annotations

import argparse
import html
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.train.jobs import GpuHandoff
from lora_ext.ui import compat
from lora_ext.ui.rest import add_train_routes, parse_credentials
from lora_ext.ui.service import Roots, TrainService
from lora_ext.ui.tab import build_train_tab, error_markdown, extension_css
from lora_ext.ui.tools_tab import build_tools_tab

log = logging.getLogger(__name__)

DEFAULT_PORT = 7861
LIBRARY_COLUMNS = ["name", "model", "algorithm", "rank", "size (MB)", "activation text", "preferred weight", "hash"]


class Generator:
    """The Generate tab's pipeline: loaded on first use, dropped while a training job needs the memory."""

    def __init__(self, service: TrainService) -> None:
        self.service = service
        self._session: Any = None
        self._model: str | None = None
        self._lock = threading.Lock()

    def release(self) -> None:
        """Free the pipeline (before a training job): LoRA weights are restored first, the next image reloads."""
        with self._lock:
            if self._session is not None:
                self._session.loras.restore()
            self._session, self._model = None, None

    def generate(self, model: str, prompt: str, negative: str, steps: float, seed: float, width: float,
                 height: float, cfg: float) -> tuple[Any, str]:
        from lora_ext.app.runner import Session

        if self.service.runner.active() is not None:
            return None, error_markdown(RuntimeError("a training job is using the device; generate when it ends"))
        try:
            path = self.service.resolve_model(model)
            with self._lock:
                if self._session is None or self._model != path:
                    self._session = Session(Path(path), lora_dirs=[self.service.roots.lora_dir])
                    self._model = path
                self._session.use_lora_dirs([self.service.roots.lora_dir])
                result = self._session.generate(prompt, negative or "", seed=int(seed), steps=int(steps),
                                                width=int(width), height=int(height), cfg=float(cfg))
        except (LoraExtError, ValueError) as err:
            return None, error_markdown(err)
        lines = "<br>".join(html.escape(x) for x in result.report_lines())
        return result.image, f"<div class='lora-ext-info'>{lines}</div><pre>{html.escape(result.infotext)}</pre>"


def library_rows(service: TrainService) -> list[list[Any]]:
    from lora_ext.library.index import LoraIndex

    index = LoraIndex([service.roots.lora_dir])
    rows = []
    for e in index.entries():
        meta = e.user_metadata or {}
        rows.append([e.name, e.effective_sd_version, e.algorithm or "?", e.rank or "", round(e.size / 1e6, 2),
                     str(meta.get("activation text", "")), str(meta.get("preferred weight", "")),
                     e.shorthash or ""])
    return rows


def build_app_blocks(service: TrainService, generator: Generator) -> Any:
    gr = compat.gradio()
    with gr.Blocks(title="lora_ext", analytics_enabled=False, **compat.kw(gr.Blocks, css=extension_css())) as blocks:
        with gr.Tabs(elem_id="lora_ext_tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="lora_ext_tab_train"):
                parts = build_train_tab(service, blocks, allow_upload=True, send_label="Send to Generate")
            with gr.Tab("Generate", id="generate", elem_id="lora_ext_tab_generate"):
                models = service.model_choices()
                g_model = gr.Dropdown(choices=models, value=models[0] if models else None, label="model",
                                      elem_id="lora_ext_gen_model", **compat.kw(gr.Dropdown, allow_custom_value=True))
                g_prompt = gr.Textbox(label="prompt (<lora:name:weight> tags apply LoRAs)", lines=2,
                                      elem_id="lora_ext_gen_prompt")
                g_negative = gr.Textbox(label="negative prompt", elem_id="lora_ext_gen_negative")
                with gr.Row():
                    g_steps = gr.Number(value=20, precision=0, label="steps", elem_id="lora_ext_gen_steps")
                    g_seed = gr.Number(value=0, precision=0, label="seed", elem_id="lora_ext_gen_seed")
                    g_width = gr.Number(value=512, precision=0, label="width", elem_id="lora_ext_gen_width")
                    g_height = gr.Number(value=512, precision=0, label="height", elem_id="lora_ext_gen_height")
                    g_cfg = gr.Number(value=7.0, label="CFG scale", elem_id="lora_ext_gen_cfg")
                g_button = gr.Button("Generate", variant="primary", elem_id="lora_ext_gen_button")
                g_image = gr.Image(label="image", type="pil", elem_id="lora_ext_gen_image")
                g_info = gr.HTML("", elem_id="lora_ext_gen_info")
            with gr.Tab("Tools", id="tools", elem_id="lora_ext_tab_tools"):
                build_tools_tab(service, blocks)
            with gr.Tab("Library", id="library", elem_id="lora_ext_tab_library"):
                l_refresh = gr.Button("Refresh", elem_id="lora_ext_library_refresh")
                l_table = gr.Dataframe(headers=LIBRARY_COLUMNS, value=[], elem_id="lora_ext_library",
                                       interactive=False)
        g_button.click(generator.generate, inputs=[g_model, g_prompt, g_negative, g_steps, g_seed, g_width, g_height,
                                                   g_cfg], outputs=[g_image, g_info])
        l_refresh.click(lambda: library_rows(service), outputs=[l_table])
        compat.on_load(blocks, lambda: library_rows(service), outputs=[l_table])
        parts.send_button.click(lambda p: (p, gr.update(selected="generate")), inputs=[parts.send_prompt],
                                outputs=[g_prompt, tabs])
    return blocks


def make_service(lora_dir: Path, models_dir: Path, datasets_dirs: Sequence[Path], work_dir: Path) -> TrainService:
    lora_dir.mkdir(parents=True, exist_ok=True)
    roots = Roots(datasets=list(datasets_dirs), models=[models_dir], lora_dir=lora_dir, work_dir=work_dir)
    return TrainService(roots)


def create_app(service: TrainService, *, auth: str | None = None) -> Any:
    """The FastAPI app: REST routes first, the gradio UI mounted at /."""
    import fastapi

    gr = compat.gradio()
    generator = Generator(service)
    service.runner.hooks = GpuHandoff(before=generator.release)
    app = fastapi.FastAPI(title="lora_ext")
    credentials = parse_credentials(auth)
    add_train_routes(app, service, credentials=credentials or None)
    blocks = build_app_blocks(service, generator)
    blocks.queue()
    mount_kw: dict[str, Any] = {}
    if credentials:
        mount_kw["auth"] = list(credentials.items())
    return gr.mount_gradio_app(app, blocks, path="/", **compat.kw_fn(gr.mount_gradio_app, **mount_kw))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ext ui", description="the lora_ext app: train, generate, browse")
    add_ui_arguments(p)
    return p


def add_ui_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--lora-dir", default="models/Lora", help="where finished LoRAs go (default models/Lora)")
    p.add_argument("--models-dir", default="models/Stable-diffusion",
                   help="base models: diffusers folders and single files (default models/Stable-diffusion)")
    p.add_argument("--datasets-dir", action="append", default=None,
                   help="folder datasets may be under (repeatable; default: the current folder)")
    p.add_argument("--work-dir", default=None, help="job records and uploads (default <lora-dir>/../lora_ext_app)")
    p.add_argument("--auth", default=None, help="USER:PASS[,USER2:PASS2]: the page and the API need this login")


def run(ns: argparse.Namespace) -> int:
    import uvicorn

    lora_dir = Path(ns.lora_dir).resolve()
    work_dir = Path(ns.work_dir).resolve() if ns.work_dir else lora_dir.parent / "lora_ext_app"
    datasets = [Path(d) for d in (ns.datasets_dir or [Path.cwd()])]
    service = make_service(lora_dir, Path(ns.models_dir), datasets, work_dir)
    app = create_app(service, auth=ns.auth)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level="warning")
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if ns.host in ("0.0.0.0", "") else ns.host
    print(f"lora_ext app: http://{shown}:{ns.port}/  (LoRAs: {lora_dir}; models: {Path(ns.models_dir).resolve()})",
          flush=True)
    server.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
