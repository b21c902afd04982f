"""Browser tests: Debian's `chromium` driven by Playwright for Python, against gradio (and plain FastAPI) apps served
from this process.

Playwright's own browser download cannot work offline, so the browser is the system's chromium, launched through
`executable_path`: $LORA_EXT_CHROMIUM, else `chromium` on PATH (`bash dev.sh chromium` installs it). Without a
browser or without playwright every test here skips, unless LORA_EXT_REQUIRE_BROWSER=1 (CI sets it), which turns the
skip into a failure that says how to install what is missing.

Fixtures:
  browser        session-scoped headless chromium
  page           a fresh context + page per test (fixed viewport; requests to anything but this machine are aborted,
                 so a page that reaches for a CDN fails fast instead of hanging); a screenshot is saved when the test
                 fails
  screenshot     screenshot(page, "state") -> Path: test-artifacts/screenshots/<test-name>-<state>.png
  gradio_server  gradio_server(blocks) -> URL: launches a gr.Blocks on a free port (its own server thread), closed at
                 teardown; gradio 3.41 (A1111 v1.10) and 6.x alike
  asgi_server    asgi_server(app) -> URL: any ASGI app (FastAPI) under uvicorn in a thread, stopped at teardown
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from gradio (offline; 3.x checks versions)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LORA_EXT_ARTIFACTS", ROOT / "test-artifacts"))
SCREENSHOTS = ARTIFACTS / "screenshots"
VIEWPORT = {"width": 1024, "height": 640}
TIMEOUT_MS = 20_000  # generous: two shared vCPUs, a test suite running beside
INSTALL_HINT = (
    "install them with `bash dev.sh setup` (Debian's chromium through apt-get, playwright and gradio in the venv), "
    "or by hand: `apt-get install -y --no-install-recommends chromium` and `pip install -e '.[test,ui]'`; "
    "LORA_EXT_CHROMIUM may name another Chromium binary"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

_saved: list[Path] = []


def browser_required() -> bool:
    return os.environ.get("LORA_EXT_REQUIRE_BROWSER", "") not in ("", "0")


def chromium_path() -> str | None:
    """The browser binary: $LORA_EXT_CHROMIUM, else `chromium` on PATH."""
    exe = os.environ.get("LORA_EXT_CHROMIUM") or shutil.which("chromium")
    return exe if exe and os.access(exe, os.X_OK) else None


def _missing(what: str) -> None:
    msg = f"browser tests: {what}; {INSTALL_HINT}"
    if browser_required():
        pytest.fail(f"{msg} (LORA_EXT_REQUIRE_BROWSER=1, so this fails instead of skipping)", pytrace=False)
    pytest.skip(msg)


def _import_or_missing(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        _missing(f"{what} is not importable ({e})")


# --- the browser ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_executable() -> str:
    exe = chromium_path()
    if exe is None:
        named = os.environ.get("LORA_EXT_CHROMIUM")
        _missing(f"LORA_EXT_CHROMIUM={named} is not executable" if named else "no `chromium` on PATH")
    return exe


@pytest.fixture(scope="session")
def browser(browser_executable):
    sync_api = _import_or_missing("playwright.sync_api", "playwright")
    args = ["--disable-dev-shm-usage", "--disable-gpu"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # chromium refuses to start its sandbox as root
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=browser_executable, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)  # a browser and a server per test: `-m "not slow"` leaves them out


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)  # the page fixture saves a screenshot of a failed test
    return report


def _local_only(route) -> None:
    host = urlparse(route.request.url).hostname or ""
    if host in LOCAL_HOSTS or route.request.url.startswith(("data:", "blob:")):
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def page(browser, request, screenshot):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    context.route("**/*", _local_only)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            try:
                screenshot(pg, "failed")
            except Exception as e:  # a crashed page: the test's own failure is the news
                print(f"[browser] no failure screenshot: {e}")
            if errors:
                print("[browser] page errors:\n  " + "\n  ".join(errors))
        context.close()


# --- screenshots ----------------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:150]


@pytest.fixture
def screenshot(request) -> Callable[..., Path]:
    """screenshot(page, state, **kw) saves test-artifacts/screenshots/<test-name>-<state>.png (kw go to
    page.screenshot, e.g. full_page=True) and returns its path."""

    def save(pg, state: str, **kw) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{_safe(request.node.name)}-{_safe(state)}.png"
        pg.screenshot(path=str(path), **kw)
        _saved.append(path)
        print(f"[browser] screenshot: {path}")
        return path

    return save


def pytest_terminal_summary(terminalreporter):
    if _saved:
        terminalreporter.write_sep("-", f"browser screenshots ({len(_saved)})")
        for p in _saved:
            terminalreporter.write_line(str(p))


# --- servers --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def gradio_server() -> Iterator[Callable[..., str]]:
    """gradio_server(blocks, **launch_kw) -> "http://127.0.0.1:<port>/": the Blocks launched on a free port in its own
    server thread (launch(prevent_thread_lock=True)), closed at teardown."""
    _import_or_missing("gradio", "gradio (the `ui` extra)")
    launched = []

    def serve(blocks, **launch_kw) -> str:
        port = free_port()
        kw = {"server_name": "127.0.0.1", "server_port": port, "prevent_thread_lock": True, "quiet": True,
              "show_error": True}
        kw.update(launch_kw)
        blocks.launch(**kw)
        launched.append(blocks)
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url)
        return url

    try:
        yield serve
    finally:
        for blocks in launched:
            # gradio 3's close() joins its server thread, whose graceful shutdown waits for the page's open
            # connections (the `every=` poll): force the exit instead of hanging the session
            server = getattr(blocks, "server", None)
            if server is not None:
                server.force_exit = True
            blocks.close()


@pytest.fixture
def asgi_server() -> Iterator[Callable[..., str]]:
    """asgi_server(app) -> "http://127.0.0.1:<port>/": an ASGI app (FastAPI) under uvicorn in a daemon thread, stopped
    at teardown."""
    uvicorn = _import_or_missing("uvicorn", "uvicorn (the `ui` extra)")
    running = []

    def serve(app, **config_kw) -> str:
        port = free_port()
        # lifespan on: a mounted gradio app starts its event queue in the app's startup (off, events never run)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                **{"lifespan": "on", **config_kw})
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {port}")
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}/"

    try:
        yield serve
    finally:
        for server, thread in running:
            server.should_exit = True
            thread.join(timeout=10)
