"""`python main.py` run again after Ctrl-C resumes the unfinished experiment instead of queueing a copy.

Real processes: the launcher with its embedded nx-27017 store, server and one client, on real MNIST.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stack import records
from stack.embedded import EmbeddedMongo, connect
from tests.helpers import small_spec, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 4


def launcher_env(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLAND_")}
    return env | {
        "FEDLAND_DATA_DIR": str(data_dir), "FEDLAND_STORE_DIR": str(tmp_path / "store"),
        "FEDLAND_LOG_DIR": str(tmp_path / "logs"), "FEDLAND_LOG_LEVEL": "INFO",
    }


def running_store_uri(store_dir: Path) -> str | None:
    """The URI the launcher's embedded store recorded in its lock file, once it has."""
    try:
        record: Any = json.loads((store_dir / "store.lock").read_text() or "{}")
    except (OSError, ValueError):
        return None
    return record.get("uri") if isinstance(record, dict) else None


def test_a_rerun_after_ctrl_c_resumes_the_experiment(tmp_path: Path, data_dir: Path) -> None:
    experiments = tmp_path / "experiments.json"
    experiments.write_text(json.dumps([small_spec(num_clients=1, rounds=ROUNDS)]), encoding="utf-8")
    command = [sys.executable, str(ROOT / "main.py"), "--experiments", str(experiments),
               "--no-reports", "--no-progress", "--clients", "1"]
    env = launcher_env(tmp_path, data_dir)
    first_output = tmp_path / "first.txt"
    with open(first_output, "w", encoding="utf-8") as output:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)

    def logs() -> str:
        return first_output.read_text(encoding="utf-8", errors="replace")

    try:
        uri = wait_until(lambda: running_store_uri(tmp_path / "store"), 300, "the launcher's store", logs)
        client = connect(uri)
        try:
            db = client["fedland"]
            experiment_id = wait_until(lambda: records.experiment_ids(db), 300, "the experiment", logs)[0]
            wait_until(lambda: records.read_rounds(db, experiment_id), 300, "round 1 stored", logs)
        finally:
            client.close()
        first.send_signal(signal.SIGINT)  # Ctrl-C
        assert first.wait(timeout=120) == 130, logs()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    said = second.stdout + second.stderr
    assert second.returncode == 0, said
    assert f"resumed {experiment_id} (round " in second.stderr, said
    assert "finished (resumed)" in second.stdout or "measuring (resumed)" in second.stdout, said  # summary

    with EmbeddedMongo(tmp_path / "store") as uri:
        client = connect(uri)
        try:
            db = client["fedland"]
            [experiment] = records.read_experiments(db)  # one document: no copy was queued
            assert (experiment.id, experiment.status) == (experiment_id, "finished")
            assert [r.round for r in records.read_rounds(db, experiment_id)] == list(range(1, ROUNDS + 1))
        finally:
            client.close()
