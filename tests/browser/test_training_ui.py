"""The training UI in a real browser (Debian's chromium through Playwright), on the tiny SD1.5 model with real
training children: the standalone app (`python -m lora_ext ui`'s FastAPI app) and the tab mounted in a plain gradio
Blocks (how the WebUI hosts it). Runs on both gradio generations: 6.x in .venv, 3.41.2 (A1111 v1.10) in .venv-webui.

Every state a person sees is kept as a screenshot under test-artifacts/screenshots/."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from lora_ext.ui import compat
from lora_ext.ui.app import create_app, make_service
from lora_ext.ui.tab import extension_css
from tests.train.test_loop_train import sd15_model, write_images  # noqa: F401

WAIT_S = 180  # training
QUICK_S = 30  # a form answer


def _field(page, name: str):
    return page.locator(f"#lora_ext_{name}").locator("textarea, input").first


def _fill(page, **values) -> None:
    for name, value in values.items():
        box = _field(page, name)
        box.fill(str(value))
        box.press("Tab")  # gradio 3 reads a text box on blur/change


def _progress_text(page) -> str:
    return page.locator("#lora_ext_progress .text").first.inner_text()


def _wait_text(page, selector: str, pattern: str, timeout: float = QUICK_S) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        loc = page.locator(selector)
        text = loc.first.inner_text() if loc.count() else ""  # gradio 3 puts a Markdown's id on two elements
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{selector}: {pattern!r} not seen in {timeout} s; last text: {text!r}")


def _tab(page, elem: str, label: str):
    """A tab's button: gradio 4+ gives it the id <elem_id>-button; gradio 3 has only its label."""
    own = page.locator(f"#lora_ext_tab_{elem}-button")
    return own if own.count() else page.locator("button:visible", has_text=label).first


def _step(page) -> int:
    m = re.search(r"step (\d+)/", _progress_text(page))
    return int(m.group(1)) if m else -1


class App:
    """A service over a models folder holding only the tiny model, a datasets root, a LoRA folder."""

    def __init__(self, root: Path, model: Path) -> None:
        models = root / "models"
        models.mkdir(parents=True)
        os.symlink(model, models / "tiny-sd15")
        self.data = root / "datasets"
        write_images(self.data / "cats", 2)
        (self.data / "empty").mkdir(parents=True)
        self.lora = models / "Lora"
        self.service = make_service(self.lora, models, [self.data], root / "work")


@pytest.fixture
def app(sd15_model, tmp_path):  # noqa: F811
    return App(tmp_path, sd15_model)


def test_standalone_app_train_watch_reattach_cancel_resume_and_use(app, asgi_server, page, screenshot):
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 1000})
    url = asgi_server(create_app(app.service))
    page.goto(url)
    expect(page.locator("#lora_ext_train_button")).to_be_visible()
    screenshot(page, "01-loaded", full_page=True)

    # bad input: a clear message, and no job
    _fill(page, train_data_dir="empty", output_name="cat", resolution=64)
    page.click("#lora_ext_preview_button")
    _wait_text(page, "#lora_ext_dataset_preview", r"no usable image")
    _fill(page, train_data_dir="cats", output_name="a/b")
    page.click("#lora_ext_train_button")
    _wait_text(page, "#lora_ext_message", r"output_name.*not a plain file stem")
    _fill(page, train_data_dir="../outside", output_name="cat")
    page.click("#lora_ext_train_button")
    _wait_text(page, "#lora_ext_message", r"outside the folders")
    screenshot(page, "02-bad-input", full_page=True)
    assert app.service.runner.jobs() == []

    # the preview: counts, buckets, steps, thumbnails with captions
    _fill(page, train_data_dir="cats", output_name="cat", max_train_epochs=200)
    page.click("#lora_ext_preview_button")
    text = _wait_text(page, "#lora_ext_dataset_preview", r"Images.*2")
    assert "total 400 steps / 200 epochs" in text and "64×64" in text
    expect(page.locator("#lora_ext_thumbnails img")).to_have_count(2)
    screenshot(page, "03-preview", full_page=True)

    # train: progress, loss and the curve update
    page.click("#lora_ext_train_button")
    _wait_text(page, "#lora_ext_message", r"Training job \w+ started: cat")
    _wait_text(page, "#lora_ext_progress", r"running: step ([3-9]|\d\d+)/400", WAIT_S)
    _wait_text(page, "#lora_ext_stats", r"loss \d")
    assert page.locator("#lora_ext_chart polyline.smoothed").count() == 1
    screenshot(page, "04-running", full_page=True)

    # close the page and come back: the job is still there
    page.reload()
    text = _wait_text(page, "#lora_ext_progress", r"running: step \d+/400", WAIT_S)
    before = _step(page)
    _wait_text(page, "#lora_ext_progress", rf"running: step (?!{before}/)\d+/400", WAIT_S)
    screenshot(page, "05-reattached", full_page=True)

    # cancel now, then resume the stopped run
    page.click("#lora_ext_cancel_button")
    _wait_text(page, "#lora_ext_result", r"Stopped at step \d+", WAIT_S)
    stopped = app.service.runner.jobs()[0]
    assert stopped.state == "cancelled" and stopped.checkpoint
    screenshot(page, "06-cancelled", full_page=True)
    page.click("#lora_ext_runs_refresh")
    expect(_field(page, "runs")).to_have_value(re.compile(r"lora_ext_runs/cat$"))
    page.click("#lora_ext_resume_button")
    _wait_text(page, "#lora_ext_message", r"Resumed as job")
    _wait_text(page, "#lora_ext_progress", rf"running: step (?!{stopped.step}/)\d+/400", WAIT_S)
    resumed = app.service.runner.jobs()[0]
    assert resumed.resume_of == stopped.run_dir and resumed.step > stopped.step
    page.click("#lora_ext_stop_button")  # stop after the next checkpoint (one per epoch = 2 steps)
    _wait_text(page, "#lora_ext_result", r"Stopped at step", WAIT_S)
    assert app.service.runner.jobs()[0].step % 2 == 0

    # a short run to the end: the file, its card, send the prompt to the Generate tab and generate with it
    # (the reload reset the form: a page keeps its job, not what was typed)
    _fill(page, train_data_dir="cats", output_name="cat_final", max_train_epochs=2, trigger_word="sks", resolution=64)
    page.click("#lora_ext_train_button")
    _wait_text(page, "#lora_ext_message", r"Training job \w+ started: cat_final")
    _wait_text(page, "#lora_ext_result", r"LoRA written", timeout=WAIT_S)
    final = app.lora / "cat_final.safetensors"
    assert final.is_file() and final.with_suffix(".json").is_file() and final.with_suffix(".preview.png").is_file()
    expect(_field(page, "send_prompt")).to_have_value("<lora:cat_final:1> sks")
    screenshot(page, "07-finished", full_page=True)
    page.click("#lora_ext_send_button")
    expect(_field(page, "gen_prompt")).to_have_value("<lora:cat_final:1> sks")
    _fill(page, gen_steps=4, gen_width=64, gen_height=64)
    page.click("#lora_ext_gen_button")
    _wait_text(page, "#lora_ext_gen_info", r"cat_final: \d+/\d+ modules applied")
    expect(page.locator("#lora_ext_gen_image img")).to_have_count(1)
    screenshot(page, "08-generated", full_page=True)
    _tab(page, "library", "Library").click()
    page.click("#lora_ext_library_refresh")
    _wait_text(page, "#lora_ext_library", r"cat_final")
    screenshot(page, "09-library", full_page=True)


def test_tab_in_plain_blocks_previews_trains_and_offers_the_prompt(app, gradio_server, page, screenshot):
    """The tab as a host mounts it: inside its own gr.Blocks (A1111 puts it in a Tab of its UI)."""
    import gradio as gr
    from playwright.sync_api import expect

    from lora_ext.ui.tab import build_train_tab

    with gr.Blocks(analytics_enabled=False, **compat.kw(gr.Blocks, css=extension_css())) as blocks:  # as the WebUI
        build_train_tab(app.service, blocks, current_label=None)
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(gradio_server(blocks.queue()))
    expect(page.locator("#lora_ext_train_button")).to_be_visible()
    _fill(page, train_data_dir="cats", output_name="tabbed", max_train_epochs=1, resolution=64)
    page.click("#lora_ext_preview_button")
    _wait_text(page, "#lora_ext_dataset_preview", r"total 2 steps / 1 epochs")
    page.click("#lora_ext_train_button")
    _wait_text(page, "#lora_ext_result", r"LoRA written", WAIT_S)
    expect(_field(page, "send_prompt")).to_have_value("<lora:tabbed:1>")
    assert (app.lora / "tabbed.safetensors").is_file()
    _fill(page, output_name="tabbed")
    page.click("#lora_ext_train_button")  # the name is taken now
    _wait_text(page, "#lora_ext_message", r"already exists")
    screenshot(page, "finished-and-clash", full_page=True)
