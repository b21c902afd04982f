"""The "LoRA Training" tab: one gradio UI for the WebUI tab and the standalone app (lora_ext.ui.app).

Build it inside a `with gr.Blocks() as blocks:` context (a Tab of it, in the app):

    parts = build_train_tab(service, blocks, current_label="(current WebUI checkpoint)")
    parts.send_prompt      # Textbox holding "<lora:name:weight> trigger words" once a LoRA is finished
    parts.send_button      # the host wires it: the WebUI to txt2img, the app to its Generate tab

The form is generated from TrainConfig (lora_ext.ui.form): the main fields on top, every other option in the
Advanced accordion by section, each with the CLI's help text. Job state lives on the server (the service's job
runner): the live view polls it every second, so a reloaded page shows the running job again. Every element a test or
a person needs has an `elem_id` starting with `lora_ext_`.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.ui import compat
from lora_ext.ui.chart import loss_chart_svg, progress_html
from lora_ext.ui.form import (
    BASIC_FIELDS,
    DREAMBOOTH_FIELDS,
    HOST_FIELDS,
    MEMORY_PRESETS,
    PURPOSE_PRESETS,
    FormField,
    apply_preset,
    form_fields,
    format_duration,
    values_from_toml,
    values_to_toml,
)
from lora_ext.ui.service import TrainService, prompt_for

POLL_SECONDS = 1.0
THUMB_SIDE = 160
SAMPLES_SHOWN = 8
LOG_LINES = 40
NO_PRESET = "(none)"
LIVE = ["lora-ext-live"]  # parts the poll refreshes: style.css keeps gradio 3 from drawing them as busy every second


@dataclass
class TabParts:
    """The components a host needs after building the tab."""

    inputs: dict[str, Any]
    send_prompt: Any
    send_button: Any
    message: Any
    components: dict[str, Any] = field(default_factory=dict)


def _display(f: FormField, value: Any) -> Any:
    """A config value as its widget shows it."""
    if f.kind == "lines":
        return "\n".join(value or [])
    if f.kind == "table":
        return "\n".join(f"{k} = {_toml_scalar(v)}" for k, v in (value or {}).items())
    if f.kind == "choice" and value is None:
        return None
    if f.kind in ("int", "float") and f.optional:
        return "" if value is None else str(value)
    return value


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def _widget(gr: Any, f: FormField) -> Any:
    common = {"label": f.label, "elem_id": f"lora_ext_{f.name}"}
    info = f.help
    if f.kind == "bool":
        return gr.Checkbox(value=bool(f.default), **common, **compat.kw(gr.Checkbox, info=info))
    if f.kind in ("int", "float") and f.optional:  # a Number cannot be empty: "none" is an empty text box
        value = "" if f.default is None else str(f.default)
        return gr.Textbox(value=value, **common, **compat.kw(gr.Textbox, info=info, placeholder="none"))
    if f.kind in ("int", "float"):
        return gr.Number(value=f.default, precision=0 if f.kind == "int" else None, **common,
                         **compat.kw(gr.Number, info=info))
    if f.kind == "choice":
        choices = list(f.choices)
        return gr.Dropdown(choices=choices, value=f.default, **common, **compat.kw(gr.Dropdown, info=info))
    lines = 3 if f.kind in ("lines", "table") else 1
    return gr.Textbox(value=_display(f, f.default) or "", lines=lines, **common, **compat.kw(gr.Textbox, info=info))


def _thumbs(items: Sequence[dict[str, Any]]) -> list[tuple[Any, str]]:
    """(PIL thumbnail, caption) pairs: images go to the page as data, so every gradio serves them whatever their
    folder."""
    from PIL import Image

    out = []
    for item in items:
        try:
            with Image.open(item["path"]) as img:
                img = img.convert("RGB")
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                out.append((img.copy(), str(item.get("caption", ""))[:200]))
        except OSError:
            continue
    return out


def error_markdown(err: Exception) -> str:
    fieldname = getattr(err, "field", None)
    where = f"**{fieldname}**: " if fieldname and not str(err).startswith(fieldname) else ""
    return f"<div class='lora-ext-error' style='color:#b00'>⚠ {where}{html.escape(str(err))}</div>"


def preview_markdown(p: dict[str, Any]) -> str:
    r = p["report"]
    lines = [f"**Model**: {html.escape(str(p['model']))} — {p['family']} ({p['prediction_type']}), resolution "
             f"{p['resolution']}",
             f"**Images**: {r['images']}" + (f" + {r['class_images']} class images" if r["class_images"] else ""),
             f"**Steps**: {html.escape(r['formula'] or '')}", f"**{html.escape(p['estimate'])}**"]
    for s in r["sources"]:
        lines.append(f"- `{html.escape(s['name'])}` ({s['kind']}): {s['images']} images × {s['repeats']} repeats = "
                     f"{s['samples']} samples/epoch" + (f", {s['missing_captions']} without caption"
                                                        if s.get("missing_captions") else ""))
    if r["buckets"]:
        lines.append("**Buckets**: " + ", ".join(f"{b['resolution'][0]}×{b['resolution'][1]}: {b['count']}"
                                                 for b in r["buckets"]))
    if p["problems"]:
        lines.append("**Problems** (fix them or check that this is what you want):")
        lines += [f"- {html.escape(x)}" for x in p["problems"]]
    return "\n\n".join(lines)


def job_stats(v: dict[str, Any]) -> str:
    if not v:
        return "No training job yet."
    parts = [f"**{html.escape(v['name'])}** — {v['state']}",
             f"step {v['step']}/{v['total_steps'] or '?'}"]
    if v.get("epoch"):
        parts.append(f"epoch {v['epoch']}/{v.get('total_epochs') or '?'}")
    if v.get("loss") is not None:
        parts.append(f"loss {v['loss']:.4f} (avg {v['loss_avg']:.4f})" if v.get("loss_avg") is not None
                     else f"loss {v['loss']:.4f}")
    if v.get("lr") is not None:
        parts.append(f"lr {v['lr']:.2e}")
    if v.get("it_s"):
        parts.append(f"{v['it_s']:.2f} it/s")
    if v.get("eta_s") is not None and v["state"] == "running":
        parts.append(f"ETA {format_duration(v['eta_s'])}")
    if v.get("peak_memory_bytes"):
        parts.append(f"memory {v['peak_memory_bytes'] / 2**20:.0f} MiB")
    return " · ".join(parts)


def result_markdown(v: dict[str, Any]) -> str:
    if not v:
        return ""
    if v["state"] == "finished" and v.get("output"):
        return (f"<div class='lora-ext-done'>✔ LoRA written: <code>{html.escape(v['output'])}</code> (with its "
                ".json card and preview). It is in the LoRA list now.</div>")
    if v["state"] == "failed":
        return error_markdown(RuntimeError(v.get("error") or "the training failed"))
    if v["state"] == "cancelled":
        where = f" Its last checkpoint: <code>{html.escape(v['checkpoint'])}</code>." if v.get("checkpoint") else ""
        return (f"<div class='lora-ext-stopped'>Stopped at step {v['step']}.{where} Resume it below to continue."
                "</div>")
    return ""


class TrainTab:
    """The callbacks of the tab (plain methods: tests call them without a browser)."""

    def __init__(self, service: TrainService, *, current_label: str | None = None) -> None:
        self.service = service
        self.current_label = current_label  # the model choice that means "the host's current checkpoint"
        self.fields = [f for f in form_fields() if f.name not in HOST_FIELDS]
        self.names = [f.name for f in self.fields]

    # -------------------------------------------------------------------------------------------- values
    def values(self, args: Sequence[Any]) -> dict[str, Any]:
        vals = dict(zip(self.names, args))
        if self.current_label and vals.get("pretrained_model") == self.current_label:
            vals["pretrained_model"] = ""
        return vals

    def model_choices(self) -> list[str]:
        return ([self.current_label] if self.current_label else []) + self.service.model_choices()

    # ----------------------------------------------------------------------------------------- callbacks
    def preview(self, *args: Any) -> tuple[str, list, str]:
        try:
            p = self.service.preview(self.values(args))
        except (LoraExtError, ValueError) as err:
            return error_markdown(err), [], ""
        return preview_markdown(p), _thumbs(p["thumbnails"]), p["estimate"]

    def estimate(self, *args: Any) -> str:
        """The live "total steps / epochs / time" line ("" while the form cannot be counted yet)."""
        try:
            return self.service.preview(self.values(args))["estimate"]
        except (LoraExtError, ValueError):
            return ""

    def family(self, model: str | None) -> str:
        """The chosen base model's family, read from its configs or header (no weights are loaded)."""
        try:
            return "**family**: " + self.service.family("" if model == self.current_label else model)
        except (LoraExtError, ValueError) as err:
            return error_markdown(err)

    def start(self, *args: Any) -> str:
        try:
            job = self.service.start(self.values(args))
        except (LoraExtError, ValueError) as err:
            return error_markdown(err)
        return f"<div class='lora-ext-started'>Training job {job.id} started: {html.escape(job.name)}.</div>"

    def control(self, action: str) -> Callable[[], str]:
        def run() -> str:
            job = self.service.runner.active()
            if job is None or job.kind != "train":
                return error_markdown(RuntimeError("no training job is running"))
            try:
                getattr(self.service.runner, action)(job.id)
            except (LoraExtError, ValueError) as err:
                return error_markdown(err)
            said = {"cancel": "Cancelling: a checkpoint is written at the end of this step.",
                    "save": "A checkpoint is written after this step; training goes on.",
                    "stop_after_checkpoint": "Training stops after the next checkpoint."}[action]
            return f"<div class='lora-ext-info'>{said}</div>"
        return run

    def resume(self, run_dir: str | None) -> str:
        if not run_dir:
            return error_markdown(RuntimeError("choose a stopped run to resume (refresh the list)"))
        try:
            job = self.service.resume(run_dir)
        except (LoraExtError, ValueError) as err:
            return error_markdown(err)
        return f"<div class='lora-ext-started'>Resumed as job {job.id}: {html.escape(job.name)}.</div>"

    def runs(self) -> Any:
        gr = compat.gradio()
        runs = [r["run_dir"] for r in self.service.resumable_runs()]
        return gr.update(choices=runs, value=runs[0] if runs else None)

    def current_view(self) -> dict[str, Any]:
        """The running training job, else the latest one (tool jobs show in the Tools tab)."""
        job = self.service.runner.active()
        if job is None or job.kind != "train":
            jobs = [j for j in self.service.runner.jobs() if j.kind == "train"]
            job = jobs[0] if jobs else None
        return self.service.view(job.id) if job is not None else {}

    def poll(self) -> tuple[str, str, str, list, str, str, str]:
        v = self.current_view()
        if not v:
            return (progress_html(0, "no training job yet", "idle"), job_stats(v), loss_chart_svg([]), [], "", "",
                    "")
        text = f"{v['state']}: step {v['step']}/{v['total_steps'] or '?'}"
        if v.get("eta") and v["state"] == "running":
            text += f", about {v['eta']} left"
        samples = [(str(p), Path(p).stem) for p in v["samples"][-SAMPLES_SHOWN:]]
        log = "\n".join(v.get("log_tail", [])[-LOG_LINES:])
        send = ""
        if v["state"] == "finished" and v.get("output"):
            send = self._send_text(v)
        chart = loss_chart_svg(v.get("losses", []), validation=v.get("validation", []))
        return (progress_html(v["fraction"], text, v["state"]), job_stats(v), chart, _images(samples), log,
                result_markdown(v), send)

    def _send_text(self, v: dict[str, Any]) -> str:
        import json

        weight, words = 1.0, ""
        sidecar = Path(v["output"]).with_suffix(".json")
        try:
            card = json.loads(sidecar.read_text(encoding="utf-8"))
            weight = float(card.get("preferred weight") or 1.0) or 1.0
            words = str(card.get("activation text") or "")
        except (OSError, ValueError):
            pass
        return prompt_for(Path(v["output"]).stem, weight, words)

    def apply_presets(self, memory: str, purpose: str, *args: Any) -> list[Any]:
        vals = self.values(args)
        described = []
        for name in (memory, purpose):
            if name and name != NO_PRESET:
                vals = apply_preset(vals, name)
                described.append(next(p for p in MEMORY_PRESETS + PURPOSE_PRESETS if p.name == name).describe())
        gr = compat.gradio()
        updates = [gr.update(value=_display(f, vals.get(f.name))) for f in self.fields]
        return [*updates, "\n\n".join(f"- {html.escape(d)}" for d in described)]

    def save_toml(self, *args: Any) -> tuple[Any, str]:
        try:
            vals = self.values(args)
            if not vals.get("pretrained_model"):
                vals.pop("pretrained_model", None)
            text = values_to_toml(vals)
        except (LoraExtError, ValueError) as err:
            return None, error_markdown(err)
        name = (vals.get("output_name") or "lora").strip() or "lora"
        out = Path(tempfile.mkdtemp(prefix="lora_ext_form_")) / f"{name}.toml"
        out.write_text(text, encoding="utf-8")
        return str(out), f"<div class='lora-ext-info'>Settings saved as {html.escape(out.name)}.</div>"

    def load_toml(self, file: Any) -> list[Any]:
        gr = compat.gradio()
        path = compat.file_path(file)
        keep = [gr.update() for _ in self.fields]
        if not path:
            return [*keep, ""]
        try:
            vals = values_from_toml(Path(path).read_text(encoding="utf-8"), source=Path(path).name)
        except (LoraExtError, ValueError, OSError) as err:
            return [*keep, error_markdown(err)]
        updates = [gr.update(value=_display(f, vals.get(f.name))) for f in self.fields]
        return [*updates, f"<div class='lora-ext-info'>Loaded {html.escape(Path(path).name)}.</div>"]

    def upload(self, name: str, files: Any) -> tuple[Any, str]:
        gr = compat.gradio()
        try:
            folder = self.service.upload(name, compat.file_paths(files))
        except (LoraExtError, ValueError) as err:
            return gr.update(), error_markdown(err)
        return gr.update(value=str(folder)), f"<div class='lora-ext-info'>Stored in {html.escape(str(folder))}.</div>"


def extension_css() -> str:
    """The extension's style.css (the WebUI loads it by itself; the app and plain Blocks pass it as `css=`)."""
    path = Path(__file__).resolve().parents[2] / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _images(pairs: Sequence[tuple[str, str]]) -> list[tuple[Any, str]]:
    from PIL import Image

    out = []
    for path, caption in pairs:
        try:
            with Image.open(path) as img:
                out.append((img.convert("RGB"), caption))
        except OSError:
            continue
    return out


def _live_view(gr: Any, send_label: str) -> tuple[Any, ...]:
    """The parts the poll refreshes: progress, stats, loss chart, samples, result, the prompt to send, the log."""
    progress = gr.HTML(progress_html(0, "no training job yet", "idle"), elem_id="lora_ext_progress", elem_classes=LIVE)
    stats = gr.Markdown("", elem_id="lora_ext_stats", elem_classes=LIVE)
    chart = gr.HTML(loss_chart_svg([]), elem_id="lora_ext_chart", elem_classes=LIVE)
    samples = gr.Gallery(label="latest samples", elem_id="lora_ext_samples", elem_classes=LIVE,
                         **compat.kw(gr.Gallery, columns=4, height=300, object_fit="contain", preview=False,
                                     fit_columns=False))
    result = gr.HTML("", elem_id="lora_ext_result", elem_classes=LIVE)
    with gr.Row():
        send_prompt = gr.Textbox(label="prompt with the new LoRA", elem_id="lora_ext_send_prompt", interactive=False,
                                 elem_classes=LIVE)
        send_button = gr.Button(send_label, elem_id="lora_ext_send_button")
    log = gr.Textbox(label="log", lines=6, max_lines=12, elem_id="lora_ext_log", interactive=False,
                     elem_classes=LIVE)
    return progress, stats, chart, samples, result, send_prompt, send_button, log


def build_train_tab(service: TrainService, blocks: Any, *, current_label: str | None = None,
                    allow_upload: bool = False, send_label: str = "Send to txt2img") -> TabParts:
    """Build the tab's components inside the current gradio context (see the module docstring)."""
    gr = compat.gradio()
    tab = TrainTab(service, current_label=current_label)
    by_name = {f.name: f for f in tab.fields}
    inputs: dict[str, Any] = {}

    def add(name: str) -> None:
        if name in inputs:
            return
        f = by_name[name]
        if name == "pretrained_model":
            choices = tab.model_choices()
            inputs[name] = gr.Dropdown(choices=choices, value=choices[0] if choices else None, label="base model",
                                       elem_id="lora_ext_pretrained_model",
                                       **compat.kw(gr.Dropdown, info=f.help, allow_custom_value=True))
        else:
            inputs[name] = _widget(gr, f)

    gr.Markdown("## LoRA Training\nPoint it at a folder of images with captions, check the preview, press "
                "**Train**. The finished LoRA lands in the LoRA folder, ready to use as `<lora:name:1>`.")
    message = gr.HTML("", elem_id="lora_ext_message")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                add("pretrained_model")
                add("vae")
            family = gr.Markdown("", elem_id="lora_ext_family")
            with gr.Row():
                add("train_data_dir")
                preview_btn = gr.Button("Preview dataset", elem_id="lora_ext_preview_button")
            upload_parts = None
            if allow_upload:
                with gr.Accordion("Upload images and captions into a new folder", open=False):
                    upload_files = gr.File(file_count="multiple", label="images and caption files",
                                           elem_id="lora_ext_upload_files")
                    with gr.Row():
                        upload_name = gr.Textbox(label="new dataset folder name", elem_id="lora_ext_upload_name")
                        upload_btn = gr.Button("Upload", elem_id="lora_ext_upload_button")
                upload_parts = (upload_files, upload_name, upload_btn)
            with gr.Accordion("DreamBooth (instance and class images)", open=False):
                for name in DREAMBOOTH_FIELDS:
                    add(name)
            with gr.Row():
                add("output_name")
                add("trigger_word")
                add("overwrite")
        with gr.Column(scale=2):
            with gr.Row():
                memory = gr.Dropdown(choices=[NO_PRESET] + [p.name for p in MEMORY_PRESETS], value=NO_PRESET,
                                     label="GPU memory preset", elem_id="lora_ext_memory_preset")
                purpose = gr.Dropdown(choices=[NO_PRESET] + [p.name for p in PURPOSE_PRESETS], value=NO_PRESET,
                                      label="purpose preset", elem_id="lora_ext_purpose_preset")
            apply_btn = gr.Button("Apply presets", elem_id="lora_ext_apply_presets")
            preset_info = gr.Markdown("", elem_id="lora_ext_preset_info")
            estimate = gr.Markdown("", elem_id="lora_ext_estimate")
    with gr.Row():
        for name in BASIC_FIELDS:
            if name not in inputs and name != "sample_prompts":
                add(name)
    add("sample_prompts")
    with gr.Accordion("Advanced: every option", open=False, elem_id="lora_ext_advanced"):
        sections: dict[str, list[str]] = {}
        for f in tab.fields:
            if f.name not in inputs:
                sections.setdefault(f.section, []).append(f.name)
        for section, names in sections.items():
            with gr.Accordion(section, open=False):
                for name in names:
                    add(name)
        with gr.Row():
            save_btn = gr.Button("Save settings (TOML)", elem_id="lora_ext_save_toml")
            toml_out = gr.File(label="settings file", elem_id="lora_ext_toml_file")
            toml_in = gr.File(label="load settings (TOML)", file_types=[".toml"], elem_id="lora_ext_toml_upload")
    with gr.Row():
        preview_md = gr.Markdown("", elem_id="lora_ext_dataset_preview")
    thumbs = gr.Gallery(label="dataset images with their captions", elem_id="lora_ext_thumbnails",
                        **compat.kw(gr.Gallery, columns=8, height=260, object_fit="contain", fit_columns=False))
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="lora_ext_train_button")
        cancel_btn = gr.Button("Cancel now", variant="stop", elem_id="lora_ext_cancel_button")
        stop_btn = gr.Button("Stop after next checkpoint", elem_id="lora_ext_stop_button")
        save_now_btn = gr.Button("Save now", elem_id="lora_ext_save_now_button")
    with gr.Row():
        runs = gr.Dropdown(choices=[], label="stopped runs", elem_id="lora_ext_runs", scale=3,
                           **compat.kw(gr.Dropdown, allow_custom_value=True))
        runs_refresh = gr.Button("↻ refresh", elem_id="lora_ext_runs_refresh", scale=1)
        resume_btn = gr.Button("Resume", elem_id="lora_ext_resume_button", scale=1)
    progress, stats, chart, samples, result, send_prompt, send_button, log = _live_view(gr, send_label)

    values = [inputs[n] for n in tab.names]
    preview_btn.click(tab.preview, inputs=values, outputs=[preview_md, thumbs, estimate])
    for name in ("train_data_dir", "max_train_epochs", "max_train_steps", "train_batch_size",
                 "gradient_accumulation_steps", "resolution"):
        compat.on_leave(inputs[name], tab.estimate, inputs=values, outputs=[estimate])
    inputs["pretrained_model"].change(tab.family, inputs=[inputs["pretrained_model"]], outputs=[family])
    train_btn.click(tab.start, inputs=values, outputs=[message])
    cancel_btn.click(tab.control("cancel"), outputs=[message])
    stop_btn.click(tab.control("stop_after_checkpoint"), outputs=[message])
    save_now_btn.click(tab.control("save"), outputs=[message])
    runs_refresh.click(tab.runs, outputs=[runs])
    resume_btn.click(tab.resume, inputs=[runs], outputs=[message])
    apply_btn.click(tab.apply_presets, inputs=[memory, purpose, *values], outputs=[*values, preset_info])
    save_btn.click(tab.save_toml, inputs=values, outputs=[toml_out, message])
    toml_in.upload(tab.load_toml, inputs=[toml_in], outputs=[*values, message])
    if upload_parts is not None:
        files, name, btn = upload_parts
        btn.click(tab.upload, inputs=[name, files], outputs=[inputs["train_data_dir"], message])
    live = [progress, stats, chart, samples, log, result, send_prompt]
    compat.every(blocks, POLL_SECONDS, tab.poll, outputs=live)
    compat.on_load(blocks, tab.runs, outputs=[runs])
    compat.on_load(blocks, tab.family, inputs=[inputs["pretrained_model"]], outputs=[family])
    return TabParts(inputs=inputs, send_prompt=send_prompt, send_button=send_button, message=message,
                    components={"tab": tab, "progress": progress, "chart": chart, "result": result, "runs": runs,
                                "preview": preview_md, "thumbs": thumbs, "estimate": estimate, "log": log})
