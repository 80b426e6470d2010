"""FedDyn (Acar et al. 2021, Algorithm 1): dynamic regularisation, client and server halves.

Client ``k`` keeps ``grad_k``, its gradient state (``grad/<param>``, zeros at
first), and from the server model ``theta`` minimises

    L_k(w) - <grad_k, w> + (alpha / 2) * ||w - theta||^2

by the spec's local SGD (each step's gradient: ``dL_k(w) - grad_k + alpha * (w - theta)``);
then ``grad_k <- grad_k - alpha * (w_k - theta)``. The server (`FedDynStrategy`)
keeps ``h`` (``h/<param>``, zeros at first):

    h <- h - alpha * participation * (mean(w_k) - theta)        theta <- mean(w_k) - h / alpha

with ``participation = |P| / m`` (members per round over the federation's size),
so ``h -= (alpha / m) * sum_k (w_k - theta)`` as in the paper. The mean is
num_examples-weighted (the paper's plain mean when shares are equal); BatchNorm
statistics get the plain weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedland.algorithms.contract import (
    GradientStep,
    LocalHyperparameters,
    LocalResult,
    MemberData,
    arrays_or_zeros,
    as_tensors,
    local_sgd,
    plain_gradient,
    to_numpy,
    trainable,
)
from fedland.strategies import (
    ClientUpdate,
    NamedArrays,
    _cast_like,
    _check_updates,
    _state_or_zeros,
    is_statistic,
    weighted_mean,
)

__all__ = ["GRADIENT", "FedDyn", "FedDynStrategy"]

GRADIENT = "grad/"  # prefix of the client's gradient state
SERVER_H = "h/"  # prefix of the server's h


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: must be a finite number > 0, got {alpha!r}")


@dataclass(frozen=True)
class FedDyn:
    """FedDyn's client: local SGD on the dynamically regularised objective, then the gradient-state update."""

    alpha: float

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def train(
        self,
        model: nn.Module,
        data: MemberData,
        *,
        seed: int,
        hyper: LocalHyperparameters,
        state: Mapping[str, np.ndarray],
        round_state: Mapping[str, np.ndarray],
    ) -> LocalResult:
        anchor = to_numpy(trainable(model))  # theta
        gradient_state = arrays_or_zeros(state, GRADIENT, trainable(model))  # grad_k

        def prepare(copy: nn.Module) -> GradientStep:
            params = trainable(copy)
            theta = as_tensors(anchor, params)
            linear = as_tensors(gradient_state, params)

            def step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                loss = plain_gradient(net, inputs, targets)
                with torch.no_grad():
                    for name, p in params.items():
                        extra = self.alpha * (p - theta[name]) - linear[name]
                        if p.grad is None:
                            p.grad = extra
                        else:
                            p.grad.add_(extra)
                return loss

            return step

        run = local_sgd(model, data, seed, hyper, prepare)
        end = to_numpy(trainable(run.model))
        new_state = {
            GRADIENT + name: gradient_state[name] - self.alpha * (end[name] - anchor[name]) for name in anchor
        }
        return LocalResult(model=run.model, report=run.report, state=new_state)


@dataclass(frozen=True)
class FedDynStrategy:
    """FedDyn's server: ``h -= alpha * participation * (mean - theta)``, ``theta = mean - h / alpha``."""

    averages: ClassVar[bool] = True
    alpha: float
    participation: float  # |P| / m: members per round over the federation's size

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if not (math.isfinite(self.participation) and 0 < self.participation <= 1):
            raise ValueError(f"participation: must be in (0, 1], got {self.participation!r}")

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        _check_updates(global_weights, updates)
        return self.aggregate_mean(global_weights, weighted_mean(updates), state)

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global: NamedArrays = {}
        new_state: NamedArrays = {}
        for name, current in global_weights.items():
            if is_statistic(name, current):
                new_global[name] = mean[name]
                continue
            theta = np.asarray(current, dtype=np.float64)
            average = np.asarray(mean[name], dtype=np.float64)
            h = _state_or_zeros(state, SERVER_H + name, theta) - self.alpha * self.participation * (average - theta)
            new_state[SERVER_H + name] = h
            new_global[name] = average - h / self.alpha
        return _cast_like(global_weights, new_global), new_state
