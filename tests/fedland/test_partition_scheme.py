"""Partitions by scheme: one member derived alone, the same on every side, stored as a few parameters.

Real MNIST labels (the `data_dir` fixture): exact class counts, overlaps and test splits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedland.datasets import DATASETS, load_dataset
from fedland.partition_scheme import ClassPools, PartitionScheme, member_class_weights, scheme_member
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec, SpecError

MNIST = DATASETS["MNIST"]
SMALLEST_CLASS = min(MNIST.train_class_counts)  # 5421 (class 5)


def scheme_spec(partition: dict[str, Any], **overrides: Any) -> ExperimentSpec:
    return ExperimentSpec.from_dict({"partition": partition, "clients_per_round": 10, "seed": 3, **overrides})


@pytest.fixture(scope="module")
def mnist(data_dir: Path) -> Any:
    return load_dataset("MNIST", data_dir)


@pytest.fixture(scope="module")
def pools(mnist: Any) -> ClassPools:
    return ClassPools.of_labels(mnist.train_y, mnist.test_y, MNIST.num_classes)


def labels_of(indices: np.ndarray, labels: Any) -> list[int]:
    return np.bincount(np.asarray(labels)[indices], minlength=MNIST.num_classes).tolist()


def test_a_member_derived_alone_equals_one_derived_among_all(mnist: Any) -> None:
    spec = scheme_spec({"scheme": "dirichlet", "alpha": 0.5, "members": 10_000, "seed": 1})
    server, worker = ExperimentPlan(spec, mnist), ExperimentPlan(spec, mnist)
    for index in range(5):  # the server derives 0..4 in order
        server.member_partition(index)
    worker_part = worker.member_partition(4)  # a worker asked for member 4 alone
    server_part = server.member_partition(4)
    assert worker_part.digest() == server_part.digest()
    assert np.array_equal(worker_part.train_indices, server_part.train_indices)
    assert server.member_partition(9_999).digest() != server_part.digest()


def test_member_class_counts_follow_the_scheme(mnist: Any, pools: ClassPools) -> None:
    iid = PartitionScheme(scheme="iid", members=100)
    part = scheme_member(iid, MNIST, pools, 7, "proportional")
    assert part.num_train == 600  # floor(60000 / 100)
    assert labels_of(part.train_indices, mnist.train_y) == part.class_counts
    natural = np.asarray(MNIST.train_class_counts) / MNIST.num_train * 600
    assert np.all(np.abs(np.asarray(part.class_counts) - natural) < 1)

    shards = PartitionScheme(scheme="shards", members=1_000, classes_per_member=2, seed=5)
    used = np.zeros(MNIST.num_classes, dtype=int)
    for index in range(10):
        counts = scheme_member(shards, MNIST, pools, index, "proportional").class_counts
        held = [c for c, n in enumerate(counts) if n]
        assert len(held) == 2 and counts[held[0]] == counts[held[1]] == 30
        used[held] += 1
    assert used.tolist() == [2] * 10  # ten members of two classes use every class twice

    skew = PartitionScheme(scheme="quantity_skew", members=1_000, alpha=0.3, seed=2)
    sizes = [scheme_member(skew, MNIST, pools, i, "none").num_train for i in range(200)]
    assert min(sizes) >= 1 and max(sizes) > 5 * 60 and len(set(sizes)) > 50


def test_members_may_overlap_when_they_outnumber_training_samples(mnist: Any, pools: ClassPools) -> None:
    scheme = PartitionScheme(scheme="dirichlet", members=100_000, alpha=0.5, seed=1)
    assert scheme.member_samples(MNIST) == 1  # floor(60000 / 100000), at least one
    parts = [scheme_member(scheme, MNIST, pools, i, "shared") for i in range(2_000)]
    assert all(p.num_train == 1 and p.num_test == MNIST.num_test for p in parts)
    drawn = np.concatenate([p.train_indices for p in parts])
    assert np.unique(drawn).size < drawn.size  # 2,000 draws of 60,000 samples: the birthday bound makes repeats sure
    for p in parts[:50]:
        assert labels_of(p.train_indices, mnist.train_y) == p.class_counts


def test_the_test_split_modes(mnist: Any, pools: ClassPools) -> None:
    scheme = PartitionScheme(scheme="shards", members=10_000, classes_per_member=1, seed=0)
    proportional = scheme_member(scheme, MNIST, pools, 3, "proportional")
    (held,) = [c for c, n in enumerate(proportional.class_counts) if n]
    assert proportional.num_train == 6
    assert proportional.test_class_counts[held] == proportional.num_test == 1  # 6 x 10000/60000 rounds to 1
    assert labels_of(proportional.test_indices, mnist.test_y) == proportional.test_class_counts
    shared = scheme_member(scheme, MNIST, pools, 3, "shared")
    assert np.array_equal(shared.test_indices, np.arange(MNIST.num_test))
    assert shared.test_class_counts == list(MNIST.test_class_counts)
    none = scheme_member(scheme, MNIST, pools, 3, "none")
    assert none.num_test == 0 and none.test_class_counts == [0] * 10
    assert np.array_equal(none.train_indices, proportional.train_indices)  # the test split never moves the train draw


def test_the_spec_stores_only_the_scheme() -> None:
    spec = scheme_spec({"scheme": "dirichlet", "alpha": 0.5, "members": 100_000, "seed": 1})
    document = spec.to_dict()
    assert "target_balance_ratios" not in document and "subset_fractions" not in document
    assert document["partition"] == {"scheme": "dirichlet", "members": 100_000, "seed": 1, "alpha": 0.5}
    assert len(json.dumps(document)) < 2_000  # a listed 100,000-member partition would take ~10 MB
    assert ExperimentSpec.from_dict(document) == spec
    assert spec.num_clients == 100_000 and spec.members_per_round == 10


def test_explicit_lists_read_back_unchanged() -> None:
    listed = ExperimentSpec(target_balance_ratios=[[0.1] * 10] * 3, subset_fractions=[0.5] * 3)
    document = listed.to_dict()
    assert "partition" not in document and "member_test_split" not in document  # older documents have neither
    assert ExperimentSpec.from_dict(document).to_dict() == document


def test_explicit_lists_of_ten_thousand_members_need_a_test_split_other_than_proportional() -> None:
    # member i holds 5 samples of class i % 10: no class runs out, but 5 samples' test share is below one sample
    ratios = [np.eye(10)[i % 10].tolist() for i in range(10_000)]
    fractions = [0.8] * 10_000
    with pytest.raises(SpecError, match=r"0 local test samples .* member_test_split"):
        ExperimentSpec(target_balance_ratios=ratios, subset_fractions=fractions)
    spec = ExperimentSpec(target_balance_ratios=ratios, subset_fractions=fractions, member_test_split="none")
    assert spec.num_clients == 10_000


@pytest.mark.parametrize(
    ("partition", "overrides", "field", "rule"),
    [
        ({"scheme": "zipf", "members": 10}, {}, "partition.scheme", "unknown scheme 'zipf'"),
        ({"scheme": "dirichlet", "members": 10}, {}, "partition.alpha", "needs it; missing"),
        ({"scheme": "iid", "members": 10, "alpha": 1.0}, {}, "partition.alpha", "takes no alpha"),
        ({"scheme": "iid", "members": 0}, {}, "partition.members", "must be an integer in [1, 1000000]"),
        ({"scheme": "shards", "members": 10, "classes_per_member": 11}, {}, "partition.classes_per_member",
         "at most 10"),
        ({"scheme": "iid", "members": 10, "samples_per_member": SMALLEST_CLASS + 1}, {},
         "partition.samples_per_member", f"at most {SMALLEST_CLASS}"),
        ({"scheme": "iid", "members": 10, "colour": 1}, {}, "partition.colour", "unknown key"),
        ({"scheme": "iid", "members": 10}, {"member_test_split": "half"}, "member_test_split", "must be one of"),
        ({"scheme": "iid", "members": 10}, {"subset_fractions": [1.0]}, "partition", "give one or the other"),
        ({"scheme": "iid", "members": 10}, {"clients_per_round": 11}, "clients_per_round", "[1, 10]"),
    ],
)
def test_refusals_name_the_field_and_the_rule(
    partition: dict[str, Any], overrides: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(SpecError) as raised:
        scheme_spec(partition, **overrides)
    assert raised.value.field == field
    assert rule in raised.value.rule


def test_scheme_weights_are_a_class_mix() -> None:
    scheme = PartitionScheme(scheme="dirichlet", members=50, alpha=0.1, seed=4)
    for index in range(50):
        weights = member_class_weights(scheme, MNIST, index)
        assert weights.shape == (10,) and np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
