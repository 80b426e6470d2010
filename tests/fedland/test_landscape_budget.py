"""The landscape budget: the schedule rule, the calibration table, and how the spec resolves and stores it."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from fedland import landscape_budget as budget_module
from fedland.datasets import DATASETS
from fedland.landscape_budget import (
    DEFAULT_BUDGET,
    fit_schedule,
    measured_rounds,
    member_measurement_s,
    model_costs,
    round_training_s,
    server_measurement_s,
)
from fedland.measure import EIGEN_MAX_ITER, PAIRWISE_MAX_MEMBERS
from fedland.models import MODEL_INPUT_SHAPES, MODEL_NAMES
from fedland.partition_scheme import PartitionScheme
from fedland.spec import ExperimentSpec, LandscapeSpec, SpecError, fingerprint

UNIFORM = [0.1] * 10


def per_sample(seconds: float) -> Any:
    return lambda num_samples: seconds * num_samples


@pytest.mark.parametrize(
    ("measurement", "train_s", "budget", "given", "expected"),
    [  # over 1,000 rounds (divisible by the every chosen: the last round costs nothing extra)
        (per_sample(1.0), 1000.0, 0.25, {}, (1, 250)),  # 250 samples fit every round
        (per_sample(1.0), 2000.0, 0.25, {}, (1, 256)),  # all 256 fit
        (per_sample(1.0), 400.0, 0.25, {}, (2, 128)),  # 128 samples cost 128 s > 100: every other round
        (per_sample(1.0), 40.0, 0.25, {}, (13, 128)),  # ceil(128 / 10)
        (lambda n: 2.0 * n + 10.0, 1000.0, 0.5, {}, (1, 245)),  # 2 x 245 + 10 = 500 exactly
        (per_sample(1.0), 200.0, 0.25, {"every": 4}, (4, 200)),  # the user's every: samples fit to 4 x 50 s
        (per_sample(1.0), 40.0, 0.25, {"every": 4}, (4, 128)),  # none fits: the least, every as given
        (per_sample(1.0), 400.0, 0.25, {"num_samples": 512}, (6, 512)),  # ceil(512 / 100)
        (per_sample(1.0), 1.0, 0.25, {"every": 3, "num_samples": 64}, (3, 64)),  # both given: kept
    ],
)
def test_the_rule_picks_samples_then_every(
    measurement: Any, train_s: float, budget: float, given: dict[str, int], expected: tuple[int, int]
) -> None:
    assert fit_schedule(measurement, train_s, budget, 1000, **given) == expected


@pytest.mark.parametrize(
    ("rounds", "train_s", "expected"),
    [
        (100, 40.0, (15, 128)),  # 1,000 s allow 7 measurements of 128 s: rounds 15, 30, ..., 90 and 100
        (100, 5.12, (100, 128)),  # 128 s allowed: the last round alone
        (100, 5.0, (100, 128)),  # not even the last round fits: measured once, the least samples
        (7, 1000.0, (1, 250)),  # 250 s a round: 250 samples every round
    ],
)
def test_the_last_round_counts_against_the_budget(rounds: int, train_s: float, expected: tuple[int, int]) -> None:
    every, num_samples = fit_schedule(per_sample(1.0), train_s, 0.25, rounds)
    assert (every, num_samples) == expected
    if measured_rounds(rounds, every) * num_samples <= 0.25 * train_s * rounds and every > 1:
        # the smallest every that fits: one less measures one round too many
        assert measured_rounds(rounds, every - 1) * num_samples > 0.25 * train_s * rounds
    assert [measured_rounds(r, e) for r, e in ((100, 15), (100, 100), (90, 15), (1, 1))] == [7, 1, 6, 1]


def test_the_table_holds_every_built_in_model() -> None:
    table = json.loads(budget_module.COSTS_FILE.read_text(encoding="utf-8"))["models"]
    assert sorted(table) == sorted(MODEL_NAMES)
    for name, cost in model_costs().items():
        values = dataclasses.asdict(cost)
        assert all(math.isfinite(v) and v > 0 for v in values.values()), (name, values)
        assert cost.hvp_s > cost.forward_s, name  # a product is a double backward pass
    # the cost model counts what fedland.measure does
    assert budget_module.LANCZOS_PRODUCTS == EIGEN_MAX_ITER
    assert budget_module.PAIRWISE_MAX_MEMBERS == PAIRWISE_MAX_MEMBERS
    # measured, ResNet-20 is dearer than the CIFAR CNN (its parameter count said the opposite)
    lspec = LandscapeSpec()
    costs = model_costs()
    assert member_measurement_s(costs["ResNet20"], lspec, 256) > 2 * member_measurement_s(costs["CifarCNN"], lspec, 256)


def default_experiment(model: str, rounds: int = 1000, **changes: Any) -> ExperimentSpec:
    dataset = next(n for n in ("MNIST", "CIFAR10") if DATASETS[n].input_shape == MODEL_INPUT_SHAPES[model])
    return ExperimentSpec(dataset_name=dataset, model=model, rounds=rounds,
                          partition=PartitionScheme(scheme="iid", members=10), **changes)


def measured_round_s(spec: ExperimentSpec) -> float:
    lspec, info = spec.landscape, DATASETS[spec.dataset_name]
    assert spec.partition is not None
    member, members = spec.partition.member_samples(info), spec.members_per_round
    subset = min(lspec.subset_size, member)
    cost = model_costs()[spec.model]
    return members * member_measurement_s(cost, lspec, subset) + server_measurement_s(
        cost, lspec, lspec.subset_size, members, subset
    )


@pytest.mark.parametrize("rounds", [20, 100, 1000])
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_the_defaults_keep_measurement_within_a_quarter_of_training(model: str, rounds: int) -> None:
    spec = default_experiment(model, rounds)
    lspec, info = spec.landscape, DATASETS[spec.dataset_name]
    assert spec.partition is not None and lspec.every is not None and 128 <= lspec.subset_size <= 256
    train_s = rounds * round_training_s(model_costs()[model], spec.members_per_round, spec.local_epochs,
                                        spec.partition.member_samples(info))
    share = measured_rounds(rounds, lspec.every) * measured_round_s(spec) / train_s
    if share > DEFAULT_BUDGET:  # a short run whose last round alone does not fit: measured once, at the least
        assert (lspec.every, lspec.subset_size, lspec.member_pac_bayes) == (rounds, 128, False)
        assert rounds == 20
        return
    if lspec.every > 1:  # measuring one round more often would break the budget
        assert measured_rounds(rounds, lspec.every - 1) * measured_round_s(spec) / train_s > DEFAULT_BUDGET
    # the members' PAC-Bayes is kept only when it costs at most half the measured rounds
    other = default_experiment(model, rounds, landscape=LandscapeSpec(member_pac_bayes=not lspec.member_pac_bayes))
    assert other.landscape.every is not None
    with_it, without_it = (lspec, other.landscape) if lspec.member_pac_bayes else (other.landscape, lspec)
    assert with_it.every is not None and without_it.every is not None
    half_as_often = 2 * measured_rounds(rounds, with_it.every) >= measured_rounds(rounds, without_it.every)
    fits = measured_rounds(rounds, with_it.every) * measured_round_s(
        default_experiment(model, rounds, landscape=LandscapeSpec(member_pac_bayes=True))) <= DEFAULT_BUDGET * train_s
    assert lspec.member_pac_bayes == (half_as_often and fits)


def test_the_members_pac_bayes_is_most_of_their_measurement_and_the_user_wins() -> None:
    cost, lspec = model_costs()["FedCNN"], LandscapeSpec()
    with_it = member_measurement_s(cost, lspec, 128)
    without = member_measurement_s(cost, dataclasses.replace(lspec, member_pac_bayes=False), 128)
    assert without < with_it / 4
    small = default_experiment("FedNet", 20, landscape=LandscapeSpec(budget=50.0)).landscape  # a loose budget keeps it
    large = default_experiment("ResNet18", 100).landscape  # the default does not
    assert (small.member_pac_bayes, large.member_pac_bayes) == (True, False)
    forced = default_experiment("ResNet18", 100, landscape=LandscapeSpec(member_pac_bayes=True)).landscape
    assert forced.member_pac_bayes is True and forced.every == 100  # measured once, the last round
    off = default_experiment("FedNet", 20, landscape=LandscapeSpec(member_pac_bayes=False))
    assert off.to_dict()["landscape"]["member_pac_bayes"] is False
    assert ExperimentSpec.from_dict(json.loads(json.dumps(off.to_dict()))) == off
    on = default_experiment("FedNet", 20, landscape=LandscapeSpec(budget=50.0))
    assert "member_pac_bayes" not in on.to_dict()["landscape"]  # as the documents before it: on
    assert ExperimentSpec.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    with pytest.raises(SpecError) as caught:
        LandscapeSpec.from_dict({"member_pac_bayes": "yes"})
    assert caught.value.field == "landscape.member_pac_bayes"


def test_a_larger_budget_measures_more_often_and_the_user_wins() -> None:
    tight = default_experiment("CifarCNN").landscape
    loose = default_experiment("CifarCNN", landscape=LandscapeSpec(budget=4.0)).landscape
    assert tight.every is not None and loose.every is not None and loose.every < tight.every
    given = default_experiment("CifarCNN", landscape=LandscapeSpec(every=2)).landscape
    assert given.every == 2 and given.subset_size == 128  # the budget cannot fit 128 every other round: the least
    given = default_experiment("CifarCNN", landscape=LandscapeSpec(num_samples=64)).landscape
    assert given.num_samples == 64 and given.every is not None and given.every < tight.every
    off = default_experiment("ResNet18", landscape=LandscapeSpec(enabled=False)).landscape
    assert (off.every, off.num_samples) == (1, 256)
    # every is at most the experiment's rounds (the last round is measured anyway)
    short = ExperimentSpec(dataset_name="CIFAR10", model="ResNet18", rounds=3,
                           partition=PartitionScheme(scheme="iid", members=10)).landscape
    assert short.every == 3


@pytest.mark.parametrize("value", [0, -0.5, 101, float("inf"), float("nan"), "0.25", True, None])
def test_a_bad_budget_is_refused_naming_the_field(value: Any) -> None:
    data = {"target_balance_ratios": [UNIFORM], "subset_fractions": [0.1], "landscape": {"budget": value}}
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.from_dict(data)
    assert caught.value.field == "landscape.budget" and "share of a round's training CPU" in caught.value.rule


#: A landscape section as the previous release stored it: every field, no budget.
STORED_BEFORE_THE_BUDGET = {
    "enabled": True, "every": 1, "num_samples": 256, "top_k": 2, "trace_probes": 12, "sharpness_rho": 0.05,
    "interpolation_points": 11, "grid_points": 9, "grid_radius": 1.0, "pac_bayes_deviation": 0.1,
    "pac_bayes_samples": 4, "pac_bayes_steps": 8, "power_iterations": 30,
}


def test_specs_stored_before_the_budget_read_back_unchanged() -> None:
    stored = {
        "target_balance_ratios": [UNIFORM, UNIFORM], "subset_fractions": [0.02, 0.02], "rounds": 5,
        "timestamp": "2025-01-02T03:04:05+00:00", "landscape": dict(STORED_BEFORE_THE_BUDGET),
    }
    spec = ExperimentSpec.from_dict(stored)
    assert (spec.landscape.every, spec.landscape.num_samples, spec.landscape.budget) == (1, 256, DEFAULT_BUDGET)
    assert spec.to_dict()["landscape"] == STORED_BEFORE_THE_BUDGET
    assert fingerprint(ExperimentSpec.from_dict(spec.to_dict())) == fingerprint(spec)
    # the same experiment submitted today gets its schedule from the budget, stored resolved
    fresh = ExperimentSpec.from_dict({**stored, "landscape": {}})
    assert fresh.landscape.every is not None and fresh.landscape.every > 1
    assert fresh.to_dict()["landscape"]["every"] == fresh.landscape.every
    assert ExperimentSpec.from_dict(json.loads(json.dumps(fresh.to_dict()))) == fresh
    custom = ExperimentSpec.from_dict({**stored, "landscape": {"budget": 0.5}})
    assert custom.to_dict()["landscape"]["budget"] == 0.5


def test_an_unresolved_section_says_so() -> None:
    with pytest.raises(ValueError, match="landscape.every: unset"):
        LandscapeSpec().scheduled(1, 3)
    with pytest.raises(ValueError, match="landscape.num_samples: unset"):
        _ = LandscapeSpec().subset_size
    assert not LandscapeSpec(enabled=False).scheduled(1, 3)
