"""Partitioning: exact class counts, sizes, disjointness, determinism, refusals, real MNIST labels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedland.datasets import DATASETS, load_dataset
from fedland.partition import (
    PartitionError,
    class_counts_for,
    client_sizes,
    gini_coefficient,
    partition,
    plan_counts,
)
from fedland.schemes import centralized, dirichlet, shards

DATA_DIR = os.environ.get("FEDLAND_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR, reason="FEDLAND_DATA_DIR is unset: point it at a directory holding mnist/ IDX files"
)

# A small 4-class dataset: 400 train (class sizes 100/120/90/90), 80 test (20 each), shuffled.
_rng = np.random.default_rng(123)
TRAIN = _rng.permutation(np.repeat(np.arange(4), [100, 120, 90, 90]))
TEST = _rng.permutation(np.repeat(np.arange(4), [20, 20, 20, 20]))
RATIOS = [[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.1, 0.3, 0.6]]
FRACTIONS = [1.0, 0.5, 0.8]


def test_class_counts_for_uses_largest_remainder() -> None:
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4): floors (3, 2, 1), the spare sample goes to the 0.5 remainder.
    assert class_counts_for([0.5, 0.3, 0.2], 7) == [4, 2, 1]
    assert class_counts_for([0.5, 0.5], 3) == [2, 1]  # a tie goes to the lower class
    assert class_counts_for([0.0, 0.999999, 0.000001], 10) == [0, 10, 0]
    assert class_counts_for([0.29, 0.71], 100) == [29, 71]  # 0.29 * 100 = 28.999999999999996 in float
    assert sum(class_counts_for([0.1] * 10, 12_345)) == 12_345


def test_sizes_and_exact_class_counts() -> None:
    parts = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=0)
    # floor(400 / 3) = 133: round(133 * f)
    assert [p.num_train for p in parts] == [133, 66, 106] == client_sizes(400, FRACTIONS)
    expected = [class_counts_for(r, n) for r, n in zip(RATIOS, [133, 66, 106])]
    assert expected == [[66, 40, 27, 0], [17, 17, 16, 16], [0, 11, 32, 63]]
    for part, counts in zip(parts, expected):
        assert part.class_counts == counts
        assert np.bincount(TRAIN[part.train_indices], minlength=4).tolist() == counts
        assert np.bincount(TEST[part.test_indices], minlength=4).tolist() == part.test_class_counts
        assert part.class_frequencies == pytest.approx([c / part.num_train for c in counts])
        for indices in (part.train_indices, part.test_indices):
            assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)


def test_clients_are_disjoint_in_both_splits() -> None:
    parts = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=0)
    for split in ("train_indices", "test_indices"):
        chosen = np.concatenate([getattr(p, split) for p in parts])
        assert len(np.unique(chosen)) == len(chosen)


def test_test_split_follows_each_clients_class_share() -> None:
    parts = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=0)
    train_totals, test_totals = np.bincount(TRAIN), np.bincount(TEST)
    taken = np.zeros(4)
    for part in parts:
        taken += part.class_counts
        # cumulative shares are rounded, so each client is within one sample of its exact share
        exact = np.asarray(part.class_counts) * test_totals / train_totals
        assert np.all(np.abs(np.asarray(part.test_class_counts) - exact) <= 1)
    assert np.all(np.sum([p.test_class_counts for p in parts], axis=0) <= test_totals)


def test_same_seed_same_indices_other_seed_other_indices() -> None:
    first = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=7)
    again = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=7)
    other = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=8)
    for a, b, c in zip(first, again, other):
        assert np.array_equal(a.train_indices, b.train_indices) and np.array_equal(a.test_indices, b.test_indices)
        assert a.digest() == b.digest()
        assert not np.array_equal(a.train_indices, c.train_indices)
        assert a.digest() != c.digest()
        assert a.class_counts == c.class_counts  # counts depend on ratios and fractions only


def test_one_client_with_full_fraction_gets_every_sample() -> None:
    ratios = [(np.bincount(TRAIN) / len(TRAIN)).tolist()]
    (part,) = partition(TRAIN, TEST, ratios, [1.0], seed=3)
    assert np.array_equal(part.train_indices, np.arange(len(TRAIN)))
    assert np.array_equal(part.test_indices, np.arange(len(TEST)))


def test_overdrawn_class_is_refused_with_client_class_and_largest_fraction() -> None:
    ratios = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]  # floor(400/2) = 200 each, class 0 has 100
    with pytest.raises(PartitionError) as caught:
        partition(TRAIN, TEST, ratios, [0.3, 0.6], seed=0)
    # client 0 takes 60; client 1 needs 120 of the 40 left: largest fraction 40 / 200 = 0.2
    assert caught.value.field == "target_balance_ratios[1]"
    assert str(caught.value) == (
        "target_balance_ratios[1]: client 1 needs 120 samples of class 0 but only 40 remain "
        "after client 0; largest subset_fraction that fits is 0.2000"
    )
    partition(TRAIN, TEST, ratios, [0.3, 0.2], seed=0)  # the suggested fraction does fit


def test_other_refusals_name_their_field() -> None:
    with pytest.raises(PartitionError, match=r"subset_fractions: need one fraction per client"):
        partition(TRAIN, TEST, RATIOS, [1.0, 1.0], seed=0)
    with pytest.raises(PartitionError, match=r"target_balance_ratios\[1\]: has 3 entries"):
        plan_counts([100, 120, 90, 90], [20] * 4, [[0.25] * 4, [0.5, 0.25, 0.25]], [0.1, 0.1])
    with pytest.raises(PartitionError, match=r"subset_fractions\[0\]: client 0 would get 0 training samples"):
        partition(TRAIN, TEST, [[0.25] * 4], [0.001], seed=0)
    with pytest.raises(PartitionError, match=r"subset_fractions\[0\]: client 0 would get 0 local test samples"):
        partition(TRAIN, TEST, [[1.0, 0, 0, 0]], [0.005], seed=0)  # 2 train samples -> 0.4 test
    with pytest.raises(PartitionError, match=r"subset_fractions\[2\]: must be a number in \(0, 1\]"):
        partition(TRAIN, TEST, RATIOS, [1.0, 0.5, 1.5], seed=0)
    with pytest.raises(ValueError, match=r"train_labels: labels must lie in \[0, 4\)"):
        partition(TRAIN + 1, TEST, RATIOS, FRACTIONS, seed=0)


def test_gini_coefficient() -> None:
    assert gini_coefficient([5, 5, 5, 5]) == 0.0
    assert gini_coefficient([1, 3]) == pytest.approx(0.25)  # (|1-3| + |3-1|) / (2 * 2 * 4)
    assert gini_coefficient([10] + [0] * 9) == pytest.approx(0.9)  # (K - 1) / K
    parts = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=0)
    assert parts[1].gini_index < parts[0].gini_index < parts[2].gini_index


def test_stats_are_json_and_carry_the_digest() -> None:
    part = partition(TRAIN, TEST, RATIOS, FRACTIONS, seed=0)[2]
    stats = json.loads(json.dumps(part.to_stats()))
    assert stats == {
        "client_index": 2,
        "class_counts": [0, 11, 32, 63],
        "test_class_counts": part.test_class_counts,
        "class_frequencies": part.class_frequencies,
        "gini_index": part.gini_index,
        "num_train": 106,
        "num_test": part.num_test,
        "partition_digest": part.digest(),
    }
    assert len(stats["partition_digest"]) == 64


@needs_mnist
def test_real_mnist_centralized_gets_every_sample() -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    data = load_dataset("MNIST", DATA_DIR, download=False)
    ratios, fractions = centralized("MNIST")
    (part,) = partition(data.train_y, data.test_y, ratios, fractions, seed=0)
    assert part.num_train == 60_000 and part.num_test == 10_000
    assert part.class_counts == list(DATASETS["MNIST"].train_class_counts)
    assert part.test_class_counts == list(DATASETS["MNIST"].test_class_counts)


@needs_mnist
@pytest.mark.parametrize("scheme", [lambda: dirichlet(10, 0.3, seed=1), lambda: shards(20, 2, seed=2)])
def test_real_mnist_non_iid_partition(scheme) -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    data = load_dataset("MNIST", DATA_DIR, download=False)
    labels = data.train_y.numpy()
    ratios, fractions = scheme()
    parts = partition(data.train_y, data.test_y, ratios, fractions, seed=5)
    chosen = np.concatenate([p.train_indices for p in parts])
    assert len(np.unique(chosen)) == len(chosen)
    for part, r, n in zip(parts, ratios, client_sizes(60_000, fractions)):
        assert part.num_train == n
        assert np.bincount(labels[part.train_indices], minlength=10).tolist() == class_counts_for(r, n)
        assert part.num_test > 0
    # the spec's table-based check and the labels agree
    assert plan_counts(DATASETS["MNIST"].train_class_counts, DATASETS["MNIST"].test_class_counts, ratios, fractions)[
        0
    ] == [p.class_counts for p in parts]


def test_a_fraction_too_small_for_one_sample_quotes_the_smallest_that_gives_one() -> None:
    totals, ratios = [6000] * 10, [[0.1] * 10] * 100  # floor(N / k) = 600
    with pytest.raises(PartitionError, match=r"fraction 0\.0008 of floor\(N / k\) = 600\); the smallest that gives one is 0\.0009"):
        plan_counts(totals, [1000] * 10, ratios, [0.0008] * 100)
    train_counts, _ = plan_counts(totals, [1000] * 10, ratios, [0.0009] * 100, require_test=False)
    assert all(sum(counts) == 1 for counts in train_counts)
