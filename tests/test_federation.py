"""Federations bigger than the worker pool, end to end: 20 members, 5 per round, 2 worker processes.

Real nx-27017, `python -m server` and `python -m client` processes, real MNIST.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from fedland.participation import selected_members
from fedland.spec import LandscapeSpec, StrategySpec
from stack import records
from tests.helpers import (
    LocalStack,
    finite,
    small_spec,
    wait_until,
)

pytestmark = pytest.mark.slow

OFF = LandscapeSpec(enabled=False)
CHEAP = LandscapeSpec(every=2, num_samples=64, trace_probes=4, interpolation_points=2, grid_points=3)


def federation(rounds: int, **overrides: Any) -> dict[str, Any]:
    """20 members of 120 images each, 5 train per round."""
    return small_spec(num_clients=20, rounds=rounds, clients_per_round=5, **overrides)


def assert_federation_complete(stack: LocalStack, experiment_id: str) -> None:
    """One client_stats per selected member per round; members, workers and rounds documents agree."""
    experiment = stack.experiment(experiment_id)
    assert experiment.status == "finished", (experiment.error, stack.logs())
    spec = experiment.spec
    selected = {r: selected_members(spec, r) for r in range(1, spec.rounds + 1)}
    stats = records.read_client_stats(stack.db, experiment_id)
    assert sorted((s.round, s.client_index) for s in stats) == [
        (r, i) for r in selected for i in selected[r]
    ]
    rounds = {d.round: d for d in records.read_rounds(stack.db, experiment_id)}
    assert sorted(rounds) == list(range(1, spec.rounds + 1))
    for r, round_record in rounds.items():
        assert list(round_record.selected) == list(round_record.participants) == list(selected[r])
        assert round_record.num_examples == sum(s.num_examples for s in stats if s.round == r)
        assert finite(round_record.test_loss)
    workers = {w["worker_id"]: w for w in stack.db[records.WORKERS].find()}
    assert {s.worker_id for s in stats} <= set(workers)  # every update names a registered worker
    members = {m.client_index: m for m in records.read_members(stack.db, experiment_id)}
    assert sorted(members) == list(range(20))
    for index, member in members.items():
        trained = [r for r in selected if index in selected[r]]
        assert member.worker_id is None  # nobody trains a member of a finished experiment
        assert member.reported_round == (max(trained) if trained else 0)


def test_twenty_members_five_per_round_on_two_workers(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack()
    [experiment_id] = stack.api.submit_experiments([federation(rounds=4, landscape=OFF)])
    stack.add_clients(2)
    stack.wait_done(experiment_id)
    assert_federation_complete(stack, experiment_id)
    assert stack.db[records.WORKERS].count_documents({}) == 2


def test_paired_experiments_select_the_same_members(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack()
    ids = stack.api.submit_experiments([
        federation(rounds=3, landscape=OFF),
        federation(rounds=3, landscape=OFF, strategy=StrategySpec("FedAdam")),
    ])
    stack.add_clients(2)
    for experiment_id in ids:
        stack.wait_done(experiment_id)
        assert_federation_complete(stack, experiment_id)
    participants = [[d.participants for d in records.read_rounds(stack.db, i)] for i in ids]
    assert participants[0] == participants[1]


def test_a_worker_killed_mid_round_is_replaced(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack(FEDLAND_HEARTBEAT_TIMEOUT_S="3")
    [experiment_id] = stack.api.submit_experiments([federation(rounds=5, landscape=OFF)])
    first, second = stack.add_clients(2)
    # kill the first worker while it holds a member of an open round
    wait_until(
        lambda: stack.db[records.MEMBERS].find_one(
            {"experiment_id": experiment_id, "worker_id": _worker(stack, first.pid), "assigned_round": {"$gte": 2}}
        ),
        120, "the first worker to hold a member in round 2 or later", stack.logs,
    )
    first.process.send_signal(signal.SIGKILL)
    first.wait(10)
    [third] = stack.add_clients(1)
    stack.wait_done(experiment_id, timeout_s=180)
    assert_federation_complete(stack, experiment_id)
    assert second.alive() and third.alive()


def _worker(stack: LocalStack, pid: int) -> str:
    doc = stack.db[records.WORKERS].find_one({"pid": pid})
    return "" if doc is None else str(doc["worker_id"])


@pytest.mark.parametrize("landscape", [OFF, CHEAP], ids=["updates-in-memory", "updates-stored"])
def test_a_restarted_server_resumes_the_federation(
    local_stack: Callable[..., LocalStack], landscape: LandscapeSpec
) -> None:
    stack = local_stack()
    [experiment_id] = stack.api.submit_experiments([federation(rounds=5, landscape=landscape)])
    stack.add_clients(2)
    wait_until(
        lambda: len(records.read_rounds(stack.db, experiment_id)) >= 2,
        120, "round 2", stack.logs,
    )
    assert stack.server is not None
    stack.server.process.send_signal(signal.SIGKILL)  # updates held only in the running sum are lost
    stack.server.wait(10)
    assert len(records.read_rounds(stack.db, experiment_id)) < 5
    stack.start_server()
    stack.wait_done(experiment_id, timeout_s=180)
    assert_federation_complete(stack, experiment_id)
    assert all(c.alive() for c in stack.clients)
    if landscape.enabled:  # finished means measured
        for round_record in records.read_rounds(stack.db, experiment_id):
            if round_record.round in (2, 4, 5):
                assert round_record.landscape is not None
