"""experiments/cifar10-prototype.toml: the prototype's study, validated against CIFAR-10's class counts (not run)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedland.datasets import DATASETS
from fedland.partition import PartitionError, plan_counts
from fedland.spec import load_specs

FILE = Path(__file__).resolve().parents[1] / "experiments" / "cifar10-prototype.toml"


def test_the_prototype_study_validates_and_is_the_prototype() -> None:
    specs = load_specs(FILE)  # every spec validates, feasibility on the class counts included
    assert sorted((s.model, s.strategy.name) for s in specs) == sorted(
        (m, s) for m in ("ResNet20", "CifarCNN") for s in ("FedAvg", "FedAdam")
    )
    k = np.arange(10)
    expected = [np.full(10, 0.1), np.full(10, 0.1), np.exp(-0.5 * k), np.exp(-0.5 * k)[::-1], np.exp(-0.7 * k)]
    for spec in specs:
        assert (spec.dataset_name, spec.num_clients, spec.rounds, spec.augment) == ("CIFAR10", 5, 60, True)
        for row, weights in zip(spec.target_balance_ratios, expected):
            assert math.isclose(sum(row), 1.0, abs_tol=1e-9)
            assert np.allclose(row, weights / weights.sum(), atol=1e-6)
        assert list(spec.subset_fractions) == [1.0, 1.0, 0.688, 0.5, 0.05]


def test_the_literal_fractions_are_infeasible_and_0688_is_the_largest_fit() -> None:
    info = DATASETS["CIFAR10"]
    ratios = load_specs(FILE)[0].target_balance_ratios
    with pytest.raises(PartitionError, match="client 4 needs 252 samples of class 0 but only 205 remain"):
        plan_counts(info.train_class_counts, info.test_class_counts, ratios, [1, 1, 0.7, 0.5, 0.05])
    with pytest.raises(PartitionError):
        plan_counts(info.train_class_counts, info.test_class_counts, ratios, [1, 1, 0.689, 0.5, 0.05])
