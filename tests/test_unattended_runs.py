"""Runs that end on their own: diverging experiments, poisoned updates and stuck workers, end to end.

Real nx-27017, `python -m server` and `python -m client` processes, real MNIST.
A hostile worker here is this test speaking the workers' HTTP API itself.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedland.spec import LandscapeSpec
from stack import records, wire
from stack.api_client import ApiError, Transport
from stack.embedded import EmbeddedMongo
from tests.helpers import WORKER_TOKEN, LocalStack, small_spec, wait_until

pytestmark = pytest.mark.slow

OFF = LandscapeSpec(enabled=False)


def hostile_worker(stack: LocalStack) -> tuple[Transport, str]:
    """A worker registered as the real ones are (the enrolment token, then its own secret): this test speaks for it."""
    transport = Transport(stack.url, WORKER_TOKEN, stop=threading.Event(), rng=random.Random(1), max_attempts=3)
    registration = transport.register(socket.gethostname(), os.getpid())
    transport.act_as(registration.worker_secret)
    return transport, registration.worker_id


def test_a_diverging_experiment_fails_with_its_reason_and_the_queue_moves_on(
    local_stack: Callable[..., LocalStack],
) -> None:
    stack = local_stack()
    diverging = {**small_spec(2, rounds=3, landscape=OFF), "learning_rate": 100.0, "momentum": 0.9}
    healthy = small_spec(2, rounds=2, landscape=OFF)
    diverging_id, healthy_id = stack.api.submit_experiments([diverging, healthy])
    stack.add_clients(2)
    failed = stack.wait_done(diverging_id, timeout_s=120)
    assert failed.status == "failed", stack.logs()
    assert failed.error and failed.error.startswith("round "), failed.error
    # either both workers' updates were refused (non-finite) or the aggregate itself was not finite
    assert "refused from 2 worker(s)" in failed.error or "not finite" in failed.error or "nan" in failed.error
    refused = records.read_refused_updates(stack.db, diverging_id)
    assert all(r.round == int(failed.error.split()[1].rstrip(":")) for r in refused)
    assert stack.wait_done(healthy_id, timeout_s=120).status == "finished", stack.logs()
    for member in records.read_members(stack.db, diverging_id):
        assert member.worker_id is None  # nothing of the failed experiment is held


def test_a_poisoned_update_is_refused_recorded_and_the_experiment_unharmed(
    local_stack: Callable[..., LocalStack],
) -> None:
    stack = local_stack(FEDLAND_HEARTBEAT_TIMEOUT_S="3")
    (experiment_id,) = stack.api.submit_experiments([small_spec(2, rounds=2, landscape=OFF)])
    transport, hostile = hostile_worker(stack)
    try:
        task = transport.next_task(hostile)
        assert task["action"] == "train"
        weights = wire.decode(transport.fetch_model(experiment_id, 1))
        poisoned = {name: np.full(value.shape, 9999.0, value.dtype) for name, value in weights.items()}
        meta = {
            "worker_id": hostile,
            "client_index": task["client_index"],
            "num_examples": records.read_members(stack.db, experiment_id)[task["client_index"]].num_train,
            "stats": {"duration_s": {"train": 1.0}},
        }
        with pytest.raises(ApiError) as refusal:
            transport.post_update(experiment_id, 1, meta, wire.encode(poisoned))
        assert refusal.value.status == 422 and "update_screening" in str(refusal.value)
        again = transport.next_task(hostile)  # not offered that member again (it holds the other now, then goes)
        assert again["action"] == "train" and again["client_index"] != task["client_index"]
        stack.add_clients(2)
        finished = stack.wait_done(experiment_id, timeout_s=120)
    finally:
        transport.close()
    assert finished.status == "finished", (finished.error, stack.logs())
    (refused,) = records.read_refused_updates(stack.db, experiment_id)
    assert (refused.worker_id, refused.round, refused.client_index) == (hostile, 1, task["client_index"])
    rounds = records.read_rounds(stack.db, experiment_id)
    assert [r.participants for r in rounds] == [(0, 1), (0, 1)]
    assert all(s.worker_id != hostile for s in records.read_client_stats(stack.db, experiment_id))
    assert rounds[-1].test_accuracy > 0.8  # FedAvg of honest updates: the poison never reached the model


def test_a_worker_that_heartbeats_but_never_reports_loses_its_member(
    local_stack: Callable[..., LocalStack],
) -> None:
    stack = local_stack(FEDLAND_HEARTBEAT_TIMEOUT_S="3")
    spec = small_spec(2, rounds=2, landscape=OFF)
    (experiment_id,) = stack.api.submit_experiments([spec])
    transport, stuck = hostile_worker(stack)
    beating = threading.Event()

    def heartbeat() -> None:  # alive, never reports
        while not beating.wait(0.5):
            transport.heartbeat(stuck)

    task = transport.next_task(stuck)
    held = task["client_index"]
    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        stack.add_clients(1)
        finished = stack.wait_done(experiment_id, timeout_s=120)
    finally:
        beating.set()
        thread.join(timeout=5)
        transport.close()
    assert finished.status == "finished", (finished.error, stack.logs())
    stats = records.read_client_stats(stack.db, experiment_id)
    assert {s.worker_id for s in stats if s.client_index == held} - {stuck}  # another worker trained it
    worker = stack.db[records.WORKERS].find_one({"worker_id": stuck})
    assert worker is not None and worker["status"] == "alive"  # it was never silent: only its member went
    assert "held it" in (stack.server.log_path.read_text() if stack.server else "")


def test_no_live_worker_loses_its_member_during_a_store_stall(data_dir: Path, tmp_path: Path) -> None:
    embedded = EmbeddedMongo(tmp_path / "store")
    uri = embedded.start()
    stack = LocalStack(uri, "stall", data_dir, tmp_path / "logs", FEDLAND_HEARTBEAT_TIMEOUT_S="4")
    try:
        stack.start_server()
        (experiment_id,) = stack.api.submit_experiments([small_spec(2, rounds=4, landscape=OFF)])
        stack.add_clients(2)
        wait_until(lambda: records.read_round(stack.db, experiment_id, 1) is not None, 120, "round 1", stack.logs)
        pid = embedded.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the store stalls: every query hangs, nothing fails fast
        try:
            threading.Event().wait(15.0)  # the stall is what is tested: 15 s, several heartbeat timeouts
        finally:
            os.kill(pid, signal.SIGCONT)
        finished = stack.wait_done(experiment_id, timeout_s=180)
        assert finished.status == "finished", (finished.error, stack.logs())
        server_log = stack.server.log_path.read_text() if stack.server else ""
        assert " freed: " not in server_log, server_log[-4000:]
        assert all(w["status"] == "alive" for w in stack.db[records.WORKERS].find())
        for client in stack.clients:
            assert "refused" not in client.log_path.read_text(), client.log_tail(30)
        assert records.read_refused_updates(stack.db, experiment_id) == []
    finally:
        stack.stop()
        embedded.stop()
