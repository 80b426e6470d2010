"""FedSWA (Caldarola et al. 2022): stochastic weight averaging (Izmailov et al. 2018) of the global model.

`SWA` wraps an averaging strategy. The training continues from the wrapped
strategy's global model; from ``start_round`` on, the global model of the last
round of every cycle of ``cycle_length`` rounds is folded into a running
average, kept in the strategy state (``swa/model/<key>``; `swa_weights` reads
it): after ``n`` folds it is the plain mean of those ``n`` global models.

The clients' cyclical learning rate (`cyclical_learning_rate`): in round ``r >=
start_round``, with ``t = ((r - start_round) mod cycle_length + 1) / cycle_length``,

    lr = (1 - t) * lr_max + t * lr_min

so it falls linearly to ``lr_min`` in the last round of each cycle, the round
whose global model is averaged; before ``start_round`` it is ``lr_max``.

State: the wrapped strategy's under ``base/``, ``swa/round`` (aggregations done),
``swa/count`` (models averaged) and ``swa/model/<key>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedland.strategies import ClientUpdate, FedAvg, NamedArrays, Strategy, _cast_like

__all__ = ["SWA", "FedSWA", "cyclical_learning_rate", "is_averaged_round", "swa_weights"]

BASE = "base/"
ROUND = "swa/round"
COUNT = "swa/count"
MODEL = "swa/model/"


def _check_schedule(start_round: int, cycle_length: int) -> None:
    if isinstance(start_round, bool) or not isinstance(start_round, int) or start_round < 1:
        raise ValueError(f"start_round: must be an integer >= 1, got {start_round!r}")
    if isinstance(cycle_length, bool) or not isinstance(cycle_length, int) or cycle_length < 1:
        raise ValueError(f"cycle_length: must be an integer >= 1, got {cycle_length!r}")


def is_averaged_round(server_round: int, start_round: int, cycle_length: int) -> bool:
    """Whether round ``server_round`` (1-based) ends a cycle from ``start_round`` on, so its model is averaged."""
    _check_schedule(start_round, cycle_length)
    return server_round >= start_round and (server_round - start_round + 1) % cycle_length == 0


def cyclical_learning_rate(
    server_round: int, start_round: int, cycle_length: int, lr_max: float, lr_min: float
) -> float:
    """The clients' learning rate in round ``server_round`` (1-based): ``lr_max`` before ``start_round``, then cycles."""
    _check_schedule(start_round, cycle_length)
    if not (math.isfinite(lr_min) and math.isfinite(lr_max) and 0 < lr_min <= lr_max):
        raise ValueError(f"lr_min: must satisfy 0 < lr_min <= lr_max, got lr_min={lr_min!r}, lr_max={lr_max!r}")
    if server_round < start_round:
        return lr_max
    t = ((server_round - start_round) % cycle_length + 1) / cycle_length
    return (1.0 - t) * lr_max + t * lr_min


def swa_weights(state: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> NamedArrays | None:
    """The averaged global model in an `SWA` state (cast like ``like``), or None before the first fold."""
    if int(np.asarray(state.get(COUNT, 0))) == 0:
        return None
    return _cast_like(like, {name: state[MODEL + name] for name in like})


@dataclass(frozen=True)
class SWA:
    """Keeps a running average of the global models a wrapped averaging strategy produces (see the module)."""

    averages: ClassVar[bool] = True
    base: Strategy
    start_round: int
    cycle_length: int = 1

    def __post_init__(self) -> None:
        _check_schedule(self.start_round, self.cycle_length)
        if not getattr(self.base, "averages", False):
            raise ValueError(f"base: SWA wraps an averaging strategy; {type(self.base).__name__} is not one")

    def round_payload(self, state: Mapping[str, np.ndarray]) -> NamedArrays:
        """What the wrapped strategy sends with the round (SWA itself sends nothing)."""
        method = getattr(self.base, "round_payload", None)
        return dict(method(_base_state(state))) if callable(method) else {}

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global, base_state = self.base.aggregate(global_weights, updates, _base_state(state))
        return new_global, self._fold(new_global, base_state, state)

    def aggregate_mean(
        self, global_weights: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> tuple[NamedArrays, NamedArrays]:
        new_global, base_state = self.base.aggregate_mean(global_weights, mean, _base_state(state))
        return new_global, self._fold(new_global, base_state, state)

    def _fold(
        self, new_global: Mapping[str, np.ndarray], base_state: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> NamedArrays:
        server_round = int(np.asarray(state.get(ROUND, 0))) + 1
        count = int(np.asarray(state.get(COUNT, 0)))
        averaged = {key: np.asarray(value, dtype=np.float64) for key, value in state.items() if key.startswith(MODEL)}
        if is_averaged_round(server_round, self.start_round, self.cycle_length):
            averaged = {
                MODEL + name: (averaged[MODEL + name] * count + np.asarray(value, dtype=np.float64)) / (count + 1)
                if count
                else np.asarray(value, dtype=np.float64)
                for name, value in new_global.items()
            }
            count += 1
        return {
            **{BASE + key: np.asarray(value) for key, value in base_state.items()},
            ROUND: np.asarray(server_round, dtype=np.int64),
            COUNT: np.asarray(count, dtype=np.int64),
            **averaged,
        }


class FedSWA(SWA):
    """`SWA` over FedAvg, as a spec names it (``FedSWA``).

    ``lr_min`` (None: a constant learning rate) is the clients' cyclical
    schedule (`cyclical_learning_rate`, from the spec's ``learning_rate``), which
    ``fedland.spec.ExperimentSpec.round_learning_rate`` applies; the server half ignores it.
    """

    def __init__(self, start_round: int, cycle_length: int = 1, lr_min: float | None = None) -> None:
        super().__init__(base=FedAvg(), start_round=start_round, cycle_length=cycle_length)


def _base_state(state: Mapping[str, np.ndarray]) -> NamedArrays:
    return {key[len(BASE) :]: np.asarray(value) for key, value in state.items() if key.startswith(BASE)}
