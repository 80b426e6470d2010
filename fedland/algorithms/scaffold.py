"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 with control-variate option II): client and server halves.

Client ``i`` holds its control variate ``c_i`` (its state, ``control/<param>``),
the server holds ``c`` (the strategy state, ``control/<param>``, sent with each
round by `ScaffoldStrategy.round_payload`). Starting from the global ``x``, each
of the ``K`` local steps is

    y <- y - lr * (g_i(y) - c_i + c)

(through SGD with the spec's momentum; with momentum 0 exactly the paper's
step), then option II

    c_i+ = c_i - c + (x - y) / (K * lr)

and the client sends ``delta c_i = c_i+ - c_i`` as its message
(``control_delta/<param>``). The server (`ScaffoldStrategy`) sets

    x <- x + eta_g * mean(y_i - x)          c <- c + participation * mean(delta c_i)

where ``participation = |S| / N`` (members per round over the federation's
size), so ``c += (1/N) * sum(delta c_i)`` as in the paper. The means are
num_examples-weighted, as every averaging strategy here (the paper's are plain
means; the same when the members hold equal shares). BatchNorm statistics get
the plain weighted mean and no control variate.
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
    weighted_mean_with_messages,
)

__all__ = ["CONTROL", "CONTROL_DELTA", "Scaffold", "ScaffoldStrategy"]

CONTROL = "control/"  # prefix of a control variate (client state, server state and round payload)
CONTROL_DELTA = "control_delta/"  # prefix of the client's message: c_i+ - c_i


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD's client: local SGD on the gradient corrected by ``c - c_i``, then option II."""

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
        start = to_numpy(trainable(model))  # x
        client_control = arrays_or_zeros(state, CONTROL, trainable(model))  # c_i
        server_control = arrays_or_zeros(round_state, CONTROL, trainable(model))  # c
        correction = {name: server_control[name] - client_control[name] for name in start}  # c - c_i

        def prepare(copy: nn.Module) -> GradientStep:
            params = trainable(copy)
            shift = as_tensors(correction, params)

            def step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                loss = plain_gradient(net, inputs, targets)
                with torch.no_grad():
                    for name, p in params.items():
                        if p.grad is None:
                            p.grad = shift[name].clone()
                        else:
                            p.grad.add_(shift[name])
                return loss

            return step

        run = local_sgd(model, data, seed, hyper, prepare)
        end = to_numpy(trainable(run.model))  # y_i
        scale = 1.0 / (run.num_steps * hyper.learning_rate)  # 1 / (K * lr)
        new_control = {
            name: client_control[name] - server_control[name] + scale * (start[name] - end[name]) for name in start
        }
        return LocalResult(
            model=run.model,
            report=run.report,
            state={CONTROL + name: value for name, value in new_control.items()},
            message={CONTROL_DELTA + name: new_control[name] - client_control[name] for name in start},
        )


@dataclass(frozen=True)
class ScaffoldStrategy:
    """SCAFFOLD's server: ``x += eta_g * mean(y_i - x)``, ``c += participation * mean(delta c_i)``."""

    averages: ClassVar[bool] = True
    participation: float  # |S| / N: members per round over the federation's size
    server_learning_rate: float = 1.0  # eta_g

    def __post_init__(self) -> None:
        if not (math.isfinite(self.participation) and 0 < self.participation <= 1):
            raise ValueError(f"participation: must be in (0, 1], got {self.participation!r}")
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise ValueError(f"server_learning_rate: must be a finite number > 0, got {self.server_learning_rate!r}")

    def round_payload(self, state: Mapping[str, np.ndarray]) -> NamedArrays:
        """The server control variate ``c``, which every member of the round needs."""
        return {key: np.asarray(value) for key, value in state.items() if key.startswith(CONTROL)}

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        _check_updates(global_weights, updates)
        return self.aggregate_mean(global_weights, weighted_mean_with_messages(updates), state)

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global: NamedArrays = {}
        new_state: NamedArrays = {}
        for name, current in global_weights.items():
            if is_statistic(name, current):
                new_global[name] = mean[name]
                continue
            if CONTROL_DELTA + name not in mean:
                raise ValueError(f"mean: no {CONTROL_DELTA + name} (the members must train with Scaffold)")
            x = np.asarray(current, dtype=np.float64)
            new_global[name] = x + self.server_learning_rate * (np.asarray(mean[name], dtype=np.float64) - x)
            control = _state_or_zeros(state, CONTROL + name, x)
            new_state[CONTROL + name] = control + self.participation * np.asarray(mean[CONTROL_DELTA + name])
        return _cast_like(global_weights, new_global), new_state
