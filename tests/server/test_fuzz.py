"""Fuzzing every route and field: never a 5xx, and a refused request leaves the store as it was.

Hypothesis, derandomized and bounded (`EXAMPLES` per route), against the real app
over loopback HTTP on the real store. Inputs: valid requests with one field
replaced by hostile JSON (huge integers, NaN, lone surrogates, `$`-keys, deep
nesting, long strings), raw bodies that are not JSON, and hostile weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api import coordinator_of
from server.store import Store
from stack import records, wire
from tests.server.conftest import Api

pytestmark = pytest.mark.slow

EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)

COLLECTIONS = (
    records.EXPERIMENTS, records.MEMBERS, records.WORKERS, records.CLIENT_STATS, records.ROUNDS, records.LANDSCAPES,
    records.files_collection(records.MODELS), records.chunks_collection(records.MODELS),
    records.files_collection(records.CLIENT_MODELS), records.chunks_collection(records.CLIENT_MODELS),
)

HOSTILE_STRINGS = ["\ud800", "\udfff x", "$gt", "a.b", "a\x00b", "", "x" * 20_000, "d" * 10_001]
HOSTILE_NUMBERS = [2**63, -(2**63) - 1, 2**63 - 1, 10**30, 1e308, -1e308, 3e38, 0, -1]
KEYS = st.one_of(st.text(max_size=6), st.sampled_from(["$gt", "$where", "a.b", "\x00", "", "\ud800", "round"]))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(HOSTILE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8
)


class Deep:
    """A JSON text nested `levels` deep (built as text: Python's json would recurse)."""

    def __init__(self, levels: int, opener: str) -> None:
        self.text = (opener * levels) + "1" + ("]" if opener == "[" else "}") * levels
        if opener == '{"a":':
            self.text = '{"a":' * levels + "1" + "}" * levels

    def __repr__(self) -> str:
        return f"Deep({len(self.text)} chars)"


DEEP = st.builds(Deep, st.sampled_from([33, 200, 5_000, 100_000]), st.sampled_from(["[", '{"a":']))
FIELD_VALUES = st.one_of(VALUES, DEEP)


def dumps(value: Any) -> str:
    """JSON text of `value` with NaN/Infinity literals kept and `Deep` values spliced in."""
    holes: list[str] = []

    def encode(item: Any) -> Any:
        if isinstance(item, Deep):
            holes.append(item.text)
            return f"@@DEEP{len(holes) - 1}@@"
        if isinstance(item, dict):
            return {key: encode(child) for key, child in item.items()}
        if isinstance(item, list):
            return [encode(child) for child in item]
        return item

    text = json.dumps(encode(value), allow_nan=True)
    for index, hole in enumerate(holes):
        text = text.replace(f'"@@DEEP{index}@@"', hole)
    return text


def snapshot(store: Store) -> dict[str, int]:
    return {name: store.count(name) for name in COLLECTIONS}


def check(api: Api, store: Store, send: Callable[[], Any], allowed: set[int]) -> int:
    # what the measurement thread writes (an accepted experiment's round-0 evaluation) is not the request's
    assert coordinator_of(api.app).measurements.wait(timeout_s=120)
    before = snapshot(store)
    response = send()
    assert response.status_code < 500, response.text[:500]
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert snapshot(store) == before, response.text[:300]
        assert "error" in response.json()
    return int(response.status_code)


def post_json(api: Api, path: str, text: str) -> Any:
    return api.post(path, data=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"})


SPEC_FIELDS = [
    "description", "dataset_name", "model", "rounds", "local_epochs", "batch_size", "learning_rate", "momentum",
    "seed", "timestamp", "id", "target_balance_ratios", "subset_fractions", "strategy", "landscape",
    "strategy.name", "strategy.params", "strategy.params.num_malicious", "strategy.params.mu",
    "landscape.every", "landscape.num_samples", "landscape.top_k", "landscape.trace_probes",
    "landscape.interpolation_points", "landscape.grid_points", "landscape.grid_radius", "landscape.sharpness_rho",
    "landscape.enabled", "unknown_key", "$where",
]


def with_field(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(document))
    target = copy
    *parents, last = path.split(".")
    for parent in parents:
        if not isinstance(target.get(parent), dict):
            target[parent] = {}
        target = target[parent]
    target[last] = value
    return copy


def test_fuzz_experiments_route(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    base = make_spec(rounds=1, strategy={"name": "Krum", "params": {"num_malicious": 0}})

    @FUZZ
    @given(
        st.one_of(
            st.tuples(st.sampled_from(SPEC_FIELDS), FIELD_VALUES).map(lambda fv: dumps(with_field(base, *fv))),
            st.tuples(st.sampled_from(SPEC_FIELDS), FIELD_VALUES).map(lambda fv: dumps([base, with_field(base, *fv)])),
            FIELD_VALUES.map(dumps),
            st.text(max_size=40),
        )
    )
    def run(text: str) -> None:
        check(api, store, lambda: post_json(api, "/experiments", text), {201, 400, 413})

    run()


def test_fuzz_client_routes(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    api.submit(make_spec())
    known = api.register()
    ids = st.one_of(st.text(max_size=70), st.sampled_from(HOSTILE_STRINGS + [known, "0" * 64, "..", "%2F"]))

    @FUZZ
    @given(
        st.sampled_from(["hostname", "pid", "extra"]),
        FIELD_VALUES,
        ids,
        st.sampled_from(["register", "heartbeat", "task"]),
    )
    def run(field: str, value: Any, worker_id: str, route: str) -> None:
        if route == "register":
            body = dumps(with_field({"hostname": "h", "pid": 1}, field, value))
            check(api, store, lambda: post_json(api, "/workers", body), {201, 400, 413})
        else:
            path = f"/workers/{quote(worker_id.encode('utf-8', 'surrogatepass'), safe='')}/{route}"
            check(api, store, lambda: api.post(path), {200, 400, 403, 404, 405})

    run()


def test_fuzz_experiment_reads(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec())

    @FUZZ
    @given(
        st.one_of(st.text(max_size=70), st.sampled_from(HOSTILE_STRINGS + [experiment_id])),
        st.one_of(st.integers(min_value=-5, max_value=2**80), st.text(max_size=5)),
    )
    def run(experiment_id: str, server_round: Any) -> None:
        quoted = quote(experiment_id.encode("utf-8", "surrogatepass"), safe="")
        check(api, store, lambda: api.get(f"/experiments/{quoted}"), {200, 400, 404})
        path = f"/experiments/{quoted}/rounds/{quote(str(server_round), safe='')}/model"
        check(api, store, lambda: api.get(path), {200, 400, 404})

    run()


def hostile_weights(reference: dict[str, np.ndarray]) -> Any:
    names = sorted(reference)

    def scaled(name: str, factor: float) -> bytes:
        changed = {key: value.copy() for key, value in reference.items()}
        with np.errstate(over="ignore", invalid="ignore"):
            changed[name] = (changed[name] * factor).astype(np.float32)
        return wire.encode(changed)

    return st.one_of(
        st.tuples(st.sampled_from(names), st.sampled_from([1e5, 1e30, 3e38 / 0.3, math.inf, math.nan, -1e9, 1.0])).map(
            lambda nf: scaled(*nf)
        ),
        st.binary(max_size=64),
        st.sampled_from([wire.encode({"x": np.zeros(3, np.float32)}), wire.encode(reference)[:-7]]),
    )


META_FIELDS = [
    "worker_id", "client_index", "num_examples", "stats", "extra", "stats.global", "stats.local",
    "stats.duration_s", "stats.duration_s.train", "stats.train_loss_per_epoch", "stats.landscape",
    "stats.landscape.global", "stats.round", "stats.$set", "stats.global.test_accuracy",
]


def test_fuzz_update_route(api: Api, store: Store, make_spec: Callable[..., dict]) -> None:
    (experiment_id,) = api.submit(make_spec())
    first, second = api.register("a"), api.register("b")
    assert api.task(first)["client_index"] == 0 and api.task(second)["client_index"] == 1
    reference = api.model(experiment_id, 1)
    good_meta = {
        "worker_id": first, "client_index": 0, "num_examples": 600,
        "stats": {"duration_s": {"train": 0.5}, "global": {"test_accuracy": 0.1}, "train_loss_per_epoch": [1.0]},
    }
    good_weights = wire.encode(reference)

    @FUZZ
    @given(
        st.one_of(
            st.tuples(st.sampled_from(META_FIELDS), FIELD_VALUES).map(lambda fv: dumps(with_field(good_meta, *fv))),
            FIELD_VALUES.map(dumps),
            st.just(dumps(good_meta)),
        ),
        st.one_of(st.just(good_weights), hostile_weights(reference)),
        st.sampled_from([experiment_id, "nope", "\ud800", "x" * 100]),
        st.sampled_from([1, 2, 0, 2**70]),
    )
    def run(meta: str, weights: bytes, target: str, server_round: int) -> None:
        path = (
            f"/experiments/{quote(target.encode('utf-8', 'surrogatepass'), safe='')}"
            f"/rounds/{server_round}/updates"
        )
        files = {"weights": ("w.safetensors", weights, "application/octet-stream")}
        data = {"meta": meta.encode("utf-8", "surrogatepass")}
        # 422: a refused update, recorded in refused_updates only (not among the collections compared)
        allowed = {202, 400, 403, 404, 409, 413, 422}
        check(api, store, lambda: api.post(path, as_worker=first, data=data, files=files), allowed)

    run()
    # whatever was accepted, nothing is orphaned: every client-model file is referenced by a stat
    referenced = {
        str(records.ClientStatsRecord.from_doc(doc).weights_file_id) for doc in store.db[records.CLIENT_STATS].find()
    }
    files = {str(doc["_id"]) for doc in store.db[records.files_collection(records.CLIENT_MODELS)].find({}, {"_id": 1})}
    assert files == referenced
