"""Helpers shared by the end-to-end tests: a quick spec, polling, a local stack of real processes, `python main.py`.

`LocalStack` is what the `local_stack` fixture (tests/conftest.py) starts.
"""

from __future__ import annotations

import html.parser
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pymongo

from fedland.spec import ExperimentSpec, LandscapeSpec
from launch.processes import Child, child_env, start_clients, start_server, stop_all, wait_healthy
from reports.atomic import TEMP_SUFFIX
from stack import records
from stack.api_client import Transport
from stack.embedded import free_port

TOKEN = "e2e-token"  # the submitter's
WORKER_TOKEN = "e2e-worker-token"  # the workers enrol with it
IID = [[0.1] * 10]
ROOT = Path(__file__).resolve().parents[1]


def small_spec(num_clients: int, rounds: int, fraction: float = 0.04, **overrides: Any) -> dict[str, Any]:
    """A quick FedNet experiment: `fraction` of floor(60000 / num_clients) images per client.

    The landscape is measured every round on 256 samples unless `landscape` says otherwise (the budget
    would measure these short rounds rarely).
    """
    overrides.setdefault("landscape", LandscapeSpec(every=1, num_samples=256))
    spec = ExperimentSpec(
        description=f"e2e {num_clients} clients x {rounds} rounds",
        target_balance_ratios=IID * num_clients,
        subset_fractions=[fraction] * num_clients,
        rounds=rounds,
        learning_rate=0.05,
        momentum=0.5,
        seed=7,
        **overrides,
    )
    return spec.to_dict()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.2)


class LocalStack:
    """A server and clients as child processes on one database of the test store."""

    def __init__(self, mongo_uri: str, db_name: str, data_dir: Path, log_dir: Path, **server_env: str) -> None:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
        self.db = client[db_name]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = child_env(os.environ, FEDLAND_DATA_DIR=str(data_dir), FEDLAND_LOG_LEVEL="INFO")
        self.server_env = child_env(
            base, FEDLAND_MONGO_URI=mongo_uri, FEDLAND_DB=db_name, FEDLAND_PORT=str(self.port),
            FEDLAND_TOKEN=TOKEN, FEDLAND_WORKER_TOKEN=WORKER_TOKEN, **server_env,
        )
        self.client_env = child_env(base, FEDLAND_SERVER_URL=self.url, FEDLAND_WORKER_TOKEN=WORKER_TOKEN)
        self.client_env.pop("FEDLAND_TOKEN", None)
        self.log_dir = log_dir
        self.server: Child | None = None
        self.clients: list[Child] = []
        self.api = Transport(self.url, TOKEN, stop=threading.Event(), rng=random.Random(0), max_attempts=20)

    def start_server(self) -> None:
        self.server = start_server(self.server_env, self.log_dir / "server.log")
        wait_healthy(self.server, self.url, TOKEN)

    def add_clients(self, count: int) -> list[Child]:
        new = start_clients(count, self.client_env, self.log_dir, first=len(self.clients))
        self.clients += new
        return new

    def experiment(self, experiment_id: str) -> records.ExperimentRecord:
        experiment = records.read_experiment(self.db, experiment_id)
        assert experiment is not None
        return experiment

    def wait_done(self, experiment_id: str, timeout_s: float = 90.0) -> records.ExperimentRecord:
        wait_until(
            lambda: self.experiment(experiment_id).status in records.DONE,
            timeout_s, f"experiment {experiment_id} to finish", self.logs,
        )
        return self.experiment(experiment_id)

    def logs(self) -> str:
        parts = []
        for child in [c for c in [self.server, *self.clients] if c is not None]:
            parts.append(f"--- {child.name} ({child.log_path})\n{child.log_tail(15)}")
        return "\n".join(parts)

    def stop(self) -> None:
        stop_all(self.clients, timeout_s=10)
        if self.server is not None:
            self.server.stop(timeout_s=10)
        self.api.close()
        self.db.client.close()


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def assert_complete(stack: LocalStack, experiment_id: str, num_clients: int, rounds: int) -> None:
    """Exactly one stats doc per client x round, one rounds doc per round, global models 0..rounds."""
    experiment = stack.experiment(experiment_id)
    assert experiment.status == "finished", (experiment.error, stack.logs())
    stats = records.read_client_stats(stack.db, experiment_id)
    keys = sorted((s.client_index, s.round) for s in stats)
    assert keys == [(i, r) for i in range(num_clients) for r in range(1, rounds + 1)]
    rounds_records = records.read_rounds(stack.db, experiment_id)
    assert sorted(r.round for r in rounds_records) == list(range(1, rounds + 1))
    for round_record in rounds_records:
        assert finite(round_record.test_loss) and 0.0 <= round_record.test_accuracy <= 1.0
    files = stack.db[records.files_collection(records.MODELS)].find(
        {"metadata.experiment_id": experiment_id, "metadata.kind": records.GLOBAL}
    )
    model_rounds = sorted(records.ModelFile.from_metadata(f["metadata"]).round for f in files)
    assert model_rounds == list(range(rounds + 1))


def seconds_until_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes `sock`, sending `trickle` a byte every 0.2 s meanwhile (slowloris)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            if sent < len(trickle):
                try:
                    sock.send(trickle[sent:sent + 1])
                except OSError:
                    return time.monotonic() - started
                sent += 1
        except OSError:
            return time.monotonic() - started
    raise AssertionError(f"still open after {limit_s} s")


class MainRun:
    """`python main.py` in a subprocess; every line of its output kept with the time it appeared."""

    def __init__(self, tmp_path: Path, data_dir: Path, specs: list[dict[str, Any]], **env: str) -> None:
        """Runs ``specs`` with logs in ``tmp_path/logs``, reports in ``tmp_path/reports``; ``env`` adds FEDLAND_*."""
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
