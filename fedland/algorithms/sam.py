"""FedSAM and FedASAM local training (Caldarola et al. 2022): SAM (Foret et al. 2021) / ASAM (Kwon et al. 2021) steps.

Each local step takes the gradient at an ascended point and applies it at the
current weights ``w``:

    g = dL(w)                                  (first forward/backward)
    SAM:   e = rho * g / ||g||
    ASAM:  e = rho * T^2 g / ||T g||,  T = |w| + eta elementwise for parameters named ``*weight``, 1 for others
    w <- SGD step of dL(w + e)                 (second forward/backward at w + e, then w restored)

The norms run over all trainable parameters together (``||.||`` plus 1e-12,
so that a zero gradient gives ``e = 0``). As in the reference ASAM code, biases
are not rescaled. BatchNorm running statistics are updated by the first forward
pass only (the second pass's updates are undone). The report's loss is the
first pass's, at ``w``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedland.algorithms.contract import (
    GradientStep,
    LocalHyperparameters,
    LocalResult,
    MemberData,
    local_sgd,
    plain_gradient,
    trainable,
)

__all__ = ["FedASAM", "FedSAM", "sharpness_aware_step"]

_NORM_FLOOR = 1e-12


def sharpness_aware_step(rho: float, eta: float | None) -> GradientStep:
    """A `GradientStep` leaving SAM's gradient (``eta`` None) or ASAM's (``eta`` >= 0) in ``.grad``."""

    def step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = plain_gradient(model, inputs, targets)
        params = trainable(model)
        ascent: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            # scales: T (ASAM, parameters named *weight) or 1; scaled: T g; ascent: T^2 g, normalised below
            scales = {
                name: p.abs() + eta if eta is not None and name.endswith("weight") else torch.ones_like(p)
                for name, p in params.items()
                if p.grad is not None
            }
            scaled = {name: scale * _grad(params[name]) for name, scale in scales.items()}
            norm = torch.sqrt(torch.stack([(value**2).sum() for value in scaled.values()]).sum()) + _NORM_FLOOR
            for name, scale in scales.items():
                ascent[name] = rho * scale * scaled[name] / norm
                params[name].add_(ascent[name])
            buffers = [buffer.clone() for buffer in model.buffers()]
        model.zero_grad(set_to_none=True)
        plain_gradient(model, inputs, targets)
        with torch.no_grad():
            for name, shift in ascent.items():
                params[name].sub_(shift)
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return loss

    return step


def _grad(p: nn.Parameter) -> torch.Tensor:
    assert p.grad is not None  # filtered by the caller
    return p.grad


def _check_rho(rho: float) -> None:
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho: must be a finite number >= 0, got {rho!r}")


@dataclass(frozen=True)
class FedSAM:
    """Local SAM: each step's gradient at ``w + rho * g / ||g||``; no state, no message."""

    rho: float = 0.05

    def __post_init__(self) -> None:
        _check_rho(self.rho)

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
        run = local_sgd(model, data, seed, hyper, lambda _copy: sharpness_aware_step(self.rho, None))
        return LocalResult(model=run.model, report=run.report)


@dataclass(frozen=True)
class FedASAM:
    """Local ASAM: each step's gradient at ``w + rho * T^2 g / ||T g||``, ``T = |w| + eta``; no state, no message."""

    rho: float = 0.5
    eta: float = 0.01

    def __post_init__(self) -> None:
        _check_rho(self.rho)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta: must be a finite number >= 0, got {self.eta!r}")

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
        run = local_sgd(model, data, seed, hyper, lambda _copy: sharpness_aware_step(self.rho, self.eta))
        return LocalResult(model=run.model, report=run.report)
