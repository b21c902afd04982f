"""The browser tier works end to end: chromium opens a gradio page served from this process, types, clicks, and sees
the server's answer; the same for a plain FastAPI page. Only gradio APIs common to 3.41 (A1111 v1.10) and 6.x."""

from __future__ import annotations

import pytest


def greet(name: str) -> str:
    return f"Hello, {name}!"


def test_gradio_blocks_round_trip(gradio_server, page, screenshot):
    import gradio as gr
    from playwright.sync_api import expect

    with gr.Blocks(title="lora_ext smoke") as demo:
        name = gr.Textbox(label="Name", elem_id="smoke-name")
        button = gr.Button("Greet", elem_id="smoke-greet")
        out = gr.Textbox(label="Greeting", elem_id="smoke-out")
        button.click(greet, inputs=name, outputs=out)

    url = gradio_server(demo)
    page.goto(url)
    field = page.locator("#smoke-name").locator("textarea, input").first
    expect(field).to_be_visible()
    screenshot(page, "loaded")
    field.fill("Ada")
    page.locator("#smoke-greet").click()
    expect(page.locator("#smoke-out").locator("textarea, input").first).to_have_value("Hello, Ada!")
    screenshot(page, "answered")


def test_fastapi_page_round_trip(asgi_server, page, screenshot):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from playwright.sync_api import expect

    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return ("<!doctype html><title>smoke</title><button id=go onclick=\"fetch('api/echo?text=hi')"
                ".then(r => r.json()).then(j => document.getElementById('out').textContent = j.echo)\">go</button>"
                "<p id=out></p>")

    @app.get("/api/echo")
    def echo(text: str) -> dict:
        return {"echo": text.upper()}

    page.goto(asgi_server(app))
    page.click("#go")
    expect(page.locator("#out")).to_have_text("HI")
    screenshot(page, "answered")


def test_outside_requests_are_blocked(page):
    """The page fixture keeps tests hermetic: a request off this machine fails at once instead of hanging offline."""
    from playwright.sync_api import Error

    with pytest.raises(Error):
        page.goto("http://example.com/", timeout=5_000)
