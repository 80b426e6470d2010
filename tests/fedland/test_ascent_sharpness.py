"""ASAM and multi-step worst-case sharpness against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedland.ascent_sharpness import adaptive_sharpness, worst_case_sharpness
from fedland.scalars import sharpness
from tests.fedland._landscape_helpers import (
    _flat_function,
    assert_unchanged,
    make_data,
    messy_state,
    quadratic,
    snapshot,
    tiny_cnn,
    tiny_mlp,
)

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()


def _reference(model: nn.Module, data: list, rho: float, steps: int, adaptive: bool, eta: float = 0.01) -> float:
    """The projected normalised ascent written out on a flat float64 function."""
    call, theta = _flat_function(model)
    total = sum(len(y) for _, y in data)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return sum(LOSS(call(flat, x), y) * len(y) for x, y in data) / total

    t = theta.abs() + eta if adaptive else torch.ones_like(theta)
    delta, values = torch.zeros_like(theta), []
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(loss, theta + t * delta)
        delta = delta + 2 * rho / steps * (t * g) / (t * g).norm()
        delta = delta * min(1.0, rho / float(delta.norm()))
        values.append(float(loss(theta + t * delta)))
    return max(values) - float(loss(theta))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_asam_one_step_matches_its_formula(name: str) -> None:
    model, data = (tiny_mlp(), make_data((4,), [7, 9])) if name == "mlp" else (tiny_cnn(), make_data((1, 6, 6), [9, 6]))
    call, theta = _flat_function(model)
    total = sum(len(y) for _, y in data)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return sum(LOSS(call(flat, x), y) * len(y) for x, y in data) / total

    g = torch.autograd.functional.jacobian(loss, theta)
    t = theta.abs() + 0.01
    eps = 0.5 * t**2 * g / (t * g).norm()  # Kwon et al. 2021, eq. 10
    expected = float(loss(theta + eps) - loss(theta))
    assert adaptive_sharpness(model, LOSS, data, rho=0.5) == pytest.approx(expected, rel=1e-10)
    assert worst_case_sharpness(model, LOSS, data, rho=0.5, steps=1, adaptive=True) == pytest.approx(expected, rel=1e-10)


def test_one_plain_step_is_sam_sharpness() -> None:
    model, data = tiny_mlp(), make_data((4,), [7, 9])
    assert worst_case_sharpness(model, LOSS, data, rho=0.1, steps=1) == pytest.approx(
        sharpness(model, LOSS, data, rho=0.1), rel=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_multi_step_matches_the_dense_reference(adaptive: bool) -> None:
    model, data = tiny_cnn(), make_data((1, 6, 6), [9, 6])
    got = worst_case_sharpness(model, LOSS, data, rho=0.2, steps=4, adaptive=adaptive)
    assert got == pytest.approx(_reference(model, data, 0.2, 4, adaptive), rel=1e-9)


def test_many_steps_reach_the_worst_case_of_a_quadratic() -> None:
    """On ``0.5 theta^T A theta`` the maximum over the ball is known: ``eps = (mu I - A)^-1 g`` on the sphere."""
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    model, loss_fn, data, a = quadratic(spectrum, seed=3)
    theta = model.theta.detach().clone()
    g, rho = a @ theta, 0.3
    lo, hi = float(spectrum.max()) + 1e-12, float(spectrum.max()) + 10 * float(g.norm()) / rho + 10
    for _ in range(200):  # bisection on ||(mu I - A)^-1 g|| = rho
        mu = 0.5 * (lo + hi)
        eps = torch.linalg.solve(mu * torch.eye(5, dtype=torch.float64) - a, g)
        lo, hi = (mu, hi) if float(eps.norm()) > rho else (lo, mu)
    best = float(g @ eps + 0.5 * eps @ a @ eps)
    one = worst_case_sharpness(model, loss_fn, data, rho=rho, steps=1)
    many = worst_case_sharpness(model, loss_fn, data, rho=rho, steps=200)
    assert one < best and many == pytest.approx(best, rel=1e-3)


def test_model_untouched_and_arguments_checked() -> None:
    model = messy_state(tiny_cnn())
    data = make_data((1, 6, 6), [5])
    before = snapshot(model)
    adaptive_sharpness(model, LOSS, data, steps=3)
    worst_case_sharpness(model, LOSS, data, adaptive=True)
    assert_unchanged(model, before)
    for kwargs, field in (({"rho": 0}, "rho"), ({"steps": 0}, "steps"), ({"eta": -1.0}, "eta")):
        with pytest.raises(ValueError, match=field):
            worst_case_sharpness(model, LOSS, data, **kwargs)
    assert np.isfinite(adaptive_sharpness(model, LOSS, data))
