"""The spec's `landscape` section: defaults, validation naming `landscape.<field>`, schedule, round trip."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from fedland.landscape_budget import member_measurement_s, model_costs
from fedland.spec import ExperimentSpec, LandscapeSpec, SpecError

UNIFORM = [0.1] * 10


def experiment(**landscape: Any) -> dict[str, Any]:
    return {
        "target_balance_ratios": [UNIFORM, UNIFORM],
        "subset_fractions": [0.1, 0.1],
        "rounds": 7,
        "timestamp": "2025-01-02T03:04:05+00:00",
        "landscape": landscape,
    }


def test_defaults_are_the_documented_ones() -> None:
    assert LandscapeSpec().to_dict() == {
        "enabled": True,
        "every": None,  # chosen by the budget (25%, left out of the dict as the default)
        "num_samples": None,
        "top_k": 2,
        "trace_probes": 12,
        "sharpness_rho": 0.05,
        "interpolation_points": 11,
        "grid_points": 9,
        "grid_radius": 1.0,
        "pac_bayes_deviation": 0.1,
        "pac_bayes_samples": 128,
        "pac_bayes_steps": 10,
        "power_iterations": 30,
    }
    spec = ExperimentSpec.from_dict({k: v for k, v in experiment().items() if k != "landscape"})
    assert dataclasses.replace(spec.landscape, every=None, num_samples=None, member_pac_bayes=None) == LandscapeSpec()
    assert spec.landscape.every == 7 and spec.landscape.num_samples == 128  # resolved: only the last round
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.landscape.every = 3  # type: ignore[misc]


def test_partial_dict_fills_defaults_and_round_trips_through_json() -> None:
    spec = ExperimentSpec.from_dict(experiment(every=3, num_samples=64, top_k=4, grid_radius=2))
    # both every and num_samples given: the budget changes nothing, the members measure PAC-Bayes too
    assert spec.landscape == LandscapeSpec(every=3, num_samples=64, top_k=4, grid_radius=2.0, member_pac_bayes=True)
    assert isinstance(spec.landscape.grid_radius, float)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["landscape"] == {
        **LandscapeSpec().to_dict(), "every": 3, "num_samples": 64, "top_k": 4, "grid_radius": 2.0
    }
    assert ExperimentSpec.from_dict(data) == spec


BAD = [
    ({"enabled": 1}, "landscape.enabled", "must be true or false"),
    ({"every": 0}, "landscape.every", "must be a positive integer"),
    ({"every": 1.5}, "landscape.every", "must be a positive integer"),
    ({"num_samples": -4}, "landscape.num_samples", "must be a positive integer"),
    ({"top_k": True}, "landscape.top_k", "must be a positive integer"),
    ({"trace_probes": 0}, "landscape.trace_probes", "must be a positive integer"),
    ({"trace_probes": 3}, "landscape.trace_probes", "Hutch++ needs at least 4 products"),
    ({"interpolation_points": 1}, "landscape.interpolation_points", "must be an integer >= 2"),
    ({"grid_points": 10}, "landscape.grid_points", "must be an odd integer >= 3"),
    ({"grid_points": 1}, "landscape.grid_points", "must be an odd integer >= 3"),
    ({"sharpness_rho": 0}, "landscape.sharpness_rho", "must be a finite number > 0"),
    ({"grid_radius": float("inf")}, "landscape.grid_radius", "must be a finite number > 0"),
    ({"grid_radius": "1"}, "landscape.grid_radius", "must be a finite number > 0"),
    ({"evry": 2}, "landscape.evry", "unknown key; valid keys: enabled, every, num_samples"),
]


@pytest.mark.parametrize(("landscape", "field", "rule"), BAD, ids=[b[1] + ":" + str(b[0]) for b in BAD])
def test_bad_values_name_the_field(landscape: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(experiment(**landscape))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and rule in str(caught.value)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(SpecError, match=r"^landscape: must be an object, got list"):
        ExperimentSpec.from_dict({**experiment(), "landscape": [1]})
    with pytest.raises(SpecError, match=r"^landscape: must be a LandscapeSpec, got dict"):
        landscape: Any = {"every": 2}
        ExperimentSpec(target_balance_ratios=[UNIFORM], subset_fractions=[0.1], landscape=landscape)


def test_schedule_every_k_rounds_and_always_the_last() -> None:
    def measured(landscape: LandscapeSpec, rounds: int) -> list[int]:
        return [r for r in range(1, rounds + 1) if landscape.scheduled(r, rounds)]

    assert measured(LandscapeSpec(every=1), 4) == [1, 2, 3, 4]
    assert measured(LandscapeSpec(every=2), 5) == [2, 4, 5]
    assert measured(LandscapeSpec(every=3), 7) == [3, 6, 7]
    assert measured(LandscapeSpec(every=3), 6) == [3, 6]
    assert measured(LandscapeSpec(every=10), 4) == [4]
    assert measured(LandscapeSpec(enabled=False), 4) == []
    assert measured(LandscapeSpec(enabled=False, every=2), 4) == []


OVER_BOUND = [
    ({"every": 2**63}, "landscape.every", "at most 100000"),
    ({"num_samples": 2**63}, "landscape.num_samples", "at most 60000"),
    ({"top_k": 51}, "landscape.top_k", "at most 50"),
    ({"trace_probes": 10**7}, "landscape.trace_probes", "at most 1000"),
    ({"interpolation_points": 2**63}, "landscape.interpolation_points", "at most 1001"),
    ({"grid_points": 103}, "landscape.grid_points", "at most 101"),
    ({"sharpness_rho": 1e308}, "landscape.sharpness_rho", "at most 100"),
    ({"grid_radius": 1e308}, "landscape.grid_radius", "at most 1000"),
    ({"pac_bayes_samples": 10**6}, "landscape.pac_bayes_samples", "at most 4096"),
    ({"pac_bayes_steps": 10**6}, "landscape.pac_bayes_steps", "at most 64"),
    ({"power_iterations": 10**7}, "landscape.power_iterations", "at most 1000"),
]


@pytest.mark.parametrize(("changes", "field", "rule"), OVER_BOUND, ids=[b[1] for b in OVER_BOUND])
def test_each_field_has_an_upper_bound(changes: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(experiment(**changes))
    assert caught.value.field == field and rule in str(caught.value)


def test_costly_settings_are_refused_by_their_calibrated_cost() -> None:
    from fedland import spec as spec_module

    assert spec_module.num_parameters("FedNet") == 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    # FedCNN on 20,000 samples is affordable; ~20x the PAC-Bayes draws (each setting within its bound) are not
    fedcnn = model_costs()["FedCNN"]
    heavy: dict[str, Any] = {"pac_bayes_samples": 512, "pac_bayes_steps": 64, "member_pac_bayes": True}
    assert member_measurement_s(fedcnn, LandscapeSpec(), 20_000) < spec_module.LANDSCAPE_COST_BUDGET_S / 2
    assert member_measurement_s(fedcnn, LandscapeSpec(**heavy), 20_000) > 2 * spec_module.LANDSCAPE_COST_BUDGET_S
    ExperimentSpec.from_dict({**experiment(num_samples=20_000), "model": "FedCNN"})
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict({**experiment(num_samples=20_000, **heavy), "model": "FedCNN"})
    assert caught.value.field == "landscape" and "CPU seconds" in str(caught.value) and "FedCNN" in str(caught.value)
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict({**experiment(trace_probes=1000, num_samples=16), "model": "FedCNN"})
    assert caught.value.field == "landscape.trace_probes" and "MiB" in str(caught.value)
    # switched off: nothing is measured, nothing to bound
    ExperimentSpec.from_dict(experiment(enabled=False, trace_probes=1000, num_samples=60_000, grid_points=101))
