"""Replicates: one spec over several seeds, expanded, grouped, and summarised with a 95% t interval."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedland.replicates import expand_replicates, mean_interval, replicate_group, t_quantile_975
from fedland.spec import ExperimentSpec, SpecError, fingerprint


def spec(**changes: Any) -> ExperimentSpec:
    fields: dict[str, Any] = dict(target_balance_ratios=[[0.1] * 10, [0.1] * 10], subset_fractions=[0.1, 0.1],
                                  rounds=2, seed=42, description="pair")
    return ExperimentSpec(**{**fields, **changes})


def test_a_replicated_spec_expands_into_consecutive_seeds_sharing_everything_else() -> None:
    base = spec(replicates=3)
    replicas = expand_replicates(base)
    assert [(r.seed, r.replicate, r.replicates) for r in replicas] == [(42, 0, 3), (43, 1, 3), (44, 2, 3)]
    for r in replicas:
        rest = {k: v for k, v in r.to_dict().items() if k not in ("seed", "replicate", "timestamp")}
        assert rest == {k: v for k, v in base.to_dict().items() if k not in ("seed", "timestamp")}
        assert expand_replicates(r) == [r]  # one of a queued group is itself
        assert ExperimentSpec.from_dict(r.to_dict()) == r
    assert len({fingerprint(r) for r in replicas}) == 3  # three experiments
    assert len({replicate_group(r) for r in replicas}) == 1  # one group
    assert replicate_group(spec(seed=7)) == replicate_group(spec(seed=9))  # seeds submitted apart group too
    assert replicate_group(spec(replicates=3)) != replicate_group(spec(learning_rate=0.5, replicates=3))


def test_a_single_run_is_stored_as_before() -> None:
    single = spec()
    assert expand_replicates(single) == [single]
    assert "replicates" not in single.to_dict() and "replicate" not in single.to_dict()  # fingerprints unchanged


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"replicates": 0}, "replicates"),
        ({"replicates": 101}, "replicates"),
        ({"replicates": 2.0}, "replicates"),
        ({"replicates": True}, "replicates"),
        ({"replicates": 3, "replicate": 3}, "replicate"),
        ({"replicates": 3, "replicate": -1}, "replicate"),
        ({"replicates": 3, "seed": 2**63 - 2}, "seed"),
        ({"replicates": 3, "replicate": 2, "seed": 1}, "seed"),
    ],
)
def test_bad_replicate_fields_are_spec_errors_naming_them(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec(**changes)
    assert caught.value.field == field


def test_mean_interval_matches_the_t_interval_by_hand() -> None:
    mean, half_width, n = mean_interval([1.0, 2.0, 3.0])  # s = 1, t(2) = 4.303
    assert (mean, n) == (2.0, 3) and half_width == pytest.approx(4.303 / math.sqrt(3))
    mean, half_width, n = mean_interval([0.5, None, math.nan, 0.7])  # absent values left out
    assert (mean, n) == (pytest.approx(0.6), 2) and half_width == pytest.approx(12.706 * 0.1414213562 / math.sqrt(2))
    assert math.isnan(mean_interval([3.0])[1]) and mean_interval([])[2] == 0
    assert t_quantile_975(30) == 2.042 and abs(t_quantile_975(60) - 2.000) < 0.002
