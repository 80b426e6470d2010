"""Live reports: quick parts of every experiment before any heavy figure, files replaced whole, and
`python main.py report --watch` stopped by SIGINT or SIGTERM mid-render exits at once (130, 143), pages intact."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reports import watch_reports
from reports.atomic import TEMP_SUFFIX, replaced, write_text
from server.store import Store
from tests.helpers import ROOT, assert_pages_intact, wait_until
from tests.reports.test_report import NO_DATA, Links, two_experiments


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    write_text(page, "first")
    with pytest.raises(RuntimeError), replaced(page) as temporary:
        temporary.write_text("half a pa", encoding="utf-8")
        assert temporary.parent == page.parent and temporary.name.endswith(TEMP_SUFFIX)
        raise RuntimeError("interrupted mid-write")
    assert page.read_text(encoding="utf-8") == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temporary file left
    write_text(page, "second")
    assert page.read_text(encoding="utf-8") == "second"
    assert page.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


def test_watch_draws_every_experiments_quick_parts_before_any_heavy_figure(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    measured_id, plain_id = two_experiments(store)
    caplog.set_level(logging.INFO, logger="reports")
    index = watch_reports(store.db, None, tmp_path, threading.Event(), poll_interval_s=0.2, data_dir=NO_DATA)
    assert index == tmp_path / "index.html"
    messages = [record.getMessage() for record in caplog.records if record.name == "reports"]
    quick = next(i for i, m in enumerate(messages) if m.startswith("accuracy, loss and tables of 2 experiments"))
    drawing = [i for i, m in enumerate(messages) if "drawing the final figures" in m]
    assert len(drawing) == 2 and quick < min(drawing), messages
    for experiment_id in (measured_id, plain_id):
        assert (tmp_path / experiment_id / "curvature.png").is_file() == (experiment_id == measured_id)
        assert "Not drawn yet" not in (tmp_path / experiment_id / "index.html").read_text(encoding="utf-8")
    assert "Not drawn yet" not in index.read_text(encoding="utf-8")
    assert assert_pages_intact(tmp_path) == 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_report_watch_stopped_mid_render_exits_at_once_with_the_pages_intact(
    store: Store, mongo_uri: str, mongo_db_name: str, tmp_path: Path, signum: int
) -> None:
    two_experiments(store)
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLAND_")} | {
        "FEDLAND_MONGO_URI": mongo_uri, "FEDLAND_DB": mongo_db_name, "FEDLAND_DATA_DIR": str(NO_DATA),
        "FEDLAND_LOG_LEVEL": "INFO",
    }
    out = tmp_path / "reports"
    report = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "report", "--watch", "--out", str(out)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert report.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(report.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("drawing the final figures" in line for line in lines), 120,
                   "the first full render", lambda: "".join(lines))
        sent = time.monotonic()
        report.send_signal(signum)
        code = report.wait(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if report.poll() is None:
            report.kill()
            report.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 128 + signum, output
    assert stopped_after < 5.0, f"exited {stopped_after:.1f} s after the signal"
    assert "terminate called" not in output and "Traceback" not in output, output
    assert "report: stopped" in output
    assert_pages_intact(out)


def test_final_renders_come_before_live_ones_and_live_figures_are_png_only(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running_id, finished_id = two_experiments(store)  # the running one comes first in the store's order
    store.db["experiments"].update_one({"_id": running_id}, {"$set": {"status": "running"}})
    caplog.set_level(logging.INFO, logger="reports")
    stop = threading.Event()

    def messages() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == "reports"]

    watcher = threading.Thread(target=watch_reports, args=(store.db, None, tmp_path, stop),
                               kwargs=dict(poll_interval_s=0.2, data_dir=NO_DATA, until_done=False), daemon=True)
    watcher.start()
    try:
        wait_until(lambda: any(f"{running_id}: live figures in" in m for m in messages()), 120,
                   "the running experiment's live figures", lambda: "\n".join(messages()))
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert not watcher.is_alive()
    drawn = [m for m in messages() if "drawing the" in m]
    assert drawn[0] == f"experiment {finished_id}: drawing the final figures", drawn
    live, final = tmp_path / running_id, tmp_path / finished_id
    assert sorted(p.name for p in live.glob("*.png")) and not list(live.glob("*.pdf"))
    assert sorted(p.stem for p in final.glob("*.pdf")) == sorted(p.stem for p in final.glob("*.png"))
    live_links, final_links = (Links((d / "index.html").read_text(encoding="utf-8")) for d in (live, final))
    assert live_links.images and not live_links.vectors  # no link to a PDF that a live render did not write
    assert sorted(final_links.vectors) == sorted(i.replace(".png", ".pdf") for i in final_links.images)
