"""The reports in a real browser: headless Chromium (Debian's package) opens the index and an experiment page
served over HTTP on loopback; every image loads, nothing is logged to the console; screenshots are kept."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reports import write_reports
from server.store import Store
from tests.reports.test_report import NO_DATA, two_experiments

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Screenshots of the last run (gitignored): a test artifact to look at.
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served by python's http.server on a free loopback port, in a thread."""
    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pages_load_every_image_without_console_errors(store: Store, http_root: tuple[Path, str]) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    root, base = http_root
    measured_id, _ = two_experiments(store)
    write_reports(store.db, None, root, data_dir=NO_DATA)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            for name, url in (("index", f"{base}/index.html"), ("experiment", f"{base}/{measured_id}/index.html")):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                problems: list[str] = []
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
                response = page.goto(url, wait_until="load")
                assert response is not None and response.status == 200, url
                images = page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
                assert len(images) >= 6, images
                broken = [src for src, complete, width in images if not complete or width == 0]
                assert broken == [], f"{name}: images that did not load: {broken}"
                links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
                assert any(str(href).endswith(".pdf") for href in links)
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
                assert problems == [], problems
                page.close()
        finally:
            browser.close()
    assert (ARTIFACTS / "index.png").stat().st_size > 10_000
