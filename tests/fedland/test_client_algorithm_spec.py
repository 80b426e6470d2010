"""The spec's client algorithm, its pairing with the strategy, and components named by import path."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedland.algorithm_spec import ClientAlgorithmSpec
from fedland.algorithms import SGD, FedSAM
from fedland.spec import ExperimentSpec, SpecError, StrategySpec, fingerprint, num_parameters
from fedland.strategies import make_strategy

BASE: dict[str, Any] = {
    "target_balance_ratios": [[0.1] * 10] * 4,
    "subset_fractions": [0.05] * 4,
    "landscape": {"enabled": False},
}

LAB = {
    "__init__.py": "",
    "nets.py": """
        import math
        from torch import nn

        class Wide(nn.Module):
            input_shape = (1, 28, 28)

            def __init__(self, num_classes):
                super().__init__()
                self.fc = nn.Linear(math.prod(self.input_shape), num_classes)

            def forward(self, x):
                return self.fc(x.flatten(1))

        class Colour(Wide):
            input_shape = (3, 32, 32)
    """,
    "algos.py": """
        from dataclasses import dataclass
        from fedland.algorithms import LocalResult, local_sgd

        @dataclass(frozen=True)
        class Damped:
            damping: float = 0.5

            def __post_init__(self):
                if not self.damping > 0:
                    raise ValueError(f"damping: must be > 0, got {self.damping!r}")

            def train(self, model, data, *, seed, hyper, state, round_state):
                run = local_sgd(model, data, seed, hyper)
                return LocalResult(model=run.model, report=run.report)
    """,
    "strategies.py": """
        from dataclasses import dataclass
        from fedland.strategies import FedAvg

        @dataclass(frozen=True)
        class Halfway(FedAvg):
            step: float = 0.5
    """,
}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "speclab_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (tmp_path / name).mkdir()
    for filename, source in LAB.items():
        (tmp_path / name / filename).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def spec(**changes: Any) -> ExperimentSpec:
    return ExperimentSpec.from_dict({**BASE, **changes})


def refused(**changes: Any) -> SpecError:
    with pytest.raises(SpecError) as caught:
        spec(**changes)
    return caught.value


def test_the_default_is_plain_sgd_and_is_left_out_of_the_document() -> None:
    plain = spec()
    assert plain.client_algorithm == ClientAlgorithmSpec("SGD", {})
    assert "client_algorithm" not in plain.to_dict()
    assert plain.client_algorithm.build() == SGD(prox_mu=0.0)
    prox = spec(strategy={"name": "FedProx", "params": {"mu": 0.3}})
    assert prox.client_algorithm.build(prox.strategy.prox_mu) == SGD(prox_mu=0.3)
    # an older document (no client_algorithm key) keeps its fingerprint
    assert fingerprint(ExperimentSpec.from_dict(plain.to_dict())) == fingerprint(plain)


def test_a_named_algorithm_and_its_parameters_round_trip() -> None:
    sam = spec(client_algorithm={"name": "FedSAM", "rho": 0.1})
    assert sam.to_dict()["client_algorithm"] == {"name": "FedSAM", "rho": 0.1}
    assert ExperimentSpec.from_dict(sam.to_dict()) == sam
    assert sam.client_algorithm.build() == FedSAM(rho=0.1)
    assert fingerprint(sam) != fingerprint(spec())
    assert spec(client_algorithm="FedASAM").client_algorithm.params == {}


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"client_algorithm": {"name": "FedSAM", "rho": -1}}, "client_algorithm.rho", "finite number >= 0"),
        ({"client_algorithm": {"name": "FedSAM", "sigma": 1}}, "client_algorithm", "sigma"),
        ({"client_algorithm": {"name": "Adam"}}, "client_algorithm.name", "unknown client algorithm 'Adam'"),
        ({"client_algorithm": {"rho": 1}}, "client_algorithm.name", "missing"),
        ({"client_algorithm": 3}, "client_algorithm", "must be a name"),
        ({"client_algorithm": {"name": "absent_lab.algos:X"}}, "client_algorithm.name", "cannot import module 'absent_lab.algos'"),
        ({"strategy": {"name": "SCAFFOLD"}}, "client_algorithm.name", "go together"),
        ({"client_algorithm": "SCAFFOLD"}, "client_algorithm.name", "go together"),
        (
            {"strategy": {"name": "FedDyn", "params": {"alpha": 0.1}}, "client_algorithm": {"name": "FedDyn", "alpha": 0.2}},
            "client_algorithm.alpha",
            "must equal strategy.params.alpha = 0.1",
        ),
        ({"strategy": {"name": "FedSWA"}}, "strategy.params.start_round", "missing"),
        (
            {"strategy": {"name": "FedSWA", "params": {"start_round": 1, "lr_min": 0.5}}},
            "strategy.params.lr_min",
            "at most learning_rate",
        ),
        ({"model": "absent_lab.nets:Wide"}, "model", "cannot import module 'absent_lab.nets'"),
        ({"strategy": {"name": "absent_lab.s:S"}}, "strategy.name", "cannot import module 'absent_lab.s'"),
    ],
)
def test_bad_algorithms_and_pairings_name_the_field(changes: dict[str, Any], field: str, words: str) -> None:
    error = refused(**changes)
    assert error.field == field
    assert words in error.rule


def test_paired_strategies_build_with_the_experiments_participation() -> None:
    scaffold = spec(strategy={"name": "SCAFFOLD"}, client_algorithm="SCAFFOLD", clients_per_round=1)
    assert scaffold.participation == 0.25
    assert make_strategy(scaffold.strategy, scaffold.participation).participation == 0.25  # type: ignore[attr-defined]
    feddyn = spec(strategy={"name": "FedDyn", "params": {"alpha": 0.1}}, client_algorithm={"name": "FedDyn", "alpha": 0.1})
    assert ExperimentSpec.from_dict(feddyn.to_dict()) == feddyn


def test_fedswa_gives_the_clients_a_cyclical_learning_rate() -> None:
    swa = spec(learning_rate=0.1, strategy={"name": "FedSWA", "params": {"start_round": 3, "cycle_length": 2, "lr_min": 0.02}})
    # before round 3: 0.1; then t = 1/2, 1: (1 - t) * 0.1 + t * 0.02
    assert [round(swa.round_learning_rate(r), 12) for r in (1, 2, 3, 4, 5, 6)] == [0.1, 0.1, 0.06, 0.02, 0.06, 0.02]
    assert spec(learning_rate=0.1).round_learning_rate(7) == 0.1


def test_components_by_import_path_are_resolved_and_checked(lab: str) -> None:
    custom = spec(
        model=f"{lab}.nets:Wide",
        strategy={"name": f"{lab}.strategies:Halfway", "params": {"step": 0.25}},
        client_algorithm={"name": f"{lab}.algos:Damped", "damping": 2.0},
    )
    assert ExperimentSpec.from_dict(custom.to_dict()) == custom
    assert num_parameters(f"{lab}.nets:Wide") == 784 * 10 + 10
    assert make_strategy(custom.strategy).step == 0.25  # type: ignore[attr-defined]
    assert custom.client_algorithm.build().damping == 2.0  # type: ignore[attr-defined]
    error = refused(model=f"{lab}.nets:Colour")
    assert error.field == "model" and "(3, 32, 32) but MNIST images have shape (1, 28, 28)" in error.rule
    error = refused(client_algorithm={"name": f"{lab}.algos:Damped", "damping": 0})
    assert (error.field, error.rule) == ("client_algorithm.damping", "must be > 0, got 0")
    with pytest.raises(SpecError) as caught:
        StrategySpec(f"{lab}.strategies:Halfway", {"stride": 1})
    assert caught.value.field == "strategy.params" and "stride" in caught.value.rule
    error = refused(model=f"{lab}.nets:Missing")
    assert error.field == "model" and "no attribute 'Missing'" in error.rule
