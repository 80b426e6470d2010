"""server/validation.py: each refusal names the field and the rule; what passes, the store can keep."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from server.validation import (
    MAX_DEPTH,
    MAX_KNOWN_EXPERIMENTS,
    MAX_STATS_BYTES,
    Invalid,
    TooLarge,
    check_document_size,
    check_id,
    check_stats,
    check_weights_bounded,
    parse_json,
    parse_meta,
    parse_query_number,
    parse_registration,
    parse_specs,
    parse_task_request,
)


def deep(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 1_000, 100_000])
def test_deep_nesting_is_refused_at_any_depth(levels: int) -> None:
    with pytest.raises(Invalid) as caught:
        parse_json(deep(levels))
    assert "nested deeper than 32 levels" in str(caught.value)
    parse_json(deep(MAX_DEPTH))  # the limit itself passes


def test_deep_nesting_names_the_path() -> None:
    with pytest.raises(Invalid) as caught:
        parse_json(json.dumps({"landscape": {"x": json.loads(deep(40))}}))
    assert caught.value.field.startswith("landscape.x[0]")


@pytest.mark.parametrize(
    ("text", "field", "rule"),
    [
        ('{"pid": 9223372036854775808}', "pid", "int64"),
        ('{"seed": -9223372036854775809}', "seed", "int64"),
        ('{"a": [1, NaN]}', "body", "NaN is not a JSON number"),
        ('{"a": Infinity}', "body", "Infinity is not a JSON number"),
        ('{"hostname": "\\ud800"}', "hostname", "lone surrogate"),
        ('{"$gt": 1}', "body", "may not start with '$'"),
        ('{"a": {"b\\u0000c": 1}}', "a", "NUL"),
        ('{"a.b": 1}', "body", "'.'"),
        ('{"": 1}', "body", "1 to 100 characters"),
        ('{"a": 1', "body", "not valid JSON"),
        (b'{"a": "\xff"}', "body", "must be UTF-8"),
    ],
)
def test_json_the_store_cannot_keep_is_refused(text: str | bytes, field: str, rule: str) -> None:
    with pytest.raises(Invalid) as caught:
        parse_json(text)
    assert caught.value.field == field and rule in str(caught.value)
    assert caught.value.status == 400


def test_strings_are_length_bounded_and_description_has_its_own_limit() -> None:
    with pytest.raises(TooLarge) as caught:
        parse_json(json.dumps({"hostname": "h" * 1_001}))
    assert caught.value.field == "hostname" and caught.value.status == 413
    parse_json(json.dumps({"description": "d" * 10_000}))
    parse_json(json.dumps([{"description": "d" * 10_000}]))
    with pytest.raises(TooLarge) as caught:
        parse_json(json.dumps({"description": "d" * 10_001}))
    assert "the limit is 10000" in str(caught.value)


def test_document_size_limit() -> None:
    check_document_size({"a": "x" * 1000}, "body", limit=2000)
    with pytest.raises(TooLarge) as caught:
        check_document_size({"a": "x" * 3000}, "experiments[2]", limit=2000)
    assert caught.value.field == "experiments[2]" and "the limit is 2000" in str(caught.value)


def test_ids_from_urls() -> None:
    assert check_id("0123abcdef_-", "experiment_id") == "0123abcdef_-"
    for bad in ("", "x" * 65, "a b", "\udc80", "$gt", "a/b"):
        with pytest.raises(Invalid) as caught:
            check_id(bad, "worker_id")
        assert caught.value.field == "worker_id"


REAL_STATS: dict[str, Any] = {
    "duration_s": {"fetch": 0.1, "eval_global": 0.2, "train": 1.5, "eval_local": 0.2, "total": 2.0},
    "global": {"train_loss": 2.3, "train_accuracy": 0.1, "test_loss": 2.3, "test_accuracy": 0.1},
    "local": {"train_loss": 0.5, "train_accuracy": 0.9, "test_loss": 0.6, "test_accuracy": 0.85},
    "train_loss_per_epoch": [0.7, 0.5],
    "landscape": {
        "num_samples": 256,
        "duration_s": 3.2,
        "global": {"loss": 2.3, "top_eigenvalues": [5.1, None], "trace": 40.0, "sharpness": None},
        "interpolation": {"alphas": [0.0, 1.0], "losses": [2.3, 0.5], "barrier": 0.0},
        "update": {"distance": 1.2, "cosine_to_previous_update": None},
    },
}


def test_what_the_client_sends_passes() -> None:
    assert check_stats(REAL_STATS, max_epochs=2) == REAL_STATS
    assert check_stats({}, max_epochs=1) == {}
    assert check_stats({"landscape": {"error": "RuntimeError: boom"}}, max_epochs=1)


@pytest.mark.parametrize(
    ("stats", "field"),
    [
        ([], "meta.stats"),
        ({"$where": 1}, "meta.stats"),
        ({"round": 3}, "meta.stats.round"),
        ({"experiment_id": "x"}, "meta.stats.experiment_id"),
        ({"anything": 1}, "meta.stats.anything"),
        ({"global": {"test_accuracy": 7.0}}, "meta.stats.global.test_accuracy"),
        ({"global": {"test_loss": -1}}, "meta.stats.global.test_loss"),
        ({"global": {"rounds_won": 1}}, "meta.stats.global.rounds_won"),
        ({"local": "great"}, "meta.stats.local"),
        ({"duration_s": {"train": "long"}}, "meta.stats.duration_s.train"),
        ({"duration_s": {"train": -1}}, "meta.stats.duration_s.train"),
        ({"train_loss_per_epoch": [1, 2, 3]}, "meta.stats.train_loss_per_epoch"),
        ({"train_loss_per_epoch": ["x"]}, "meta.stats.train_loss_per_epoch[0]"),
        ({"landscape": {"global": {"trace": "big"}}}, "meta.stats.landscape.global.trace"),
        ({"landscape": {"global": {"bad key": 1}}}, "meta.stats.landscape.global"),
        ({"landscape": {"x": [[1]]}}, "meta.stats.landscape.x[0]"),
        ({"landscape": {"error": "x", "trace": 1}}, "meta.stats.landscape.error"),
        ({"landscape": {"x": 2**63}}, "meta.stats.landscape.x"),
        ({"landscape": {"global": {"trace": True}}}, "meta.stats.landscape.global.trace"),
    ],
)
def test_stats_are_typed(stats: Any, field: str) -> None:
    with pytest.raises(Invalid) as caught:
        check_stats(stats, max_epochs=2)
    assert caught.value.field == field


def test_the_flags_of_a_measurement_are_booleans_only_under_their_keys() -> None:
    landscape = {"global": {"top_eigenvalues": [3.0], "top_eigenvalues_converged": False,
                            "generalization": {"pac_bayes": {"saturated": True, "sigma": None}}}}
    assert check_stats({"landscape": landscape}, max_epochs=1)["landscape"] == landscape


def test_stats_are_size_bounded() -> None:
    losses = [0.5] * (MAX_STATS_BYTES // 4)
    with pytest.raises(TooLarge) as caught:
        check_stats({"train_loss_per_epoch": losses}, max_epochs=len(losses))
    assert caught.value.field == "meta.stats" and caught.value.status == 413


def test_weights_are_bounded_per_tensor() -> None:
    weights = {"fc1.weight": np.ones((3, 2), np.float32), "fc1.bias": np.zeros(3, np.float32)}
    check_weights_bounded(weights)
    weights["fc1.bias"] = np.array([0.0, -2e4, 1.0], np.float32)
    with pytest.raises(Invalid) as caught:
        check_weights_bounded(weights)
    assert caught.value.field == "weights['fc1.bias']" and "2e+04" in str(caught.value)
    weights["fc1.bias"] = np.array([0.0, np.nan, 1.0], np.float32)
    with pytest.raises(Invalid, match="NaN or Inf"):
        check_weights_bounded(weights)


def test_batchnorm_buffers_have_their_own_bounds() -> None:
    # num_batches_tracked grows every round (ResNet-20 on CIFAR-10 passes 1e4 in ~20 rounds): never refused
    buffers: dict[str, np.ndarray] = {
        "bn.num_batches_tracked": np.array(10**7, np.int64), "bn.running_var": np.full(4, 5e4, np.float32),
    }
    check_weights_bounded(buffers)
    buffers["bn.running_var"] = np.full(4, 1e13, np.float32)
    with pytest.raises(Invalid) as caught:
        check_weights_bounded(buffers)
    assert caught.value.field == "weights['bn.running_var']" and "1e+12" in str(caught.value)


def test_what_a_real_client_sends_passes_check_stats(data_dir: Any) -> None:
    # the stats rule and the client must agree: a measured round's stats, as run_round makes them
    from client.work import run_round
    from fedland.datasets import load_dataset
    from fedland.plan import ExperimentPlan
    from fedland.spec import ExperimentSpec, LandscapeSpec
    from tests.helpers import small_spec

    landscape = LandscapeSpec(every=1, num_samples=32, top_k=1, trace_probes=4, interpolation_points=3, grid_points=3)
    spec = ExperimentSpec.from_dict(small_spec(1, rounds=1, fraction=0.005, landscape=landscape))
    plan = ExperimentPlan(spec, load_dataset(spec.dataset_name, data_dir))
    stats = run_round(plan, plan.client_data(0), plan.model(), 1, 0.0).stats
    assert "generalization" in stats["landscape"]["local"] and "generalization_gap" in stats["local"]
    assert check_stats(stats, max_epochs=spec.local_epochs) == stats


def test_invalid_names_the_field_and_the_rule() -> None:
    error = Invalid("meta.num_examples", "must be an integer > 0")
    assert (error.field, error.rule, error.status) == ("meta.num_examples", "must be an integer > 0", 400)
    assert str(error) == "meta.num_examples: must be an integer > 0"
    large = TooLarge("body", "the limit is 5")
    assert isinstance(large, Invalid) and large.status == 413 and str(large) == "body: the limit is 5"


def test_registration() -> None:
    registration = parse_registration({"hostname": "node-1", "pid": 42})
    assert (registration.hostname, registration.pid) == ("node-1", 42)
    refusals: list[tuple[Any, str]] = [
        ([], "body"),
        ({"pid": 1}, "hostname"),
        ({"hostname": "", "pid": 1}, "hostname"),
        ({"hostname": "h" * 256, "pid": 1}, "hostname"),
        ({"hostname": 7, "pid": 1}, "hostname"),
        ({"hostname": "h"}, "pid"),
        ({"hostname": "h", "pid": "1"}, "pid"),
        ({"hostname": "h", "pid": True}, "pid"),
        ({"hostname": "h", "pid": -1}, "pid"),
        ({"hostname": "h", "pid": 2**32}, "pid"),
    ]
    for body, field in refusals:
        with pytest.raises(Invalid) as caught:
            parse_registration(body)
        assert caught.value.field == field, body


def test_task_requests() -> None:
    assert parse_task_request({}) == parse_task_request({"wait_s": 0, "known_experiments": []})
    wanted = parse_task_request({"wait_s": 2, "known_experiments": ["e-1", "e_2"]})
    assert (wanted.wait_s, wanted.known_experiments) == (2.0, frozenset({"e-1", "e_2"}))
    assert isinstance(wanted.wait_s, float)
    refusals: list[tuple[Any, str]] = [
        ([], "body"),
        ({"wait_s": -1}, "wait_s"),
        ({"wait_s": True}, "wait_s"),
        ({"wait_s": "1"}, "wait_s"),
        ({"wait_s": math.nan}, "wait_s"),
        ({"known_experiments": "e-1"}, "known_experiments"),
        ({"known_experiments": ["e"] * (MAX_KNOWN_EXPERIMENTS + 1)}, "known_experiments"),
        ({"known_experiments": ["e-1", 3]}, "known_experiments[1]"),
        ({"known_experiments": ["e-1", "a/b"]}, "known_experiments[1]"),
    ]
    for body, field in refusals:
        with pytest.raises(Invalid) as caught:
            parse_task_request(body)
        assert caught.value.field == field, body


def test_query_numbers() -> None:
    assert parse_query_number("version", None, int) is None
    assert parse_query_number("version", "3", int) == 3
    assert parse_query_number("wait_s", "2.5", float) == 2.5
    huge = "9" * 400  # more than a float holds: still a version, not a server error
    assert parse_query_number("version", huge, int) == int(huge)
    for name, raw, kind in [("version", "x", int), ("version", "1.5", int), ("version", "-1", int),
                            ("wait_s", "nan", float), ("wait_s", "-0.1", float), ("wait_s", "", float)]:
        with pytest.raises(Invalid) as caught:
            parse_query_number(name, raw, kind)
        assert caught.value.field == name and repr(raw) in caught.value.rule


GOOD_META: dict[str, Any] = {"worker_id": "w-1", "client_index": 1, "num_examples": 600, "stats": REAL_STATS}


def test_update_meta() -> None:
    meta = parse_meta(GOOD_META, num_clients=2, max_epochs=2)
    assert (meta.worker_id, meta.client_index, meta.num_examples, meta.stats) == ("w-1", 1, 600, REAL_STATS)
    assert parse_meta({**GOOD_META, "stats": {}}, num_clients=2, max_epochs=2).stats == {}
    without_stats = {key: value for key, value in GOOD_META.items() if key != "stats"}
    assert parse_meta(without_stats, num_clients=2, max_epochs=2).stats == {}
    refusals: list[tuple[Any, str]] = [
        ([], "meta"),
        ({**GOOD_META, "client_id": "w-1"}, "meta.client_id"),  # the previous release's name: refused, not ignored
        ({**GOOD_META, "worker_id": None}, "meta.worker_id"),
        ({**GOOD_META, "worker_id": "a b"}, "meta.worker_id"),
        ({**GOOD_META, "worker_id": "x" * 65}, "meta.worker_id"),
        ({**GOOD_META, "client_index": 2}, "meta.client_index"),
        ({**GOOD_META, "client_index": -1}, "meta.client_index"),
        ({**GOOD_META, "client_index": True}, "meta.client_index"),
        ({**GOOD_META, "client_index": 1.0}, "meta.client_index"),
        ({**GOOD_META, "num_examples": 0}, "meta.num_examples"),
        ({**GOOD_META, "num_examples": "600"}, "meta.num_examples"),
        ({**GOOD_META, "stats": {"round": 3}}, "meta.stats.round"),
    ]
    for meta_value, field in refusals:
        with pytest.raises(Invalid) as caught:
            parse_meta(meta_value, num_clients=2, max_epochs=2)
        assert caught.value.field == field, meta_value


def test_specs_one_or_a_list() -> None:
    from tests.server.conftest import small_spec

    (one,) = parse_specs(small_spec())
    assert one.description == "server test" and one.num_clients == 2
    assert [spec.seed for spec in parse_specs([small_spec(), small_spec(seed=8)])] == [7, 8]
    refusals: list[tuple[Any, str]] = [
        ([], "body"),
        (small_spec(rounds=0), "rounds"),
        ([small_spec(), small_spec(rounds=0)], "experiments[1].rounds"),
        ([small_spec(), "x"], "experiments[1].experiment"),
    ]
    for body, field in refusals:
        with pytest.raises(Invalid) as caught:
            parse_specs(body)
        assert caught.value.field == field, body
