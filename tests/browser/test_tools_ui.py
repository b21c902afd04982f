"""The Tools tab in a real browser (Debian's chromium through Playwright), as the WebUI mounts it (a Tools tab beside
the Train tab in one gr.Blocks) and in the standalone app: merge a LoRA into a checkpoint, resize and convert LoRAs,
bad input, the report. Runs on both gradio generations (6.x in .venv, 3.41.2 in .venv-webui). Screenshots under
test-artifacts/screenshots/."""

from __future__ import annotations

import pytest
import torch

from lora_ext.formats.safetensors_io import load_tensors, read_header, save_safetensors_atomic
from lora_ext.models.loading import load_pipeline
from lora_ext.models.tiny import save_tiny_model
from lora_ext.ui import compat
from lora_ext.ui.app import make_service
from lora_ext.ui.tab import extension_css
from tests.browser.test_training_ui import _fill, _wait_text
from tests.lora_factory import make_entries, to_state_dict

WAIT_S = 120


@pytest.fixture
def tools_world(tmp_path):
    models = tmp_path / "models"
    lora_dir = models / "Lora"
    lora_dir.mkdir(parents=True)
    model = save_tiny_model("sd15", models, "single-file", name="tiny")
    pipe = load_pipeline(model).pipe
    save_safetensors_atomic(to_state_dict(make_entries(pipe, "lora", rank=4, seed=1), "kohya"),
                            lora_dir / "style.safetensors")
    service = make_service(lora_dir, models, [tmp_path / "datasets"], tmp_path / "work")
    return {"service": service, "models": models, "lora": lora_dir, "model": model}


def _open(page, elem_id: str, label: str) -> None:
    """Switch tabs: gradio 4+ gives the tab's button the id <elem_id>-button; gradio 3 has only its label."""
    own = page.locator(f"#{elem_id}-button")
    (own if own.count() else page.locator("button:visible", has_text=label).first).click()


def _set_dropdown(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem}").locator("input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    box.press("Tab")


def test_tools_tab_merge_resize_convert(tools_world, gradio_server, page, screenshot):
    import gradio as gr
    from playwright.sync_api import expect

    from lora_ext.ui.tab import build_train_tab
    from lora_ext.ui.tools_tab import build_tools_tab

    service = tools_world["service"]
    with gr.Blocks(analytics_enabled=False, **compat.kw(gr.Blocks, css=extension_css())) as blocks, \
            gr.Tabs():
        with gr.Tab("Train", elem_id="lora_ext_tab_train"):
            build_train_tab(service, blocks)
        with gr.Tab("Tools", elem_id="lora_ext_tab_tools"):
            build_tools_tab(service, blocks)
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(gradio_server(blocks.queue()))
    expect(page.locator("#lora_ext_train_button")).to_be_visible()
    _open(page, "lora_ext_tab_tools", "Tools")
    expect(page.locator("#lora_ext_tools_mm_run")).to_be_visible()
    screenshot(page, "01-tools-loaded", full_page=True)

    # merge into the checkpoint: add the LoRA from the list, a bad name first, then a good one
    page.click("#lora_ext_tools_mm_add")
    expect(page.locator("#lora_ext_tools_mm_loras textarea")).to_have_value("style:1")
    _fill(page, tools_mm_loras="style:0.8", tools_mm_out="a/b")
    page.click("#lora_ext_tools_mm_run")
    _wait_text(page, "#lora_ext_tools_message", r"out_name.*plain file name")
    assert service.runner.jobs() == []
    _fill(page, tools_mm_out="tiny_style")
    page.click("#lora_ext_tools_mm_run")
    _wait_text(page, "#lora_ext_tools_message", r"Job \w+ started: merge-model")
    _wait_text(page, "#lora_ext_tools_report", r"merged 1 LoRA\(s\) into \d+ of \d+ tensors", WAIT_S)
    out = tools_world["models"] / "tiny_style.safetensors"
    assert out.is_file()
    merged, base = load_tensors(out), load_tensors(tools_world["model"])
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    screenshot(page, "02-merged", full_page=True)

    # resize to rank 2 against the base model's layer names
    _open(page, "lora_ext_tools_tab_resize", "Resize")
    _set_dropdown(page, "lora_ext_tools_rs_base", "tiny.safetensors")
    _fill(page, tools_rs_rank=2, tools_rs_out="style_r2")
    page.click("#lora_ext_tools_rs_run")
    _wait_text(page, "#lora_ext_tools_report", r"resize: \d+ layers, rank 2", WAIT_S)
    assert read_header(tools_world["lora"] / "style_r2.safetensors").metadata["ss_network_dim"] == "2"
    screenshot(page, "03-resized", full_page=True)

    # convert to diffusers names
    _open(page, "lora_ext_tools_tab_convert", "Convert")
    _set_dropdown(page, "lora_ext_tools_cv_base", "tiny.safetensors")
    page.locator("#lora_ext_tools_cv_to").get_by_text("diffusers").click()
    _fill(page, tools_cv_out="style_diffusers")
    page.click("#lora_ext_tools_cv_run")
    _wait_text(page, "#lora_ext_tools_report", r"convert: \d+ layers", WAIT_S)
    keys = list(load_tensors(tools_world["lora"] / "style_diffusers.safetensors"))
    assert keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    screenshot(page, "04-converted", full_page=True)
