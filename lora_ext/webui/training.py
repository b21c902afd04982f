"""The training tab and training REST routes inside the WebUI: a `TrainService` (lora_ext.ui.service) rooted at the
WebUI's folders, the tab (lora_ext.ui.tab) and the routes (lora_ext.ui.rest), with the WebUI's model handed off the
GPU around every job.

- Roots: datasets anywhere under the WebUI's data folder; base models from the WebUI's checkpoint and VAE folders (the
  loaded checkpoint is the default); LoRAs go to the first LoRA folder, runs beside it (models/lora_ext_runs); job
  records under <data>/lora_ext/.
- GPU hand-off: before a job, the LoRA weights lora_ext merged are restored (the session forgets the model: the next
  generation merges them again) and the model moves to the CPU under the WebUI's queue lock; after the job, however
  it ended, it moves back.
- After a finished job the catalogue (and the built-in Lora's list, when it is loaded) is rescanned: the new LoRA is
  listed and usable at once.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_ext.train.jobs import GpuHandoff
from lora_ext.ui.service import Roots, TrainService
from lora_ext.webui import builtin, host
from lora_ext.webui.state import GlueState

log = logging.getLogger(__name__)

TAB_TITLE = "LoRA Training"
TAB_ID = "lora_ext_training"
CURRENT_LABEL = "(current WebUI checkpoint)"


class ModelHandoff:
    """The GPU hand-off callbacks of the WebUI (see the module docstring)."""

    def __init__(self, st: GlueState) -> None:
        self.st = st
        self.moved: Any = None

    def before(self) -> None:
        self.st.session.forget_model()
        self.moved = host.release_model()

    def after(self) -> None:
        moved, self.moved = self.moved, None
        host.restore_model(moved)


def make_service(st: GlueState) -> TrainService:
    lora_dir = host.lora_dirs()[0]
    data = host.data_dir()
    roots = Roots(datasets=[data], models=host.model_dirs(), lora_dir=lora_dir, work_dir=data / "lora_ext")
    handoff = ModelHandoff(st)

    def current() -> str | None:
        return host.checkpoint_file()

    def refreshed(_path: Any) -> None:
        st.index.refresh()
        builtin.refresh_builtin()  # its cards page and /sdapi/v1/loras list the new file too

    def new_checkpoint(_path: Any) -> None:
        try:
            host.refresh_checkpoints()
        except Exception as exc:  # noqa: BLE001 - the file is written; the list refreshes by hand then
            log.warning("lora_ext: could not refresh the checkpoint list: %s", exc)

    return TrainService(roots, current_model=current, hooks=GpuHandoff(before=handoff.before, after=handoff.after),
                        on_new_lora=refreshed, on_new_checkpoint=new_checkpoint)


def build_tab(service: TrainService) -> list[tuple[Any, str, str]]:
    """The `on_ui_tabs` result: the tab's Blocks, its title and id."""
    import gradio as gr

    from lora_ext.ui.tab import build_train_tab
    from lora_ext.ui.tools_tab import build_tools_tab

    with gr.Blocks(analytics_enabled=False) as blocks, gr.Tabs(elem_id="lora_ext_webui_tabs"):
        with gr.Tab("Train", elem_id="lora_ext_tab_train"):
            parts = build_train_tab(service, blocks, current_label=CURRENT_LABEL)
        with gr.Tab("Tools", elem_id="lora_ext_tab_tools"):
            build_tools_tab(service, blocks, current_label=CURRENT_LABEL)
    try:
        host.send_to_txt2img(parts.send_button, parts.send_prompt)
    except (ImportError, AttributeError) as exc:  # an older WebUI without paste buttons: the prompt stays visible
        log.warning("lora_ext: 'Send to txt2img' is not available here (%s)", exc)
    return [(blocks, TAB_TITLE, TAB_ID)]


def add_routes(app: Any, service: TrainService) -> None:
    from lora_ext.ui.rest import add_train_routes, parse_credentials

    add_train_routes(app, service, credentials=parse_credentials(host.api_credentials()) or None)
