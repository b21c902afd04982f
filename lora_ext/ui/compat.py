"""The few gradio differences the UI meets, in one place: gradio 3.41 (AUTOMATIC1111 v1.10), 4.x (Forge) and 5/6 (the
standalone app's newest). Everything else the UI uses (Blocks, Row, Column, Tab, Accordion, Textbox, Number,
Checkbox, Dropdown, Button, Markdown, HTML, Gallery, File, State, `gr.update`) has one spelling in all of them.

- Polling: `every=` on `Blocks.load` (3.x, 4.x) became `gr.Timer(...).tick` (4.40+; `every=` is gone in 5+).
- Uploaded files: a tempfile wrapper with `.name` (3.x) or a path string (4+).
- JavaScript on an event: `_js=` (3.x) or `js=` (4+).
- The Blocks object of the context we build in (3.x: the tab's Blocks; 4+: the same), for `every`.
- `blur` on a Number: 3.x and 5+ have it, 4.x (Forge's 4.40) does not (`on_leave` falls back to `change`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any


def gradio() -> Any:
    import gradio as gr

    return gr


def major() -> int:
    return int(str(gradio().__version__).split(".")[0])


def every(blocks: Any, seconds: float, fn: Callable[..., Any], outputs: Sequence[Any],
          inputs: Sequence[Any] = ()) -> Any:
    """Call `fn` every `seconds` while the page is open and update `outputs`: a Timer where gradio has one, else
    `blocks.load(..., every=...)`. Call inside the `with blocks:` context."""
    gr = gradio()
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        timer.tick(fn, inputs=list(inputs), outputs=list(outputs), show_progress="hidden")
        return timer
    return blocks.load(fn, inputs=list(inputs), outputs=list(outputs), every=seconds, show_progress=False)


def on_load(blocks: Any, fn: Callable[..., Any], outputs: Sequence[Any], inputs: Sequence[Any] = ()) -> Any:
    """Run `fn` when the page loads (quietly)."""
    kw = {"show_progress": "hidden"} if major() >= 4 else {"show_progress": False}
    return blocks.load(fn, inputs=list(inputs), outputs=list(outputs), **kw)


def on_leave(component: Any, fn: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> Any:
    """Run `fn` when the user leaves `component` (`blur`), or on each change where this gradio's component has no blur
    event."""
    event = getattr(component, "blur", None) or component.change
    return event(fn, inputs=list(inputs), outputs=list(outputs))


def js_kwarg(code: str) -> dict[str, str]:
    """The keyword that attaches JavaScript to an event listener: {"_js": code} (3.x) or {"js": code} (4+)."""
    return {"_js": code} if major() < 4 else {"js": code}


def file_path(value: Any) -> str | None:
    """The path of an uploaded file (gr.File value) in every version; None when nothing was uploaded."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # some versions hand FileData dicts
        return value.get("path") or value.get("name")
    return getattr(value, "name", None) or getattr(value, "path", None)


def file_paths(values: Any) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        values = [values]
    return [p for p in (file_path(v) for v in values) if p]


def supports(component: Any, kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(component.__init__).parameters
    except (TypeError, ValueError):
        return False


def kw(component: Any, **options: Any) -> dict[str, Any]:
    """`options` without the keywords this gradio's `component` does not take (e.g. `info`, `show_label`)."""
    return {k: v for k, v in options.items() if supports(component, k)}


def kw_fn(fn: Callable[..., Any], **options: Any) -> dict[str, Any]:
    """`options` without the keywords function `fn` of this gradio does not take."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return options
    return {k: v for k, v in options.items() if k in params}
