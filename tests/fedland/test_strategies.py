"""Aggregation strategies against hand-computed numbers."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from fedland.algorithms import SWA, FedDynStrategy, ScaffoldStrategy
from fedland.spec import STRATEGY_PARAMS, SpecError, StrategySpec
from fedland.strategies import (
    PARTICIPATION_STRATEGIES,
    STRATEGIES,
    ClientUpdate,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    RunningMean,
    Strategy,
    is_statistic,
    make_strategy,
    weighted_mean,
)
from stack import wire


def default(name: str) -> Strategy:
    """The strategy `name` with the spec's default parameters."""
    return make_strategy(StrategySpec(name))


def arr(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def updates_1_3() -> list[ClientUpdate]:
    # weighted mean: (1 * [1, 2] + 3 * [3, 6]) / 4 = [2.5, 5.0]
    return [ClientUpdate({"w": arr(1, 2)}, 1), ClientUpdate({"w": arr(3, 6)}, 3)]


def test_fedavg_is_the_example_weighted_mean() -> None:
    new, state = FedAvg().aggregate({"w": arr(0, 0)}, updates_1_3(), {})
    np.testing.assert_allclose(new["w"], [2.5, 5.0], rtol=0, atol=1e-7)
    assert new["w"].dtype == np.float32
    assert state == {}


def test_fedprox_aggregates_like_fedavg() -> None:
    new, _ = FedProx(mu=0.1).aggregate({"w": arr(0, 0)}, updates_1_3(), {})
    np.testing.assert_allclose(new["w"], [2.5, 5.0], atol=1e-7)


def test_integer_keys_are_rounded_back_to_their_dtype() -> None:
    current = {"n": np.asarray([0], dtype=np.int64)}
    ups = [ClientUpdate({"n": np.asarray([1], dtype=np.int64)}, 1), ClientUpdate({"n": np.asarray([4], dtype=np.int64)}, 2)]
    new, _ = FedAvg().aggregate(current, ups, {})
    assert new["n"].dtype == np.int64 and new["n"].tolist() == [3]  # (1 + 8) / 3 = 3


def test_fedavgm_first_step_equals_fedavg_then_momentum_accumulates() -> None:
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    new, state = strategy.aggregate({"w": arr(0, 0)}, updates_1_3(), {})
    np.testing.assert_allclose(new["w"], [2.5, 5.0], atol=1e-7)
    np.testing.assert_allclose(state["momentum/w"], [-2.5, -5.0])
    # x = [2.5, 5], avg = [3.5, 5]: delta = x - avg = [-1, 0]; v = 0.9 * [-2.5, -5] + [-1, 0] = [-3.25, -4.5]
    ups = [ClientUpdate({"w": arr(3.5, 5)}, 2)]
    new, state = strategy.aggregate(new, ups, state)
    np.testing.assert_allclose(state["momentum/w"], [-3.25, -4.5], atol=1e-6)
    np.testing.assert_allclose(new["w"], [5.75, 9.5], atol=1e-6)


def test_fedavgm_server_learning_rate_scales_the_step() -> None:
    new, _ = FedAvgM(server_learning_rate=0.5, server_momentum=0.9).aggregate({"w": arr(0, 0)}, updates_1_3(), {})
    np.testing.assert_allclose(new["w"], [1.25, 2.5], atol=1e-7)


def test_fedadam_first_step() -> None:
    # delta = [2.5, 5]; m = 0.1 delta = [0.25, 0.5]; v = 0.01 delta^2 = [0.0625, 0.25]
    new, state = default("FedAdam").aggregate({"w": arr(0, 0)}, updates_1_3(), {})
    np.testing.assert_allclose(state["m/w"], [0.25, 0.5])
    np.testing.assert_allclose(state["v/w"], [0.0625, 0.25])
    expected = [0.01 * 0.25 / (0.25 + 1e-3), 0.01 * 0.5 / (0.5 + 1e-3)]  # [0.00996016, 0.00998004]
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(new["w"], [0.0099601594, 0.0099800399], rtol=1e-6)


SECOND_STATE = {"m/w": np.asarray([0.25, 0.5]), "v/w": np.asarray([0.0625, 0.25])}
SECOND_UPDATES = [ClientUpdate({"w": arr(1.0, 0.1)}, 5)]  # delta = [1, 0.1], delta^2 = [1, 0.01]
SECOND_M = [0.325, 0.46]  # 0.9 * [0.25, 0.5] + 0.1 * [1, 0.1]


@pytest.mark.parametrize(
    ("strategy", "expected_v"),
    [
        (default("FedAdam"), [0.071875, 0.2476]),  # 0.99 v + 0.01 delta^2
        (default("FedYogi"), [0.0725, 0.2499]),  # v - 0.01 delta^2 sign(v - delta^2): signs -1, +1
        (default("FedAdagrad"), [1.0625, 0.26]),  # v + delta^2
    ],
)
def test_adaptive_second_step(strategy: FedAdam, expected_v: list[float]) -> None:
    new, state = strategy.aggregate({"w": arr(0, 0)}, SECOND_UPDATES, SECOND_STATE)
    np.testing.assert_allclose(state["m/w"], SECOND_M, rtol=1e-6)
    np.testing.assert_allclose(state["v/w"], expected_v, rtol=1e-6)
    expected = [0.01 * m / (math.sqrt(v) + 1e-3) for m, v in zip(SECOND_M, expected_v)]
    np.testing.assert_allclose(new["w"], expected, rtol=1e-5)


def test_state_survives_the_wire_format() -> None:
    strategy = make_strategy(StrategySpec("FedYogi", {"eta": 0.1}))
    x: dict[str, np.ndarray] = {"w": arr(0, 0)}
    state: dict[str, np.ndarray] = {}
    direct_x, direct_state = x, state
    for target in (arr(1, 2), arr(-1, 3), arr(0.5, 0.5)):
        ups = [ClientUpdate({"w": target}, 1)]
        direct_x, direct_state = strategy.aggregate(direct_x, ups, direct_state)
        x, state = strategy.aggregate(x, ups, wire.decode(wire.encode(state)))
    np.testing.assert_array_equal(x["w"], direct_x["w"])
    assert sorted(state) == sorted(direct_state) == ["m/w", "v/w"]
    for name in state:
        np.testing.assert_array_equal(state[name], direct_state[name])


def test_median_is_coordinatewise_and_unweighted() -> None:
    ups = [
        ClientUpdate({"w": arr(1, 10)}, 100),
        ClientUpdate({"w": arr(5, 20)}, 1),
        ClientUpdate({"w": arr(2, -4)}, 1),
    ]
    new, _ = FedMedian().aggregate({"w": arr(0, 0)}, ups, {})
    np.testing.assert_array_equal(new["w"], [2, 10])
    new, _ = FedMedian().aggregate({"w": arr(0, 0)}, ups[:2], {})
    np.testing.assert_array_equal(new["w"], [3, 15])


def test_trimmed_mean_drops_beta_of_each_end() -> None:
    ups = [ClientUpdate({"w": arr(v, -v)}, 1) for v in (1, 2, 3, 100)]
    new, _ = FedTrimmedAvg(beta=0.25).aggregate({"w": arr(0, 0)}, ups, {})  # drop 1 each end
    np.testing.assert_allclose(new["w"], [2.5, -2.5])
    new, _ = FedTrimmedAvg(beta=0.2).aggregate({"w": arr(0, 0)}, ups, {})  # floor(0.8) = 0 dropped
    np.testing.assert_allclose(new["w"], [26.5, -26.5])


def test_krum_picks_the_most_central_update() -> None:
    # f = 0, n = 4: each score sums the n - 2 = 2 nearest squared distances.
    # 0: 1 + 9 = 10; 1: 1 + 4 = 5; 3: 4 + 9 = 13; 10: 49 + 81 = 130
    ups = [ClientUpdate({"w": arr(v)}, n) for v, n in ((0, 1), (1, 3), (3, 1), (10, 1))]
    krum = Krum(num_malicious=0, num_selected=1)
    np.testing.assert_allclose(krum.scores(ups), [10, 5, 13, 130])
    new, _ = krum.aggregate({"w": arr(0)}, ups, {})
    np.testing.assert_array_equal(new["w"], [1])
    # Multi-Krum: the 2 best (1 with 3 examples, 0 with 1) averaged by examples = 0.75
    new, _ = Krum(num_malicious=0, num_selected=2).aggregate({"w": arr(0)}, ups, {})
    np.testing.assert_allclose(new["w"], [0.75])
    # f = 1 needs n > 2f + 2 = 4 updates: refused with 4, two neighbours each with 5
    with pytest.raises(ValueError, match="num_malicious: Krum needs more than 2 \\* num_malicious \\+ 2 = 4"):
        Krum(num_malicious=1, num_selected=1).scores(ups)
    five = [*ups, ClientUpdate({"w": arr(20)}, 1)]
    # 0: 1 + 9; 1: 1 + 4; 3: 4 + 9; 10: 49 + 81; 20: 100 + 289
    np.testing.assert_allclose(Krum(num_malicious=1, num_selected=1).scores(five), [10, 5, 13, 130, 389])
    with pytest.raises(ValueError, match="Krum needs more than"):
        Krum(num_malicious=0, num_selected=1).aggregate({"w": arr(0)}, ups[:2], {})


def test_inputs_are_not_mutated() -> None:
    current = {"w": arr(0, 0)}
    ups = updates_1_3()
    state = {"m/w": np.asarray([0.25, 0.5]), "v/w": np.asarray([0.0625, 0.25])}
    default("FedAdam").aggregate(current, ups, state)
    np.testing.assert_array_equal(current["w"], [0, 0])
    np.testing.assert_array_equal(ups[1].weights["w"], [3, 6])
    np.testing.assert_array_equal(state["m/w"], [0.25, 0.5])


def test_bad_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FedAvg().aggregate({"w": arr(0)}, [], {})
    with pytest.raises(ValueError, match=r"updates\[0\].num_examples"):
        FedAvg().aggregate({"w": arr(0)}, [ClientUpdate({"w": arr(1)}, 0)], {})


def test_make_strategy_builds_every_named_strategy_with_params() -> None:
    assert set(STRATEGIES) == {
        "FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedMedian", "FedTrimmedAvg", "Krum",
        "SCAFFOLD", "FedDyn", "FedSWA",
    }
    assert make_strategy(StrategySpec("FedAvgM", {"server_momentum": 0.5})) == FedAvgM(1.0, 0.5)
    assert make_strategy(StrategySpec("FedProx", {"mu": 0.1})) == FedProx(mu=0.1)
    assert make_strategy(StrategySpec("FedAdam", {"eta": 0.1, "tau": 1e-9})) == FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9)
    assert make_strategy(StrategySpec("Krum", {"num_malicious": 2, "num_selected": 3})) == Krum(2, 3)
    assert make_strategy(StrategySpec("FedTrimmedAvg", {"beta": 0.3})) == FedTrimmedAvg(beta=0.3)
    assert make_strategy(StrategySpec("FedTrimmedAvg")) == FedTrimmedAvg(beta=0.1)


def test_every_spec_strategy_builds_and_takes_exactly_the_spec_parameters() -> None:
    assert set(STRATEGIES) == set(STRATEGY_PARAMS)
    for name, cls in STRATEGIES.items():
        # participation is the experiment's (make_strategy passes it), not a spec parameter
        taken = set(inspect.signature(cls).parameters) - ({"participation"} if name in PARTICIPATION_STRATEGIES else set())
        assert taken == set(STRATEGY_PARAMS[name]), name


def test_server_halves_of_the_client_algorithms_are_built_with_the_experiments_participation() -> None:
    assert make_strategy(StrategySpec("SCAFFOLD"), 0.25) == ScaffoldStrategy(participation=0.25)
    assert make_strategy(StrategySpec("SCAFFOLD", {"server_learning_rate": 0.5})) == ScaffoldStrategy(1.0, 0.5)
    assert make_strategy(StrategySpec("FedDyn", {"alpha": 0.1}), 0.5) == FedDynStrategy(alpha=0.1, participation=0.5)
    swa = make_strategy(StrategySpec("FedSWA", {"start_round": 3, "cycle_length": 2}))
    assert isinstance(swa, SWA) and (swa.start_round, swa.cycle_length, swa.base) == (3, 2, FedAvg())
    with pytest.raises(SpecError, match="start_round"):
        StrategySpec("FedSWA")


def test_krum_with_too_few_clients_is_refused_by_the_spec() -> None:
    from fedland.spec import ExperimentSpec

    ratios = [[0.1] * 10] * 4
    with pytest.raises(SpecError) as caught:
        ExperimentSpec(
            target_balance_ratios=ratios, subset_fractions=[0.1] * 4, strategy=StrategySpec("Krum", {"num_malicious": 1})
        )
    assert caught.value.field == "strategy.params.num_malicious"
    assert "4" in caught.value.rule
    ExperimentSpec(target_balance_ratios=[[0.1] * 10] * 5, subset_fractions=[0.1] * 5, strategy=StrategySpec("Krum", {"num_malicious": 1}))


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("FedAvg", {"lr": 1.0}, "strategy.params.lr"),
        ("FedAvgM", {"server_momentum": 1.5}, "strategy.params.server_momentum"),
        ("FedAdam", {"eta": -1}, "strategy.params.eta"),
        ("FedYogi", {"beta_2": "high"}, "strategy.params.beta_2"),
        ("FedTrimmedAvg", {"beta": 0.5}, "strategy.params.beta"),
        ("Krum", {"num_selected": 1.5}, "strategy.params.num_selected"),
        ("Krum", {"num_malicious": True}, "strategy.params.num_malicious"),
    ],
)
def test_strategy_spec_names_the_bad_param(name: str, params: dict, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        StrategySpec(name, params)
    assert caught.value.field == field


# ---------------------------------------------------------------- BatchNorm statistics


def _bn_updates() -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    import torch

    from fedland.models import build_model
    from stack import wire

    model = build_model("ResNet20", seed=0)
    global_weights = wire.from_module(model)
    updates = []
    for index, (count, batches) in enumerate(((30, 7), (10, 4))):
        weights = {k: v.copy() for k, v in global_weights.items()}
        rng = np.random.default_rng(index)
        for name, value in weights.items():
            if name.endswith("running_var"):
                weights[name] = rng.uniform(1e-4, 1e-3, value.shape).astype(value.dtype)  # tiny variances
            elif name.endswith("num_batches_tracked"):
                weights[name] = np.asarray(batches, dtype=value.dtype)
            elif np.issubdtype(value.dtype, np.floating):
                weights[name] = value + rng.normal(0, 0.01, value.shape).astype(value.dtype)
        updates.append(ClientUpdate(weights, count))
    assert global_weights["bn1.num_batches_tracked"].dtype == np.int64
    assert torch.is_tensor(wire.to_state_dict(global_weights)["bn1.running_var"])
    return global_weights, updates


@pytest.mark.parametrize("name", ["FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"])
def test_batchnorm_statistics_get_the_weighted_mean(name: str) -> None:
    global_weights, updates = _bn_updates()
    new_global, state = make_strategy(StrategySpec(name)).aggregate(global_weights, updates, {})
    average = weighted_mean(updates)
    for key, value in new_global.items():
        assert value.dtype == global_weights[key].dtype and value.shape == global_weights[key].shape
        if key.endswith("running_var") or key.endswith("running_mean"):
            assert np.allclose(value, average[key].astype(value.dtype)), key
            assert key.endswith("running_mean") or (value > 0).all()
        if key.endswith("num_batches_tracked"):
            assert int(value) == round((30 * 7 + 10 * 4) / 40)  # 6.25 -> 6, still int64
    assert not [k for k in state if k.rsplit("/", 1)[-1].rsplit(".", 1)[-1] in ("running_var", "num_batches_tracked")]
    assert is_statistic("layers.0.bn1.running_mean", np.zeros(3, np.float32))
    assert not is_statistic("layers.0.bn1.weight", np.zeros(3, np.float32))


def test_running_mean_folds_updates_into_the_weighted_mean_in_o_model_memory() -> None:
    rng = np.random.default_rng(0)
    updates = [
        ClientUpdate({"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}, n)
        for n in (5, 17, 1, 300)
    ]
    running = RunningMean()
    for update in updates:
        running.add(update.weights, update.num_examples)
    assert (running.count, running.total_examples) == (4, 323)
    expected = weighted_mean(updates)
    for name, value in running.mean().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-12)
    # the averaging strategies give the same model from the mean as from the updates
    spec = StrategySpec("FedAdam")
    strategy = make_strategy(spec)
    global_weights = {name: np.zeros_like(value) for name, value in updates[0].weights.items()}
    from_updates = strategy.aggregate(global_weights, updates, {})
    from_mean = strategy.aggregate_mean(global_weights, running.mean(), {})
    for name in global_weights:
        np.testing.assert_array_equal(from_updates[0][name], from_mean[0][name])


# ---------------------------------------------------------------- the contract

ROBUST = {"FedMedian", "FedTrimmedAvg", "Krum"}


def test_each_class_is_named_as_in_the_spec() -> None:
    assert set(STRATEGIES) == set(STRATEGY_PARAMS)
    required: dict[str, dict[str, float]] = {"FedProx": {"mu": 0.0}, "FedSWA": {"start_round": 1}}
    # the server halves of SCAFFOLD and FedDyn: their client halves (fedland.algorithms) hold the plain names
    renamed = {"SCAFFOLD": "ScaffoldStrategy", "FedDyn": "FedDynStrategy"}
    for name, cls in STRATEGIES.items():
        assert cls.__name__ == renamed.get(name, name)
        assert type(make_strategy(StrategySpec(name, required.get(name, {})))) is cls


def test_only_the_robust_strategies_do_not_average() -> None:
    assert {name for name, cls in STRATEGIES.items() if not cls.averages} == ROBUST


def _random_round(seed: int) -> tuple[dict[str, np.ndarray], list[ClientUpdate], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 4), "b": (4,), "bn.running_var": (4,)}
    global_weights = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    global_weights["bn.num_batches_tracked"] = np.asarray(3, dtype=np.int64)
    updates = [
        ClientUpdate({name: (value + rng.normal(size=value.shape)).astype(value.dtype) for name, value in
                      global_weights.items()}, num_examples)
        for num_examples in (5, 17, 1, 300)
    ]
    # a second round's state: every optimiser's arrays (momentum, m, v) for the parameters
    state = {
        f"{kind}/{name}": np.abs(rng.normal(size=shapes[name]))
        for kind in ("momentum", "m", "v")
        for name in ("w", "b")
    }
    return global_weights, updates, state


# the server halves of the client algorithms: tests/fedland/test_algorithm_strategies.py
ALGORITHM_HALVES = {"SCAFFOLD", "FedDyn", "FedSWA"}


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - ROBUST - ALGORITHM_HALVES))
def test_an_averaging_strategy_gives_the_same_bits_from_the_mean_as_from_the_updates(name: str) -> None:
    strategy = make_strategy(StrategySpec(name, {"mu": 0.01} if name == "FedProx" else {}))
    global_weights, updates, state = _random_round(0)
    for round_state in ({}, state):
        from_updates = strategy.aggregate(global_weights, updates, round_state)
        from_mean = strategy.aggregate_mean(global_weights, weighted_mean(updates), round_state)
        for expected, got in zip(from_updates, from_mean):
            assert sorted(expected) == sorted(got)
            for key in expected:
                assert expected[key].dtype == got[key].dtype
                np.testing.assert_array_equal(expected[key], got[key], strict=True)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_a_robust_strategy_refuses_the_mean(name: str) -> None:
    global_weights, updates, _ = _random_round(1)
    strategy = make_strategy(StrategySpec(name))
    with pytest.raises(NotImplementedError, match=f"{name} needs every update of the round"):
        strategy.aggregate_mean(global_weights, weighted_mean(updates), {})
