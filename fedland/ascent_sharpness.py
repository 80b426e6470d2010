"""Adaptive (ASAM) and multi-step worst-case sharpness of the dataset-mean loss.

Both maximise ``L(theta + eps)`` over a ball of radius ``rho`` and report the
loss increase. With ``T = diag(|theta| + eta)`` (adaptive) or ``T = I`` (plain),
the ball is ``||T^{-1} eps||_2 <= rho``: writing ``eps = T delta``, the search is
over ``||delta|| <= rho`` by projected normalised gradient ascent,

    delta_0 = 0,  delta_{t+1} = Proj_rho(delta_t + (2 rho / steps) * u_t),
    u_t = T g_t / ||T g_t||,  g_t = grad L(theta + T delta_t),

and the result is ``max_{t=1..steps} L(theta + T delta_t) - L(theta)``. One step
is exactly SAM's (Foret et al. 2021) or ASAM's (Kwon et al. 2021, eq. 10:
``eps = rho T^2 g / ||T g||``) ascent; more steps approach the worst case in the
ball (the multi-step sharpness of Foret et al. 2021, sec. 3/App. C, and
Andriushchenko & Flammarion 2022). FedASAM (Caldarola et al. 2022) uses ASAM's
ball for clients. ``T`` covers every trainable parameter (ASAM's reference code
leaves 1-D tensors with ``T = 1``; here biases are scaled too, so the measure is
invariant to every per-coordinate rescaling of the parameters up to ``eta``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fedland._objective import (
    DEFAULT_CHUNK_SIZE,
    Batch,
    LossFn,
    NonFiniteLossError,
    Objective,
    check_int,
    check_real,
    preserved,
)


def _ascent(objective: Objective, rho: float, steps: int, scale: torch.Tensor) -> float:
    """``max_t L(theta + T delta_t) - L(theta)`` of the projected normalised ascent above."""
    theta = objective.theta
    base, grad = objective.gradient(theta)
    delta = torch.zeros_like(theta)
    best = -math.inf
    for t in range(steps):
        direction = scale * grad
        norm = float(direction.norm())
        if norm == 0.0:
            break
        if not math.isfinite(norm):  # the loss overflowed on the way: no direction to follow beyond it
            break
        delta = delta + (2.0 * rho / steps) * direction / norm
        length = float(delta.norm())
        if length > rho:
            delta = delta * (rho / length)
        point = theta + scale * delta
        if t == steps - 1:
            loss, _ = objective.evaluate(point)
        else:
            loss, grad = _gradient_anywhere(objective, point)
        if math.isnan(loss):  # max() would pass over it and report a smaller rise
            raise NonFiniteLossError(
                f"loss: is NaN at ascent step {t + 1} inside the ball (radius {rho:g}); the sharpness is undefined"
            )
        best = max(best, loss)
        if best == math.inf:  # the loss overflowed inside the ball: the rise is unbounded
            break
    return 0.0 if best == -math.inf else best - base


def _gradient_anywhere(objective: Objective, point: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Loss and gradient away from the model: not-finite values there are results, not errors."""
    leaf = point.detach().clone().requires_grad_(True)
    loss, grad = 0.0, torch.zeros_like(leaf)
    with torch.enable_grad():
        for group in objective.groups:
            g_loss, _ = objective.group_loss(leaf, group)
            (g,) = torch.autograd.grad(g_loss, leaf)
            loss += float(g_loss.detach())
            grad += g
    return loss, grad


def _check(rho: float, steps: int, eta: float) -> None:
    check_real(rho, "rho")
    check_int(steps, "steps")
    check_real(eta, "eta", inclusive=True)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    rho: float = 0.5,
    eta: float = 0.01,
    steps: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """ASAM adaptive sharpness (Kwon et al. 2021): the loss increase over ``||eps / (|theta| + eta)||_2 <= rho``.

    Args:
        rho: radius in the scale-invariant coordinates (ASAM's default 0.5 for CIFAR).
        eta: added to ``|theta|`` so that zero weights can still move.
        steps: ascent steps (1: ASAM's one-step ascent; more: the worst case in the ball).
        chunk_size: samples per forward call.
    """
    _check(rho, steps, eta)
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        return _ascent(objective, rho, steps, objective.theta.abs() + eta)


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    rho: float = 0.05,
    steps: int = 5,
    adaptive: bool = False,
    eta: float = 0.01,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Multi-step worst-case sharpness: ``max_{||T^-1 eps|| <= rho} L(theta + eps) - L(theta)`` by projected ascent.

    A lower bound on the true maximum that rises with ``steps`` (``steps=1``
    with ``adaptive=False`` is ``scalars.sharpness``).

    Args:
        rho: ball radius (parameter units; scale-invariant units when ``adaptive``).
        steps: ascent steps of length ``2 rho / steps``, projected onto the ball.
        adaptive: use ASAM's ball ``T = diag(|theta| + eta)``.
        chunk_size: samples per forward call.
    """
    _check(rho, steps, eta)
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        scale = objective.theta.abs() + eta if adaptive else torch.ones_like(objective.theta)
        return _ascent(objective, rho, steps, scale)
