"""`python -m client` exits 0 promptly on SIGTERM/SIGINT, whatever it is waiting for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stack.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_client(server_url: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FEDLAND_SERVER_URL": server_url,
        "FEDLAND_TOKEN": "test-token",
        "FEDLAND_DATA_DIR": str(tmp_path),
        "FEDLAND_LOG_LEVEL": "INFO",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "client"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def stop_and_collect(process: subprocess.Popen[str], signum: int) -> tuple[int, float, str]:
    t0 = time.monotonic()
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    return process.returncode, time.monotonic() - t0, output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_exits_zero_while_waiting_for_work(stub_server: Any, tmp_path: Path, signum: int) -> None:
    script = stub_server(
        routes={
            ("POST", "/api/v1/clients"): (201, {"client_id": "c-1", "heartbeat_interval_s": 5.0}),
            ("POST", "/api/v1/clients/c-1/task"): (200, {"action": "wait", "retry_after_s": 60.0}),
        }
    )
    process = start_client(script.url, tmp_path)
    wait_for(lambda: any(path.endswith("/task") for _, path, _, _ in script.calls), timeout_s=30)
    code, elapsed_s, output = stop_and_collect(process, signum)
    assert code == 0, output
    assert elapsed_s < 3.0
    assert "Traceback" not in output
    assert "client stopped" in output


def test_exits_zero_while_backing_off_from_an_unreachable_server(tmp_path: Path) -> None:
    process = start_client(f"http://127.0.0.1:{free_port()}", tmp_path)
    time.sleep(3.0)  # imports, then a few refused connections and backoff sleeps
    assert process.poll() is None
    code, elapsed_s, output = stop_and_collect(process, signal.SIGTERM)
    assert code == 0, output
    assert elapsed_s < 3.0
    assert "retry" in output and "Traceback" not in output


def test_reregisters_when_the_server_forgets_it(stub_server: Any, tmp_path: Path) -> None:
    script = stub_server(
        routes={
            ("POST", "/api/v1/clients"): (201, {"client_id": "c-1", "heartbeat_interval_s": 5.0}),
            ("POST", "/api/v1/clients/c-1/task"): (404, {"error": "unknown client"}),
        }
    )
    process = start_client(script.url, tmp_path)
    registrations = lambda: sum(path == "/api/v1/clients" for _, path, _, _ in script.calls)  # noqa: E731
    wait_for(lambda: registrations() >= 3, timeout_s=30)
    code, _, output = stop_and_collect(process, signal.SIGTERM)
    assert code == 0, output
    assert "registering again" in output


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDLAND_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "client"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "FEDLAND_TOKEN" in result.stderr
