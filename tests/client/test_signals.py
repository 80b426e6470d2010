"""`python -m client` exits 0 on SIGTERM/SIGINT, whatever it is waiting for, without a traceback.

No sleeps and no wall-clock bounds: each test waits for a line the client logs (or a
call the stub server sees) before it signals; the timeouts only stop a hung test.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stack.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


HANG_S = 120.0  # only a hung client reaches this


class Client:
    """`python -m client` as a process, its output read line by line as it comes."""

    def __init__(self, server_url: str, tmp_path: Path) -> None:
        env = {
            **os.environ,
            "FEDLAND_SERVER_URL": server_url,
            "FEDLAND_WORKER_TOKEN": "test-token",
            "FEDLAND_DATA_DIR": str(tmp_path),
            "FEDLAND_LOG_LEVEL": "INFO",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._fresh.put(line)
        self._fresh.put(None)

    def wait_for_line(self, text: str) -> str:
        """The first line (from now on) containing `text`; fails if the client exits first."""
        while True:
            line = self._fresh.get(timeout=HANG_S)
            if line is None:
                raise AssertionError(f"client exited before logging {text!r}:\n{self.output}")
            if text in line:
                return line

    def stop(self, *signals: int) -> int:
        for signum in signals:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=HANG_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout=HANG_S)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + HANG_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_exits_zero_while_waiting_for_work(stub_server: Any, tmp_path: Path, signum: int) -> None:
    script = stub_server(
        routes={
            ("POST", "/api/v1/workers"): (201, {"worker_id": "c-1", "worker_secret": "c-1.s", "heartbeat_interval_s": 5.0}),
            ("POST", "/api/v1/workers/c-1/task"): (200, {"action": "wait", "retry_after_s": 60.0}),
        }
    )
    client = Client(script.url, tmp_path)
    wait_for(lambda: any(path.endswith("/task") for _, path, _, _ in script.calls))
    assert client.stop(signum) == 0, client.output
    assert "Traceback" not in client.output
    assert "client stopped" in client.output


def test_exits_zero_while_backing_off_from_an_unreachable_server(tmp_path: Path) -> None:
    client = Client(f"http://127.0.0.1:{free_port()}", tmp_path)
    client.wait_for_line("retry 2 in")  # imports done, connections refused, now in a backoff sleep
    assert client.stop(signal.SIGTERM) == 0, client.output
    assert "Traceback" not in client.output and "client stopped" in client.output


def test_a_second_signal_stops_at_once_without_a_traceback(tmp_path: Path) -> None:
    client = Client(f"http://127.0.0.1:{free_port()}", tmp_path)
    client.wait_for_line("retry 1 in")
    assert client.stop(signal.SIGTERM, signal.SIGTERM) == 0, client.output
    assert "Traceback" not in client.output and "KeyboardInterrupt" not in client.output


def test_reregisters_when_the_server_forgets_it(stub_server: Any, tmp_path: Path) -> None:
    script = stub_server(
        routes={
            ("POST", "/api/v1/workers"): (201, {"worker_id": "c-1", "worker_secret": "c-1.s", "heartbeat_interval_s": 5.0}),
            ("POST", "/api/v1/workers/c-1/task"): (404, {"error": "unknown worker"}),
        }
    )
    client = Client(script.url, tmp_path)
    registrations = lambda: sum(path == "/api/v1/workers" for _, path, _, _ in script.calls)  # noqa: E731
    wait_for(lambda: registrations() >= 3)
    assert client.stop(signal.SIGTERM) == 0, client.output
    assert "registering again" in client.output


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDLAND_TOKEN", "FEDLAND_WORKER_TOKEN")}
    result = subprocess.run(
        [sys.executable, "-m", "client"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "FEDLAND_WORKER_TOKEN" in result.stderr
