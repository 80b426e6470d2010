"""One owner of the spec's rules: what `ExperimentSpec` accepts the server accepts, and it refuses the same field.

Hypothesis mutates a valid experiment field by field (numbers at and past their
bounds, wrong types, strategies with good, bad and unknown parameters, client
counts Krum cannot aggregate) and posts each over real HTTP to a real server.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from fedland.spec import STRATEGY_NAMES, STRATEGY_PARAMS, ExperimentSpec, SpecError
from tests.server.conftest import small_spec

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 2, 3, 7, 2**31, 2**63 - 1, 2**63, -(2**63)]),
    st.sampled_from([0.0, -0.5, 0.05, 0.4999, 0.5, 0.99, 1.0, 1.5, 1e308]),
    st.sampled_from(["", "MNIST", "FedNet", "FedCNN", "x" * 50, "2026-01-01T00:00:00+00:00"]),
    st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), max_size=3),
    st.just({"$gt": ""}),
)
TOP_LEVEL = [
    "description", "dataset_name", "model", "rounds", "local_epochs", "batch_size", "learning_rate", "momentum",
    "seed", "timestamp", "subset_fractions", "unknown_key",
]
LANDSCAPE_KEYS = [
    "enabled", "every", "num_samples", "top_k", "trace_probes", "sharpness_rho", "interpolation_points",
    "grid_points", "grid_radius", "bogus",
]
PARAM_KEYS = sorted({key for params in STRATEGY_PARAMS.values() for key in params} | {"lr"})
# Derandomized and without an example database: the same examples on every machine and every run.
SEARCH = settings(max_examples=2000, deadline=None, derandomize=True, database=None)


@st.composite
def experiments(draw: st.DrawFn) -> dict[str, Any]:
    num_clients = draw(st.integers(1, 6))
    spec = small_spec(
        target_balance_ratios=[[0.1] * 10] * num_clients, subset_fractions=[0.02] * num_clients, rounds=1
    )
    for key in draw(st.lists(st.sampled_from(TOP_LEVEL), max_size=2, unique=True)):
        spec[key] = draw(ANY_VALUE)
    if draw(st.booleans()):
        spec["landscape"] = {key: draw(ANY_VALUE) for key in draw(st.lists(st.sampled_from(LANDSCAPE_KEYS), max_size=2))}
    name = draw(st.sampled_from([*STRATEGY_NAMES, "FedSGD"]))
    params = {key: draw(ANY_VALUE) for key in draw(st.lists(st.sampled_from(PARAM_KEYS), max_size=2))}
    if name == "FedProx" and draw(st.booleans()):
        params["mu"] = draw(st.sampled_from([0.0, 0.01, 1.0]))
    if name == "Krum" and draw(st.booleans()):  # around Krum's limit n > 2 * num_malicious + 2
        params["num_malicious"] = draw(st.integers(0, 3))
    spec["strategy"] = {"name": name, "params": params}
    return spec


def library_verdict(spec: dict[str, Any]) -> str | None:
    """None if `ExperimentSpec` accepts `spec`, else the field it names."""
    try:
        ExperimentSpec.from_dict(spec)
    except SpecError as error:
        return error.field
    return None


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=experiments())
def test_the_server_agrees_with_the_spec(api: Any, spec: dict[str, Any]) -> None:
    expected_field = library_verdict(spec)
    response = api.post("/experiments", json=spec)
    if expected_field is None:
        assert response.status_code == 201, response.text
    else:
        assert response.status_code == 400, (expected_field, response.text)
        assert response.json()["field"] == expected_field, response.text


def test_the_generator_reaches_both_verdicts_and_the_awkward_cases() -> None:
    # the property above is only worth something if both outcomes occur
    assert library_verdict(find(experiments(), lambda spec: library_verdict(spec) is None, settings=SEARCH)) is None
    def too_few_for_krum(spec: dict[str, Any]) -> bool:
        try:
            ExperimentSpec.from_dict(spec)
        except SpecError as error:
            return "client updates per round" in error.rule
        return False

    krum = find(experiments(), too_few_for_krum, settings=SEARCH)
    assert krum["strategy"]["name"] == "Krum"
    odd = find(experiments(), lambda spec: isinstance(spec.get("dataset_name"), dict), settings=SEARCH)
    assert library_verdict(odd) == "dataset_name"
