"""Partitions named by a scheme: each member's data derived on demand from a few parameters.

An experiment may describe its partition as ``{"scheme": "dirichlet", "alpha":
0.5, "members": 10000, "seed": 1}`` instead of listing every member's class
ratios and fraction; the stored spec then holds only these parameters, and
``scheme_member`` derives one member's partition from them, alone, in
microseconds. The server and the workers both call it (through
``fedland.plan.ExperimentPlan.member_partition``), so they agree by construction.

The rule (documented in DEVELOPERS.md "Partitions by scheme"):

* Every member draws its ``samples_per_member`` training samples on its own,
  from the class pools of the train split, without replacement within the
  member. Members are independent draws, so they may overlap (they must, once
  members outnumber training samples: 100,000 members on MNIST's 60,000).
  Explicit ratio lists keep the disjoint rule of ``fedland.partition``.
* ``samples_per_member`` defaults to ``floor(N_train / members)`` (so a
  federation that fits uses about the whole train split), at least 1 and at
  most the smallest class's train count (so any class mix can be drawn).
* Class mix per scheme: ``iid`` the train split's class frequencies;
  ``dirichlet`` a draw of Dir(alpha) per member; ``shards`` ``classes_per_member``
  classes in equal parts, dealt round-robin from a seeded class order (every
  class is used equally often); ``quantity_skew`` the iid mix, with member
  sizes ``samples_per_member * g_i / mean(g)``, ``g ~ Gamma(alpha)`` (the
  Dirichlet shares over members, rescaled), rounded, at least 1 and at most the
  train split.
* The local test set follows ``member_test_split`` (``fedland.spec``):
  ``proportional`` draws, of each test class, the member's share of the
  matching train class (rounded; a member whose share rounds to nothing gets
  one test sample of its most frequent class); ``shared`` is the whole test
  split; ``none`` is empty.

Randomness: member ``i`` draws from ``numpy.random.default_rng(SeedSequence([seed,
stream, i]))``, so any member is derived without the others.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedland.datasets import DatasetCounts
from fedland.partition import ClientPartition, PartitionError, class_counts_for, gini_coefficient

__all__ = [
    "MAX_MEMBERS",
    "SCHEME_NAMES",
    "TEST_SPLITS",
    "ClassPools",
    "PartitionScheme",
    "member_class_weights",
    "scheme_member",
]

SCHEME_NAMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity_skew")
#: How a member's local test set is drawn (``ExperimentSpec.member_test_split``).
TEST_SPLITS: tuple[str, ...] = ("proportional", "shared", "none")
#: The most members a scheme may name (participation draws stay cheap far beyond).
MAX_MEMBERS = 1_000_000

# second words of the seed sequences; distinct from fedland.plan's streams
_MIX_STREAM, _TRAIN_STREAM, _TEST_STREAM, _SHARDS_STREAM, _SIZES_STREAM = 0x5C4E0, 0x5C4E1, 0x5C4E2, 0x5C4E3, 0x5C4E4
_PARAMETERS: dict[str, frozenset[str]] = {
    "iid": frozenset(),
    "dirichlet": frozenset({"alpha"}),
    "shards": frozenset({"classes_per_member"}),
    "quantity_skew": frozenset({"alpha"}),
}
_FIELD = "partition"


@dataclass(frozen=True, kw_only=True)
class PartitionScheme:
    """A partition by scheme: its name, the member count, the seed and the scheme's parameters.

    Checks its own fields on construction (``PartitionError`` naming
    ``partition.<field>``); ``check_dataset`` checks what depends on the dataset.
    """

    scheme: str
    members: int
    seed: int = 0
    alpha: float | None = None
    classes_per_member: int | None = None
    samples_per_member: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_NAMES:
            raise PartitionError(f"{_FIELD}.scheme", f"unknown scheme {self.scheme!r}; valid: {', '.join(SCHEME_NAMES)}")
        if not _is_int(self.members) or not 1 <= self.members <= MAX_MEMBERS:
            raise PartitionError(f"{_FIELD}.members", f"must be an integer in [1, {MAX_MEMBERS}], got {self.members!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= 2**63 - 1:
            raise PartitionError(f"{_FIELD}.seed", f"must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        needed = _PARAMETERS[self.scheme]
        for name in ("alpha", "classes_per_member"):
            given = getattr(self, name) is not None
            if name in needed and not given:
                raise PartitionError(f"{_FIELD}.{name}", f"the {self.scheme} scheme needs it; missing")
            if name not in needed and given:
                raise PartitionError(f"{_FIELD}.{name}", f"the {self.scheme} scheme takes no {name}")
        if self.alpha is not None:
            if not _is_real(self.alpha) or not self.alpha > 0:
                raise PartitionError(f"{_FIELD}.alpha", f"must be a finite number > 0, got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        if self.classes_per_member is not None and (not _is_int(self.classes_per_member) or self.classes_per_member < 1):
            raise PartitionError(
                f"{_FIELD}.classes_per_member", f"must be a positive integer, got {self.classes_per_member!r}"
            )
        if self.samples_per_member is not None and (not _is_int(self.samples_per_member) or self.samples_per_member < 1):
            raise PartitionError(
                f"{_FIELD}.samples_per_member", f"must be a positive integer, got {self.samples_per_member!r}"
            )

    def check_dataset(self, info: DatasetCounts) -> None:
        """Refuse parameters the dataset cannot serve (``PartitionError`` naming the field and the rule)."""
        if self.classes_per_member is not None and self.classes_per_member > info.num_classes:
            raise PartitionError(
                f"{_FIELD}.classes_per_member",
                f"must be at most {info.num_classes} (the classes of {info.name}), got {self.classes_per_member}",
            )
        smallest = min(info.train_class_counts)
        if self.samples_per_member is not None and self.samples_per_member > smallest:
            raise PartitionError(
                f"{_FIELD}.samples_per_member",
                f"must be at most {smallest} (the train count of {info.name}'s smallest class, so that any class mix "
                f"can be drawn without replacement), got {self.samples_per_member}",
            )

    def member_samples(self, info: DatasetCounts) -> int:
        """The training samples of a member (the mean size, for quantity_skew): the given or the default value."""
        if self.samples_per_member is not None:
            return self.samples_per_member
        return max(1, min(sum(info.train_class_counts) // self.members, min(info.train_class_counts)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the scheme, members and seed, and the parameters that are set."""
        data: dict[str, Any] = {"scheme": self.scheme, "members": self.members, "seed": self.seed}
        for name in ("alpha", "classes_per_member", "samples_per_member"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PartitionScheme:
        """Build from the JSON form; unknown keys and a missing scheme or member count raise ``PartitionError``."""
        if not isinstance(data, Mapping):
            raise PartitionError(_FIELD, f"must be an object such as {{'scheme': 'iid', 'members': 100}}, got {data!r}")
        known = ("scheme", "members", "seed", "alpha", "classes_per_member", "samples_per_member")
        for key in data:
            if key not in known:
                raise PartitionError(f"{_FIELD}.{key}", f"unknown key; valid keys: {', '.join(known)}")
        for required in ("scheme", "members"):
            if required not in data:
                raise PartitionError(f"{_FIELD}.{required}", "missing")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class ClassPools:
    """The indices of each class in the train and the test split (ascending), built once per dataset."""

    train: tuple[np.ndarray, ...]  # per class: (count,) int64 indices into the train split
    test: tuple[np.ndarray, ...]
    num_test: int

    @classmethod
    def of_labels(cls, train_labels: Any, test_labels: Any, num_classes: int) -> ClassPools:
        train, test = (np.asarray(y.cpu() if hasattr(y, "cpu") else y) for y in (train_labels, test_labels))
        return cls(
            train=tuple(np.flatnonzero(train == c).astype(np.int64) for c in range(num_classes)),
            test=tuple(np.flatnonzero(test == c).astype(np.int64) for c in range(num_classes)),
            num_test=int(test.size),
        )


def member_class_weights(scheme: PartitionScheme, info: DatasetCounts, client_index: int) -> np.ndarray:
    """Member ``client_index``'s class weights (its target class mix, summing to 1) under the scheme."""
    _check_index(scheme, client_index)
    num_classes = info.num_classes
    if scheme.scheme in ("iid", "quantity_skew"):
        natural = np.asarray(info.train_class_counts, dtype=np.float64)
        return natural / natural.sum()
    if scheme.scheme == "shards":
        per_member = int(scheme.classes_per_member or 1)
        order = np.random.default_rng(np.random.SeedSequence([scheme.seed, _SHARDS_STREAM])).permutation(num_classes)
        weights = np.zeros(num_classes)
        weights[order[(client_index * per_member + np.arange(per_member)) % num_classes]] = 1.0 / per_member
        return weights
    draw = _member_rng(scheme, _MIX_STREAM, client_index).dirichlet(np.full(num_classes, float(scheme.alpha or 1.0)))
    if not np.all(np.isfinite(draw)) or not draw.sum() > 0:  # alpha so small that every gamma draw underflowed
        draw = np.eye(num_classes)[int(np.argmax(np.nan_to_num(draw)))]
    return draw / draw.sum()


def scheme_member(
    scheme: PartitionScheme, info: DatasetCounts, pools: ClassPools, client_index: int, test_split: str
) -> ClientPartition:
    """Member ``client_index``'s partition under the scheme (see the module docstring for the rule).

    Args:
        scheme: the experiment's partition scheme (checked against ``info``).
        info: the dataset's class counts.
        pools: the class indices of the real labels (``ClassPools.of_labels``).
        client_index: the member, in ``[0, scheme.members)``.
        test_split: one of ``TEST_SPLITS``.

    Returns:
        The member's ``ClientPartition`` (sorted indices; train and test draws are without replacement).
    """
    _check_index(scheme, client_index)
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split: must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}")
    weights = member_class_weights(scheme, info, client_index)
    size = _member_size(scheme, info, client_index)
    train_counts = class_counts_for([float(w) for w in weights], size)
    rng = _member_rng(scheme, _TRAIN_STREAM, client_index)
    train_indices = _draw(pools.train, train_counts, rng)
    if test_split == "shared":
        test_counts = [int(pool.size) for pool in pools.test]
        test_indices = _all_test(pools.num_test)
    elif test_split == "none":
        test_counts = [0] * len(train_counts)
        test_indices = np.zeros(0, dtype=np.int64)
    else:
        test_counts = _proportional_test(train_counts, pools)
        test_indices = _draw(pools.test, test_counts, _member_rng(scheme, _TEST_STREAM, client_index))
    return ClientPartition(
        client_index=client_index,
        train_indices=train_indices,
        test_indices=test_indices,
        class_counts=train_counts,
        test_class_counts=test_counts,
        class_frequencies=[c / size for c in train_counts],
        gini_index=gini_coefficient(train_counts),
    )


def _member_size(scheme: PartitionScheme, info: DatasetCounts, client_index: int) -> int:
    mean = scheme.member_samples(info)
    if scheme.scheme != "quantity_skew":
        return mean
    shares = _size_shares(scheme.seed, float(scheme.alpha or 1.0), scheme.members)
    return int(min(max(1, round(mean * float(shares[client_index]))), sum(info.train_class_counts)))


@functools.lru_cache(maxsize=8)
def _size_shares(seed: int, alpha: float, members: int) -> np.ndarray:
    """Gamma(alpha) draws over the members divided by their mean: the Dirichlet shares, times the member count."""
    draws = np.random.default_rng(np.random.SeedSequence([seed, _SIZES_STREAM])).gamma(alpha, size=members)
    mean = draws.mean()
    shares = draws / mean if mean > 0 else np.ones(members)
    shares.setflags(write=False)
    return shares


def _proportional_test(train_counts: Sequence[int], pools: ClassPools) -> list[int]:
    """Of each test class, the member's share of the train class (rounded half up), at least one sample in all."""
    counts = []
    for taken, train_pool, test_pool in zip(train_counts, pools.train, pools.test):
        total = int(train_pool.size)
        counts.append(0 if total == 0 else (2 * taken * int(test_pool.size) + total) // (2 * total))
    if sum(counts) == 0:
        order = np.argsort([-c for c in train_counts], kind="stable")
        fallback = next(int(c) for c in order if pools.test[int(c)].size > 0)
        counts[fallback] = 1
    return counts


def _draw(pools: Sequence[np.ndarray], counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    parts = [pool[rng.choice(pool.size, size=count, replace=False)] for pool, count in zip(pools, counts) if count > 0]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _all_test(num_test: int) -> np.ndarray:
    """The whole test split's indices, one read-only array shared by every member."""
    indices = np.arange(num_test, dtype=np.int64)
    indices.setflags(write=False)
    return indices


def _member_rng(scheme: PartitionScheme, stream: int, client_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([scheme.seed, stream, client_index]))


def _check_index(scheme: PartitionScheme, client_index: int) -> None:
    if not 0 <= client_index < scheme.members:
        raise ValueError(f"client_index: must be in [0, {scheme.members}), got {client_index}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
