"""Submitting a spec identical to an unfinished experiment's resumes it; `?fresh=1` queues a new one.

Real server over loopback HTTP on the test store; identity is `fedland.spec.fingerprint`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from fedland.spec import ExperimentSpec, fingerprint
from server.store import Store
from stack import records
from stack.api_client import API_PREFIX, Transport
from tests.server.conftest import Api


def experiment_count(store: Store) -> int:
    return store.count(records.EXPERIMENTS)


def test_an_identical_unfinished_experiment_is_resumed_not_queued_again(
    api: Api, store: Store, make_spec: Callable[..., dict[str, Any]]
) -> None:
    spec = make_spec(rounds=3)
    first = api.post("/experiments", json=spec)
    assert first.status_code == 201, first.text
    assert first.json()["resumed"] == []
    [experiment_id] = first.json()["ids"]

    again = api.post("/experiments", json={**make_spec(rounds=3), "timestamp": "2030-01-01T00:00:00+00:00"})
    assert again.status_code == 201, again.text
    assert again.json() == {"ids": [experiment_id], "resumed": [experiment_id]}  # written at another time: the same
    assert experiment_count(store) == 1
    assert store.count(records.MEMBERS) == 2  # no second federation either

    other_seed = api.post("/experiments", json=[make_spec(rounds=3), make_spec(rounds=3, seed=8)])
    assert other_seed.status_code == 201, other_seed.text
    ids, resumed = other_seed.json()["ids"], other_seed.json()["resumed"]
    assert ids[0] == experiment_id and ids[1] != experiment_id and resumed == [experiment_id]  # in order
    assert experiment_count(store) == 2

    fresh = api.post("/experiments?fresh=1", json=spec)
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["resumed"] == [] and fresh.json()["ids"][0] not in ids
    assert experiment_count(store) == 3


def test_a_spec_repeated_in_one_submit_is_one_experiment_unless_fresh(
    api: Api, store: Store, make_spec: Callable[..., dict[str, Any]]
) -> None:
    response = api.post("/experiments", json=[make_spec(), make_spec()])
    assert response.status_code == 201, response.text
    first, second = response.json()["ids"]
    assert first == second and response.json()["resumed"] == []
    assert experiment_count(store) == 1
    fresh = api.post("/experiments?fresh=true", json=[make_spec(), make_spec()])
    assert len(set(fresh.json()["ids"]) | {first}) == 3


def test_a_finished_or_failed_twin_is_not_resumed(
    api: Api, store: Store, make_spec: Callable[..., dict[str, Any]]
) -> None:
    [finished] = api.submit(make_spec(description="done"))
    assert store.update_experiment(finished, {"status": "finished"})
    [failed] = api.submit(make_spec(description="broke"))
    assert store.update_experiment(failed, {"status": "failed", "error": "boom"})
    rerun = api.post("/experiments", json=[make_spec(description="done"), make_spec(description="broke")])
    assert rerun.status_code == 201, rerun.text
    assert rerun.json()["resumed"] == [] and not {finished, failed} & set(rerun.json()["ids"])


def test_fresh_must_be_a_flag(api: Api, store: Store, make_spec: Callable[..., dict[str, Any]]) -> None:
    response = api.post("/experiments?fresh=maybe", json=make_spec())
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "fresh" and "1, true, 0 or false" in body["rule"] and body["error"]
    assert experiment_count(store) == 0


def test_a_restarted_server_resumes_the_running_experiment_from_its_stored_rounds(
    start_api: Callable[..., Api], store: Store, make_spec: Callable[..., dict[str, Any]]
) -> None:
    first = start_api()
    [experiment_id] = first.submit(make_spec(rounds=3))
    worker = first.register()
    task = first.task(worker)
    assert (task["experiment_id"], task["round"]) == (experiment_id, 1)
    weights = first.model(experiment_id, 1)
    for client_index in (0, 1):
        if client_index != task["client_index"]:
            task = first.task(worker)
        response = first.update(experiment_id, 1, worker, task["client_index"], weights)
        assert response.status_code == 202, response.text
    assert store.get_round(experiment_id, 1) is not None  # round 1 is stored: then the server stops

    second = start_api()  # recover() rebuilds round 2
    response = second.post("/experiments", json=make_spec(rounds=3))
    assert response.json() == {"ids": [experiment_id], "resumed": [experiment_id]}
    assert experiment_count(store) == 1
    summary = next(e for e in second.get("/experiments").json()["experiments"] if e["id"] == experiment_id)
    assert (summary["status"], summary["last_round"]["round"]) == ("running", 1)
    worker = second.register()
    task = second.task(worker)
    assert (task["experiment_id"], task["round"]) == (experiment_id, 2)  # it goes on from its stored rounds


def test_the_fingerprint_leaves_out_the_id_and_the_time_only(make_spec: Callable[..., dict[str, Any]]) -> None:
    spec = ExperimentSpec.from_dict(make_spec())
    same = ExperimentSpec.from_dict({**make_spec(), "id": "e-1", "timestamp": "2030-01-01T00:00:00+00:00"})
    assert fingerprint(spec) == fingerprint(same)
    for change in ({"seed": 8}, {"rounds": 3}, {"description": "renamed"}, {"learning_rate": 0.02}):
        assert fingerprint(ExperimentSpec.from_dict({**make_spec(), **change})) != fingerprint(spec), change


def test_the_transport_reads_resumed_ids_and_asks_for_fresh_ones(
    api: Api, store: Store, token: str, make_spec: Callable[..., dict[str, Any]]
) -> None:
    transport = Transport(api.base.removesuffix(API_PREFIX), token, stop=threading.Event(), rng=random.Random(0))
    try:
        first = transport.submit_experiments([make_spec()])
        again = transport.submit_experiments([make_spec(), make_spec(seed=8)])
        fresh = transport.submit_experiments([make_spec()], fresh=True)
    finally:
        transport.close()
    assert (list(first), first.resumed) == ([first[0]], ())
    assert again[0] == first[0] and again[1] != first[0] and again.resumed == (first[0],)
    assert fresh.resumed == () and fresh[0] not in (*first, *again)
    assert experiment_count(store) == 3


def test_a_replicated_spec_is_queued_as_its_group_and_resumed_as_one(
    api: Api, store: Store, make_spec: Callable[..., dict[str, Any]]
) -> None:
    from fedland.replicates import replicate_group

    response = api.post("/experiments", json=make_spec(rounds=3, seed=5, replicates=3))
    assert response.status_code == 201, response.text
    ids = response.json()["ids"]
    assert len(set(ids)) == 3 and experiment_count(store) == 3
    stored = {doc["_id"]: doc for doc in store.db[records.EXPERIMENTS].find({})}
    experiments = [records.ExperimentRecord.from_doc(stored[i]) for i in ids]
    assert [(e.spec.seed, e.spec.replicate) for e in experiments] == [(5, 0), (6, 1), (7, 2)]
    groups = {stored[i]["group_id"] for i in ids}
    assert groups == {replicate_group(experiments[0].spec)}
    again = api.post("/experiments", json=make_spec(rounds=3, seed=5, replicates=3))
    assert again.json() == {"ids": ids, "resumed": ids} and experiment_count(store) == 3
