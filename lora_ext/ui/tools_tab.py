"""The "Tools" tab: the model tools (merge into a checkpoint, merge LoRAs, resize, extract, convert) with a form each,
run as jobs through the training service's runner (one job at a time, progress from the child's events), the result's
report shown when the job ends. The same in the WebUI (beside the training tab) and in the standalone app.

Every element a test or a person needs has an `elem_id` starting with `lora_ext_tools_`. The callbacks are plain
methods of `ToolsTab` (tests call them without a browser).
"""

from __future__ import annotations

import html
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.ui import compat
from lora_ext.ui.chart import progress_html
from lora_ext.ui.service import TrainService
from lora_ext.ui.tab import POLL_SECONDS, error_markdown

DTYPE_CHOICES = ["(keep)", "fp16", "bf16", "fp32"]
DYNAMIC_CHOICES = ["(fixed rank)", "sv_ratio", "sv_fro", "sv_cumulative"]
NO_MODEL = "(the LoRA's own family)"


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


def _dtype(value: str | None) -> str | None:
    return None if not value or value.startswith("(") else value


def report_html(v: dict[str, Any]) -> str:
    if not v:
        return ""
    if v["state"] == "finished":
        where = "checkpoint list (refresh it)" if v.get("tool") == "merge-model" else "LoRA list"
        lines = "\n".join(html.escape(line) for line in v.get("report_lines") or [])
        return (f"<div class='lora-ext-done'>✔ {html.escape(v.get('tool') or '')} wrote "
                f"<code>{html.escape(v.get('output') or '')}</code>; it is in the {where}.</div>"
                f"<pre class='lora-ext-report'>{lines}</pre>")
    if v["state"] == "failed":
        return error_markdown(RuntimeError(v.get("error") or "the tool failed"))
    if v["state"] == "cancelled":
        return "<div class='lora-ext-stopped'>Cancelled: nothing was written.</div>"
    return ""


class ToolsTab:
    """The callbacks of the Tools tab."""

    def __init__(self, service: TrainService, *, current_label: str | None = None) -> None:
        self.service = service
        self.current_label = current_label

    def model_choices(self) -> list[str]:
        return ([self.current_label] if self.current_label else []) + self.service.model_choices()

    def _model(self, value: str | None) -> str:
        return "" if value == self.current_label else (value or "")

    def _start(self, tool: str, values: dict[str, Any]) -> str:
        try:
            job = self.service.run_tool(tool, values)
        except (LoraExtError, ValueError) as err:
            return error_markdown(err)
        return f"<div class='lora-ext-started'>Job {job.id} started: {html.escape(job.name)}.</div>"

    # ------------------------------------------------------------------------------------------------ the tools
    def merge_model(self, model: str, loras: str, out_name: str, dtype: str, overwrite: bool) -> str:
        return self._start("merge-model", {"model": self._model(model), "loras": _lines(loras),
                                           "out_name": out_name, "dtype": _dtype(dtype), "overwrite": overwrite})

    def _base(self, value: str | None) -> str | None:
        """The optional base model of the LoRA tools: None = the family the LoRA files were made for."""
        if not value or value == NO_MODEL:
            return None
        return self._model(value) or None

    def merge_loras(self, inputs: str, rank: Any, base: str, out_name: str, dtype: str, overwrite: bool) -> str:
        items = []
        for line in _lines(inputs):
            name, _, weight = line.rpartition(":") if ":" in line else (line, "", "1")
            items.append({"name": name or line, "weight": weight or 1.0})
        return self._start("merge-loras", {"inputs": items, "rank": rank or None, "model": self._base(base),
                                           "out_name": out_name, "dtype": _dtype(dtype), "overwrite": overwrite})

    def resize(self, lora: str, rank: Any, dynamic: str, param: Any, base: str, out_name: str, dtype: str,
               overwrite: bool) -> str:
        method = None if not dynamic or dynamic.startswith("(") else dynamic
        return self._start("resize", {"input": lora, "rank": rank or None, "dynamic": method,
                                      "param": param if method else None, "model": self._base(base),
                                      "out_name": out_name,
                                      "dtype": _dtype(dtype), "overwrite": overwrite})

    def extract(self, base: str, tuned: str, rank: Any, conv_rank: Any, out_name: str, dtype: str,
                overwrite: bool) -> str:
        return self._start("extract", {"base": self._model(base), "tuned": self._model(tuned), "rank": rank,
                                       "conv_rank": conv_rank or None, "out_name": out_name, "dtype": _dtype(dtype),
                                       "overwrite": overwrite})

    def convert(self, lora: str, to: str, base: str, out_name: str, dtype: str, overwrite: bool) -> str:
        return self._start("convert", {"input": lora, "to": to, "model": self._base(base), "out_name": out_name,
                                       "dtype": _dtype(dtype), "overwrite": overwrite})

    def cancel(self) -> str:
        job = self.service.runner.active()
        if job is None or job.kind != "tool":
            return error_markdown(RuntimeError("no tool job is running"))
        self.service.runner.cancel(job.id)
        return "<div class='lora-ext-info'>Cancelling: nothing will be written.</div>"

    # --------------------------------------------------------------------------------------------- live view
    def current_view(self) -> dict[str, Any]:
        jobs = [j for j in self.service.runner.jobs() if j.kind == "tool"]
        return self.service.view(jobs[0].id) if jobs else {}

    def poll(self) -> tuple[str, str]:
        v = self.current_view()
        if not v:
            return progress_html(0, "no tool job yet", "idle"), ""
        pct = 100 * v["fraction"]
        text = f"{v['name']} — {v['state']}" + (f": {pct:.0f}%" if v["state"] == "running" else "")
        return progress_html(v["fraction"] if v["state"] != "finished" else 1.0, text, v["state"]), report_html(v)

    def refresh(self) -> list[Any]:
        gr = compat.gradio()
        models, loras = self.model_choices(), self.service.lora_choices()
        first = loras[0] if loras else None
        return [gr.update(choices=models), gr.update(choices=models), gr.update(choices=models),
                gr.update(choices=loras, value=first), gr.update(choices=loras, value=first),
                gr.update(choices=loras, value=first), gr.update(choices=loras, value=first)]

    def add_line(self, current: str, lora: str | None, weight: Any) -> str:
        if not lora:
            return current
        name = lora.rsplit(".", 1)[0] if lora.endswith((".safetensors", ".pt", ".ckpt")) else lora
        line = f"{name}:{float(weight or 1):g}"
        return (current.rstrip("\n") + "\n" + line) if current.strip() else line


def build_tools_tab(service: TrainService, blocks: Any, *, current_label: str | None = None) -> ToolsTab:
    """Build the Tools tab's components inside the current gradio context."""
    gr = compat.gradio()
    tab = ToolsTab(service, current_label=current_label)
    models, loras = tab.model_choices(), service.lora_choices()
    first_model, first_lora = (models[0] if models else None), (loras[0] if loras else None)
    gr.Markdown("## Model tools\nMerge LoRAs into a checkpoint (exactly what `<lora:...>` tags give), merge LoRAs "
                "together, resize, extract a LoRA from a fine-tuned checkpoint, or convert between kohya and "
                "diffusers names. Each runs as a job; the result lands in the checkpoint or LoRA folder.")
    message = gr.HTML("", elem_id="lora_ext_tools_message")

    def base_model(prefix: str) -> Any:
        return gr.Dropdown(choices=[NO_MODEL, *models], value=NO_MODEL, elem_id=f"lora_ext_tools_{prefix}_base",
                           label="base model (its layer names; needed for DoRA/IA3 and files of an unknown family)",
                           **compat.kw(gr.Dropdown, allow_custom_value=True))

    def common(prefix: str) -> tuple[Any, Any, Any]:
        with gr.Row():
            out = gr.Textbox(label="output name", elem_id=f"lora_ext_tools_{prefix}_out")
            dtype = gr.Dropdown(choices=DTYPE_CHOICES, value=DTYPE_CHOICES[0], label="dtype",
                                elem_id=f"lora_ext_tools_{prefix}_dtype")
            overwrite = gr.Checkbox(label="overwrite", value=False, elem_id=f"lora_ext_tools_{prefix}_overwrite")
        return out, dtype, overwrite

    with gr.Tabs(elem_id="lora_ext_tools_tabs"):
        with gr.Tab("Merge into checkpoint", elem_id="lora_ext_tools_tab_merge_model"):
            mm_model = gr.Dropdown(choices=models, value=first_model, label="checkpoint",
                                   elem_id="lora_ext_tools_mm_model",
                                   **compat.kw(gr.Dropdown, allow_custom_value=True))
            with gr.Row():
                mm_pick = gr.Dropdown(choices=loras, value=first_lora, label="LoRA", elem_id="lora_ext_tools_mm_pick",
                                      **compat.kw(gr.Dropdown, allow_custom_value=True))
                mm_weight = gr.Number(value=1.0, label="weight", elem_id="lora_ext_tools_mm_weight")
                mm_add = gr.Button("Add", elem_id="lora_ext_tools_mm_add")
            mm_loras = gr.Textbox(label="LoRAs, one per line as in a tag: name:weight[:unet weight][:lbw=...]",
                                  lines=4, elem_id="lora_ext_tools_mm_loras")
            mm_out, mm_dtype, mm_over = common("mm")
            mm_run = gr.Button("Merge", variant="primary", elem_id="lora_ext_tools_mm_run")
        with gr.Tab("Merge LoRAs", elem_id="lora_ext_tools_tab_merge_loras"):
            with gr.Row():
                ml_pick = gr.Dropdown(choices=loras, value=first_lora, label="LoRA", elem_id="lora_ext_tools_ml_pick",
                                      **compat.kw(gr.Dropdown, allow_custom_value=True))
                ml_weight = gr.Number(value=1.0, label="weight", elem_id="lora_ext_tools_ml_weight")
                ml_add = gr.Button("Add", elem_id="lora_ext_tools_ml_add")
            ml_inputs = gr.Textbox(label="LoRAs, one per line: name:weight", lines=4,
                                   elem_id="lora_ext_tools_ml_inputs")
            ml_rank = gr.Number(value=None, precision=0, label="rank (empty: exact, ranks added up)",
                                elem_id="lora_ext_tools_ml_rank")
            ml_base = base_model("ml")
            ml_out, ml_dtype, ml_over = common("ml")
            ml_run = gr.Button("Merge LoRAs", variant="primary", elem_id="lora_ext_tools_ml_run")
        with gr.Tab("Resize", elem_id="lora_ext_tools_tab_resize"):
            rs_lora = gr.Dropdown(choices=loras, value=first_lora, label="LoRA", elem_id="lora_ext_tools_rs_lora",
                                  **compat.kw(gr.Dropdown, allow_custom_value=True))
            with gr.Row():
                rs_rank = gr.Number(value=8, precision=0, label="rank (the largest, with a dynamic rule)",
                                    elem_id="lora_ext_tools_rs_rank")
                rs_dynamic = gr.Dropdown(choices=DYNAMIC_CHOICES, value=DYNAMIC_CHOICES[0], label="dynamic rule",
                                         elem_id="lora_ext_tools_rs_dynamic")
                rs_param = gr.Number(value=None, label="rule parameter (sv_ratio e.g. 2; sv_fro 0.9)",
                                     elem_id="lora_ext_tools_rs_param")
            rs_base = base_model("rs")
            rs_out, rs_dtype, rs_over = common("rs")
            rs_run = gr.Button("Resize", variant="primary", elem_id="lora_ext_tools_rs_run")
        with gr.Tab("Extract", elem_id="lora_ext_tools_tab_extract"):
            with gr.Row():
                ex_base = gr.Dropdown(choices=models, value=first_model, label="base checkpoint",
                                      elem_id="lora_ext_tools_ex_base",
                                      **compat.kw(gr.Dropdown, allow_custom_value=True))
                ex_tuned = gr.Dropdown(choices=models, value=None, label="fine-tuned checkpoint",
                                       elem_id="lora_ext_tools_ex_tuned",
                                       **compat.kw(gr.Dropdown, allow_custom_value=True))
            with gr.Row():
                ex_rank = gr.Number(value=16, precision=0, label="rank", elem_id="lora_ext_tools_ex_rank")
                ex_conv = gr.Number(value=None, precision=0, label="conv rank (empty: no 3x3 convs)",
                                    elem_id="lora_ext_tools_ex_conv")
            ex_out, ex_dtype, ex_over = common("ex")
            ex_run = gr.Button("Extract", variant="primary", elem_id="lora_ext_tools_ex_run")
        with gr.Tab("Convert", elem_id="lora_ext_tools_tab_convert"):
            with gr.Row():
                cv_lora = gr.Dropdown(choices=loras, value=first_lora, label="LoRA", elem_id="lora_ext_tools_cv_lora",
                                      **compat.kw(gr.Dropdown, allow_custom_value=True))
                cv_to = gr.Radio(choices=["kohya", "diffusers"], value="kohya", label="to",
                                 elem_id="lora_ext_tools_cv_to")
            cv_base = base_model("cv")
            cv_out, cv_dtype, cv_over = common("cv")
            cv_run = gr.Button("Convert", variant="primary", elem_id="lora_ext_tools_cv_run")
    with gr.Row():
        refresh = gr.Button("↻ refresh lists", elem_id="lora_ext_tools_refresh")
        cancel = gr.Button("Cancel", variant="stop", elem_id="lora_ext_tools_cancel")
    progress = gr.HTML(progress_html(0, "no tool job yet", "idle"), elem_id="lora_ext_tools_progress",
                       elem_classes=["lora-ext-live"])
    report = gr.HTML("", elem_id="lora_ext_tools_report", elem_classes=["lora-ext-live"])

    mm_add.click(tab.add_line, inputs=[mm_loras, mm_pick, mm_weight], outputs=[mm_loras])
    ml_add.click(tab.add_line, inputs=[ml_inputs, ml_pick, ml_weight], outputs=[ml_inputs])
    mm_run.click(tab.merge_model, inputs=[mm_model, mm_loras, mm_out, mm_dtype, mm_over], outputs=[message])
    ml_run.click(tab.merge_loras, inputs=[ml_inputs, ml_rank, ml_base, ml_out, ml_dtype, ml_over], outputs=[message])
    rs_run.click(tab.resize, inputs=[rs_lora, rs_rank, rs_dynamic, rs_param, rs_base, rs_out, rs_dtype, rs_over],
                 outputs=[message])
    ex_run.click(tab.extract, inputs=[ex_base, ex_tuned, ex_rank, ex_conv, ex_out, ex_dtype, ex_over],
                 outputs=[message])
    cv_run.click(tab.convert, inputs=[cv_lora, cv_to, cv_base, cv_out, cv_dtype, cv_over], outputs=[message])
    cancel.click(tab.cancel, outputs=[message])
    refresh.click(tab.refresh, outputs=[mm_model, ex_base, ex_tuned, rs_lora, cv_lora, ml_pick, mm_pick])
    compat.every(blocks, POLL_SECONDS, tab.poll, outputs=[progress, report])
    return tab

