"""Schemes: each generator gives a valid, feasible, reproducible spec; fractions are the largest that fit."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pytest

from fedland.datasets import DATASETS
from fedland.partition import PartitionError, client_sizes, plan_counts
from fedland.schemes import centralized, dirichlet, iid, quantity_skew, shards
from fedland.spec import ExperimentSpec

MNIST = DATASETS["MNIST"]


def feasible(ratios: list[list[float]], fractions: list[float]) -> bool:
    try:
        plan_counts(MNIST.train_class_counts, MNIST.test_class_counts, ratios, fractions)
    except PartitionError:
        return False
    return True


def check_rows(ratios: list[list[float]]) -> None:
    for row in ratios:
        assert len(row) == 10 and min(row) >= 0
        assert abs(math.fsum(row) - 1.0) <= 1e-12
        assert all(round(v, 6) == v for v in row)  # readable: six decimals


SCHEMES = {
    "iid": lambda seed: iid(10),
    "dirichlet": lambda seed: dirichlet(10, alpha=0.3, seed=seed),
    "shards": lambda seed: shards(10, 2, seed=seed),
    "quantity_skew": lambda seed: quantity_skew(10, alpha=1.0, seed=seed),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_scheme_gives_a_valid_reproducible_spec(name: str) -> None:
    state = cast(tuple[Any, ...], np.random.get_state())[1].copy()  # legacy=True: a tuple, never the dict
    ratios, fractions = SCHEMES[name](seed=3)
    assert np.array_equal(cast(tuple[Any, ...], np.random.get_state())[1], state)  # the global numpy RNG is untouched
    check_rows(ratios)
    spec = ExperimentSpec(target_balance_ratios=ratios, subset_fractions=fractions)
    assert spec.num_clients == 10
    assert SCHEMES[name](seed=3) == (ratios, fractions)


@pytest.mark.parametrize("name", ["dirichlet", "shards", "quantity_skew"])
def test_seed_changes_the_draw(name: str) -> None:
    assert SCHEMES[name](seed=3) != SCHEMES[name](seed=4)


@pytest.mark.parametrize("name", SCHEMES)
def test_fractions_are_the_largest_common_scale_that_fits(name: str) -> None:
    ratios, fractions = SCHEMES[name](seed=3)
    assert feasible(ratios, fractions)
    if max(fractions) < 1.0:
        # one grid step more for every client no longer fits
        scale = max(fractions)
        bigger = [min(1.0, round(f / scale * (scale + 1e-4), 4)) for f in fractions]
        assert not feasible(ratios, bigger)


def test_iid_uses_natural_frequencies_and_nearly_all_data() -> None:
    ratios, fractions = iid(10)
    natural = np.asarray(MNIST.train_class_counts) / MNIST.num_train
    for row in ratios:
        assert row == ratios[0]
        assert np.allclose(row, natural, atol=5e-7)
    assert 0.99 <= fractions[0] < 1.0  # rounding leaves a few samples of some classes short
    assert sum(client_sizes(MNIST.num_train, fractions)) > 0.99 * MNIST.num_train


def test_iid_explicit_fraction_is_kept_or_refused() -> None:
    assert iid(4, fraction=0.5)[1] == [0.5] * 4
    with pytest.raises(ValueError, match=r"^fraction: 1.0 is too large .* the largest that fits is 0\.99"):
        iid(10, fraction=1.0)


def test_a_too_small_fraction_quotes_the_smallest_that_works() -> None:
    with pytest.raises(ValueError, match=r"^fraction: 0.0001 is too small .* the smallest that works is ") as raised:
        dirichlet(100, alpha=0.5, seed=0, fraction=0.0001)
    smallest = float(str(raised.value).rsplit(" ", 1)[1])
    ratios, fractions = dirichlet(100, alpha=0.5, seed=0, fraction=smallest)
    assert feasible(ratios, fractions)
    with pytest.raises(ValueError, match="too small"):
        dirichlet(100, alpha=0.5, seed=0, fraction=round(smallest - 1e-4, 4))


def test_quantity_skew_at_100_clients_gives_every_client_a_test_sample() -> None:
    ratios, fractions = quantity_skew(100, alpha=0.5, seed=0)
    train_counts, test_counts = plan_counts(MNIST.train_class_counts, MNIST.test_class_counts, ratios, fractions)
    assert min(sum(counts) for counts in test_counts) >= 1
    assert max(fractions) > 0.5 and len(set(fractions)) > 20  # still skewed: the floor only lifts the smallest
    smallest = min(range(100), key=lambda i: fractions[i])
    assert sum(test_counts[smallest]) == 1  # the floor is no higher than a test sample needs


def test_shards_give_each_client_k_classes_in_equal_parts() -> None:
    ratios, _ = shards(15, 3, seed=0)
    usage = np.zeros(10)
    for row in ratios:
        held = [c for c, r in enumerate(row) if r > 0]
        assert len(held) == 3
        assert [row[c] for c in held] == pytest.approx([1 / 3] * 3, abs=1e-6)
        usage[held] += 1
    assert usage.max() - usage.min() <= 1  # classes are dealt evenly


def test_dirichlet_alpha_controls_skew() -> None:
    concentrated, _ = dirichlet(20, alpha=0.05, seed=0)
    spread, _ = dirichlet(20, alpha=100.0, seed=0)
    assert np.mean([max(r) for r in concentrated]) > 0.7
    assert np.mean([max(r) for r in spread]) < 0.2


def test_quantity_skew_keeps_ratios_and_varies_sizes() -> None:
    ratios, fractions = quantity_skew(10, alpha=2.0, seed=1, min_fraction=0.05)
    assert all(row == ratios[0] for row in ratios)
    assert max(fractions) > 0.9 and min(fractions) >= 0.05
    assert len(set(fractions)) > 5


def test_centralized_is_one_client_with_exact_class_counts() -> None:
    ratios, fractions = centralized()
    assert fractions == [1.0]
    train_counts, test_counts = plan_counts(MNIST.train_class_counts, MNIST.test_class_counts, ratios, fractions)
    assert train_counts == [list(MNIST.train_class_counts)]
    assert test_counts == [list(MNIST.test_class_counts)]
    ExperimentSpec(target_balance_ratios=ratios, subset_fractions=fractions)


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="^num_clients"):
        iid(0)
    with pytest.raises(ValueError, match="^alpha"):
        dirichlet(3, alpha=0, seed=0)
    with pytest.raises(ValueError, match="^classes_per_client"):
        shards(3, 11, seed=0)
    with pytest.raises(ValueError, match="^dataset_name"):
        iid(3, dataset="CIFAR")
