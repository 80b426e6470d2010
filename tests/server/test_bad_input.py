"""Bad input over real HTTP: each case is a 4xx naming the field, and leaves the store as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from server.store import Store
from stack import records, wire
from tests.server.conftest import Api

COLLECTIONS = (
    records.EXPERIMENTS, records.MEMBERS, records.WORKERS, records.CLIENT_STATS, records.ROUNDS,
    records.files_collection(records.MODELS), records.files_collection(records.CLIENT_MODELS),
)


def counts(store: Store) -> dict[str, int]:
    return {name: store.count(name) for name in COLLECTIONS}


def post_text(api: Api, path: str, text: str) -> Any:
    return api.post(path, data=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"})


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "rule"),
    [
        ("/experiments", DEEP, 400, "body", "nested deeper than 32"),
        ("/workers", DEEP, 400, "body", "nested deeper than 32"),
        ("/workers", '{"hostname": "h", "pid": 9223372036854775808}', 400, "pid", "int64"),
        ("/workers", '{"hostname": "\\ud800", "pid": 1}', 400, "hostname", "lone surrogate"),
        ("/workers", '{"hostname": "h", "pid": NaN}', 400, "body", "NaN"),
    ],
)
def test_hostile_json_bodies(
    api: Api, store: Store, path: str, body: str, status: int, field: str, rule: str
) -> None:
    before = counts(store)
    response = post_text(api, path, body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and rule in response.json()["error"]
    assert counts(store) == before


LANDSCAPE_INTS = ["every", "num_samples", "top_k", "trace_probes", "interpolation_points"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"landscape": {name: 2**63}}, f"landscape.{name}") for name in LANDSCAPE_INTS]
    + [
        ({"strategy": {"name": "Krum", "params": {"num_malicious": 2**63}}}, "strategy.params.num_malicious"),
        ({"rounds": 2**63 - 1}, "rounds"),
        ({"local_epochs": 2**63 - 1}, "local_epochs"),
        ({"batch_size": 2**63 - 1}, "batch_size"),
        ({"learning_rate": 1e308}, "learning_rate"),
        ({"landscape": {"sharpness_rho": 1e308}}, "landscape.sharpness_rho"),
        ({"landscape": {"grid_radius": 1e308}}, "landscape.grid_radius"),
        ({"landscape": {"trace_probes": 4000}}, "landscape.trace_probes"),
        ({"landscape": {"trace_probes": 10**7}}, "landscape.trace_probes"),
        ({"description": "\ud800"}, "description"),
        ({"dataset_name": {"$gt": ""}}, "dataset_name"),
        ({"strategy": {"name": "FedAvg", "params": {}}, "description": "x" * 17_000_000}, "description"),
    ],
)
def test_specs_the_store_or_the_server_cannot_take(
    api: Api, store: Store, make_spec: Callable[..., dict], changes: dict[str, Any], field: str
) -> None:
    before = counts(store)
    response = post_text(api, "/experiments", json.dumps(make_spec(**changes)))
    assert response.status_code in (400, 413), response.text
    assert response.json()["field"] == field, response.text
    assert counts(store) == before


def test_a_spec_over_the_document_limit_is_413(
    api: Api, store: Store, make_spec: Callable[..., dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import validation

    # a valid MNIST spec cannot reach 8 MiB; lower the limit to see the submit route apply it
    monkeypatch.setattr(validation, "MAX_DOCUMENT_BYTES", 5_000)
    before = counts(store)
    response = post_text(api, "/experiments", json.dumps([make_spec(), make_spec(description="d" * 6_000)]))
    assert response.status_code == 413, response.text
    assert response.json()["field"] == "experiments[1]" and "the limit is 5000" in response.json()["error"]
    assert counts(store) == before


def test_a_failed_experiment_insert_leaves_no_round_zero_model(
    api: Api, store: Store, make_spec: Callable[..., dict]
) -> None:
    api.submit(make_spec(description="taken"))
    # a real store refusal after the round-0 model was written: a unique index the insert breaks
    store.db[records.EXPERIMENTS].create_index([("description", 1)], unique=True)
    before = counts(store)
    # another seed: an identical spec would resume the first experiment, not insert
    response = post_text(api, "/experiments", json.dumps(make_spec(description="taken", seed=8)))
    assert response.status_code == 500  # the store refused: a server-side failure, logged
    assert counts(store) == before  # ... and the model it had written is gone


@pytest.mark.parametrize(
    ("stats", "field"),
    [
        ({"landscape": {"trace": 2**63}}, "meta.stats.landscape.trace"),
        ({"a\x00b": 1}, "meta.stats"),
        ({"deep": json.loads("[" * 30 + "]" * 30)}, "meta.stats.deep"),
        ({"$set": {"status": "finished"}}, "meta.stats"),
        ({"global": {"test_accuracy": 1.0, "rounds": 3}}, "meta.stats.global.rounds"),
        ({"landscape": {"global": {"trace": "fabricated"}}}, "meta.stats.landscape.global.trace"),
    ],
)
def test_stats_that_left_orphan_files_are_refused_before_any_write(
    api: Api, store: Store, make_spec: Callable[..., dict], stats: dict[str, Any], field: str
) -> None:
    (experiment_id,) = api.submit(make_spec())
    first, second = api.register("a"), api.register("b")
    assert api.task(first)["client_index"] == 0 and api.task(second)["client_index"] == 1
    weights = api.model(experiment_id, 1)
    before = counts(store)
    for _ in range(4):  # the client retried 5xx: each attempt used to leave a file
        response = api.update(experiment_id, 1, first, 0, weights, stats=stats)
        assert response.status_code == 400, response.text
        assert response.json()["field"] == field, response.text
    assert counts(store) == before
    # the same update with real stats is accepted
    assert api.update(experiment_id, 1, first, 0, weights).status_code == 202


def test_deep_meta_is_refused(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec())
    worker = api.register()
    data = wire.encode({"w": np.zeros(1, np.float32)})
    before = counts(store)
    response = api.post(
        f"/experiments/{experiment_id}/rounds/1/updates", as_worker=worker,
        data={"meta": "[" * 100_000 + "]" * 100_000},
        files={"weights": ("w.safetensors", data, "application/octet-stream")},
    )
    assert (response.status_code, response.json()["field"]) == (400, "meta")
    assert counts(store) == before


def test_a_failed_member_insert_leaves_no_experiment_behind(
    api: Api, store: Store, make_spec: Callable[..., dict]
) -> None:
    # a real store refusal after the experiment documents were written: two members with equal num_train
    store.db[records.MEMBERS].create_index([("num_train", 1)], unique=True)
    before = counts(store)
    response = post_text(api, "/experiments", json.dumps(make_spec()))  # 2 members of 600 examples each
    assert response.status_code == 500, response.text  # the store refused: a server-side failure, logged
    assert counts(store) == before  # no experiment without members, no round-0 model


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        (DEEP, "body", "nested deeper than 32"),
        ("{not json", "body", "JSON"),
        ("[1, 2]", "body", "JSON object"),
        ('{"wait_s": "soon"}', "wait_s", "seconds"),
        ('{"known_experiments": [7]}', "known_experiments[0]", "experiment id"),
        ('{"known_experiments": ["../x"]}', "known_experiments[0]", "letters, digits"),
        (json.dumps({"known_experiments": ["a"] * 1001}), "known_experiments", "at most 1000"),
    ],
)
def test_hostile_task_requests(api: Api, store: Store, body: str, field: str, rule: str) -> None:
    worker = api.register()
    before = counts(store)
    response = post_text(api, f"/workers/{worker}/task", body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field and rule in response.json()["error"], response.json()
    assert counts(store) == before
