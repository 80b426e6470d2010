"""Replicates: one experiment over several seeds, and the mean with a 95% interval across them.

A spec with ``replicates = n`` (and ``replicate`` unset) stands for ``n``
experiments that share everything but the seed: replicate ``r`` runs with
``seed + r`` and carries ``replicate = r``. They are queued together
(:func:`expand_replicates`, called where specs are submitted) and form one
group (:func:`replicate_group`), which the reports and the export read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedland.spec import ExperimentSpec

__all__ = ["MAX_REPLICATES", "expand_replicates", "mean_interval", "replicate_group", "t_quantile_975"]

MAX_REPLICATES = 100

# Student's t, 0.975 quantile, for 1..30 degrees of freedom (two-sided 95%).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
          2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
          2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def expand_replicates(spec: ExperimentSpec) -> list[ExperimentSpec]:
    """The experiments a spec stands for: itself, or its ``replicates`` copies with seeds ``seed + r``.

    A spec that already names its ``replicate`` (one of a queued group) is itself.
    """
    if spec.replicate is not None or spec.replicates == 1:
        return [spec]
    return [dataclasses.replace(spec, seed=spec.seed + r, replicate=r) for r in range(spec.replicates)]


def replicate_group(spec: ExperimentSpec) -> str:
    """The group of an experiment: its spec's fingerprint with the seed and replicate index set aside (16 hex).

    Replicates of one spec share it, and so do experiments submitted apart that differ only in their seed.
    """
    from fedland.spec import fingerprint

    return fingerprint(dataclasses.replace(spec, seed=0, replicate=None))[:16]


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Student's t 0.975 quantile (the half width of a 95% interval in standard errors)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom: must be >= 1, got {degrees_of_freedom!r}")
    if degrees_of_freedom <= len(_T_975):
        return _T_975[degrees_of_freedom - 1]
    return 1.959964 + 2.4 / degrees_of_freedom  # within 0.002 of the exact quantile above 30


def mean_interval(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean of the finite values, the half width of its 95% t interval, and their count.

    The half width is ``t(n - 1) * s / sqrt(n)`` (NaN for a single value: no spread
    to judge by); the mean is NaN when no value is finite.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    if n == 1:
        return mean, math.nan, 1
    variance = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(variance / n), n
