"""`python main.py` with its reports drawn in a process of their own: the summary comes seconds after the last
round, the run exits promptly, and Ctrl-C or SIGTERM at any moment exits at once with nothing half-written.

Real processes: the launcher, nx-27017, `python -m server`, `python -m client`, `python -m reports`; real MNIST.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack import records
from stack.embedded import connect
from tests.helpers import MainRun, assert_pages_intact, small_spec, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def runs() -> Iterator[list[MainRun]]:
    started: list[MainRun] = []
    yield started
    for run in started:
        run.kill()


def processes_of(run: MainRun) -> list[int]:
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_render_exits_at_once_with_the_pages_intact(
    tmp_path: Path, data_dir: Path, runs: list[MainRun], signum: int
) -> None:
    run = MainRun(tmp_path, data_dir, [small_spec(2, rounds=2)])
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
    tmp_path: Path, data_dir: Path, runs: list[MainRun]
) -> None:
    run = MainRun(tmp_path, data_dir, [small_spec(2, rounds=30)])
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
    tmp_path: Path, data_dir: Path, mongo_uri: str, mongo_db_name: str, runs: list[MainRun]
) -> None:
    run = MainRun(tmp_path, data_dir, [small_spec(2, rounds=3), small_spec(1, rounds=2, fraction=0.02)],
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
