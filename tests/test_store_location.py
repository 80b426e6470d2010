"""Server, launcher and report command agree on where the embedded store lives (stack.settings' one rule).

Each is started for real, from the same working directory, without a MongoDB URI:
an experiment queued through `python -m server` must be seen by the launcher's
store and by `python main.py report`, which only happens if all three opened the
same files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch.launcher import LocalRun, RunOptions, make_transport
from launch.processes import Child, wait_healthy
from stack.embedded import free_port
from stack.settings import DEFAULT_STORE_DIR, LauncherSettings, ServerSettings
from tests.helpers import small_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_server_launcher_and_report_use_one_embedded_store(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLAND_")}
    env |= {
        "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_TOKEN": "location-token-0123456789",
        "FEDLAND_WORKER_TOKEN": "location-worker-token",
    }
    assert ServerSettings.from_env(env).store_dir == LauncherSettings.from_env(env).store.store_dir == DEFAULT_STORE_DIR

    # 1. python -m server, with no URI, starts its embedded store in ./data/store
    port = free_port()
    server = Child("server", "server", env | {"FEDLAND_PORT": str(port)}, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, env["FEDLAND_TOKEN"], timeout_s=300.0)
        api = make_transport(url, env["FEDLAND_TOKEN"])
        [experiment_id] = api.submit_experiments([small_spec(num_clients=1, rounds=1)])
        api.close()
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=120)
        server.stop()
    assert (tmp_path / DEFAULT_STORE_DIR).is_dir()

    # 2. the launcher, with no URI, opens the same store: the server's experiment is there
    run = LocalRun(RunOptions(store=LauncherSettings.from_env(env).store, log_dir=tmp_path / "logs"), env)
    try:
        run.start(0)
        transport = make_transport(run.url, run.token)
        assert experiment_id in [e["id"] for e in transport.list_experiments()]
        transport.close()
    finally:
        run.stop()

    # 3. `python main.py report ID` finds the same store (an unknown id would exit 2 naming it)
    report = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "report", experiment_id, "--out", str(tmp_path / "reports")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert "no store" not in report.stderr and "experiment_id" not in report.stderr, report.stderr
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "reports" / "index.html").is_file()
