"""The search page in a real headless Chromium: text search, result images, upload, caption, error box.

The app runs under uvicorn on a free loopback port in a background thread, over the word-overlap
:class:`serve_fixtures.CataloguePipeline` (the model pipeline's browser test is separate). Skips, with the
reason, where no Chromium or Playwright is installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from browser import chromium_browser, serve_in_thread, skip_without_browser

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from kaleido_bert.serve.app import create_app  # noqa: E402
from serve_fixtures import CataloguePipeline  # noqa: E402

pytestmark = [pytest.mark.browser, skip_without_browser, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server(catalogue_root) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a port the OS picked); yields its base URL."""
    with serve_in_thread(create_app(CataloguePipeline(catalogue_root), catalogue_root=catalogue_root)) as url:
        yield url


def test_search_upload_and_errors_in_chromium(server, catalogue_root, tmp_path):
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        console_errors: list[str] = []
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: console_errors.append(str(err)))
        page.goto(server + "/", wait_until="networkidle")
        assert page.title() == "kaleido-bert product search"
        # the category dropdown is filled from /api/categories
        page.wait_for_function("document.querySelectorAll('#category option').length > 1", timeout=10_000)
        assert page.locator("#category option").count() == 1 + 7

        # text search: results appear as a grid of loaded images with title and score
        page.fill("#query", "printed t-shirt")
        page.select_option("#k", "5")
        page.click("#search-button")
        page.wait_for_selector("#results .result", timeout=10_000)
        results = page.locator("#results .result")
        assert results.count() == 5
        page.wait_for_function(
            "[...document.querySelectorAll('#results .result img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=10_000,
        )
        first = results.first
        assert "t-shirt" in first.locator(".title").inner_text().lower()
        assert first.locator(".score").inner_text().startswith("score 1.000")
        assert page.locator("#error").is_hidden()
        assert "5 results" in page.inner_text("#status")

        # category filter: every result is in the chosen category
        page.select_option("#category", "SHOES")
        page.click("#search-button")
        page.wait_for_function(
            "[...document.querySelectorAll('#results .result .labels')].every(l => l.textContent.startsWith('SHOES'))"
            " && document.querySelectorAll('#results .result').length > 0",
            timeout=10_000,
        )
        page.select_option("#category", "")

        # image upload through the file input: similar products, descriptions, caption, classification
        photo = catalogue_root / "images" / "p00000_v1.jpg"
        page.set_input_files("#file-input", str(photo))
        page.wait_for_function("document.querySelector('#caption').textContent.trim().length > 0", timeout=10_000)
        page.wait_for_selector("#classification .top-label", timeout=10_000)
        page.wait_for_selector("#descriptions li", timeout=10_000)
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('Showing')", timeout=10_000)
        assert page.inner_text("#caption") == "camel printed oversized t-shirt"
        assert "TOPS" in page.inner_text("#classification") and "%" in page.inner_text("#classification")
        assert page.locator("#results .result").first.get_attribute("data-id") == "p00000-v1"
        assert page.locator("#error").is_hidden()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        # an upload the API refuses: its one-line detail shows in the error box
        page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                    "buffer": b"not an image"}])
        page.wait_for_selector("#error", state="visible", timeout=10_000)
        assert "content type 'text/plain' is not supported" in page.inner_text("#error")
        assert "notes.txt" in page.inner_text("#error")

        # an empty query is caught on the page
        page.fill("#query", "   ")
        page.click("#search-button")
        page.wait_for_function("document.querySelector('#error').textContent.includes('Type a description')")
        # the refused upload's failed requests are the only console errors
        assert all("status of 415" in e for e in console_errors), console_errors
    assert (tmp_path / "page.png").stat().st_size > 10_000
