"""The client training algorithm contract, and the local SGD loop the built-ins share.

A client algorithm is an object with one method::

    result = algorithm.train(model, data, seed=seed, hyper=hyper, state=state, round_state=round_state)

* ``model``: the round's global model; it is never modified (the result holds a trained copy).
* ``data``: the member's training examples (`MemberData`: ``x`` and ``y`` tensors).
* ``seed``: the round's seed for this member; every random draw (shuffle,
  augmentation, dropout) comes from it through a private ``torch.Generator``
  or a forked RNG, never the caller's global RNG.
* ``hyper``: the spec's local-training hyperparameters (`LocalHyperparameters`);
  an algorithm's own parameters (``prox_mu``, ``rho``, ``alpha``) are fields of
  the algorithm object, as a strategy's are.
* ``state``: the member's own persistent arrays from its previous round (a
  control variate, a gradient state), by name; empty in its first round.
* ``round_state``: arrays the server strategy sends with the round (SCAFFOLD's
  server control variate): ``strategy.round_payload(strategy_state)`` when the
  strategy has that method (`round_payload`), else empty.

It returns a `LocalResult`: the trained model, a `fedland.training.TrainReport`,
the member's new state, and ``message``: arrays for the server strategy (a
control-variate difference), averaged with the same num_examples weights as the
models (``ClientUpdate.message``). Message keys contain ``/`` so that they never
clash with a ``state_dict`` key.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedland.device import resolve_device
from fedland.strategies import NamedArrays
from fedland.training import Inputs, TrainReport, batches

__all__ = [
    "ClientAlgorithm",
    "LocalHyperparameters",
    "LocalResult",
    "MemberData",
    "round_payload",
]


@dataclass(frozen=True, eq=False)
class MemberData:
    """One member's training examples: inputs ``(N, ...)`` (a tensor or compact ``Images``) and int64 targets ``(N,)``."""

    x: Inputs
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.y) == 0:
            raise ValueError("y: no training examples")
        if len(self.x) != len(self.y):
            raise ValueError(f"y: has {len(self.y)} examples but x has {len(self.x)}")


@dataclass(frozen=True)
class LocalHyperparameters:
    """The spec's local training settings, shared by every client algorithm.

    ``learning_rate`` is the SGD step size, ``momentum`` SGD momentum in [0, 1);
    ``augment`` random-crops and flips each batch; ``device`` is where to train
    (``None``: where the model is).
    """

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    augment: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0:
            raise ValueError(f"epochs: must be a positive integer, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: must be a finite number > 0, got {self.learning_rate!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum!r}")


@dataclass(frozen=True, eq=False)
class LocalResult:
    """What a client algorithm returns for one member and round."""

    model: nn.Module  # the trained copy, in the train/eval mode the given model was in
    report: TrainReport
    state: NamedArrays = field(default_factory=dict)  # the member's new persistent state
    message: NamedArrays = field(default_factory=dict)  # arrays for the server strategy, averaged like the weights


@runtime_checkable
class ClientAlgorithm(Protocol):
    """A local training algorithm (see the module docstring for each argument)."""

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
        """Train a copy of ``model`` on ``data``; return it with its report, new state and message."""
        ...


def round_payload(strategy: object, strategy_state: Mapping[str, np.ndarray]) -> NamedArrays:
    """The arrays a strategy sends with each round to the clients (empty unless it defines ``round_payload``)."""
    method = getattr(strategy, "round_payload", None)
    return dict(method(strategy_state)) if callable(method) else {}


# --------------------------------------------------------------- the shared loop

# A step: given the model (train mode, gradients zeroed) and one batch, leave the
# gradient to follow in every parameter's ``.grad``; return the batch's mean cross-entropy.
GradientStep = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_gradient(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy gradient at the current weights (plain SGD)."""
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    return loss


@dataclass(frozen=True, eq=False)
class LocalRun:
    """A finished `local_sgd` run: the trained copy, its report, and the number of SGD steps taken."""

    model: nn.Module
    report: TrainReport
    num_steps: int


def local_sgd(
    model: nn.Module,
    data: MemberData,
    seed: int,
    hyper: LocalHyperparameters,
    prepare: Callable[[nn.Module], GradientStep] = lambda _copy: plain_gradient,
) -> LocalRun:
    """SGD (momentum) on a copy of ``model``, each step following a `GradientStep`; ``model`` is untouched.

    ``prepare`` is given the copy (on the training device, before its first
    step) and returns the step, so that a step can hold anchors on that device.
    The same shuffle, augmentation and dropout draws as ``fedland.training.train_local``
    with the same seed: with `plain_gradient` the numbers are identical to it.
    """
    started = time.perf_counter()
    trained = copy.deepcopy(model)
    if hyper.device is not None:
        trained = trained.to(resolve_device(hyper.device))
    where = parameter_device(trained)
    trained.train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=hyper.learning_rate, momentum=hyper.momentum)
    gradient = prepare(trained)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    num_steps = 0
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else [], device_type=where.type):
        torch.manual_seed(seed)
        for _ in range(hyper.epochs):
            epoch_loss, seen = 0.0, 0
            for inputs, targets in batches(
                data.x, data.y, hyper.batch_size, generator, augment=hyper.augment, device=where
            ):
                optimizer.zero_grad(set_to_none=True)
                loss = gradient(trained, inputs, targets)
                optimizer.step()
                num_steps += 1
                epoch_loss += loss.item() * len(targets)
                seen += len(targets)
            epoch_losses.append(epoch_loss / seen)
    optimizer.zero_grad(set_to_none=True)
    for source, copied in zip(model.modules(), trained.modules()):
        copied.train(source.training)
    report = TrainReport(num_examples=len(data.y), epoch_losses=epoch_losses, duration_s=time.perf_counter() - started)
    return LocalRun(model=trained, report=report, num_steps=num_steps)


def parameter_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters SGD moves, by ``state_dict`` name (buffers such as BatchNorm statistics are not)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def arrays_or_zeros(arrays: Mapping[str, np.ndarray], prefix: str, params: Mapping[str, nn.Parameter]) -> NamedArrays:
    """``arrays[prefix + name]`` (float64) for each parameter, zeros where absent; refuses a wrong shape."""
    out: NamedArrays = {}
    for name, p in params.items():
        key = prefix + name
        if key in arrays:
            value = np.asarray(arrays[key], dtype=np.float64)
            if value.shape != tuple(p.shape):
                raise ValueError(f"{key}: has shape {value.shape}, the parameter {tuple(p.shape)}")
            out[name] = value
        else:
            out[name] = np.zeros(tuple(p.shape), dtype=np.float64)
    return out


def as_tensors(arrays: Mapping[str, np.ndarray], params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each array as a tensor with its parameter's dtype and device."""
    return {name: torch.as_tensor(arrays[name]).to(device=p.device, dtype=p.dtype) for name, p in params.items()}


def to_numpy(params: Mapping[str, nn.Parameter]) -> NamedArrays:
    return {name: p.detach().cpu().numpy().astype(np.float64) for name, p in params.items()}
