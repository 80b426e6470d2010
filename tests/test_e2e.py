"""End to end: real nx-27017, `python -m server` and `python -m client` processes, real MNIST.

Every test uses a fresh database on the session's nx-27017 and loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo.database import Database

from fedland.datasets import load_dataset
from fedland.partition import partition
from launch.processes import child_env
from stack import records
from tests.helpers import (
    TOKEN,
    LocalStack,
    assert_complete,
    finite,
    small_spec,
    wait_until,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_two_clients_two_rounds(local_stack: Callable[..., LocalStack], data_dir: Path) -> None:
    stack = local_stack()
    spec = small_spec(num_clients=2, rounds=2)
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(2)
    stack.wait_done(experiment_id)
    assert_complete(stack, experiment_id, num_clients=2, rounds=2)

    # the partition each client trained on is the one computed here from the spec and real MNIST
    mnist = load_dataset("MNIST", data_dir)
    parts = partition(mnist.train_y, mnist.test_y, spec["target_balance_ratios"], spec["subset_fractions"], 7)
    slots = {m.client_index: m for m in records.read_members(stack.db, experiment_id)}
    assert sorted(slots) == [0, 1]
    for index, part in enumerate(parts):
        assert slots[index].class_counts == tuple(part.class_counts)
        assert slots[index].partition_digest == part.digest()

    for record in records.read_client_stats(stack.db, experiment_id):
        part = parts[record.client_index]
        assert record.num_examples == part.num_train
        stats = record.stats
        for phase in ("global", "local"):
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
                assert finite(stats[phase][key]), (phase, key, stats[phase])
        assert 0.0 <= stats["local"]["train_accuracy"] <= 1.0
        assert len(stats["train_loss_per_epoch"]) == 1 and finite(stats["train_loss_per_epoch"][0])
        durations = stats["duration_s"]
        assert set(durations) == {"fetch", "eval_global", "train", "eval_local", "total"}
        assert durations["total"] >= durations["train"] > 0
    # round 2 starts from the aggregate of round 1: the clients' "global" stats there beat round 1's
    round1, round2 = (
        [s for s in records.read_client_stats(stack.db, experiment_id, r) if s.client_index == 0] for r in (1, 2)
    )
    assert len(round1) == 1 and len(round2) == 1
    assert round2[0].stats["global"]["train_loss"] < round1[0].stats["global"]["train_loss"]

    [summary] = [e for e in stack.api.list_experiments() if e["id"] == experiment_id]
    last = records.read_round(stack.db, experiment_id, 2)
    assert last is not None
    assert summary["last_round"] == {"round": 2, "test_loss": last.test_loss, "test_accuracy": last.test_accuracy}


def test_killed_client_slot_is_reassigned(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack(FEDLAND_HEARTBEAT_TIMEOUT_S="3")
    rounds = 6
    [experiment_id] = stack.api.submit_experiments([small_spec(num_clients=2, rounds=rounds)])
    first, second = stack.add_clients(2)
    wait_until(
        lambda: len(records.read_rounds(stack.db, experiment_id)) >= 1,
        60, "round 1", stack.logs,
    )
    first.process.send_signal(signal.SIGKILL)
    first.wait(10)
    assert stack.experiment(experiment_id).status == "running"
    [third] = stack.add_clients(1)
    stack.wait_done(experiment_id)
    assert_complete(stack, experiment_id, num_clients=2, rounds=rounds)
    assert second.alive() and third.alive()

    workers = (records.WorkerRecord.from_doc(doc) for doc in stack.db[records.WORKERS].find())
    worker_ids = {w.pid: w.worker_id for w in workers}
    holders = {s.worker_id for s in records.read_client_stats(stack.db, experiment_id)}
    assert {worker_ids[first.pid], worker_ids[second.pid]} <= holders  # the third may or may not get a member
    assert holders <= {worker_ids[first.pid], worker_ids[second.pid], worker_ids[third.pid]}


def test_server_restart_resumes_on_the_same_store(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack()
    rounds = 5
    [experiment_id] = stack.api.submit_experiments([small_spec(num_clients=2, rounds=rounds)])
    stack.add_clients(2)
    wait_until(
        lambda: len(records.read_rounds(stack.db, experiment_id)) >= 2,
        60, "round 2", stack.logs,
    )
    assert stack.server is not None
    stack.server.process.send_signal(signal.SIGKILL)
    stack.server.wait(10)
    done_before = len(records.read_rounds(stack.db, experiment_id))
    assert done_before < rounds
    wait_until(  # the clients meet a dead port (after their current step) and back off
        lambda: "retry" in "".join(c.log_path.read_text() for c in stack.clients), 300, "a client retrying", stack.logs
    )
    stack.start_server()
    stack.wait_done(experiment_id)
    assert_complete(stack, experiment_id, num_clients=2, rounds=rounds)
    assert all(c.alive() for c in stack.clients)
    assert "retry" in "".join(c.log_path.read_text() for c in stack.clients)


def run_main(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture
def main_env(mongo_uri: str, mongo_db_name: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return child_env(
        os.environ,
        FEDLAND_DATA_DIR=str(data_dir),
        FEDLAND_DB=mongo_db_name,
        FEDLAND_MONGO_URI=mongo_uri,
        FEDLAND_LOG_DIR=str(tmp_path / "logs"),
        FEDLAND_STORE_DIR=str(tmp_path / "store"),
    )


def test_main_quick_run_from_an_experiments_file(
    main_env: dict[str, str], tmp_path: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    experiments = tmp_path / "experiments.json"
    experiments.write_text(json.dumps([small_spec(2, rounds=3), small_spec(1, rounds=3, fraction=0.02)]))
    result = run_main(["--rounds", "1", "--experiments", str(experiments)], main_env)
    assert result.returncode == 0, result.stdout + result.stderr
    db: Database[dict[str, Any]] = pymongo.MongoClient(mongo_uri)[mongo_db_name]
    try:
        stored = records.read_experiments(db)
        assert sorted(e.status for e in stored) == ["finished", "finished"]
        assert [e.spec.rounds for e in stored] == [1, 1]  # --rounds overrides the file
        assert db[records.ROUNDS].count_documents({}) == 2
    finally:
        db.client.close()
    table = result.stdout
    assert "e2e 2 clients x 3 rounds" in table and table.count("finished") + table.count("measuring") == 2
    assert not (tmp_path / "store").exists()  # a given store URI means no embedded store


def test_main_refuses_invalid_experiments_before_submitting(
    main_env: dict[str, str], tmp_path: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    good = small_spec(2, rounds=1)
    bad = {**small_spec(2, rounds=1), "subset_fractions": [1.0, 1.0]}
    bad["target_balance_ratios"] = [[1.0] + [0.0] * 9] * 2  # 30,000 zeros each; MNIST has 5,923
    experiments = tmp_path / "experiments.json"
    experiments.write_text(json.dumps([good, bad]))
    result = run_main(["--experiments", str(experiments)], main_env, timeout_s=60)
    assert result.returncode == 2
    assert "experiments[1]" in result.stderr
    db: Database[dict[str, Any]] = pymongo.MongoClient(mongo_uri)[mongo_db_name]
    try:
        assert db[records.EXPERIMENTS].count_documents({}) == 0
    finally:
        db.client.close()


def test_main_only_queues_on_a_running_server(
    local_stack: Callable[..., LocalStack], main_env: dict[str, str], tmp_path: Path
) -> None:
    stack = local_stack()
    experiments = tmp_path / "experiments.toml"
    experiments.write_text(
        '[[experiments]]\ndescription = "queued from a file"\nrounds = 2\n'
        "target_balance_ratios = [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]\nsubset_fractions = [0.01]\n"
    )
    env = {**main_env, "FEDLAND_TOKEN": TOKEN}
    result = run_main(["--server", stack.url, "--experiments", str(experiments)], env, timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [experiment] = records.read_experiments(stack.db)
    assert (experiment.status, experiment.spec.description, experiment.spec.rounds) == ("queued", "queued from a file", 2)
    assert f"queued {experiment.id}" in result.stdout
    assert not stack.clients  # nothing started: no client, no embedded store
    assert not (tmp_path / "store").exists()
