"""Browser-test plumbing (a helper, not a test module): find the system Chromium and drive it with Playwright.

The tests use Debian's ``chromium`` package (``.ci/run`` installs it when missing) through Playwright's Python
package with ``executable_path``; nothing here ever downloads a browser (``playwright install`` is never run).
Tests that need a browser use :data:`skip_without_browser` and :func:`chromium_browser`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Flags for a headless, offline, root-safe Chromium (see /work/shared/docs/environment.md)."""


def find_chromium() -> str | None:
    """The path of a system Chromium: /usr/bin/chromium, /usr/bin/chromium-browser, then PATH; None if absent."""
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_missing_reason() -> str | None:
    """Why browser tests cannot run here (one line), or None when Chromium and Playwright are both present."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright's Python package is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return (
            "no Chromium found (looked in /usr/bin/chromium, /usr/bin/chromium-browser and PATH); "
            "install Debian's chromium package (.ci/run does) to run the browser tests"
        )
    return None


_REASON = browser_missing_reason()
skip_without_browser = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
"""Mark for tests that drive a real browser; they skip with the reason above where none is available."""


@contextlib.contextmanager
def chromium_browser(executable: str | Path | None = None, **launch: Any) -> Iterator[Any]:
    """Start the system Chromium headless through Playwright and yield the ``Browser``; closed on exit.

    Args:
        executable: the Chromium binary (default :func:`find_chromium`).
        **launch: extra keyword arguments for ``chromium.launch`` (e.g. ``slow_mo``).

    Raises:
        RuntimeError: no Chromium is available.
    """
    from playwright.sync_api import sync_playwright

    path = str(executable) if executable else find_chromium()
    if path is None:
        raise RuntimeError(browser_missing_reason() or "no Chromium found")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=list(CHROMIUM_FLAGS), **launch
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def serve_in_thread(app: Any, *, timeout: float = 15.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread on a free 127.0.0.1 port; yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not start within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
