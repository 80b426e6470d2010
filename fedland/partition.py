"""Partition a dataset among clients by target class ratios and subset fractions.

The rule (pure, deterministic, no sampling with replacement):

* With ``k`` clients and ``N`` training samples, client ``i`` gets
  ``n_i = round(floor(N / k) * subset_fractions[i])`` training samples whose
  class counts are ``class_counts_for(ratios[i], n_i)`` (largest remainder).
* Each class's indices are shuffled once (``numpy.random.default_rng(seed)``)
  and handed out as consecutive chunks to clients 0, 1, ..., so clients are
  disjoint by construction. A plan needing more samples of a class than remain
  is refused (``PartitionError``) rather than oversampled.
* The local test set takes, of each class of the test split, the same share
  as the client's training set takes of that class of the train split
  (cumulative rounding over clients, so the shares never overlap and never
  exceed the split). Its class frequencies thus follow ``ratios[i]`` reweighted
  by the test/train frequency of each class (within about 1% for MNIST).
  Why not ``ratios[i]`` on ``round(floor(N_test / k) * f_i)`` samples: train
  and test class frequencies differ, so that rule cannot hold for a client
  that takes the whole train split (MNIST's class 0 is 9.87% of train but
  9.80% of test), nor for IID clients at full fraction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClientPartition",
    "PartitionError",
    "class_counts_for",
    "client_sizes",
    "gini_coefficient",
    "partition",
    "plan_counts",
]


class PartitionError(ValueError):
    """A partition plan is impossible; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.rule = message


@dataclass(frozen=True, eq=False)
class ClientPartition:
    """One client's share of a dataset: sorted sample indices and class statistics."""

    client_index: int
    train_indices: np.ndarray  # (num_train,) int64, sorted, into the train split
    test_indices: np.ndarray  # (num_test,) int64, sorted, into the test split
    class_counts: list[int]  # train samples per class
    test_class_counts: list[int]
    class_frequencies: list[float]  # class_counts / num_train
    gini_index: float  # Gini coefficient of class_counts, see gini_coefficient

    @property
    def num_train(self) -> int:
        return int(self.train_indices.size)

    @property
    def num_test(self) -> int:
        return int(self.test_indices.size)

    def digest(self) -> str:
        """Return the sha256 hex digest of the train and test indices (int64 little-endian)."""
        sha = hashlib.sha256()
        for name, indices in (("train", self.train_indices), ("test", self.test_indices)):
            sha.update(f"{name}:{indices.size}:".encode())
            sha.update(np.ascontiguousarray(indices, dtype="<i8").tobytes())
        return sha.hexdigest()

    def to_stats(self) -> dict[str, Any]:
        """Return the JSON-able statistics stored per client (no indices)."""
        return {
            "client_index": self.client_index,
            "class_counts": list(self.class_counts),
            "test_class_counts": list(self.test_class_counts),
            "class_frequencies": list(self.class_frequencies),
            "gini_index": self.gini_index,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "partition_digest": self.digest(),
        }


def class_counts_for(ratios: Sequence[float], n: int) -> list[int]:
    """Split ``n`` samples among classes in proportion to ``ratios`` (largest remainder).

    Ratios are normalised by their sum first; ties in the remainders go to the
    lower class index. The counts sum to exactly ``n`` and a zero ratio gets 0.
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    weights = np.asarray(ratios, dtype=np.float64)
    total = weights.sum()
    if weights.ndim != 1 or weights.size == 0 or np.any(weights < 0) or not total > 0:
        raise ValueError(f"ratios: must be a non-empty list of non-negative numbers with a positive sum, got {ratios}")
    exact = weights / total * n
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    deficit = n - int(counts.sum())
    # Stable sort on -remainder: largest remainder first, ties to the lower index.
    order = np.argsort(-remainders, kind="stable")
    order = order[weights[order] > 0]
    for j in range(deficit):
        counts[order[j % order.size]] += 1
    return [int(c) for c in counts]


def client_sizes(num_samples: int, fractions: Sequence[float]) -> list[int]:
    """Return ``round(floor(num_samples / k) * f_i)`` for each of the ``k`` fractions."""
    base = num_samples // len(fractions)
    return [int(round(base * f)) for f in fractions]


def plan_counts(
    train_class_totals: Sequence[int] | np.ndarray,
    test_class_totals: Sequence[int] | np.ndarray,
    ratios: Sequence[Sequence[float]],
    fractions: Sequence[float],
    *,
    require_test: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """Return per-client (train, test) class counts, or raise ``PartitionError``.

    This is the feasibility check shared by ``partition`` and the experiment
    spec: it needs only the class totals of each split. ``require_test``
    (member_test_split ``proportional``) refuses a client whose proportional
    test share is empty; the other test splits do not use that share.
    """
    if len(ratios) != len(fractions) or not ratios:
        raise PartitionError(
            "subset_fractions", f"need one fraction per client: {len(fractions)} fractions for {len(ratios)} clients"
        )
    for i, fraction in enumerate(fractions):
        if not 0 < fraction <= 1:
            raise PartitionError(f"subset_fractions[{i}]", f"must be a number in (0, 1], got {fraction!r}")
    train_totals = [int(c) for c in train_class_totals]
    test_totals = [int(c) for c in test_class_totals]
    base = sum(train_totals) // len(ratios)
    remaining = list(train_totals)
    train_counts: list[list[int]] = []
    for i, (client_ratios, n) in enumerate(zip(ratios, client_sizes(sum(train_totals), fractions))):
        if len(client_ratios) != len(train_totals):
            raise PartitionError(
                f"target_balance_ratios[{i}]",
                f"has {len(client_ratios)} entries but the dataset has {len(train_totals)} classes",
            )
        if n == 0:
            # round(base * f) >= 1 needs f >= 0.5 / base: the smallest fraction that gives one sample
            smallest = f"the smallest that gives one is {math.ceil(5_000 / base) / 10_000:.4f}" if base else "none does"
            raise PartitionError(
                f"subset_fractions[{i}]",
                f"client {i} would get 0 training samples (fraction {fractions[i]} of floor(N / k) = {base}); {smallest}",
            )
        counts = class_counts_for(client_ratios, n)
        for c, (need, have) in enumerate(zip(counts, remaining)):
            if need > have:
                after = {0: "exist in the train split", 1: "remain after client 0"}.get(
                    i, f"remain after clients 0..{i - 1}"
                )
                largest = _largest_fitting_fraction(client_ratios, remaining, base)
                fits = f"largest subset_fraction that fits is {largest:.4f}" if largest else "no subset_fraction fits"
                raise PartitionError(
                    f"target_balance_ratios[{i}]",
                    f"client {i} needs {need} samples of class {c} but only {have} {after}; {fits}",
                )
        remaining = [have - need for have, need in zip(remaining, counts)]
        train_counts.append(counts)
    test_counts = _proportional_test_counts(train_counts, train_totals, test_totals)
    for i, counts in enumerate(test_counts):
        if require_test and sum(counts) == 0:
            per_test = sum(train_totals) / max(sum(test_totals), 1)
            raise PartitionError(
                f"subset_fractions[{i}]",
                f"client {i} would get 0 local test samples (fraction {fractions[i]}, {sum(train_counts[i])} training "
                f"samples): a member's local test set takes its share of each test class, so it needs about "
                f"{per_test:.0f} training samples per local test sample; give it a larger fraction, or set "
                "member_test_split to 'shared' or 'none'",
            )
    return train_counts, test_counts


def partition(
    train_labels: Any,
    test_labels: Any,
    ratios: Sequence[Sequence[float]],
    fractions: Sequence[float],
    seed: int,
    test_split: str = "proportional",
) -> list[ClientPartition]:
    """Split the train and test splits among clients; disjoint, without replacement.

    Args:
        train_labels: class index of every training sample (array or CPU tensor).
        test_labels: class index of every test sample.
        ratios: per client, the target frequency of each class (sums to 1).
        fractions: per client, the share in (0, 1] of ``floor(N / k)`` it gets.
        seed: seeds the per-class shuffle.
        test_split: ``proportional`` (disjoint local test shares, as above),
            ``shared`` (every client's test set is the whole test split) or
            ``none`` (no local test set).

    Returns:
        One ``ClientPartition`` per client, in client order.

    Raises:
        PartitionError: a client needs more samples of a class than remain.
    """
    num_classes = len(ratios[0]) if len(ratios) else 0
    train = _as_labels(train_labels, num_classes, "train_labels")
    test = _as_labels(test_labels, num_classes, "test_labels")
    train_totals = np.bincount(train, minlength=num_classes)
    test_totals = np.bincount(test, minlength=num_classes)
    if test_split not in ("proportional", "shared", "none"):
        raise ValueError(f"test_split: must be 'proportional', 'shared' or 'none', got {test_split!r}")
    proportional = test_split == "proportional"
    train_counts, test_counts = plan_counts(train_totals, test_totals, ratios, fractions, require_test=proportional)
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train_chunks = _deal(train, num_classes, train_counts, train_rng)
    if proportional:
        test_chunks = _deal(test, num_classes, test_counts, test_rng)
    else:  # one read-only array shared by every client, or none
        shared = np.arange(test.size, dtype=np.int64) if test_split == "shared" else np.zeros(0, dtype=np.int64)
        shared.setflags(write=False)
        test_chunks = [shared] * len(ratios)
        whole = [int(n) for n in test_totals] if test_split == "shared" else [0] * num_classes
        test_counts = [list(whole) for _ in ratios]
    return [
        ClientPartition(
            client_index=i,
            train_indices=train_chunks[i],
            test_indices=test_chunks[i],
            class_counts=train_counts[i],
            test_class_counts=test_counts[i],
            class_frequencies=[c / sum(train_counts[i]) for c in train_counts[i]],
            gini_index=gini_coefficient(train_counts[i]),
        )
        for i in range(len(ratios))
    ]


def gini_coefficient(counts: Sequence[int]) -> float:
    """Gini coefficient of a class-count distribution over all ``K`` classes.

    ``G = sum_ij |x_i - x_j| / (2 * K * sum_i x_i)``: 0 when every class has the
    same count, ``(K - 1) / K`` (0.9 for 10 classes) when one class holds all.
    """
    x = np.asarray(counts, dtype=np.float64)
    total = x.sum()
    if total == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size * total))


def _deal(
    labels: np.ndarray, num_classes: int, counts: list[list[int]], rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle each class once, then give clients consecutive chunks in client order."""
    chunks: list[list[np.ndarray]] = [[] for _ in counts]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, client_counts in enumerate(counts):
            chunks[i].append(pool[start : start + client_counts[c]])
            start += client_counts[c]
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in chunks]


def _proportional_test_counts(
    train_counts: list[list[int]], train_totals: list[int], test_totals: list[int]
) -> list[list[int]]:
    """Give each client the share of each test class its train counts take of that train class."""
    test_counts = [[0] * len(train_totals) for _ in train_counts]
    for c, (train_total, test_total) in enumerate(zip(train_totals, test_totals)):
        if train_total == 0:
            continue
        taken, handed_out = 0, 0
        for i, counts in enumerate(train_counts):
            taken += counts[c]
            # round-half-up of taken * test_total / train_total, in exact integers
            cumulative = (2 * taken * test_total + train_total) // (2 * train_total)
            test_counts[i][c] = cumulative - handed_out
            handed_out = cumulative
    return test_counts


def _largest_fitting_fraction(ratios: Sequence[float], remaining: list[int], base: int) -> float:
    """Largest fraction f on a 1e-4 grid with ``base * f <= n`` for a fitting size ``n`` (0.0 if none)."""

    def fits(n: int) -> bool:
        return n > 0 and all(need <= have for need, have in zip(class_counts_for(ratios, n), remaining))

    if base == 0:
        return 0.0
    total = sum(ratios)
    # n * r / total <= have + 1 bounds n (largest remainder adds at most one); walk down from there.
    n = min(base, min(math.floor((have + 1) * total / r) for r, have in zip(ratios, remaining) if r > 0))
    while n > 0 and not fits(n):
        n -= 1
    step = math.floor(n / base * 10_000)
    while step > 0 and not fits(int(round(base * step / 10_000))):
        step -= 1
    return step / 10_000


def _as_labels(labels: Any, num_classes: int, field: str) -> np.ndarray:
    array = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{field}: must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{field}: labels must lie in [0, {num_classes}), got [{array.min()}, {array.max()}]")
    return array.astype(np.int64, copy=False)
