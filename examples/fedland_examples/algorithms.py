"""A client algorithm component: local SGD whose every step's gradient is clipped to a norm.

It follows ``fedland.algorithms.ClientAlgorithm``: ``train(model, data, *, seed,
hyper, state, round_state) -> LocalResult``; its fields are the parameters a
spec gives beside its name::

    client_algorithm = { name = "fedland_examples.algorithms:ClippedSGD", max_norm = 1.0 }
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedland.algorithms import LocalHyperparameters, LocalResult, MemberData, local_sgd
from fedland.algorithms.contract import GradientStep, plain_gradient


@dataclass(frozen=True)
class ClippedSGD:
    """Local SGD on the cross-entropy gradient, its norm (over all parameters) clipped to ``max_norm``."""

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm: must be a finite number > 0, got {self.max_norm!r}")

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
        def step(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            loss = plain_gradient(net, inputs, targets)
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.max_norm)
            return loss

        def prepare(_copy: nn.Module) -> GradientStep:
            return step

        run = local_sgd(model, data, seed, hyper, prepare)
        return LocalResult(model=run.model, report=run.report)
