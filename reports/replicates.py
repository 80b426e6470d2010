"""Replicate groups of the compared experiments: each curve and measure as a mean with a 95% interval across seeds.

Experiments whose specs differ only in the seed form a group
(`fedland.replicates.replicate_group`); a group of two or more is drawn and
tabled as one entry: at every round, the mean over its experiments and the
95% Student-t interval of that mean (`fedland.replicates.mean_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedland.replicates import mean_interval, replicate_group
from fedland.spec import ExperimentSpec, SpecError
from reports.data import ExperimentData, Series, value_at


@dataclass(frozen=True)
class Band:
    """A group's mean by round and the half width of its 95% interval (NaN where one seed has the value)."""

    rounds: tuple[int, ...]
    means: tuple[float, ...]
    half_widths: tuple[float, ...]
    counts: tuple[int, ...]  # seeds with the value at each round


def group_key(data: ExperimentData) -> str:
    """The replicate group of an experiment (its own id when its stored spec cannot be read)."""
    try:
        return replicate_group(ExperimentSpec.from_dict(data.spec))
    except (SpecError, TypeError, ValueError):
        return data.experiment_id


def groups(experiments: Sequence[ExperimentData]) -> list[list[ExperimentData]]:
    """The experiments in groups of replicates, in the order of each group's first experiment."""
    by_key: dict[str, list[ExperimentData]] = {}
    for data in experiments:
        by_key.setdefault(group_key(data), []).append(data)
    return list(by_key.values())


def band(members: Sequence[ExperimentData], series: Callable[[ExperimentData], Series]) -> Band:
    """Mean and 95% interval across ``members`` of a per-round series, at every round any of them has."""
    by_round: dict[int, list[float]] = {}
    for data in members:
        values = series(data)
        for r, v in zip(values.rounds, values.values):
            by_round.setdefault(r, []).append(v)
    rounds = tuple(sorted(by_round))
    stats = [mean_interval(by_round[r]) for r in rounds]
    return Band(rounds, tuple(s[0] for s in stats), tuple(s[1] for s in stats), tuple(s[2] for s in stats))


def last_value(data: ExperimentData, path: tuple[str | int, ...]) -> float | None:
    """The value at ``path`` of the experiment's last round document that has it."""
    for doc in reversed(data.rounds):
        value = value_at(doc, path)
        if value is not None:
            return value
    return None


def mean_text(values: Sequence[float | None], decimals: int = 4) -> str:
    """``mean ± half width (n = k)`` of the finite values; the bare value for one; "–" for none."""
    mean, half_width, n = mean_interval(values)
    if n == 0:
        return "–"
    if math.isnan(half_width):
        return f"{mean:.{decimals}f} (n = 1)"
    return f"{mean:.{decimals}f} ± {half_width:.{decimals}f} (n = {n})"


GROUP_HEADER = ("experiment (replicates)", "seeds", "final test acc.", "final test loss", "λ1 global (last measured)",
                "trace global (last measured)", "PAC-Bayes σ global (last measured)")


def group_rows(experiments: Sequence[ExperimentData]) -> list[list[str]]:
    """One row per group of two or more replicates: each measure as mean ± 95% interval (n = seeds with it).

    A saturated PAC-Bayes search has no value: it is counted apart, never averaged in.
    """
    rows = []
    for members in groups(experiments):
        if len(members) < 2:
            continue
        landscape = ("landscape", "global")
        saturated = sum(
            1 for data in members
            for doc in [next((d for d in reversed(data.rounds) if isinstance(d.get("landscape"), dict)), None)]
            if doc is not None and ((((doc["landscape"].get("global") or {}).get("generalization") or {})
                                     .get("pac_bayes") or {}).get("saturated") is True)
        )
        sigma = mean_text([last_value(d, (*landscape, "generalization", "pac_bayes", "sigma")) for d in members], 4)
        rows.append([
            members[0].label,
            ", ".join(str(d.spec.get("seed")) for d in members),
            mean_text([last_value(d, ("test_accuracy",)) for d in members]),
            mean_text([last_value(d, ("test_loss",)) for d in members]),
            mean_text([last_value(d, (*landscape, "top_eigenvalues", 0)) for d in members], 2),
            mean_text([last_value(d, (*landscape, "trace")) for d in members], 2),
            sigma + (f"; saturated in {saturated}" if saturated else ""),
        ])
    return rows
