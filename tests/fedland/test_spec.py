"""Experiment spec: every refusal names its field and rule; dict, JSON and TOML round trips."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedland.spec import (
    STORE_KEYS,
    STRATEGY_NAMES,
    ExperimentSpec,
    LandscapeSpec,
    SpecError,
    StrategySpec,
    load_specs,
)

UNIFORM = [0.1] * 10


def spec_dict(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": None,
        "description": "three clients, one skewed",
        "dataset_name": "MNIST",
        "model": "FedNet",
        "timestamp": "2025-01-02T03:04:05+00:00",
        "target_balance_ratios": [UNIFORM, UNIFORM, [0.5, 0.5] + [0.0] * 8],
        "subset_fractions": [0.5, 0.25, 0.1],
        "rounds": 3,
        "local_epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.05,
        "momentum": 0.9,
        "strategy": {"name": "FedProx", "params": {"mu": 0.01}},
        "seed": 7,
        "augment": False,
        "landscape": {
            "enabled": True,
            "every": 2,
            "num_samples": 256,
            "top_k": 2,
            "trace_probes": 24,
            "sharpness_rho": 0.05,
            "interpolation_points": 11,
            "grid_points": 11,
            "grid_radius": 1.0,
            "pac_bayes_deviation": 0.1,
            "pac_bayes_samples": 128,
            "pac_bayes_steps": 10,
            "power_iterations": 30,
        },
    }
    base.update(changes)
    return base


def test_dict_and_json_round_trip_exactly() -> None:
    data = spec_dict()
    spec = ExperimentSpec.from_dict(data)
    assert spec.to_dict() == data
    assert ExperimentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.num_clients == 3
    assert spec.strategy == StrategySpec("FedProx", {"mu": 0.01}) and spec.strategy.prox_mu == 0.01


def test_python_construction_has_readable_defaults() -> None:
    spec = ExperimentSpec(target_balance_ratios=[UNIFORM], subset_fractions=[0.5])
    assert (spec.dataset_name, spec.model, spec.strategy.name, spec.id) == ("MNIST", "FedNet", "FedAvg", None)
    # the default landscape section, with its schedule resolved from the budget
    assert dataclasses.replace(spec.landscape, every=None, num_samples=None, member_pac_bayes=None) == LandscapeSpec()
    assert spec.landscape.every is not None and spec.landscape.scheduled(spec.rounds, spec.rounds)
    assert isinstance(spec.landscape.member_pac_bayes, bool)
    assert spec.strategy.prox_mu == 0.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", spec.timestamp)
    assert spec.with_id("abc").id == "abc" and spec.id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rounds = 5  # type: ignore[misc]


def test_store_keys_are_ignored_and_unknown_keys_refused() -> None:
    stored = spec_dict(id="65a1", _id="65a1", status="running", current_round=2, created_at="x", error=None)
    assert set(stored) - set(spec_dict()) <= STORE_KEYS
    assert ExperimentSpec.from_dict(stored).to_dict() == spec_dict(id="65a1")
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(spec_dict(learning_rte=0.1))
    assert caught.value.field == "learning_rte" and "unknown key" in str(caught.value)
    with pytest.raises(SpecError, match=r"^strategy\.mu: unknown key"):
        ExperimentSpec.from_dict(spec_dict(strategy={"name": "FedAvg", "mu": 1}))


BAD_INPUTS = [
    ({"target_balance_ratios": [UNIFORM, UNIFORM, [0.5, 0.5]]}, "target_balance_ratios[2]", "has 2 entries but the dataset has 10 classes"),
    ({"target_balance_ratios": [UNIFORM, [-0.1, 0.2] + [0.1] * 8, UNIFORM]}, "target_balance_ratios[1][0]", "must be >= 0"),
    ({"target_balance_ratios": [UNIFORM, UNIFORM, [0.1] * 9 + [0.09]]}, "target_balance_ratios[2]", "must sum to 1"),
    ({"subset_fractions": [0.5, 0.0, 0.1]}, "subset_fractions[1]", "must be a number in (0, 1]"),
    ({"subset_fractions": [0.5, 1.2, 0.1]}, "subset_fractions[1]", "must be a number in (0, 1]"),
    ({"subset_fractions": [0.5, 0.5]}, "subset_fractions", "has 2 entries but target_balance_ratios has 3"),
    ({"dataset_name": "CIFAR"}, "dataset_name", "unknown dataset 'CIFAR'"),
    ({"dataset_name": "CIFAR10"}, "model", "FedNet takes inputs of shape (1, 28, 28) but CIFAR10 images have shape (3, 32, 32)"),
    ({"model": "ResNet20"}, "model", "ResNet20 takes inputs of shape (3, 32, 32) but MNIST images"),
    ({"augment": "yes"}, "augment", "must be true, false or null"),
    ({"model": "ResNet"}, "model", "unknown model 'ResNet'; built-ins: FedNet, FedCNN"),
    ({"strategy": {"name": "FedSGD"}}, "strategy.name", "valid: " + ", ".join(STRATEGY_NAMES)),
    ({"strategy": {"name": "FedProx", "params": {}}}, "strategy.params.mu", "mu >= 0"),
    ({"strategy": {"name": "FedProx", "params": {"mu": -1}}}, "strategy.params.mu", "mu >= 0"),
    ({"rounds": 0}, "rounds", "must be a positive integer"),
    ({"rounds": True}, "rounds", "must be a positive integer"),
    ({"local_epochs": -1}, "local_epochs", "must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size", "must be a positive integer"),
    ({"learning_rate": 0}, "learning_rate", "must be a finite number > 0"),
    ({"momentum": 1.0}, "momentum", "must be a number in [0, 1)"),
    ({"momentum": -0.1}, "momentum", "must be a number in [0, 1)"),
    ({"seed": -1}, "seed", "must be an integer in [0, 2**63 - 1]"),
    ({"seed": 2**63}, "seed", "must be an integer in [0, 2**63 - 1]"),
    ({"rounds": 2**63}, "rounds", "at most 100000"),
    ({"rounds": 100_001}, "rounds", "at most 100000"),
    ({"local_epochs": 1_001}, "local_epochs", "at most 1000"),
    ({"batch_size": 2**63 - 1}, "batch_size", "at most 65536"),
    ({"learning_rate": 1e308}, "learning_rate", "at most 100"),
    ({"description": "x" * 10_001}, "description", "the limit is 10000"),
    ({"dataset_name": {"$gt": ""}}, "dataset_name", "must be a name or an import path"),
    ({"model": ["FedNet"]}, "model", "must be a name or an import path"),
    ({"timestamp": "yesterday"}, "timestamp", "ISO 8601"),
    ({"landscape": [1, 2]}, "landscape", "must be an object"),
    ({"subset_fractions": [0.5, 0.25, 0.00001]}, "subset_fractions[2]", "would get 0 training samples"),
]


@pytest.mark.parametrize(("changes", "field", "rule"), BAD_INPUTS, ids=[b[1] + ":" + b[2][:20] for b in BAD_INPUTS])
def test_bad_input_names_field_and_rule(changes: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(spec_dict(**changes))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and rule in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_required_field() -> None:
    data = spec_dict()
    del data["subset_fractions"]
    with pytest.raises(SpecError, match=r"^subset_fractions: missing"):
        ExperimentSpec.from_dict(data)


def test_infeasible_partition_names_client_class_and_largest_fraction() -> None:
    # floor(60000 / 3) = 20000 per client. Clients 0 and 1 take 1000 of class 0's 5923 each,
    # client 2 asks for 27% of 20000 = 5400 of the 3923 left.
    skewed = [0.27, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.03, 0.05, 0.05]
    data = spec_dict(target_balance_ratios=[UNIFORM, UNIFORM, skewed], subset_fractions=[0.5, 0.5, 1.0])
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(data)
    assert caught.value.field == "target_balance_ratios[2]"
    match = re.fullmatch(
        r"target_balance_ratios\[2\]: client 2 needs 5400 samples of class 0 but only 3923 remain "
        r"after clients 0\.\.1; largest subset_fraction that fits is (0\.\d{4})",
        str(caught.value),
    )
    assert match, str(caught.value)
    largest = float(match.group(1))
    assert largest == pytest.approx(3923 / 0.27 / 20000, abs=2e-4)
    ExperimentSpec.from_dict(dict(data, subset_fractions=[0.5, 0.5, largest]))  # the advice is right
    with pytest.raises(SpecError):
        ExperimentSpec.from_dict(dict(data, subset_fractions=[0.5, 0.5, largest + 0.001]))


def test_python_construction_validates_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"^subset_fractions\[0\]"):
        ExperimentSpec(target_balance_ratios=[UNIFORM], subset_fractions=[2.0])
    with pytest.raises(SpecError, match=r"^strategy\.name"):
        StrategySpec("SGD")
    assert list(tmp_path.iterdir()) == []  # validation writes nothing


def test_nested_values_are_typed_and_must_be_json() -> None:
    with pytest.raises(SpecError, match=r"^landscape: must be a LandscapeSpec"):
        ExperimentSpec(target_balance_ratios=[UNIFORM], subset_fractions=[0.5], landscape={"top_k": 2})  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^landscape\.1: unknown key"):
        ExperimentSpec.from_dict(spec_dict(landscape={1: 2}))
    with pytest.raises(SpecError, match=r"^strategy\.params: must be JSON-able"):
        StrategySpec("FedAvg", {"x": float("nan")})


def test_json_file_round_trip(tmp_path: Path) -> None:
    specs = [ExperimentSpec.from_dict(spec_dict()), ExperimentSpec.from_dict(spec_dict(seed=8, id="e2"))]
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps([s.to_dict() for s in specs]))
    assert load_specs(path) == specs
    path.write_text(json.dumps({"experiments": [s.to_dict() for s in specs]}))
    assert load_specs(path) == specs


TOML = """
[[experiments]]
description = "iid pair"
timestamp = "2025-01-02T03:04:05+00:00"
target_balance_ratios = [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
subset_fractions = [0.5, 0.25]
rounds = 3
learning_rate = 0.05
momentum = 0.9
seed = 7
strategy = { name = "FedAdam", params = { eta = 0.01 } }
landscape = { top_k = 2, every = 1, num_samples = 256 }

[[experiments]]
description = "one client"
timestamp = "2025-01-02T03:04:05+00:00"
target_balance_ratios = [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
subset_fractions = [0.9]
model = "FedCNN"
landscape = { pac_bayes_samples = 16 }
[experiments.strategy]
name = "FedProx"
params = { mu = 0.1 }
"""


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(TOML)
    first, second = load_specs(path)
    assert first.to_dict() == spec_dict(
        description="iid pair",
        target_balance_ratios=[UNIFORM, UNIFORM],
        subset_fractions=[0.5, 0.25],
        local_epochs=1,
        strategy={"name": "FedAdam", "params": {"eta": 0.01}},
        landscape=LandscapeSpec(top_k=2, every=1, num_samples=256).to_dict(),
    )
    assert (second.model, second.strategy.prox_mu, second.subset_fractions) == ("FedCNN", 0.1, (0.9,))
    assert ExperimentSpec.from_dict(second.to_dict()) == second


def test_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps([spec_dict(), spec_dict(rounds=0)]))
    with pytest.raises(SpecError) as caught:
        load_specs(path)
    assert caught.value.field == "experiments[1].rounds"
    path.write_text(json.dumps({"experiment": []}))
    with pytest.raises(SpecError, match=r"^experiment: unknown top-level key"):
        load_specs(path)
    with pytest.raises(ValueError, match=r"path: expected a \.json or \.toml file"):
        load_specs(tmp_path / "experiments.yaml")
