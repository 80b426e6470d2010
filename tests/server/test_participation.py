"""Members, workers and rounds in the coordinator: selection, deadlines, long-polls, the reaper, running sums."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from fedland.participation import selected_members
from fedland.spec import ExperimentSpec
from server.api import coordinator_of, create_app
from server.coordinator import Coordinator
from server.errors import Conflict
from server.store import Store
from stack import records, wire


def six_members(make_spec: Callable[..., dict], **overrides: Any) -> dict:
    return make_spec(
        target_balance_ratios=[[0.1] * 10] * 6, subset_fractions=[0.02] * 6, landscape={"enabled": False}, **overrides
    )


def start(store: Store, clock: Any, make_settings: Callable[..., Any], **settings: Any) -> Coordinator:
    return coordinator_of(create_app(make_settings(**settings), Store.from_database(store.db), clock=clock))


def report(coordinator: Coordinator, worker: str, task: dict, offset: float = 0.0) -> dict:
    weights = wire.decode(coordinator.global_model(task["experiment_id"], task["round"]))
    update = {name: (value + offset).astype(value.dtype) for name, value in weights.items()}
    member = coordinator.store.member(task["experiment_id"], task["client_index"])
    assert member is not None
    meta = {"worker_id": worker, "client_index": task["client_index"], "num_examples": member.num_train}
    return coordinator.submit_update(task["experiment_id"], task["round"], meta, wire.encode(update))


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_only_the_selected_members_train_and_one_worker_serves_them_all(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings)
    (experiment_id,) = coordinator.submit(six_members(make_spec, rounds=3, clients_per_round=2))
    spec = ExperimentSpec.from_dict(coordinator.experiment(experiment_id))
    worker = coordinator.register({"hostname": "h", "pid": 1})["worker_id"]
    for server_round in (1, 2, 3):
        trained = []
        for _ in range(2):
            task = coordinator.task(worker)
            assert (task["action"], task["round"]) == ("train", server_round)
            trained.append(task["client_index"])
            report(coordinator, worker, task, 0.01 * server_round)
        assert tuple(sorted(trained)) == selected_members(spec, server_round)
        round_record = store.get_round(experiment_id, server_round)
        assert round_record is not None
        assert round_record.selected == round_record.participants == selected_members(spec, server_round)
    assert coordinator.task(worker)["action"] == "wait"
    # finished once the measurement thread stored the experiment's analysis (landscapes off: no round to measure)
    wait_for(lambda: coordinator.experiment(experiment_id)["status"] == "finished", "the experiment to finish")
    stats = store.rounds_of(experiment_id)
    assert [len(d.participants) for d in stats] == [2, 2, 2]
    assert {s.worker_id for r in (1, 2, 3) for s in store.stats_of_round(experiment_id, r)} == {worker}
    coordinator.close()


def test_an_accepted_update_counts_as_its_workers_heartbeat(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings, heartbeat_timeout_s=3.0)
    coordinator.submit(six_members(make_spec, rounds=2, clients_per_round=2))
    worker = coordinator.register({"hostname": "h", "pid": 1})["worker_id"]
    first = coordinator.task(worker)
    clock.advance(2)
    report(coordinator, worker, first)  # the worker's only request in 2 s
    clock.advance(2)  # 4 s after its task request, 2 s after its update
    coordinator.reap()
    alive = store.get_worker(worker)
    assert alive is not None and alive.status == "alive"  # a silent worker would be "lost" now
    clock.advance(2)  # 4 s after its update
    coordinator.reap()
    lost = store.get_worker(worker)
    assert lost is not None and lost.status == "lost"
    coordinator.close()


def test_queued_to_running_moves_the_progress_version(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings)
    (experiment_id,) = coordinator.submit(six_members(make_spec))
    worker = coordinator.register({"hostname": "h", "pid": 1})["worker_id"]
    queued = coordinator.version
    assert coordinator.task(worker)["action"] == "train"
    assert coordinator.experiment(experiment_id)["status"] == "running"
    assert coordinator.wait_for_change(queued, 0.0) > queued  # a progress long-poll answers at once
    coordinator.close()


def test_a_deadline_closes_the_round_with_the_updates_it_has(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings, heartbeat_timeout_s=1000.0)
    (experiment_id,) = coordinator.submit(
        six_members(make_spec, rounds=2, clients_per_round=3, round_timeout_s=60, min_reports=2)
    )
    workers = [coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(3)]
    tasks = [coordinator.task(w) for w in workers]
    assert report(coordinator, workers[0], tasks[0])["aggregated"] is False
    clock.advance(61)
    assert coordinator.rounds.close_due() == 0  # past the deadline, but only 1 of the 2 updates needed
    assert report(coordinator, workers[1], tasks[1])["aggregated"] is True  # the second closes it at once
    round_record = store.get_round(experiment_id, 1)
    assert round_record is not None
    assert list(round_record.participants) == sorted([tasks[0]["client_index"], tasks[1]["client_index"]])
    assert len(round_record.selected) == 3
    straggler = tasks[2]
    files = store.count(records.files_collection(records.CLIENT_MODELS))
    try:
        report(coordinator, workers[2], straggler)
        raise AssertionError("a straggler's update after the round closed must be refused")
    except Conflict:
        pass
    assert len(store.stats_of_round(experiment_id, 1)) == 2
    assert store.count(records.files_collection(records.CLIENT_MODELS)) == files  # the straggler's weights are not kept either
    # round 2 has its own deadline, from its start: the timer closes it
    tasks = [coordinator.task(w) for w in workers]
    assert all(t["round"] == 2 for t in tasks)
    for worker, task in zip(workers[:2], tasks[:2]):
        report(coordinator, worker, task)
    clock.advance(61)
    assert coordinator.rounds.close_due() == 1
    assert coordinator.measurements.wait(timeout_s=60)
    assert coordinator.experiment(experiment_id)["status"] == "finished"
    coordinator.close()


def test_a_waiting_worker_gets_the_next_round_as_soon_as_it_exists(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings)
    (experiment_id,) = coordinator.submit(six_members(make_spec, rounds=2, clients_per_round=2))
    first, second = (coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(2))
    task_a, task_b = coordinator.task(first), coordinator.task(second)
    report(coordinator, first, task_a)
    answers: list[dict] = []
    waiting = threading.Thread(target=lambda: answers.append(coordinator.task(first, wait_s=coordinator.max_wait_s)))
    waiting.start()
    wait_for(lambda: coordinator._work_generation >= 0 and waiting.is_alive(), "the long-poll to start")
    report(coordinator, second, task_b)  # closes round 1: round 2 exists now
    waiting.join(timeout=60)
    assert answers and (answers[0]["action"], answers[0]["round"]) == ("train", 2)
    # nothing to do: a long-poll that ends without work says "ask again at once"
    idle = coordinator.register({"hostname": "h", "pid": 9})["worker_id"]
    coordinator.task(second)  # takes round 2's other member
    assert coordinator.task(idle, wait_s=0.2) == {"action": "wait", "retry_after_s": 0.0}
    coordinator.close()


def test_concurrent_workers_take_distinct_members(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings)
    (experiment_id,) = coordinator.submit(six_members(make_spec, clients_per_round=4))
    workers = [coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(8)]
    barrier = threading.Barrier(len(workers))
    tasks: dict[str, dict] = {}

    def ask(worker: str) -> None:
        barrier.wait()
        tasks[worker] = coordinator.task(worker)

    threads = [threading.Thread(target=ask, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = sorted(t["client_index"] for t in tasks.values() if t["action"] == "train")
    spec = ExperimentSpec.from_dict(coordinator.experiment(experiment_id))
    assert taken == list(selected_members(spec, 1))
    holders = {m.client_index: m.worker_id for m in store.members(experiment_id) if m.worker_id}
    assert holders == {t["client_index"]: w for w, t in tasks.items() if t["action"] == "train"}
    coordinator.close()


def test_the_timer_reaps_a_silent_worker_and_its_member_goes_to_another(
    store: Store, clock: Any, make_settings: Callable[..., Any], make_spec: Callable[..., dict]
) -> None:
    coordinator = start(store, clock, make_settings, heartbeat_timeout_s=3.0)  # the timer ticks every 0.5 s
    (experiment_id,) = coordinator.submit(six_members(make_spec, clients_per_round=1))
    silent, alive = (coordinator.register({"hostname": "h", "pid": i})["worker_id"] for i in range(2))
    task = coordinator.task(silent)
    assert coordinator.task(alive)["action"] == "wait"
    clock.advance(2)
    coordinator.heartbeat(alive)
    clock.advance(2)  # silent for 4 s > 3 s; alive for 2 s
    def released() -> bool:
        member = store.member(experiment_id, task["client_index"])
        return member is not None and member.worker_id is None

    wait_for(released, "the timer to reap")
    lost = store.get_worker(silent)
    assert lost is not None and lost.status == "lost" and lost.status_at == clock()
    again = coordinator.task(alive)
    assert (again["action"], again["client_index"]) == ("train", task["client_index"])
    try:
        report(coordinator, silent, task)
        raise AssertionError("the reaped worker's update must be refused")
    except Conflict:
        pass
    assert report(coordinator, alive, again)["aggregated"] is True
    coordinator.close()


def test_progress_long_poll_answers_on_a_change(api: Any, make_spec: Callable[..., dict]) -> None:
    version = api.get("/experiments").json()["version"]
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(api.get(f"/experiments?version={version}&wait_s=20")))
    waiting.start()
    (experiment_id,) = api.submit(make_spec())
    waiting.join(timeout=60)
    body = answers[0].json()
    assert body["version"] > version and [e["id"] for e in body["experiments"]] == [experiment_id]
    assert api.get("/experiments?version=x").status_code == 400
    assert api.get("/experiments?version=" + "9" * 400).status_code == 200  # a version no float holds: no wait
