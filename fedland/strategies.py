"""Aggregation strategies: pure functions of (global weights, client updates, server state).

Every strategy has the same contract (`Strategy`)::

    new_global, new_state = strategy.aggregate(global_weights, updates, state)
    new_global, new_state = strategy.aggregate_mean(global_weights, mean, state)  # if strategy.averages

`state` holds the server optimiser's arrays (momentum, Adam moments) by name so
that it can be stored next to the global model and a restarted server resumes
exactly; stateless strategies return an empty state. Inputs are never mutated.
Arithmetic is float64; results are cast back to each key's dtype (integer
buffers are rounded).

BatchNorm statistics (``running_mean``, ``running_var``, ``num_batches_tracked``
and any non-float key: ``is_statistic``) are not parameters: the server
optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) give them the plain
num_examples-weighted mean and keep no optimiser state for them (a server step
could make a variance negative); FedAvg/FedProx average them like every key,
and the robust rules (median, trimmed mean, Krum) apply to them as to the rest.

Memory: the averaging strategies (``averages = True``: FedAvg, FedProx, FedAvgM,
FedAdam, FedYogi, FedAdagrad) depend on the updates only through their
num_examples-weighted mean, so the server folds each update into a `RunningMean`
as it arrives and calls `aggregate_mean` (memory O(model), whatever the number
of updates). The robust strategies (``averages = False``: FedMedian,
FedTrimmedAvg, Krum) need every update of the round at once: their
`aggregate_mean` raises, and the spec refuses more than
`fedland.spec.ROBUST_MAX_UPDATES` members per round for them.

`STRATEGIES` maps each spec name (`fedland.spec.STRATEGY_PARAMS`, which holds
the parameters and their rules) to its class, named as in the spec (the server
halves of the client algorithms too: ``SCAFFOLD`` and ``FedDyn`` are
``fedland.algorithms``' `ScaffoldStrategy` and `FedDynStrategy`, ``FedSWA`` its
`SWA` over FedAvg); `make_strategy` builds one from a `StrategySpec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, cast

import numpy as np

if TYPE_CHECKING:  # fedland.spec asks STRATEGIES whether a strategy averages: no import at run time
    from fedland.spec import StrategySpec

NamedArrays = dict[str, np.ndarray]  # model weights or strategy state, by name (numpy; the wire format's type)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained weights and the number of examples it trained on.

    ``message`` holds what a client algorithm sends its strategy besides the
    weights (SCAFFOLD's control-variate difference, ``fedland.algorithms``), by
    keys that contain ``/``; a strategy that reads it averages it with the same
    num_examples weights (`weighted_mean_with_messages`).
    """

    weights: Mapping[str, np.ndarray]
    num_examples: int
    message: Mapping[str, np.ndarray] = field(default_factory=dict)


class Strategy(Protocol):
    """What the server calls: both return (new global weights, new strategy state); inputs are never mutated."""

    # True: the strategy needs only the updates' num_examples-weighted mean (the server keeps a
    # RunningMean and calls aggregate_mean); False: every update at once (aggregate_mean raises)
    averages: ClassVar[bool]

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[NamedArrays, NamedArrays]:
        """The new global model from every update of the round."""
        ...

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        """The new global model from the updates' num_examples-weighted mean alone (only if `averages`)."""
        ...


# ---------------------------------------------------------------- pure helpers


def _check_updates(global_weights: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise ValueError("updates: at least one client update is needed")
    for position, update in enumerate(updates):
        if update.num_examples <= 0:
            raise ValueError(f"updates[{position}].num_examples must be > 0, got {update.num_examples}")
        if set(update.weights) != set(global_weights):
            raise ValueError(f"updates[{position}].weights: keys differ from the global model")


def _cast_like(reference: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> NamedArrays:
    out: NamedArrays = {}
    for name, like in reference.items():
        value = values[name]
        if not np.issubdtype(like.dtype, np.inexact):
            value = np.rint(value)
        out[name] = np.asarray(value).astype(like.dtype).reshape(like.shape)
    return out


def weighted_mean(updates: Sequence[ClientUpdate]) -> NamedArrays:
    """Per-key mean of the updates weighted by num_examples (float64)."""
    total = float(sum(update.num_examples for update in updates))
    names = list(updates[0].weights)
    return {
        name: cast(  # never the int start value: there is at least one update
            np.ndarray,
            sum((update.num_examples / total) * np.asarray(update.weights[name], dtype=np.float64) for update in updates),
        )
        for name in names
    }


def weighted_mean_with_messages(updates: Sequence[ClientUpdate]) -> NamedArrays:
    """`weighted_mean` of the weights and, under their own keys, of the messages (float64)."""
    if not updates:
        raise ValueError("updates: at least one client update is needed")
    if any(set(update.message) != set(updates[0].message) for update in updates):
        raise ValueError("updates: the messages' keys differ between updates")
    if any(name in updates[0].weights for name in updates[0].message):
        raise ValueError("updates: a message key is also a weight key")
    messages = [ClientUpdate(weights=update.message, num_examples=update.num_examples) for update in updates]
    return {**weighted_mean(updates), **(weighted_mean(messages) if updates[0].message else {})}


STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str, value: np.ndarray) -> bool:
    """Whether a key is a running statistic (BatchNorm buffers, any integer key) rather than a parameter."""
    return name.rsplit(".", 1)[-1] in STATISTIC_SUFFIXES or not np.issubdtype(np.asarray(value).dtype, np.inexact)


def relative_distance(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """``||weights - reference|| / max(||reference||, 1)`` over the parameters (statistics left out), float64.

    How far an update moved from the round's global model, in units of that
    model's size (at least 1, so a near-zero model does not make every update
    look far). The server screens updates with it (``ExperimentSpec.update_screening``).
    """
    distance = 0.0
    size = 0.0
    for name, value in reference.items():
        if is_statistic(name, value):
            continue
        base = np.asarray(value, dtype=np.float64)
        moved = np.asarray(weights[name], dtype=np.float64) - base
        distance += float(np.dot(moved.ravel(), moved.ravel()))
        size += float(np.dot(base.ravel(), base.ravel()))
    return math.sqrt(distance) / max(math.sqrt(size), 1.0)


class RunningMean:
    """The num_examples-weighted mean of updates folded in one at a time: float64, O(model) memory."""

    def __init__(self) -> None:
        self._sums: NamedArrays = {}
        self.total_examples = 0
        self.count = 0

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Fold one update in (the weights are not kept)."""
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0, got {num_examples}")
        if self._sums and set(weights) != set(self._sums):
            raise ValueError("weights: keys differ from the updates folded so far")
        for name, value in weights.items():
            scaled = float(num_examples) * np.asarray(value, dtype=np.float64)
            if name in self._sums:
                self._sums[name] += scaled
            else:
                self._sums[name] = scaled
        self.total_examples += int(num_examples)
        self.count += 1

    def mean(self) -> NamedArrays:
        if not self.count:
            raise ValueError("updates: at least one client update is needed")
        return {name: total / float(self.total_examples) for name, total in self._sums.items()}


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


class _Averaging:
    """An averaging strategy: `aggregate` is `aggregate_mean` of the updates' weighted mean."""

    averages: ClassVar[bool] = True

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[NamedArrays, NamedArrays]:
        _check_updates(global_weights, updates)
        return self.aggregate_mean(global_weights, weighted_mean(updates), state)

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        raise NotImplementedError


class _Robust:
    """A robust strategy: it needs every update of the round, not their mean."""

    averages: ClassVar[bool] = False

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        raise NotImplementedError(
            f"{type(self).__name__} needs every update of the round (averages is False), not their mean: call aggregate"
        )


@dataclass(frozen=True)
class FedAvg(_Averaging):
    """McMahan et al. 2017: mean of the client weights weighted by num_examples."""

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        return _cast_like(global_weights, mean), {}


@dataclass(frozen=True)
class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; `mu` is the clients' proximal term."""

    mu: float


@dataclass(frozen=True)
class FedAvgM(_Averaging):
    """Hsu et al. 2019: server momentum on the pseudo-gradient x - FedAvg(updates)."""

    server_learning_rate: float
    server_momentum: float

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global: NamedArrays = {}
        new_state: NamedArrays = {}
        for name, current in global_weights.items():
            if is_statistic(name, current):
                new_global[name] = mean[name]
                continue
            x = np.asarray(current, dtype=np.float64)
            pseudo_gradient = x - mean[name]
            momentum = self.server_momentum * _state_or_zeros(state, f"momentum/{name}", x) + pseudo_gradient
            new_state[f"momentum/{name}"] = momentum
            new_global[name] = x - self.server_learning_rate * momentum
        return _cast_like(global_weights, new_global), new_state


@dataclass(frozen=True)
class _Adaptive(_Averaging):
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

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global: NamedArrays = {}
        new_state: NamedArrays = {}
        for name, current in global_weights.items():
            if is_statistic(name, current):
                new_global[name] = mean[name]
                continue
            x = np.asarray(current, dtype=np.float64)
            delta = mean[name] - x
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
class FedMedian(_Robust):
    """Yin et al. 2018: coordinate-wise median of the client weights (unweighted)."""

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[NamedArrays, NamedArrays]:
        _check_updates(global_weights, updates)
        medians = {name: np.median(_stack(updates, name), axis=0) for name in global_weights}
        return _cast_like(global_weights, medians), {}


@dataclass(frozen=True)
class FedTrimmedAvg(_Robust):
    """Yin et al. 2018: per coordinate, drop the floor(beta*n) largest and smallest values, then average."""

    beta: float

    def aggregate(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        state: Mapping[str, np.ndarray],
    ) -> tuple[NamedArrays, NamedArrays]:
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
class Krum(_Robust):
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
    ) -> tuple[NamedArrays, NamedArrays]:
        _check_updates(global_weights, updates)
        if len(updates) == 1:
            return _cast_like(global_weights, weighted_mean(updates)), {}
        order = np.argsort(self.scores(updates), kind="stable")
        chosen = [updates[int(i)] for i in order[: min(self.num_selected, len(updates))]]
        return _cast_like(global_weights, weighted_mean(chosen)), {}


# ---------------------------------------------------------------- construction

# by the spec's name, which is the class's name
STRATEGIES: dict[str, type[Strategy]] = {
    "FedAvg": FedAvg,
    "FedProx": FedProx,
    "FedAvgM": FedAvgM,
    "FedAdam": FedAdam,
    "FedYogi": FedYogi,
    "FedAdagrad": FedAdagrad,
    "FedMedian": FedMedian,
    "FedTrimmedAvg": FedTrimmedAvg,
    "Krum": Krum,
}

# The server halves of the client algorithms, through the same contract (fedland.algorithms
# imports this module first, so its modules find every name above defined).
from fedland.algorithms.feddyn import FedDynStrategy  # noqa: E402
from fedland.algorithms.scaffold import ScaffoldStrategy  # noqa: E402
from fedland.algorithms.swa import FedSWA  # noqa: E402

STRATEGIES.update({"SCAFFOLD": ScaffoldStrategy, "FedDyn": FedDynStrategy, "FedSWA": FedSWA})
#: Strategies built with the experiment's participation (members per round over num_clients), not a spec parameter.
PARTICIPATION_STRATEGIES = ("SCAFFOLD", "FedDyn")


def make_strategy(spec: StrategySpec, participation: float = 1.0) -> Strategy:
    """Build the strategy a (valid, hence checked) `StrategySpec` names, with every parameter resolved.

    A built-in name or an import path, through ``fedland.components.resolve``;
    ``participation`` (members per round over the federation's size) goes to
    SCAFFOLD and FedDyn (``ExperimentSpec.participation``).
    """
    from fedland.components import resolve_strategy  # it imports this module

    params = dict(spec.resolved_params)
    if spec.name in PARTICIPATION_STRATEGIES:
        params["participation"] = participation
    strategy: Strategy = resolve_strategy(spec.name)(**params)
    return strategy
