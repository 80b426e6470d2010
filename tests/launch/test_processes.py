"""Children of the launcher are stopped with one SIGTERM, and a client's log then ends cleanly."""

from __future__ import annotations

import os
import time
from pathlib import Path

from launch.processes import child_env, start_clients, stop_all
from stack.embedded import free_port


def test_stop_all_signals_each_client_once_and_logs_end_cleanly(tmp_path: Path) -> None:
    env = child_env(
        os.environ,
        FEDLAND_SERVER_URL=f"http://127.0.0.1:{free_port()}",  # nobody there: the clients back off
        FEDLAND_WORKER_TOKEN="t",
        FEDLAND_DATA_DIR=str(tmp_path),
        FEDLAND_LOG_LEVEL="INFO",
    )
    clients = start_clients(2, env, tmp_path / "logs")
    logs = [tmp_path / "logs" / f"client-{i}.log" for i in range(2)]
    while not all(path.exists() and "retry 1 in" in path.read_text() for path in logs):  # running and backing off
        assert all(client.alive() for client in clients)
        time.sleep(0.05)
    stop_all(clients)
    for client, path in zip(clients, logs):
        assert client.process.returncode == 0
        text = path.read_text()
        assert text.count("SIGTERM received") == 1 and "received again" not in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        assert text.rstrip().endswith("client stopped")
