"""Local training and evaluation: pure functions over tensors, no I/O."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from fedland._objective import evaluation_loop
from fedland.augment import random_crop_flip
from fedland.datasets import Images
from fedland.device import resolve_device

__all__ = ["Evaluation", "Inputs", "TrainReport", "batches", "evaluate", "train_local"]

#: Inputs indexed one batch at a time: a tensor, or a dataset's ``Images`` (uint8, normalised per batch).
Inputs = torch.Tensor | Images


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy (nats per example), accuracy in [0, 1], and the examples seen."""

    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class TrainReport:
    """What ``train_local`` did: training-set size, per-epoch mean loss, wall time.

    ``epoch_losses[e]`` is the mean cross-entropy over epoch ``e``'s batches
    (weighted by batch size, measured while training, without the proximal term).
    """

    num_examples: int
    epoch_losses: list[float]
    duration_s: float


def batches(
    x: Inputs,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    augment: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` mini-batches, shuffled when a generator is given.

    Args:
        x: inputs, first dimension is the example (``Images`` become float32 batch by batch).
        y: targets, same length as ``x``.
        batch_size: examples per batch (the last batch may be smaller).
        generator: draws the shuffle order; ``None`` keeps the given order.
        augment: pass each batch's inputs through ``fedland.augment.random_crop_flip``
            with ``generator`` (right after the batch is drawn); needs a generator.
        device: move each batch there (``None``: leave it where ``x`` is).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"y: has {len(y)} examples but x has {len(x)}")
    if augment and generator is None:
        raise ValueError("augment: needs a generator (augmentation is for seeded training batches)")
    target = None if device is None else resolve_device(device)
    order = torch.randperm(len(y), generator=generator) if generator is not None else None
    for start in range(0, len(y), batch_size):
        if order is None:
            inputs, targets = x[start : start + batch_size], y[start : start + batch_size]
        else:
            chosen = order[start : start + batch_size]
            inputs, targets = x[chosen], y[chosen]
        if target is not None:
            inputs, targets = inputs.to(target), targets.to(target)
        if augment:
            assert generator is not None
            inputs = random_crop_flip(inputs, generator)
        yield inputs, targets


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device | None = None,
) -> Evaluation:
    """Mean cross-entropy and accuracy of ``model`` over ``batches``.

    Runs ``fedland._objective.evaluation_loop`` (eval mode, no gradients,
    the model left exactly as found) on the summed cross-entropy of each batch.

    Args:
        model: a classifier returning logits ``(batch, classes)``; when
            ``device`` differs from its own, a copy is moved there (``model``
            stays where it is).
        batches: ``(inputs, targets)`` pairs, e.g. from ``batches(x, y, 512)``.
        device: where to compute (``None``: where the model is).

    Returns:
        The loss and accuracy averaged over all examples.
    """
    runner = _on_device(model, device)
    totals = evaluation_loop(
        runner,
        batches,
        partial(F.cross_entropy, reduction="sum"),
        reduction="sum",
        device=_device_of(runner),
        correct=_argmax_correct,
    )
    assert totals.correct is not None
    return Evaluation(loss=totals.loss / totals.count, accuracy=totals.correct / totals.count,
                      num_examples=totals.count)


def _argmax_correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Correct argmax predictions of ``logits`` ``(batch, classes)`` against class indices ``(batch,)``."""
    return int((logits.argmax(dim=1) == targets).sum())


def train_local(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    seed: int,
    prox_mu: float = 0.0,
    augment: bool = False,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, TrainReport]:
    """Train a copy of ``model`` with SGD (momentum), optionally with FedProx's proximal term.

    The objective per batch is ``cross_entropy + (prox_mu / 2) * ||w - w_0||^2``
    where ``w_0`` are the weights of ``model`` as given. ``model`` itself is
    not modified.

    Args:
        model: the starting (global) model.
        x: training inputs ``(N, ...)``: a tensor or ``Images`` (normalised batch by batch).
        y: training targets ``(N,)`` int64.
        epochs: passes over the data.
        batch_size: examples per SGD step.
        learning_rate: SGD step size.
        momentum: SGD momentum in [0, 1).
        seed: seeds the shuffle order; same seed and inputs, same result.
        prox_mu: proximal weight (0 disables it).
        augment: random crop and flip each training batch (``batches(augment=True)``),
            drawn from the same seeded generator as the shuffle.
        device: where to train (``None``: where ``model`` is); the batches are
            moved there. Randomness is drawn on the CPU, so the shuffle and the
            augmentation do not depend on the device.

    Returns:
        The trained copy (on ``device``, in the train/eval mode ``model`` was
        in, no gradients left attached) and a ``TrainReport``.
    """
    _check_training_args(x, y, epochs, learning_rate, momentum, prox_mu)
    started = time.perf_counter()
    trained = copy.deepcopy(model)
    if device is not None:
        trained = trained.to(resolve_device(device))
    where = _device_of(trained)
    trained.train()
    anchor = [p.detach().clone() for p in trained.parameters()] if prox_mu > 0 else []
    optimizer = torch.optim.SGD(trained.parameters(), lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    # Dropout draws from the global RNG: seed it from `seed` inside a fork, so the caller's state is untouched.
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else [], device_type=where.type):
        torch.manual_seed(seed)
        for _ in range(epochs):
            epoch_losses.append(_epoch(trained, optimizer, batches(
                x, y, batch_size, generator, augment=augment, device=where
            ), anchor, prox_mu))
    optimizer.zero_grad(set_to_none=True)
    for source, copied in zip(model.modules(), trained.modules()):
        copied.train(source.training)
    report = TrainReport(num_examples=len(y), epoch_losses=epoch_losses, duration_s=time.perf_counter() - started)
    return trained, report


def _epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    anchor: list[torch.Tensor],
    prox_mu: float,
) -> float:
    """One pass of SGD steps over ``data``; the size-weighted mean cross-entropy seen."""
    epoch_loss, seen = 0.0, 0
    for inputs, targets in data:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        objective = loss
        if anchor:
            distance = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), anchor))
            objective = loss + 0.5 * prox_mu * distance
        objective.backward()
        optimizer.step()
        epoch_loss += loss.item() * len(targets)
        seen += len(targets)
    return epoch_loss / seen


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """``model`` itself when it is on ``device`` (or no device is asked), else a copy moved there."""
    if device is None:
        return model
    target = resolve_device(device)
    if _device_of(model) == target:
        return model
    return copy.deepcopy(model).to(target)


def _check_training_args(
    x: Inputs, y: torch.Tensor, epochs: int, learning_rate: float, momentum: float, prox_mu: float
) -> None:
    if len(y) == 0:
        raise ValueError("y: no training examples")
    if len(x) != len(y):
        raise ValueError(f"y: has {len(y)} examples but x has {len(x)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs: must be a positive integer, got {epochs!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate: must be a finite number > 0, got {learning_rate!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum: must be in [0, 1), got {momentum!r}")
    if not (math.isfinite(prox_mu) and prox_mu >= 0):
        raise ValueError(f"prox_mu: must be a finite number >= 0, got {prox_mu!r}")
