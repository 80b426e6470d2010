"""The reports in a real browser: headless Chromium (Debian's package) opens the index and an experiment page
served over HTTP on loopback; every image loads, nothing is logged to the console; screenshots are kept.
During a real `python main.py` run the live index shows each round's accuracy within seconds of the round."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reports import write_reports
from server.store import Store
from stack import records
from stack.embedded import connect
from tests.helpers import MainRun, small_spec, wait_until
from tests.reports.test_report import NO_DATA, two_experiments

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Screenshots of the last run (gitignored): a test artifact to look at.
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"


def serve(root: Path) -> Iterator[tuple[Path, str]]:
    """``root`` served by python's http.server on a free loopback port, in a thread."""
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


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback."""
    root = tmp_path / "site"
    root.mkdir()
    yield from serve(root)


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


def index_rows(page: Any) -> dict[str, list[str]]:
    """The index table's rows by experiment id: [label, id, status, rounds, clients, acc., loss, landscape]."""
    rows = page.eval_on_selector_all(
        "table tr", "rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(c => c.innerText.trim()))")
    return {row[1]: row for row in rows if len(row) >= 7}


@pytest.mark.slow
def test_the_live_index_shows_each_round_within_seconds_during_a_run(
    tmp_path: Path, data_dir: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    rounds = 8
    run = MainRun(tmp_path, data_dir, [small_spec(2, rounds=rounds)], FEDLAND_MONGO_URI=mongo_uri,
                  FEDLAND_DB=mongo_db_name)
    run.reports.mkdir()
    seen: dict[int, tuple[float, str]] = {}  # round -> (when the browser first showed it, the accuracy shown)
    live_screenshot = ARTIFACTS / "live-index.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.contextmanager(serve)(run.reports) as (_, base), sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def look() -> str | None:
                """Load the index as a reader would; the final status once the run ends."""
                response = page.goto(f"{base}/index.html", wait_until="load")
                rows = index_rows(page) if response is not None and response.status == 200 else {}
                for row in rows.values():
                    done, _, planned = row[3].partition("/")
                    if row[2] == "running" and row[5] != "—" and int(done) not in seen:
                        seen[int(done)] = (time.time(), row[5])
                        if len(seen) == 1:
                            page.screenshot(path=str(live_screenshot), full_page=True)
                    if row[2] in ("finished", "failed"):
                        return row[2]
                return None

            try:
                status = wait_until(look, 300, "the run's end on the live index", run.everything)
            finally:
                browser.close()
        assert status == "finished"
        assert run.wait(120)[0] == 0, run.everything()
    finally:
        run.kill()
    client = connect(mongo_uri)
    try:
        [experiment] = records.read_experiments(client[mongo_db_name])
        stored = {r.round: r for r in records.read_rounds(client[mongo_db_name], experiment.id)}
    finally:
        client.close()
    assert len(stored) == rounds
    assert len(seen) >= 2, f"the live index showed rounds {sorted(seen)} while the experiment ran"
    for round_, (when, accuracy) in seen.items():
        assert accuracy == f"{stored[round_].test_accuracy:.4f}", (round_, accuracy)  # the stored round's value
        assert when - stored[round_].finished_at < 10.0, f"round {round_} showed {when - stored[round_].finished_at:.1f} s late"
    assert live_screenshot.stat().st_size > 10_000
