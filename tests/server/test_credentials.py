"""Credentials per worker and per role, over loopback HTTP on the real store.

A worker id alone grants nothing: every worker route needs that worker's own
secret. The submitter token cannot act as a worker; the enrolment token can only
register. Registrations are bounded in number and in rate (429, Retry-After).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import requests

from server.api import coordinator_of
from server.store import Store
from stack import records, wire
from tests.server.conftest import WORKER_TOKEN, Api


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def post_update(api: Api, experiment_id: str, meta: dict[str, Any], weights: bytes, headers: dict[str, str]) -> Any:
    return requests.post(
        f"{api.base}/experiments/{experiment_id}/rounds/1/updates",
        data={"meta": json.dumps(meta)},
        files={"weights": ("weights.safetensors", weights, "application/octet-stream")},
        headers=headers, timeout=60,
    )


def stored_updates(store: Store) -> tuple[int, int]:
    return store.count(records.CLIENT_STATS), store.count(records.files_collection(records.CLIENT_MODELS))


def test_a_stolen_worker_id_is_refused(api: Api, store: Store, make_spec: Callable[..., dict], token: str) -> None:
    (experiment_id,) = api.submit(make_spec())
    first, second = api.register("a"), api.register("b")
    task = api.task(second)
    assert task["client_index"] == 0
    weights = wire.encode(api.model(experiment_id, 1))
    meta = {"worker_id": second, "client_index": 0, "num_examples": 600, "stats": {"duration_s": {"train": 0.5}}}
    forged = f"{second}.{'x' * 43}"  # the shape of a secret, with the stolen id
    for stolen in (api.secrets[first], WORKER_TOKEN, token, forged, second):
        headers = bearer(stolen)
        for route in ("heartbeat", "task"):
            response = requests.post(f"{api.base}/workers/{second}/{route}", headers=headers, timeout=60)
            assert response.status_code in (401, 403), (route, response.text)
        response = post_update(api, experiment_id, meta, weights, headers)
        assert response.status_code in (401, 403), response.text
        assert "error" in response.json()
    # a valid secret naming the other worker in its update: refused, nothing stored
    response = post_update(api, experiment_id, meta, weights, api.act(first))
    assert (response.status_code, response.json()["field"]) == (403, "meta.worker_id")
    assert stored_updates(store) == (0, 0)
    assert store.get_round(experiment_id, 1) is None
    # the worker's own secret still works: its member was not taken from it
    assert api.post(f"/workers/{second}/heartbeat").json() == {"ok": True}
    response = post_update(api, experiment_id, meta, weights, api.act(second))
    assert response.status_code == 202, response.text
    assert stored_updates(store) == (1, 1)


def test_the_submitter_token_cannot_act_as_a_worker(
    api: Api, store: Store, make_spec: Callable[..., dict], token: str
) -> None:
    (experiment_id,) = api.submit(make_spec())
    worker = api.register()
    submitter = bearer(token)
    response = requests.post(f"{api.base}/workers", json={"hostname": "h", "pid": 1}, headers=submitter, timeout=60)
    assert (response.status_code, response.json()["field"]) == (403, "Authorization")
    for route in ("heartbeat", "task"):
        assert requests.post(f"{api.base}/workers/{worker}/{route}", headers=submitter, timeout=60).status_code == 403
    meta = {"worker_id": worker, "client_index": 0, "num_examples": 600, "stats": {"duration_s": {"train": 0.5}}}
    weights = wire.encode({"w": np.zeros(1, np.float32)})
    assert post_update(api, experiment_id, meta, weights, submitter).status_code == 403
    assert store.count(records.WORKERS) == 1 and stored_updates(store) == (0, 0)
    # what the submitter is for
    assert requests.get(f"{api.base}/experiments", headers=submitter, timeout=60).status_code == 200
    assert requests.get(f"{api.base}/experiments/{experiment_id}", headers=submitter, timeout=60).status_code == 200


def test_worker_credentials_cannot_queue_experiments(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec())
    worker = api.register()
    for headers in (bearer(WORKER_TOKEN), api.act(worker)):
        response = requests.post(f"{api.base}/experiments", json=make_spec(), headers=headers, timeout=60)
        assert (response.status_code, response.json()["field"]) == (403, "Authorization")
        assert requests.get(f"{api.base}/experiments", headers=headers, timeout=60).status_code == 403
    assert store.count(records.EXPERIMENTS) == 1
    # the enrolment token only registers: no spec, no model
    enrolment = bearer(WORKER_TOKEN)
    assert requests.get(f"{api.base}/experiments/{experiment_id}", headers=enrolment, timeout=60).status_code == 403
    model = f"{api.base}/experiments/{experiment_id}/rounds/1/model"
    assert requests.get(model, headers=enrolment, timeout=60).status_code == 403
    # a worker reads the spec and the model it trains
    assert requests.get(f"{api.base}/experiments/{experiment_id}", headers=api.act(worker), timeout=60).ok
    assert requests.get(model, headers=api.act(worker), timeout=60).status_code == 200


def test_registration_beyond_the_bound_is_refused(
    start_api: Callable[..., Api], store: Store, clock: Any
) -> None:
    api = start_api(max_workers=3)
    workers = [api.register(f"h{i}") for i in range(3)]
    response = api.post("/workers", json={"hostname": "h4", "pid": 4})
    body = response.json()
    assert (response.status_code, body["field"]) == (429, "workers")
    assert "at most 3 workers" in body["rule"] and "FEDLAND_MAX_WORKERS" in body["rule"]
    assert int(response.headers["Retry-After"]) >= 1
    assert store.count(records.WORKERS) == 3
    # a worker silent past the heartbeat timeout is reaped, and its slot frees
    clock.advance(20)
    for worker in workers[1:]:
        assert api.post(f"/workers/{worker}/heartbeat").status_code == 200
    clock.advance(15)
    coordinator_of(api.app).reap()
    assert api.post("/workers", json={"hostname": "h4", "pid": 4}).status_code == 201
    assert api.post("/workers", json={"hostname": "h5", "pid": 5}).status_code == 429


def test_a_registration_burst_over_the_rate_is_answered_429_with_retry_after(
    start_api: Callable[..., Api], store: Store, clock: Any
) -> None:
    api = start_api(registrations_per_min=5)
    answers = [api.post("/workers", json={"hostname": "h", "pid": i}) for i in range(12)]
    assert [a.status_code for a in answers] == [201] * 5 + [429] * 7
    refused = answers[-1]
    assert refused.json()["field"] == "workers" and "FEDLAND_REGISTRATIONS_PER_MIN" in refused.json()["rule"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 12  # one registration every 12 s
    assert store.count(records.WORKERS) == 5
    clock.advance(12)
    assert api.post("/workers", json={"hostname": "h", "pid": 99}).status_code == 201
    assert api.post("/workers", json={"hostname": "h", "pid": 100}).status_code == 429
