"""Per-round participation: the seeded draw, and the spec's rules for it."""

from __future__ import annotations

from typing import Any

import pytest

from fedland.participation import select_members, selected_members
from fedland.spec import ROBUST_MAX_UPDATES, ExperimentSpec, SpecError, StrategySpec


def spec(num_clients: int = 20, **overrides: object) -> ExperimentSpec:
    fields: dict[str, object] = {"seed": 3, **overrides}
    return ExperimentSpec(
        target_balance_ratios=[[0.1] * 10] * num_clients, subset_fractions=[0.2] * num_clients, **fields  # type: ignore[arg-type]
    )


def test_selection_is_seeded_sorted_and_the_same_for_paired_experiments() -> None:
    fedavg = spec(clients_per_round=5)
    fedadam = spec(clients_per_round=5, strategy=StrategySpec("FedAdam"), learning_rate=0.1, description="other")
    draws = [selected_members(fedavg, r) for r in range(1, 21)]
    assert draws == [selected_members(fedadam, r) for r in range(1, 21)]  # strategy and the rest play no part
    assert draws == [selected_members(fedavg, r) for r in range(1, 21)]  # deterministic
    assert all(len(d) == 5 and list(d) == sorted(set(d)) and all(0 <= i < 20 for i in d) for d in draws)
    assert len(set(draws)) > 15  # rounds draw differently
    assert draws != [selected_members(spec(clients_per_round=5, seed=4), r) for r in range(1, 21)]
    # a fraction giving the same count draws the same members
    assert draws == [selected_members(spec(clients_per_round=0.25), r) for r in range(1, 21)]
    # every member trains about as often: 20 rounds x 5 = 100 slots over 20 members
    counts = [sum(i in d for d in draws) for i in range(20)]
    assert sum(counts) == 100 and max(counts) <= 12


def test_all_members_by_default() -> None:
    assert selected_members(spec(), 7) == tuple(range(20))
    assert select_members(0, 1, 3, 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="members_per_round"):
        select_members(0, 1, 3, 4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"clients_per_round": 21}, "clients_per_round"),
        ({"clients_per_round": 1.5}, "clients_per_round"),
        ({"clients_per_round": 0.0}, "clients_per_round"),
        ({"clients_per_round": "5"}, "clients_per_round"),
        ({"clients_per_round": True}, "clients_per_round"),
        ({"round_timeout_s": 0}, "round_timeout_s"),
        ({"min_reports": 2}, "min_reports"),  # without a deadline
        ({"round_timeout_s": 5, "clients_per_round": 4, "min_reports": 5}, "min_reports"),
    ],
)
def test_participation_rules_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as error:
        spec(**overrides)
    assert error.value.field == field


def test_members_per_round_and_the_round_trip() -> None:
    assert spec(clients_per_round=0.1).members_per_round == 2
    assert spec(clients_per_round=0.01).members_per_round == 1  # at least one
    assert spec(clients_per_round=7).members_per_round == 7
    timed = spec(clients_per_round=5, round_timeout_s=30, min_reports=3)
    assert ExperimentSpec.from_dict(timed.to_dict()) == timed
    assert "clients_per_round" not in spec().to_dict()  # unset keys stay out: older documents read back unchanged


def test_robust_strategies_are_capped_per_round() -> None:
    big = ROBUST_MAX_UPDATES + 20
    assert spec(big, clients_per_round=ROBUST_MAX_UPDATES, strategy=StrategySpec("FedMedian")).members_per_round == 100
    with pytest.raises(SpecError) as error:
        spec(big, strategy=StrategySpec("FedMedian"))
    assert error.value.field == "clients_per_round"
    assert spec(big).members_per_round == big  # averaging strategies keep a running sum: no cap


def test_krum_with_a_deadline_needs_enough_reports_for_any_early_close() -> None:
    krum = StrategySpec("Krum", {"num_malicious": 3})  # needs more than 8 updates (or exactly 1)
    assert spec(10, strategy=krum).members_per_round == 10
    with pytest.raises(SpecError) as error:  # a deadline may close a round with 1..10 updates: 2..8 break Krum
        spec(10, strategy=krum, round_timeout_s=30, min_reports=1)
    assert error.value.field == "min_reports" and "must be > 8" in error.value.rule
    assert spec(10, strategy=krum, round_timeout_s=30, min_reports=9).min_reports == 9
    with pytest.raises(SpecError) as error:
        spec(10, strategy=krum, clients_per_round=8)
    assert error.value.field == "strategy.params.num_malicious"
