"""Rounds end to end over HTTP: aggregation, conflicts, heartbeat expiry, failure, restart safety."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest

from server.api import coordinator_of, create_app
from server.coordinator import Coordinator
from server.store import Store
from stack import records, wire
from stack.records import ClientModelFile, ClientStatsRecord


def shifted(weights: dict[str, np.ndarray], offset: float, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Client weights made by hand: scale * global + offset, float32 like the model."""
    return {name: (scale * value + offset).astype(np.float32) for name, value in weights.items()}


def start_two(api: Any, experiment_id: str) -> tuple[str, str]:
    first, second = api.register("a"), api.register("b")
    assert api.task(first)["client_index"] == 0
    assert api.task(second)["client_index"] == 1
    return first, second


def test_round_aggregates_with_fedavg_then_finishes(api: Any, store: Store, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec(rounds=2, subset_fractions=[0.02, 0.06]))  # 600 and 1,800 examples
    first, second = start_two(api, experiment_id)
    global_0 = api.model(experiment_id, 1)
    update_0, update_1 = shifted(global_0, 0.01), shifted(global_0, -0.03, scale=0.5)

    inflated = api.update(experiment_id, 1, first, 0, update_0, num_examples=10**6)
    assert (inflated.status_code, inflated.json()["field"]) == (400, "meta.num_examples")  # not the member's 600
    response = api.update(experiment_id, 1, first, 0, update_0, num_examples=600,
                          stats={"duration_s": {"train": 1.5}, "global": {"train_loss": 2.3}, "local": {"train_loss": 1.1}})
    assert (response.status_code, response.json()) == (202, {"accepted": True, "aggregated": False})
    assert api.update(experiment_id, 1, first, 0, update_0).status_code == 409  # duplicate
    assert api.task(first)["action"] == "wait"  # its member already reported round 1
    assert store.get_round(experiment_id, 1) is None

    response = api.update(experiment_id, 1, second, 1, update_1, num_examples=1800)
    assert (response.status_code, response.json()) == (202, {"accepted": True, "aggregated": True})
    assert api.update(experiment_id, 1, second, 1, update_1).status_code == 409  # late

    # the global model of round 1 is the example-weighted mean, computed here by hand
    global_1 = api.model(experiment_id, 2)
    for name, value in global_0.items():
        expected = (600 * update_0[name].astype(np.float64) + 1800 * update_1[name].astype(np.float64)) / 2400
        np.testing.assert_allclose(global_1[name], expected, rtol=0, atol=1e-6)
        assert global_1[name].dtype == np.float32

    round_record = store.get_round(experiment_id, 1)
    assert round_record is not None
    assert round_record.participants == (0, 1) and round_record.num_examples == 2400
    assert round_record.num_test == 10_000 and np.isfinite(round_record.test_loss)
    assert 0.0 <= round_record.test_accuracy <= 1.0
    assert round_record.finished_at >= round_record.started_at and round_record.duration_s >= 0
    stored = wire.decode(store.load_model(round_record.model_file_id))
    np.testing.assert_array_equal(stored["fc1.weight"], global_1["fc1.weight"])

    stats = store.stats_of_round(experiment_id, 1)
    assert [(s.client_index, s.worker_id, s.num_examples) for s in stats] == [(0, first, 600), (1, second, 1800)]
    assert stats[0].stats["global"] == {"train_loss": 2.3} and stats[0].stats["duration_s"] == {"train": 1.5}
    assert api.get(f"/experiments/{experiment_id}").json()["current_round"] == 2
    (summary,) = api.get("/experiments").json()["experiments"]
    assert summary["last_round"] == {"round": 1, "test_loss": round_record.test_loss,
                                     "test_accuracy": round_record.test_accuracy}
    assert summary["status"] == "running" and summary["started_at"] is not None and summary["error"] is None

    # round 2, then the experiment is finished and its members are released
    assert [api.task(c)["round"] for c in (first, second)] == [2, 2]
    assert api.update(experiment_id, 2, first, 0, shifted(global_1, 0.0)).status_code == 202
    last = api.update(experiment_id, 2, second, 1, shifted(global_1, 0.0), num_examples=1800)
    assert last.json()["aggregated"] is True
    assert coordinator_of(api.app).measurements.wait(timeout_s=300)  # finished once the last round is measured
    doc = api.get(f"/experiments/{experiment_id}").json()
    assert (doc["status"], doc["current_round"]) == ("finished", 2)
    assert all(member.worker_id is None for member in store.members(experiment_id))
    assert api.task(first)["action"] == "wait"
    assert api.update(experiment_id, 2, first, 0, shifted(global_1, 0.0)).status_code == 409
    assert api.get(f"/experiments/{experiment_id}/rounds/3/model").status_code == 404
    assert store.count(records.ROUNDS, {"experiment_id": experiment_id}) == 2


def test_heartbeat_expiry_frees_the_member(api: Any, clock: Any, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec())
    stale, alive = start_two(api, experiment_id)
    newcomer = api.register("c")
    assert api.task(newcomer)["action"] == "wait"

    clock.advance(20)
    api.post(f"/workers/{alive}/heartbeat")
    clock.advance(15)  # stale silent for 35 s > 30 s; alive for 15 s
    task = api.task(newcomer)
    assert (task["action"], task["client_index"], task["round"]) == ("train", 0, 1)

    weights = api.model(experiment_id, 1)
    assert api.update(experiment_id, 1, stale, 0, weights).status_code == 409
    assert api.update(experiment_id, 1, newcomer, 0, weights).status_code == 202
    assert api.update(experiment_id, 1, alive, 1, weights).json()["aggregated"] is True
    # round 2: each member goes back to the worker that reported it; the stale worker, back, waits
    assert [api.task(w)["client_index"] for w in (alive, newcomer)] == [1, 0]
    assert api.task(stale)["action"] == "wait"


def test_absurd_weights_are_refused_recorded_and_their_member_trains_elsewhere(
    api: Any, store: Store, make_spec: Callable[..., dict]
) -> None:
    (experiment_id,) = api.submit(make_spec())
    first, second = start_two(api, experiment_id)
    weights = api.model(experiment_id, 1)
    huge = {name: np.full(value.shape, 3e38, np.float32) for name, value in weights.items()}  # finite, overflows
    files_before = store.count(records.files_collection(records.CLIENT_MODELS))
    response = api.update(experiment_id, 1, first, 0, huge)
    assert response.status_code == 422
    assert response.json()["field"].startswith("weights[") and "the bound is 10000" in response.json()["error"]
    assert store.count(records.files_collection(records.CLIENT_MODELS)) == files_before
    assert store.count(records.CLIENT_STATS) == 0
    (refused,) = records.read_refused_updates(store.db, experiment_id)
    assert (refused.round, refused.client_index, refused.worker_id) == (1, 0, first)
    assert refused.field == response.json()["field"] and "the bound is 10000" in refused.rule
    # the refused worker no longer holds member 0 and is not offered it again; the other worker trains it
    assert api.update(experiment_id, 1, first, 0, shifted(weights, 0.01)).status_code == 409
    assert api.update(experiment_id, 1, second, 1, shifted(weights, -0.01)).status_code == 202
    assert api.task(first)["action"] == "wait"
    assert api.task(second)["client_index"] == 0
    response = api.update(experiment_id, 1, second, 0, shifted(weights, 0.01))
    assert (response.status_code, response.json()["aggregated"]) == (202, True)
    doc = api.get(f"/experiments/{experiment_id}").json()
    assert doc["status"] == "running" and doc["current_round"] == 2


def test_updates_refused_from_two_workers_fail_the_experiment_with_the_reasons(
    api: Any, store: Store, make_spec: Callable[..., dict]
) -> None:
    (experiment_id,) = api.submit(make_spec())
    first, second = start_two(api, experiment_id)
    weights = api.model(experiment_id, 1)
    diverged = {"duration_s": {"train": 0.5}, "local": {"train_loss": float("nan")}}
    response = api.update(experiment_id, 1, first, 0, weights, stats=diverged)
    assert response.status_code == 422, response.text
    assert api.get(f"/experiments/{experiment_id}").json()["status"] == "running"  # one worker: maybe its fault
    nan_weights = {name: np.full(value.shape, np.nan, value.dtype) for name, value in weights.items()}
    response = api.update(experiment_id, 1, second, 1, nan_weights)
    assert response.status_code == 422 and "NaN" in response.json()["error"]
    doc = api.get(f"/experiments/{experiment_id}").json()
    assert doc["status"] == "failed"
    assert "updates refused from 2 worker(s)" in doc["error"]
    assert "meta.stats.local.train_loss is nan" in doc["error"] and "contains NaN or Inf" in doc["error"]
    assert [r.worker_id for r in records.read_refused_updates(store.db, experiment_id)] == [first, second]
    assert api.task(first)["action"] == "wait"  # the queue moves on: nothing left to train


def test_an_update_far_from_the_global_model_is_screened_out_unless_screening_is_off(
    api: Any, store: Store, make_spec: Callable[..., dict]
) -> None:
    screened, unscreened = api.submit(
        make_spec(description="on", rounds=1), make_spec(description="off", rounds=1, update_screening=None)
    )
    assert api.get(f"/experiments/{unscreened}").json()["update_screening"] is None
    first, second = api.register("a"), api.register("b")
    for experiment_id in (screened, unscreened):
        assert api.task(first)["client_index"] == 0 and api.task(second)["client_index"] == 1
        weights = api.model(experiment_id, 1)
        poisoned = {name: np.full(value.shape, 9999.0, value.dtype) for name, value in weights.items()}
        response = api.update(experiment_id, 1, first, 0, poisoned)
        if experiment_id == screened:
            assert response.status_code == 422, response.text
            assert "update_screening allows 100" in response.json()["error"]
            assert len(records.read_refused_updates(store.db, screened)) == 1
            # an honest update moves the model far less than its size
            assert api.update(experiment_id, 1, second, 1, shifted(weights, 0.01)).status_code == 202
            assert api.task(second)["client_index"] == 0
            response = api.update(experiment_id, 1, second, 0, shifted(weights, -0.01))
            assert response.json()["aggregated"] is True
        else:
            assert response.status_code == 202, response.text
            assert records.read_refused_updates(store.db, unscreened) == []


def test_an_out_of_bounds_aggregate_never_replaces_the_global_model(
    api: Any, store: Store, make_spec: Callable[..., dict]
) -> None:
    # each update is sane; the server's own step (FedAvgM, server learning rate 1e6) diverges
    strategy = {"name": "FedAvgM", "params": {"server_learning_rate": 1e6}}
    (experiment_id,) = api.submit(make_spec(strategy=strategy))
    first, second = start_two(api, experiment_id)
    weights = api.model(experiment_id, 1)
    assert api.update(experiment_id, 1, first, 0, shifted(weights, 0.5)).status_code == 202
    assert api.update(experiment_id, 1, second, 1, shifted(weights, 0.5)).status_code == 202
    doc = api.get(f"/experiments/{experiment_id}").json()
    assert doc["status"] == "failed" and "aggregated model is out of bounds" in doc["error"]
    assert store.count(records.ROUNDS) == 0
    assert store.count(records.files_collection(records.MODELS)) == 1  # only the round-0 model


def put_update_like_a_crashed_server(store: Store, experiment_id: str, server_round: int, client_index: int,
                                     worker_id: str, weights: dict[str, np.ndarray], num_examples: int) -> None:
    """What submit_update writes before it aggregates: the state a crash mid-aggregation leaves."""
    file_id = store.save_client_model(wire.encode(weights), ClientModelFile(experiment_id, server_round, client_index))
    store.insert_client_stats(ClientStatsRecord(
        experiment_id=experiment_id, round=server_round, client_index=client_index, worker_id=worker_id,
        received_at=1.0, num_examples=num_examples, weights_file_id=file_id,
    ))


def test_new_app_on_the_same_store_resumes(
    api: Any, store: Store, start_api: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    (experiment_id,) = api.submit(make_spec(rounds=3, subset_fractions=[0.02, 0.06]))  # 600 and 1,800 examples
    first, second = start_two(api, experiment_id)
    global_0 = api.model(experiment_id, 1)
    update_0, update_1 = shifted(global_0, 0.5), shifted(global_0, -0.5)
    assert api.update(experiment_id, 1, first, 0, update_0, num_examples=600).status_code == 202
    # the server dies after storing the second update, before aggregating it
    put_update_like_a_crashed_server(store, experiment_id, 1, 1, second, update_1, num_examples=1800)
    assert store.get_round(experiment_id, 1) is None
    # ... and another worker's upload was cut off between its weights file and its stats document
    orphan = store.save_client_model(wire.encode(update_0), ClientModelFile(experiment_id, 1, 0))

    restarted = start_api()  # recovers on start, and first deletes what no document references
    restarted.secrets.update(api.secrets)  # the workers keep their secrets: the new app reads their digests
    client_files = records.files_collection(records.CLIENT_MODELS)
    assert orphan not in {str(f["_id"]) for f in store.db[client_files].find({}, {"_id": 1})}
    assert store.count(client_files) == 2  # the two stored updates stay
    assert restarted.get(f"/experiments/{experiment_id}").json()["current_round"] == 2
    global_1 = restarted.model(experiment_id, 2)
    expected = (update_0["fc3.bias"].astype(np.float64) + 3 * update_1["fc3.bias"].astype(np.float64)) / 4
    np.testing.assert_allclose(global_1["fc3.bias"], expected, atol=1e-6)
    # the same workers carry on with their members against the new server
    assert [restarted.task(c)["round"] for c in (first, second)] == [2, 2]
    assert [restarted.task(c)["client_index"] for c in (first, second)] == [0, 1]
    assert restarted.update(experiment_id, 2, first, 0, global_1).status_code == 202


def test_concurrent_recovery_aggregates_exactly_once(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    app = create_app(make_settings(), Store.from_database(store.db), clock=clock)
    coordinator = coordinator_of(app)
    (experiment_id,) = coordinator.submit(make_spec(rounds=3, strategy={"name": "FedAvgM", "params": {}}))
    clients = [coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(2)]
    for worker_id in clients:
        assert coordinator.task(worker_id)["action"] == "train"
    weights = wire.decode(coordinator.global_model(experiment_id, 1))
    for index, worker_id in enumerate(clients):
        put_update_like_a_crashed_server(store, experiment_id, 1, index, worker_id, shifted(weights, 0.1), 10)

    others = [coordinator_of(create_app(make_settings(), Store.from_database(store.db), clock=clock, recover=False))
              for _ in range(3)]
    barrier = threading.Barrier(len(others) + 1)
    results: list[int] = []

    def run(target: Any) -> None:
        barrier.wait()
        results.append(target.recover())

    threads = [threading.Thread(target=run, args=(c,)) for c in [coordinator, *others]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.count(records.ROUNDS, {"experiment_id": experiment_id}) == 1
    assert coordinator.experiment(experiment_id)["current_round"] == 2
    round_record = store.get_round(experiment_id, 1)
    assert round_record is not None
    assert set(wire.decode(store.load_model(round_record.strategy_state_file_id))) == {f"momentum/{k}" for k in weights}
    global_1 = wire.decode(coordinator.global_model(experiment_id, 2))
    # FedAvgM's first step (momentum from zero, server rate 1) equals FedAvg: global + 0.1
    np.testing.assert_allclose(global_1["fc2.bias"], weights["fc2.bias"] + np.float32(0.1), atol=1e-6)
    assert store.count(records.files_collection(records.MODELS), {"metadata.round": 1, "metadata.kind": "global"}) == 1


# landscape measurements in the background --------------------------------------------------------

CHEAP_LANDSCAPE = {"num_samples": 64, "trace_probes": 4, "interpolation_points": 2, "grid_points": 3}


def play_rounds(coordinator: Coordinator, clients: list[str], experiment_id: str, rounds: range) -> None:
    """Each client trains (by hand: a shift of the global model) and reports every round in `rounds`."""
    for server_round in rounds:
        weights = wire.decode(coordinator.global_model(experiment_id, server_round))
        for worker_id in clients:
            task = coordinator.task(worker_id)
            assert (task["action"], task["experiment_id"], task["round"]) == ("train", experiment_id, server_round)
            index = task["client_index"]
            member = coordinator.store.member(experiment_id, index)
            assert member is not None
            meta = {"worker_id": worker_id, "client_index": index, "num_examples": member.num_train}
            update = shifted(weights, 0.01 * (index + 1) * (-1) ** server_round, scale=1.0 - 0.1 * index)
            coordinator.submit_update(experiment_id, server_round, meta, wire.encode(update))


def landscapes_of(store: Store, experiment_id: str) -> dict[int, Any]:
    return {record.round: record.landscape for record in store.rounds_of(experiment_id)}


def assert_same_measurement(after: Any, before: Any, path: str = "landscape") -> None:
    """Equal documents up to float noise, `duration_s` (the measurement's own time) aside."""
    if isinstance(before, dict):
        assert set(after) == set(before), path
        for key in before:
            if key != "duration_s":
                assert_same_measurement(after[key], before[key], f"{path}.{key}")
    elif isinstance(before, list):
        assert len(after) == len(before), path
        for position, (a, b) in enumerate(zip(after, before)):
            assert_same_measurement(a, b, f"{path}[{position}]")
    elif isinstance(before, float):
        assert after == pytest.approx(before, rel=1e-6, abs=1e-9), path
    else:
        assert after == before, path


def test_finished_means_measured_and_a_restart_measures_lost_landscapes(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    first = coordinator_of(create_app(make_settings(), Store.from_database(store.db), clock=clock))
    landscape = {**CHEAP_LANDSCAPE, "every": 2}
    finished_id, running_id = first.submit([make_spec(rounds=3, landscape=landscape),
                                            make_spec(rounds=3, landscape=CHEAP_LANDSCAPE)])
    clients = [first.register({"hostname": "h", "pid": i})["worker_id"] for i in range(2)]
    play_rounds(first, clients, finished_id, range(1, 4))
    # "finished" promises every scheduled round (2, and the last) is measured: it comes after them
    assert first.measurements.wait(timeout_s=300)
    assert first.experiment(finished_id)["status"] == "finished"
    before = landscapes_of(store, finished_id)
    assert before[1] is None and before[2] is not None and before[3] is not None
    assert "error" not in before[2] and "error" not in before[3]
    for server_round in (2, 3):
        round_record = store.get_round(finished_id, server_round)
        assert round_record is not None and round_record.aggregation_s > 0
        assert 0 < before[server_round]["duration_s"]
    play_rounds(first, clients, running_id, range(1, 3))  # the second experiment stops in round 3
    assert first.measurements.wait(timeout_s=300)
    assert first.experiment(running_id)["current_round"] == 3
    running_before = landscapes_of(store, running_id)
    assert set(running_before) == {1, 2} and all("error" not in doc for doc in running_before.values())
    first.close()

    # the server stops before measuring: its documents lack the landscape (surfaces stay, as after a crash)
    lost = [(finished_id, 2), (finished_id, 3), (running_id, 1)]
    for experiment_id, server_round in lost:
        store.db[records.ROUNDS].update_one(
            {"experiment_id": experiment_id, "round": server_round}, {"$unset": {"landscape": ""}}
        )
    surfaces = store.count(records.LANDSCAPES)
    restarted = coordinator_of(create_app(make_settings(), Store.from_database(store.db), clock=clock))
    assert restarted.measurements.wait(timeout_s=300)
    after, running_after = landscapes_of(store, finished_id), landscapes_of(store, running_id)
    assert after[1] is None  # not scheduled: still not measured
    for server_round in (2, 3):
        assert_same_measurement(after[server_round], before[server_round])
    for server_round in (1, 2):
        assert_same_measurement(running_after[server_round], running_before[server_round])
    assert store.count(records.LANDSCAPES) == surfaces  # measured again in place: the same surface ids
    restarted.close()


def test_measurements_of_broken_or_deleted_rounds_leave_the_worker_alive(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = coordinator_of(create_app(make_settings(), Store.from_database(store.db), clock=clock))
    (experiment_id,) = coordinator.submit(make_spec(rounds=3, landscape=CHEAP_LANDSCAPE))
    clients = [coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(2)]
    play_rounds(coordinator, clients, experiment_id, range(1, 4))
    assert coordinator.measurements.wait(timeout_s=300)
    assert coordinator.experiment(experiment_id)["status"] == "finished"
    measured = landscapes_of(store, experiment_id)
    for server_round in (1, 2, 3):
        store.db[records.ROUNDS].update_one(
            {"experiment_id": experiment_id, "round": server_round}, {"$unset": {"landscape": ""}}
        )

    # queued while the worker is busy; then round 1's updates vanish and the experiment fails
    gate = threading.Event()

    def block() -> None:
        assert gate.wait(300)

    blocker = coordinator.measurements.lanes.submit(experiment_id, block)  # the experiment's lane waits for it
    for server_round in (1, 2, 3):
        coordinator.measurements.queue(experiment_id, server_round)
    for stats in store.stats_of_round(experiment_id, 1):
        assert stats.weights_file_id is not None
        store.delete_client_model(stats.weights_file_id)
    store.update_experiment(experiment_id, {"status": "failed", "error": "stopped by the test"})
    gate.set()
    assert coordinator.measurements.wait(timeout_s=300) and blocker.result() is None
    after = landscapes_of(store, experiment_id)
    assert after[1] is not None and after[1]["error"].startswith("NoFile")  # stored as an error, like any failed measurement
    for server_round in (2, 3):  # the rounds are real: measured as before
        assert_same_measurement(after[server_round], measured[server_round])

    # queued, then the whole experiment is deleted
    store.db[records.ROUNDS].update_one({"experiment_id": experiment_id, "round": 2}, {"$unset": {"landscape": ""}})
    gate.clear()
    blocker = coordinator.measurements.lanes.submit(experiment_id, block)
    coordinator.measurements.queue(experiment_id, 2)
    store.db[records.EXPERIMENTS].delete_one({"_id": experiment_id})
    gate.set()
    assert coordinator.measurements.wait(timeout_s=300)
    deleted_round = store.get_round(experiment_id, 2)
    assert deleted_round is None or deleted_round.landscape is None
    assert blocker.result() is None
    # the measurement threads still take jobs
    names: list[str] = []
    coordinator.measurements.lanes.submit(experiment_id, lambda: names.append(threading.current_thread().name)
                                          ).result(timeout=60)
    assert names[0].startswith("landscape")
    coordinator.close()


def test_a_round_no_worker_may_train_fails_at_its_stall_deadline(
    api: Any, store: Store, clock: Any, make_spec: Callable[..., dict]
) -> None:
    (experiment_id,) = api.submit(make_spec())
    (only,) = [api.register("a")]  # a single worker: its refusals alone do not fail the experiment
    diverged = {"local": {"train_loss": float("nan")}}
    for member in (0, 1):
        assert api.task(only)["client_index"] == member
        weights = api.model(experiment_id, 1)
        assert api.update(experiment_id, 1, only, member, weights, stats=diverged).status_code == 422
    coordinator = coordinator_of(api.app)
    for _ in range(14):  # 280 s of a stalled round: under the deadline (10 x the 30 s heartbeat timeout)
        clock.advance(20.0)
        assert api.task(only)["action"] == "wait"  # idle: it may train neither member
        coordinator.fail_stalled()
    assert api.get(f"/experiments/{experiment_id}").json()["status"] == "running"
    for _ in range(2):
        clock.advance(20.0)
        api.task(only)
        coordinator.fail_stalled()
    doc = api.get(f"/experiments/{experiment_id}").json()
    assert doc["status"] == "failed"
    assert doc["error"].startswith("round 1 stalled") and "meta.stats.local.train_loss is nan" in doc["error"]
