"""The server halves: SCAFFOLD's and FedDyn's strategies and SWA, against hand-computed numbers, and SCAFFOLD's
client and server together over rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedland.algorithms import (
    SWA,
    FedDynStrategy,
    LocalHyperparameters,
    MemberData,
    Scaffold,
    ScaffoldStrategy,
    cyclical_learning_rate,
    is_averaged_round,
    round_payload,
    swa_weights,
)
from fedland.strategies import ClientUpdate, FedAvg, FedAvgM, FedMedian, RunningMean, weighted_mean_with_messages

torch.set_num_threads(1)

GLOBAL = {"w": np.array([1.0, 2.0], dtype=np.float32), "bn.running_mean": np.array([0.0], dtype=np.float32)}
UPDATES = [
    ClientUpdate({"w": np.array([2.0, 0.0]), "bn.running_mean": np.array([1.0])}, 1,
                 message={"control_delta/w": np.array([0.3, -0.3])}),
    ClientUpdate({"w": np.array([5.0, 3.0]), "bn.running_mean": np.array([4.0])}, 3,
                 message={"control_delta/w": np.array([-0.1, 0.5])}),
]
# num_examples-weighted means (1/4, 3/4)
MEAN_W = np.array([0.25 * 2 + 0.75 * 5, 0.25 * 0 + 0.75 * 3])  # [4.25, 2.25]
MEAN_DELTA = np.array([0.25 * 0.3 + 0.75 * -0.1, 0.25 * -0.3 + 0.75 * 0.5])  # [0.0, 0.3]


def running_mean(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """What the server folds as updates arrive: the weights and the message under one running mean."""
    folded = RunningMean()
    for update in updates:
        folded.add({**update.weights, **update.message}, update.num_examples)
    return folded.mean()


def test_scaffold_strategy_moves_the_model_and_the_server_control_variate() -> None:
    strategy = ScaffoldStrategy(participation=0.5, server_learning_rate=0.8)
    state = {"control/w": np.array([0.1, 0.2])}
    new_global, new_state = strategy.aggregate(GLOBAL, UPDATES, state)
    np.testing.assert_allclose(new_global["w"], [1 + 0.8 * (4.25 - 1), 2 + 0.8 * (2.25 - 2)], rtol=1e-6)
    assert new_global["w"].dtype == np.float32
    np.testing.assert_allclose(new_global["bn.running_mean"], [0.25 * 1 + 0.75 * 4])  # statistics: the mean
    np.testing.assert_allclose(new_state["control/w"], [0.1 + 0.5 * 0.0, 0.2 + 0.5 * 0.3], rtol=0, atol=1e-12)
    assert set(new_state) == {"control/w"}  # no control variate for a statistic
    from_mean = strategy.aggregate_mean(GLOBAL, running_mean(UPDATES), state)
    np.testing.assert_allclose(from_mean[0]["w"], new_global["w"])
    np.testing.assert_allclose(from_mean[1]["control/w"], new_state["control/w"], rtol=0, atol=1e-12)
    assert round_payload(strategy, new_state).keys() == {"control/w"}
    assert round_payload(FedAvg(), {}) == {}
    with pytest.raises(ValueError, match="^mean: no control_delta/w"):
        strategy.aggregate(GLOBAL, [ClientUpdate(UPDATES[0].weights, 1)], state)
    with pytest.raises(ValueError, match="^participation"):
        ScaffoldStrategy(participation=1.5)


def test_messages_average_with_the_weights_and_never_shadow_them() -> None:
    mean = weighted_mean_with_messages(UPDATES)
    np.testing.assert_allclose(mean["w"], MEAN_W)
    np.testing.assert_allclose(mean["control_delta/w"], MEAN_DELTA, atol=1e-12)
    with pytest.raises(ValueError, match="messages' keys differ"):
        weighted_mean_with_messages([UPDATES[0], ClientUpdate(UPDATES[1].weights, 3)])
    with pytest.raises(ValueError, match="also a weight key"):
        weighted_mean_with_messages([ClientUpdate(GLOBAL, 1, message={"w": np.zeros(2)})])


def test_feddyn_strategy_updates_h_then_corrects_the_mean() -> None:
    alpha, participation = 0.1, 0.5
    h = np.array([0.02, -0.04])
    new_global, new_state = FedDynStrategy(alpha=alpha, participation=participation).aggregate(
        GLOBAL, UPDATES, {"h/w": h}
    )
    expected_h = h - alpha * participation * (MEAN_W - np.array([1.0, 2.0]))
    np.testing.assert_allclose(new_state["h/w"], expected_h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new_global["w"], MEAN_W - expected_h / alpha, rtol=1e-6)
    np.testing.assert_allclose(new_global["bn.running_mean"], [3.25])
    first_global, _ = FedDynStrategy(alpha=alpha, participation=1.0).aggregate(GLOBAL, UPDATES, {})
    # from h = 0 with everyone taking part: theta = mean + (mean - theta_0)
    np.testing.assert_allclose(first_global["w"], 2 * MEAN_W - np.array([1.0, 2.0]), rtol=1e-6)


def test_swa_averages_the_global_model_at_the_end_of_each_cycle_from_the_start_round() -> None:
    means = [{"w": np.array([float(r), -float(r)])} for r in range(1, 6)]  # FedAvg's global in round r: [r, -r]
    strategy = SWA(base=FedAvg(), start_round=2, cycle_length=2)
    current: dict[str, np.ndarray] = {"w": np.zeros(2)}
    state: dict[str, np.ndarray] = {}
    seen: list[dict[str, np.ndarray] | None] = []
    for mean in means:
        current, state = strategy.aggregate_mean(current, mean, state)
        seen.append(swa_weights(state, current))
    np.testing.assert_allclose(current["w"], [5.0, -5.0])  # training follows the wrapped strategy
    assert seen[0] is None and seen[1] is None  # rounds 1, 2: nothing averaged yet
    averaged = [None if weights is None else weights["w"].tolist() for weights in seen]
    # round 3 ends the first cycle; round 5 the second: the mean of rounds 3 and 5
    assert averaged == [None, None, [3.0, -3.0], [3.0, -3.0], [4.0, -4.0]]
    assert int(state["swa/round"]) == 5 and int(state["swa/count"]) == 2
    assert [is_averaged_round(r, 2, 2) for r in range(1, 6)] == [False, False, True, False, True]


def test_swa_keeps_the_wrapped_strategy_state_and_payload() -> None:
    base = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    wrapped = SWA(base=base, start_round=1)
    plain_global, plain_state = base.aggregate(GLOBAL, UPDATES, {})
    swa_global, swa_state = wrapped.aggregate(GLOBAL, UPDATES, {})
    np.testing.assert_array_equal(swa_global["w"], plain_global["w"])
    np.testing.assert_array_equal(swa_state["base/momentum/w"], plain_state["momentum/w"])
    again_plain, _ = base.aggregate(plain_global, UPDATES, plain_state)
    again_swa, _ = wrapped.aggregate(swa_global, UPDATES, swa_state)  # the base resumes from its own state
    np.testing.assert_array_equal(again_swa["w"], again_plain["w"])
    scaffold = SWA(base=ScaffoldStrategy(participation=1.0), start_round=1)
    assert round_payload(scaffold, {"base/control/w": np.ones(2)}).keys() == {"control/w"}
    with pytest.raises(ValueError, match="^base: SWA wraps an averaging strategy"):
        SWA(base=FedMedian(), start_round=1)


def test_cyclical_learning_rate_falls_linearly_within_each_cycle() -> None:
    rates = [cyclical_learning_rate(r, start_round=3, cycle_length=3, lr_max=0.1, lr_min=0.01) for r in range(1, 9)]
    expected = [0.1, 0.1, 0.07, 0.04, 0.01, 0.07, 0.04, 0.01]
    np.testing.assert_allclose(rates, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="^lr_min"):
        cyclical_learning_rate(1, 1, 1, lr_max=0.01, lr_min=0.1)


def test_scaffold_client_and_server_keep_c_the_mean_of_the_client_control_variates() -> None:
    """With everyone taking part and equal shares, the paper's invariant c = mean(c_i) holds round after round."""
    generator = torch.Generator().manual_seed(0)
    members = [MemberData(torch.randn(6, 3, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2] * 2))
               for _ in range(2)]
    model = nn.Linear(3, 3).double()
    strategy = ScaffoldStrategy(participation=1.0)
    settings = LocalHyperparameters(epochs=1, batch_size=2, learning_rate=0.1)
    server_state: dict[str, np.ndarray] = {}
    client_states: list[dict[str, np.ndarray]] = [{}, {}]
    weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for server_round in range(3):
        updates = []
        for index, data in enumerate(members):
            result = Scaffold().train(model, data, seed=server_round * 10 + index, hyper=settings,
                                      state=client_states[index], round_state=round_payload(strategy, server_state))
            client_states[index] = result.state
            updates.append(ClientUpdate({k: v.numpy() for k, v in result.model.state_dict().items()}, 6,
                                        message=result.message))
        weights, server_state = strategy.aggregate(weights, updates, server_state)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        for name in ("weight", "bias"):
            np.testing.assert_allclose(
                server_state[f"control/{name}"],
                (client_states[0][f"control/{name}"] + client_states[1][f"control/{name}"]) / 2,
                rtol=0, atol=1e-12,
            )
    assert np.abs(server_state["control/weight"]).max() > 1e-3  # the variates moved
