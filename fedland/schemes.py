"""Generators of ``(target_balance_ratios, subset_fractions)`` for common partition schemes.

Every generator returns plain lists ready for ``ExperimentSpec``; the result
is feasible on the dataset (``fedland.partition.plan_counts`` accepts it).
Ratios are rounded to ``DECIMALS`` places with the largest entry adjusted so
each row sums to 1. Fractions have 4 decimals.

``fraction=None`` (the default) picks the largest common fraction on a 1e-4
grid that is feasible; an explicit ``fraction`` is used as given, and an
infeasible one raises ``ValueError`` naming ``fraction`` and the bound it
crossed: the smallest fraction that works when it is too small (a client would
get no local test sample), the largest that fits when it is too large (a class
runs out). Randomness comes from ``numpy.random.default_rng(seed)`` only.

These generators list every member (explicit ratio lists, disjoint members);
for large federations name the scheme in the spec instead
(``fedland.partition_scheme``).

``dataset`` is a spec's ``dataset_name``: a built-in or an import path
(``fedland.components.resolve_dataset``; its declared class counts, nothing loaded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedland.components import DatasetComponent, resolve_dataset
from fedland.partition import PartitionError, plan_counts

__all__ = ["centralized", "dirichlet", "iid", "quantity_skew", "shards"]

DECIMALS = 6
Scheme = tuple[list[list[float]], list[float]]


def iid(num_clients: int, dataset: str = "MNIST", fraction: float | None = None) -> Scheme:
    """Every client gets the dataset's natural class frequencies (train split).

    Natural rather than uniform frequencies so nearly all the data can be
    used: MNIST's rarest class (5, 9.0%) caps uniform clients at fraction
    ~0.90, natural ones reach ~0.99 (rounding leaves a few samples over).
    """
    info = resolve_dataset(dataset)
    _check_num_clients(num_clients)
    natural = _rounded_row(np.asarray(info.train_class_counts, dtype=np.float64))
    return _with_fractions(info, [natural] * num_clients, [1.0] * num_clients, fraction)


def dirichlet(
    num_clients: int, alpha: float, seed: int, dataset: str = "MNIST", fraction: float | None = None
) -> Scheme:
    """Each client's class ratios are drawn from Dir(alpha, ..., alpha); all get the same fraction.

    Small ``alpha`` (0.1) gives clients dominated by one or two classes, large
    ``alpha`` (100) nearly uniform ones.
    """
    info = resolve_dataset(dataset)
    _check_num_clients(num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha: must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    draws = rng.dirichlet(np.full(info.num_classes, float(alpha)), size=num_clients)
    ratios = [_rounded_row(row) for row in draws]
    return _with_fractions(info, ratios, [1.0] * num_clients, fraction)


def shards(
    num_clients: int, classes_per_client: int, seed: int, dataset: str = "MNIST", fraction: float | None = None
) -> Scheme:
    """Each client holds ``classes_per_client`` classes in equal parts.

    Classes are dealt so that every class is used by as many clients as
    possible equally often (each client takes the least-used classes, ties
    broken at random).
    """
    info = resolve_dataset(dataset)
    _check_num_clients(num_clients)
    if not 1 <= classes_per_client <= info.num_classes:
        raise ValueError(f"classes_per_client: must be in [1, {info.num_classes}], got {classes_per_client!r}")
    rng = np.random.default_rng(seed)
    usage = np.zeros(info.num_classes, dtype=np.int64)
    ratios = []
    for _ in range(num_clients):
        order = rng.permutation(info.num_classes)
        chosen = order[np.argsort(usage[order], kind="stable")[:classes_per_client]]
        usage[chosen] += 1
        row = np.zeros(info.num_classes)
        row[chosen] = 1.0
        ratios.append(_rounded_row(row))
    return _with_fractions(info, ratios, [1.0] * num_clients, fraction)


def quantity_skew(
    num_clients: int, alpha: float, seed: int, dataset: str = "MNIST", min_fraction: float | None = None
) -> Scheme:
    """Natural class frequencies for all, unequal sizes: shares ~ Dir(alpha) over clients.

    Fractions are the Dirichlet shares divided by the largest one (so the
    largest client gets the largest feasible fraction), floored at
    ``min_fraction``. Small ``alpha`` means very unequal sizes. The default
    floor (``None``) is the smallest on a 1e-4 grid at which every client gets
    a local test sample: a share of ~1e-5 of the largest client would
    otherwise leave a client with a handful of training samples and no test
    sample (at 100 clients and alpha 0.5 the floor comes out near 0.02).
    """
    info = resolve_dataset(dataset)
    _check_num_clients(num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha: must be > 0, got {alpha!r}")
    if min_fraction is not None and not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction: must be in (0, 1], got {min_fraction!r}")
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_clients, float(alpha)))
    natural = _rounded_row(np.asarray(info.train_class_counts, dtype=np.float64))
    ratios = [natural] * num_clients

    def relative(floor: float) -> list[float]:
        return [float(f) for f in np.maximum(shares / shares.max(), floor)]

    if min_fraction is None:
        def works(step: int) -> bool:  # every client gets a test sample at the largest scale the classes allow
            floored = relative(step / 10_000)
            return _feasible(info, ratios, _scaled(floored, _largest_scale(info, ratios, floored)))

        step = _smallest_step(works, 10_000)
        if step is None:
            raise ValueError("min_fraction: no floor in (0, 1] gives every client a local test sample")
        min_fraction = step / 10_000
    return _with_fractions(info, ratios, relative(min_fraction), None)


def centralized(dataset: str = "MNIST") -> Scheme:
    """One client holding the whole dataset: exact class frequencies, fraction 1.0."""
    info = resolve_dataset(dataset)
    counts = np.asarray(info.train_class_counts, dtype=np.float64)
    # More decimals than DECIMALS so largest remainder gives back exactly each class count.
    ratios = [_rounded_row(counts, decimals=12)]
    plan_counts(info.train_class_counts, info.test_class_counts, ratios, [1.0])
    return ratios, [1.0]


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients <= 0:
        raise ValueError(f"num_clients: must be a positive integer, got {num_clients!r}")


def _rounded_row(weights: np.ndarray, decimals: int = DECIMALS) -> list[float]:
    """Normalise ``weights`` to sum to 1, round, and set the largest entry to 1 minus the others."""
    values = [float(v) for v in np.round(weights / weights.sum(), decimals)]
    largest = int(np.argmax(values))
    values[largest] = round(1.0 - math.fsum(v for j, v in enumerate(values) if j != largest), decimals)
    return values


def _with_fractions(
    info: DatasetComponent, ratios: list[list[float]], relative: Sequence[float], fraction: float | None
) -> Scheme:
    """Scale ``relative`` sizes by ``fraction``, or by the largest feasible common factor."""
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: must be in (0, 1], got {fraction!r}")
        fractions = _scaled(relative, fraction)
        try:
            plan_counts(info.train_class_counts, info.test_class_counts, ratios, fractions)
        except PartitionError as error:
            largest = _largest_scale(info, ratios, relative)
            smallest = _smallest_step(lambda step: _feasible(info, ratios, _scaled(relative, step / 10_000)),
                                      round(largest * 10_000))
            if smallest is None:
                raise ValueError(f"fraction: {fraction} is infeasible ({error}); no fraction fits") from None
            if fraction < smallest / 10_000:
                raise ValueError(
                    f"fraction: {fraction} is too small ({error}); the smallest that works is {smallest / 10_000}"
                ) from None
            raise ValueError(f"fraction: {fraction} is too large ({error}); the largest that fits is {largest}") from None
        return ratios, fractions
    scale = _largest_scale(info, ratios, relative)
    if scale == 0 or not _feasible(info, ratios, _scaled(relative, scale)):
        raise ValueError(
            "fraction: no fraction in (0, 1] is feasible for these clients (at the largest that fits the classes, "
            "some client gets no local test sample: use fewer clients)"
        )
    return ratios, _scaled(relative, scale)


def _scaled(relative: Sequence[float], scale: float) -> list[float]:
    return [max(round(r * scale, 4), 1e-4) for r in relative]


def _feasible(info: DatasetComponent, ratios: list[list[float]], fractions: list[float], require_test: bool = True) -> bool:
    try:
        plan_counts(info.train_class_counts, info.test_class_counts, ratios, fractions, require_test=require_test)
    except PartitionError:
        return False
    return True


def _smallest_step(feasible: Callable[[int], bool], high: int) -> int | None:
    """Bisect on a 1e-4 grid for the smallest step in [1, high] that is feasible, feasible(high) assumed monotone."""
    if high < 1 or not feasible(high):
        return None
    low = 0  # feasible(low) fails (or low == 0), feasible(high) holds
    while high - low > 1:
        middle = (low + high) // 2
        if feasible(middle):
            high = middle
        else:
            low = middle
    return high


def _largest_scale(info: DatasetComponent, ratios: list[list[float]], relative: Sequence[float]) -> float:
    """Bisect on a 1e-4 grid for the largest common scale at which no class runs out (0.0 if none).

    Only the classes' supply bounds it from above (more samples never make a
    class last longer), so the bisection is sound; whether every client also
    gets a local test sample at that scale is the caller's check.
    """

    def fits(step: int) -> bool:
        return _feasible(info, ratios, _scaled(relative, step / 10_000), require_test=False)

    if fits(10_000):
        return 1.0
    low, high = 0, 10_000  # fits(low) holds (or low == 0), fits(high) fails
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low / 10_000
