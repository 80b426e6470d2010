"""`python main.py` with its reports drawn in a process of their own: the summary comes seconds after the last
round, the run exits promptly, and Ctrl-C or SIGTERM at any moment exits at once with nothing half-written.

Real processes: the launcher, nx-27017, `python -m server`, `python -m client`, `python -m reports`; real MNIST.
"""

from __future__ import annotations

import html.parser
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from reports.atomic import TEMP_SUFFIX
from stack import records
from stack.embedded import connect
from tests.helpers import small_spec, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Run:
    """`python main.py` in a subprocess; every line of its output kept with the time it appeared."""

    def __init__(self, tmp_path: Path, data_dir: Path, specs: list[dict[str, Any]], **env: str) -> None:
        self.tmp_path = tmp_path
        self.logs = tmp_path / "logs"
        self.reports = tmp_path / "reports"
        experiments = tmp_path / "experiments.json"
        experiments.write_text(json.dumps(specs), encoding="utf-8")
        base = {key: value for key, value in os.environ.items() if not key.startswith("FEDLAND_")}
        self.env = base | {
            "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_STORE_DIR": str(tmp_path / "store"),
            "FEDLAND_LOG_DIR": str(self.logs), "FEDLAND_LOG_LEVEL": "INFO", **env,
        }
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--experiments", str(experiments), "--no-progress",
             "--reports", str(self.reports)],
            cwd=tmp_path, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append((time.time(), line))

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def log(self, name: str) -> str:
        try:
            return (self.logs / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def everything(self) -> str:
        return self.output() + "".join(self.log(p.name) for p in sorted(self.logs.glob("*.log")))

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """Exit status and the time it exited."""
        code = self.process.wait(timeout=timeout_s)
        exited = time.time()
        self._reader.join(timeout=10)
        return code, exited

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def processes_of(run: Run) -> list[int]:
    """Live processes started for this run: every child inherits its (unique) log directory in its environment."""
    marker = f"FEDLAND_LOG_DIR={run.logs}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in environ.split(b"\0") and "zombie" not in state:
            found.append(int(entry.name))
    return found


class _Strict(html.parser.HTMLParser):
    """Counts the elements that must open and close a whole page."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: list[str] = []

    def handle_endtag(self, tag: str) -> None:
        self.closed.append(tag)


def assert_pages_intact(reports: Path) -> int:
    """Every page is a whole document, every row and figure file complete, no temporary file left; returns pages."""
    assert not [p for p in reports.rglob(f"*{TEMP_SUFFIX}")], "temporary files left behind"
    pages = sorted(reports.rglob("index.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>"), page
        parser = _Strict()
        parser.feed(text)
        parser.close()
        assert parser.closed[-2:] == ["body", "html"], page
    for summary in reports.rglob("summary.json"):
        assert json.loads(summary.read_text(encoding="utf-8"))["experiment_id"]
    for png in reports.rglob("*.png"):
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND", png
    for pdf in reports.rglob("*.pdf"):
        assert pdf.read_bytes().rstrip().endswith(b"%%EOF"), pdf
    return len(pages)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_render_exits_at_once_with_the_pages_intact(
    tmp_path: Path, data_dir: Path, runs: list[Run], signum: int
) -> None:
    run = Run(tmp_path, data_dir, [small_spec(2, rounds=2)])
    runs.append(run)
    wait_until(lambda: "drawing the final figures" in run.log("reports.log"), 300,
               "the report process drawing the final figures", run.everything)
    assert run.process.poll() is None  # the launcher gives the report process its time
    sent = time.time()
    run.process.send_signal(signum)
    code, exited = run.wait(30)
    assert code == 128 + signum, run.everything()
    assert exited - sent < 5.0, f"exited {exited - sent:.1f} s after the signal"
    assert "terminate called" not in run.everything() and "Traceback" not in run.everything(), run.everything()
    assert processes_of(run) == [], "processes left behind"
    assert "experiment" in run.output()  # the summary came before the final render
    assert assert_pages_intact(run.reports) >= 2  # the index and the experiment's page


def test_sigterm_while_training_exits_with_143_and_leaves_nothing_running(
    tmp_path: Path, data_dir: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, data_dir, [small_spec(2, rounds=30)])
    runs.append(run)
    wait_until(lambda: "round 1/30" in run.log("client-0.log") + run.log("client-1.log"), 300,
               "training", run.everything)
    sent = time.time()
    run.process.send_signal(signal.SIGTERM)
    code, exited = run.wait(30)
    assert code == 143, run.everything()
    assert exited - sent < 5.0, f"exited {exited - sent:.1f} s after the signal"
    assert "terminate called" not in run.everything() and "Traceback" not in run.everything(), run.everything()
    assert processes_of(run) == []
    assert_pages_intact(run.reports)


def test_the_summary_comes_within_5_s_of_the_last_round_and_the_run_exits_within_30_s(
    tmp_path: Path, data_dir: Path, mongo_uri: str, mongo_db_name: str, runs: list[Run]
) -> None:
    run = Run(tmp_path, data_dir, [small_spec(2, rounds=3), small_spec(1, rounds=2, fraction=0.02)],
              FEDLAND_MONGO_URI=mongo_uri, FEDLAND_DB=mongo_db_name)
    runs.append(run)
    code, exited = run.wait(600)
    assert code == 0, run.everything()
    client = connect(mongo_uri)
    try:
        db = client[mongo_db_name]
        experiments = records.read_experiments(db)
        assert sorted(e.status for e in experiments) == ["finished", "finished"]
        last_round = max(r.finished_at for e in experiments for r in records.read_rounds(db, e.id))
    finally:
        client.close()
    summary = next(t for t, line in run.lines if line.startswith("experiment ") and "status" in line)
    assert summary - last_round < 5.0, f"summary {summary - last_round:.1f} s after the last round"
    assert exited - last_round < 30.0, f"exited {exited - last_round:.1f} s after the last round"
    assert processes_of(run) == []
    assert "terminate called" not in run.everything()
    assert_pages_intact(run.reports)
