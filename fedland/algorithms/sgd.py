"""Plain local SGD (momentum), with FedProx's proximal term: ``fedland.training.train_local`` as a client algorithm."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedland.algorithms.contract import LocalHyperparameters, LocalResult, MemberData
from fedland.training import train_local

__all__ = ["SGD"]


@dataclass(frozen=True)
class SGD:
    """Local SGD on ``cross_entropy + (prox_mu / 2) * ||w - w_global||^2`` (Li et al. 2020, FedProx, when prox_mu > 0).

    Exactly ``train_local``'s numbers; no state, no message.
    """

    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"prox_mu: must be a finite number >= 0, got {self.prox_mu!r}")

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
        trained, report = train_local(
            model,
            data.x,
            data.y,
            epochs=hyper.epochs,
            batch_size=hyper.batch_size,
            learning_rate=hyper.learning_rate,
            momentum=hyper.momentum,
            seed=seed,
            prox_mu=self.prox_mu,
            augment=hyper.augment,
            device=hyper.device,
        )
        return LocalResult(model=trained, report=report)
