"""Aggregation strategies: pure functions of (global weights, client updates, server state).

Every strategy has the same interface::

    new_global, new_state = strategy.aggregate(global_weights, updates, state)

`state` holds the server optimiser's arrays (momentum, Adam moments) by name so
that it can be stored next to the global model and a restarted server resumes
exactly; stateless strategies return an empty state. Inputs are never mutated.
Arithmetic is float64; results are cast back to each key's dtype (integer
buffers are rounded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedland.spec import StrategySpec

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained weights and the number of examples it trained on."""

    weights: Mapping[str, np.ndarray]
    num_examples: int


class Strategy(Protocol):
    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]: ...


# ---------------------------------------------------------------- pure helpers


def _check_updates(global_weights: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise ValueError("updates: at least one client update is needed")
    for position, update in enumerate(updates):
        if update.num_examples <= 0:
            raise ValueError(f"updates[{position}].num_examples must be > 0, got {update.num_examples}")
        if set(update.weights) != set(global_weights):
            raise ValueError(f"updates[{position}].weights: keys differ from the global model")


def _cast_like(reference: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> Weights:
    out: Weights = {}
    for name, like in reference.items():
        value = values[name]
        if not np.issubdtype(like.dtype, np.inexact):
            value = np.rint(value)
        out[name] = np.asarray(value).astype(like.dtype).reshape(like.shape)
    return out


def weighted_mean(updates: Sequence[ClientUpdate]) -> Weights:
    """Per-key mean of the updates weighted by num_examples (float64)."""
    total = float(sum(update.num_examples for update in updates))
    names = list(updates[0].weights)
    return {
        name: sum(
            (update.num_examples / total) * np.asarray(update.weights[name], dtype=np.float64)
            for update in updates
        )
        for name in names
    }


def _stack(updates: Sequence[ClientUpdate], name: str) -> np.ndarray:
    # (clients, *shape)
    return np.stack([np.asarray(update.weights[name], dtype=np.float64) for update in updates])


def _flat(weights: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[name], dtype=np.float64).ravel() for name in names])


def _state_or_zeros(state: Mapping[str, np.ndarray], key: str, like: np.ndarray) -> np.ndarray:
    if key in state:
        return np.asarray(state[key], dtype=np.float64).reshape(like.shape)
    return np.zeros(like.shape, dtype=np.float64)


# ---------------------------------------------------------------- strategies


@dataclass(frozen=True)
class FedAvg:
    """McMahan et al. 2017: mean of the client weights weighted by num_examples."""

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        return _cast_like(global_weights, weighted_mean(updates)), {}


@dataclass(frozen=True)
class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; `mu` is the clients' proximal term."""

    mu: float


@dataclass(frozen=True)
class FedAvgM:
    """Hsu et al. 2019: server momentum on the pseudo-gradient x - FedAvg(updates)."""

    server_learning_rate: float
    server_momentum: float

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        average = weighted_mean(updates)
        new_global: Weights = {}
        new_state: Weights = {}
        for name, current in global_weights.items():
            x = np.asarray(current, dtype=np.float64)
            pseudo_gradient = x - average[name]
            momentum = self.server_momentum * _state_or_zeros(state, f"momentum/{name}", x) + pseudo_gradient
            new_state[f"momentum/{name}"] = momentum
            new_global[name] = x - self.server_learning_rate * momentum
        return _cast_like(global_weights, new_global), new_state


@dataclass(frozen=True)
class _Adaptive:
    """Reddi et al. 2021 server optimisers on the pseudo-gradient Δ = avg - x.

    As in Flower, not exactly the paper: Δ is the num_examples-weighted mean (the
    paper's Algorithm 2 takes the plain mean) and both moments start at 0 (the paper
    starts v at >= tau^2); neither has bias correction.
    """

    eta: float
    beta_1: float
    beta_2: float
    tau: float

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        average = weighted_mean(updates)
        new_global: Weights = {}
        new_state: Weights = {}
        for name, current in global_weights.items():
            x = np.asarray(current, dtype=np.float64)
            delta = average[name] - x
            m = self.beta_1 * _state_or_zeros(state, f"m/{name}", x) + (1.0 - self.beta_1) * delta
            v = self._second_moment(_state_or_zeros(state, f"v/{name}", x), delta)
            new_state[f"m/{name}"] = m
            new_state[f"v/{name}"] = v
            new_global[name] = x + self.eta * m / (np.sqrt(v) + self.tau)
        return _cast_like(global_weights, new_global), new_state


@dataclass(frozen=True)
class FedAdam(_Adaptive):
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta**2


@dataclass(frozen=True)
class FedYogi(_Adaptive):
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1.0 - self.beta_2) * squared * np.sign(v - squared)


@dataclass(frozen=True)
class FedAdagrad(_Adaptive):
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2


@dataclass(frozen=True)
class Median:
    """Yin et al. 2018: coordinate-wise median of the client weights (unweighted)."""

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        medians = {name: np.median(_stack(updates, name), axis=0) for name in global_weights}
        return _cast_like(global_weights, medians), {}


@dataclass(frozen=True)
class TrimmedMean:
    """Yin et al. 2018: per coordinate, drop the floor(beta*n) largest and smallest values, then average."""

    beta: float

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        trimmed = math.floor(self.beta * len(updates))
        if len(updates) - 2 * trimmed < 1:
            raise ValueError(f"trimmed_mean: beta={self.beta} trims all {len(updates)} updates")
        means = {}
        for name in global_weights:
            ordered = np.sort(_stack(updates, name), axis=0)
            means[name] = ordered[trimmed : len(updates) - trimmed].mean(axis=0)
        return _cast_like(global_weights, means), {}


@dataclass(frozen=True)
class Krum:
    """Blanchard et al. 2017: the update(s) closest to their n-f-2 nearest neighbours.

    score(i) = sum of squared distances from update i to its n-f-2 nearest (Blanchard et
    al. 2017 require n > 2f + 2; fewer updates are refused),
    other updates; the `num_selected` lowest scores are averaged by num_examples
    (num_selected=1 is Krum, more is Multi-Krum).
    """

    num_malicious: int
    num_selected: int

    def scores(self, updates: Sequence[ClientUpdate]) -> np.ndarray:
        n, f = len(updates), self.num_malicious
        if n <= 2 * f + 2:
            raise ValueError(
                f"num_malicious: Krum needs more than 2 * num_malicious + 2 = {2 * f + 2} updates, got {n}"
            )
        names = sorted(updates[0].weights)
        flat = np.stack([_flat(update.weights, names) for update in updates])  # (n, params)
        gram = flat @ flat.T  # (n, n): pairwise distances without an (n, n, params) array
        norms = np.diag(gram)
        squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
        neighbours = n - f - 2
        return np.asarray([np.sort(np.delete(squared[i], i))[:neighbours].sum() for i in range(n)])

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Weights, Weights]:
        _check_updates(global_weights, updates)
        if len(updates) == 1:
            return _cast_like(global_weights, weighted_mean(updates)), {}
        order = np.argsort(self.scores(updates), kind="stable")
        chosen = [updates[int(i)] for i in order[: min(self.num_selected, len(updates))]]
        return _cast_like(global_weights, weighted_mean(chosen)), {}


# ---------------------------------------------------------------- construction

STRATEGIES: dict[str, type] = {
    "FedAvg": FedAvg,
    "FedProx": FedProx,
    "FedAvgM": FedAvgM,
    "FedAdam": FedAdam,
    "FedYogi": FedYogi,
    "FedAdagrad": FedAdagrad,
    "FedMedian": Median,
    "FedTrimmedAvg": TrimmedMean,
    "Krum": Krum,
}


def make_strategy(spec: StrategySpec) -> Strategy:
    """Build the strategy a (valid, hence checked) `StrategySpec` names, with every parameter resolved."""
    return STRATEGIES[spec.name](**spec.resolved_params)  # type: ignore[no-any-return]
