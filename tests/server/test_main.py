"""`python -m server` as a process: serves with waitress, exits cleanly on SIGTERM, refuses bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from stack.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


def server_env(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLAND_")}
    env.update(variables)
    return env


def test_serves_and_stops_on_sigterm(mongo_uri: str, mongo_db_name: str, token: str, tmp_path: Path) -> None:
    port = free_port()
    env = server_env(
        FEDLAND_TOKEN=token, FEDLAND_WORKER_TOKEN="main-worker-token", FEDLAND_MONGO_URI=mongo_uri, FEDLAND_DB=mongo_db_name,
        FEDLAND_PORT=str(port), FEDLAND_DATA_DIR=str(tmp_path), FEDLAND_LOG_LEVEL="INFO",
    )
    process = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/v1/health"
        deadline = time.monotonic() + 30
        while True:
            try:
                response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "server did not come up in 30 s"
                time.sleep(0.2)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        assert response.headers["Server"] == "waitress"
        assert requests.get(url, timeout=2).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read() if process.stdout else ""
    assert "serving on" in output and "Traceback" not in output


def test_missing_token_exits_with_a_clear_message() -> None:
    result = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=server_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "FEDLAND_TOKEN" in result.stderr


def test_an_unreachable_store_is_one_line_naming_it_and_exit_2() -> None:
    uri = f"mongodb://alice:s3cret-pw@127.0.0.1:{free_port()}/"  # free a moment ago: nothing listens
    env = server_env(FEDLAND_TOKEN="t" * 24, FEDLAND_WORKER_TOKEN="w" * 24, FEDLAND_MONGO_URI=uri)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    duration_s = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("server: ") and "mongodb://alice:***@127.0.0.1:" in line and "Connection refused" in line
    assert "s3cret-pw" not in result.stderr + result.stdout
    started = time.monotonic()  # what starting takes here and now (imports: torch), with nothing else to do
    subprocess.run([sys.executable, "-c", "import server.api"], cwd=ROOT, env=env, check=True, timeout=120)
    limit_s = max(5.0, time.monotonic() - started + 3.0)  # 5 s on a quiet machine (about 2 s here)
    assert duration_s < limit_s, f"took {duration_s:.1f} s (limit {limit_s:.1f} s)"
