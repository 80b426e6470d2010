"""Client algorithms through their contract: SGD is train_local bit for bit; SCAFFOLD, FedDyn, FedSAM and
FedASAM take the steps computed by hand (numpy) on a two-class linear model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from fedland.algorithms import (
    CLIENT_ALGORITHMS,
    SGD,
    ClientAlgorithm,
    FedASAM,
    FedDyn,
    FedSAM,
    LocalHyperparameters,
    LocalResult,
    MemberData,
    Scaffold,
)
from fedland.models import build_model
from fedland.training import train_local

torch.set_num_threads(1)

X = np.array([[1.0, 2.0]])  # one example, two features
Y = np.array([0])
W0 = np.array([[0.1, -0.2], [0.3, 0.05]])  # (classes, features)
B0 = np.array([0.01, -0.02])
LR = 0.1


def linear_model() -> nn.Linear:
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W0))
        model.bias.copy_(torch.from_numpy(B0))
    return model


def member() -> MemberData:
    return MemberData(torch.from_numpy(X), torch.from_numpy(Y))


def hyper(epochs: int) -> LocalHyperparameters:
    return LocalHyperparameters(epochs=epochs, batch_size=1, learning_rate=LR, momentum=0.0)


def cross_entropy_gradient(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/d(w, b) of the mean cross-entropy of softmax(x w^T + b) on (X, Y), by hand."""
    logits = X @ w.T + b  # (batch, classes)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(Y)), Y] -= 1.0  # softmax - one-hot
    return p.T @ X / len(Y), p.mean(axis=0)


def weights_of(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    linear = cast(nn.Linear, model)
    return linear.weight.detach().numpy().copy(), linear.bias.detach().numpy().copy()


def train(algorithm: ClientAlgorithm, epochs: int, state: dict[str, np.ndarray] | None = None,
          round_state: dict[str, np.ndarray] | None = None) -> LocalResult:
    given = linear_model()
    before = {k: v.clone() for k, v in given.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    result = algorithm.train(given, member(), seed=3, hyper=hyper(epochs), state=state or {},
                             round_state=round_state or {})
    assert all(torch.equal(before[k], v) for k, v in given.state_dict().items())  # the given model is untouched
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG too
    return result


def test_every_built_in_follows_the_contract() -> None:
    assert set(CLIENT_ALGORITHMS) == {"SGD", "SCAFFOLD", "FedDyn", "FedSAM", "FedASAM"}
    for cls in CLIENT_ALGORITHMS.values():
        assert isinstance(cls(**({"alpha": 0.1} if cls is FedDyn else {})), ClientAlgorithm)


def test_sgd_is_train_local_bit_for_bit_fedprox_term_included() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28, generator=generator), torch.randint(0, 10, (40,), generator=generator)
    model = build_model("FedNet", seed=1)
    settings = LocalHyperparameters(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9)
    for prox_mu in (0.0, 0.3):
        expected, report = train_local(model, x, y, epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9,
                                       seed=7, prox_mu=prox_mu)
        result = SGD(prox_mu=prox_mu).train(model, MemberData(x, y), seed=7, hyper=settings, state={}, round_state={})
        assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), result.model.state_dict().values()))
        assert result.report.epoch_losses == report.epoch_losses and result.report.num_examples == 40
        assert result.state == {} and result.message == {}
    # The shared loop with nothing added (SCAFFOLD with zero control variates) is train_local too.
    expected, report = train_local(model, x, y, epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9, seed=7)
    result = Scaffold().train(model, MemberData(x, y), seed=7, hyper=settings, state={}, round_state={})
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), result.model.state_dict().values()))
    assert result.report.epoch_losses == report.epoch_losses


def test_scaffold_takes_corrected_steps_and_updates_its_control_variate_by_option_two() -> None:
    c_w, c_b = np.array([[0.2, -0.1], [0.0, 0.3]]), np.array([0.05, -0.05])  # server c
    ci_w, ci_b = np.array([[-0.1, 0.1], [0.2, 0.0]]), np.array([0.0, 0.1])  # client c_i
    w, b = W0.copy(), B0.copy()
    for _ in range(2):  # K = 2 steps: y <- y - lr (g(y) - c_i + c)
        g_w, g_b = cross_entropy_gradient(w, b)
        w, b = w - LR * (g_w - ci_w + c_w), b - LR * (g_b - ci_b + c_b)
    new_ci_w = ci_w - c_w + (W0 - w) / (2 * LR)
    new_ci_b = ci_b - c_b + (B0 - b) / (2 * LR)

    result = train(Scaffold(), epochs=2, state={"control/weight": ci_w, "control/bias": ci_b},
                   round_state={"control/weight": c_w, "control/bias": c_b})
    got_w, got_b = weights_of(result.model)
    np.testing.assert_allclose(got_w, w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_b, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.state["control/weight"], new_ci_w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.state["control/bias"], new_ci_b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.message["control_delta/weight"], new_ci_w - ci_w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.message["control_delta/bias"], new_ci_b - ci_b, rtol=0, atol=1e-10)
    assert set(result.state) == {"control/weight", "control/bias"}
    with pytest.raises(ValueError, match=r"^control/weight: has shape \(3,\)"):
        train(Scaffold(), epochs=1, state={"control/weight": np.zeros(3)})


def test_feddyn_steps_on_its_regularised_objective_and_updates_its_gradient_state() -> None:
    alpha = 0.5
    gs_w, gs_b = np.array([[0.3, -0.2], [0.1, 0.4]]), np.array([-0.1, 0.2])  # grad_k from the last round
    w, b = W0.copy(), B0.copy()
    for _ in range(2):  # gradient of L(w) - <grad_k, w> + alpha/2 ||w - theta||^2
        g_w, g_b = cross_entropy_gradient(w, b)
        w, b = w - LR * (g_w - gs_w + alpha * (w - W0)), b - LR * (g_b - gs_b + alpha * (b - B0))
    result = train(FedDyn(alpha=alpha), epochs=2, state={"grad/weight": gs_w, "grad/bias": gs_b})
    got_w, got_b = weights_of(result.model)
    np.testing.assert_allclose(got_w, w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_b, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.state["grad/weight"], gs_w - alpha * (w - W0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.state["grad/bias"], gs_b - alpha * (b - B0), rtol=0, atol=1e-12)
    assert result.message == {}
    first = train(FedDyn(alpha=alpha), epochs=1)  # empty state: grad_k = 0, and after one step -alpha (w - theta)
    g_w, _ = cross_entropy_gradient(W0, B0)
    np.testing.assert_allclose(first.state["grad/weight"], -alpha * (-LR * g_w), rtol=0, atol=1e-12)


def ascended(scale: Callable[[np.ndarray], np.ndarray | None], rho: float) -> tuple[np.ndarray, np.ndarray]:
    """One SAM/ASAM step by hand: the gradient at w + e applied at w."""
    g_w, g_b = cross_entropy_gradient(W0, B0)
    t_w, t_b = scale(W0), None  # biases are never rescaled
    tg_w = g_w if t_w is None else t_w * g_w
    norm = np.sqrt((tg_w**2).sum() + (g_b**2).sum()) + 1e-12
    e_w = rho * (g_w if t_w is None else t_w**2 * g_w) / norm
    e_b = rho * g_b / norm
    assert t_b is None
    a_w, a_b = cross_entropy_gradient(W0 + e_w, B0 + e_b)
    return W0 - LR * a_w, B0 - LR * a_b


def test_fedsam_applies_the_gradient_at_the_ascended_point() -> None:
    expected_w, expected_b = ascended(lambda w: None, rho=0.3)
    got_w, got_b = weights_of(train(FedSAM(rho=0.3), epochs=1).model)
    np.testing.assert_allclose(got_w, expected_w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_b, expected_b, rtol=0, atol=1e-12)
    plain_w, _ = weights_of(train(SGD(), epochs=1).model)
    assert np.abs(plain_w - expected_w).max() > 1e-4  # the ascent matters at this rho
    zero_w, _ = weights_of(train(FedSAM(rho=0.0), epochs=1).model)
    np.testing.assert_allclose(zero_w, plain_w, rtol=0, atol=1e-15)  # rho = 0 is plain SGD


def test_fedasam_scales_the_ascent_elementwise_by_weight_magnitude() -> None:
    eta = 0.01
    expected_w, expected_b = ascended(lambda w: np.abs(w) + eta, rho=0.5)
    got_w, got_b = weights_of(train(FedASAM(rho=0.5, eta=eta), epochs=1).model)
    np.testing.assert_allclose(got_w, expected_w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_b, expected_b, rtol=0, atol=1e-12)
    sam_w, _ = weights_of(train(FedSAM(rho=0.5), epochs=1).model)
    assert np.abs(sam_w - expected_w).max() > 1e-4


def test_sharpness_aware_steps_leave_batchnorm_statistics_to_the_first_pass() -> None:
    norm = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Linear(2, 3), norm, nn.Linear(3, 2)).double()
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    settings = LocalHyperparameters(epochs=1, batch_size=3, learning_rate=LR)
    sam = FedSAM(rho=0.2).train(net, MemberData(x, y), seed=0, hyper=settings, state={}, round_state={})
    once = copy.deepcopy(net).train()
    with torch.no_grad():
        once(x)  # one forward pass at the starting weights: the statistics SAM must keep
    trained, expected = dict(sam.model.named_buffers()), dict(once.named_buffers())
    assert trained.keys() == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for key in trained:  # to rounding: a reduction's order may differ between two passes on 2 threads
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-12, atol=1e-15)
    assert int(trained["1.num_batches_tracked"]) == 1 and not torch.equal(cast(torch.Tensor, norm.running_mean), expected["1.running_mean"])


@pytest.mark.parametrize(("make", "field"), [
    (lambda: FedSAM(rho=-0.1), "rho"), (lambda: FedASAM(eta=-1.0), "eta"), (lambda: FedDyn(alpha=0.0), "alpha"),
    (lambda: SGD(prox_mu=float("nan")), "prox_mu"),
    (lambda: LocalHyperparameters(epochs=0, batch_size=1, learning_rate=0.1), "epochs"),
    (lambda: LocalHyperparameters(epochs=1, batch_size=1, learning_rate=0.1, momentum=1.0), "momentum"),
    (lambda: MemberData(torch.zeros(2, 1), torch.zeros(3, dtype=torch.long)), "y"),
])
def test_bad_parameters_are_refused_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("algorithm", [SGD(prox_mu=0.1), Scaffold(), FedDyn(alpha=0.1), FedSAM(rho=0.1),
                                       FedASAM(rho=0.3)], ids=lambda a: type(a).__name__)
def test_algorithms_train_on_the_accelerator_as_on_the_cpu(algorithm: ClientAlgorithm) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 28, 28, generator=generator), torch.randint(0, 10, (24,), generator=generator)
    model = build_model("FedNet", seed=1)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state = {f"{prefix}{name}": np.full(shape, 0.01) for name, shape in shapes.items() for prefix in ("control/", "grad/")}
    round_state = {f"control/{name}": np.full(shape, -0.02) for name, shape in shapes.items()}
    results = {}
    for device in ("cpu", "cuda"):
        settings = LocalHyperparameters(epochs=2, batch_size=8, learning_rate=0.05, momentum=0.5, device=device)
        results[device] = algorithm.train(model, MemberData(x, y), seed=5, hyper=settings, state=state,
                                          round_state=round_state)
    cpu, cuda = results["cpu"], results["cuda"]
    assert next(cuda.model.parameters()).device.type == "cuda"
    for key, value in cpu.model.state_dict().items():
        torch.testing.assert_close(cuda.model.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-5)
    assert cpu.state.keys() == cuda.state.keys() and cpu.message.keys() == cuda.message.keys()
    for key in cpu.state:
        np.testing.assert_allclose(cuda.state[key], cpu.state[key], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cuda.report.epoch_losses, cpu.report.epoch_losses, rtol=1e-4)
