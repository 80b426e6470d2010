"""Loss along lines and planes in parameter space, and along the path between two models.

Each grid point is evaluated by handing the shifted parameters to
``torch.func.functional_call`` under ``torch.no_grad`` (the model is never
copied nor written to). Batching grid points with ``torch.func.vmap`` over
stacked parameters was measured 2-4x *slower* on CPU for a 200k-parameter CNN,
so points are evaluated one after another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedland._objective import DEFAULT_CHUNK_SIZE, Batch, LossFn, Objective, check_finite, check_real, preserved
from fedland.directions import Norm, random_direction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slice1D:
    """Loss along ``theta + alpha * d``.

    Attributes:
        alphas: ``(n,)`` step sizes; the middle one is exactly 0.
        losses: ``(n,)`` mean loss at each step.
        accuracies: ``(n,)`` accuracy, or None when outputs are not class scores.
    """

    alphas: np.ndarray
    losses: np.ndarray
    accuracies: np.ndarray | None


@dataclass(frozen=True)
class Slice2D:
    """Loss on the plane ``theta + x * d1 + y * d2``.

    Attributes:
        xs: ``(n,)`` coordinates along ``d1``; the middle one is exactly 0.
        ys: ``(n,)`` coordinates along ``d2``; the middle one is exactly 0.
        losses: ``(n, n)``; ``losses[i, j]`` is at ``(xs[i], ys[j])``.
        accuracies: ``(n, n)`` or None when outputs are not class scores.
    """

    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray
    accuracies: np.ndarray | None


@dataclass(frozen=True)
class Interpolation:
    """Loss along ``(1 - alpha) * theta_a + alpha * theta_b``.

    Attributes:
        alphas: ``(n,)`` path positions (include 0 and 1).
        losses: ``(n,)`` mean loss at each position.
        accuracies: ``(n,)`` or None when outputs are not class scores.
        barrier: ``max_alpha loss(alpha) - [(1 - alpha) loss(0) + alpha loss(1)]`` over
            the grid: the height of the loss above the straight line between the
            endpoint losses (the linear-mode-connectivity barrier of Frankle et al.
            2020, with the linear baseline of Entezari et al. 2022). Both endpoints
            are on the grid, where the difference is 0, so it is >= 0: exactly 0 when
            the curve never rises above the chord (e.g. a convex path).
    """

    alphas: np.ndarray
    losses: np.ndarray
    accuracies: np.ndarray | None
    barrier: float


def centered_grid(radius: float, num_points: int) -> np.ndarray:
    """``np.linspace(-radius, radius, num_points)`` with the middle point exactly 0."""
    check_real(radius, "radius")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1 or num_points % 2 == 0:
        raise ValueError("num_points: must be a positive odd number, so the model itself is a grid point")
    grid = np.linspace(-radius, radius, num_points)
    grid[num_points // 2] = 0.0
    return grid


def loss_slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    direction: Mapping[str, Tensor] | None = None,
    *,
    radius: float = 1.0,
    num_points: int = 21,
    seed: int = 0,
    norm: Norm = "filter",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Slice1D:
    """Mean loss along one direction through the model.

    Args:
        direction: tensors keyed by trainable parameter name; default a random
            direction (``random_direction(model, seed=seed, norm=norm)``).
        radius: the grid spans ``[-radius, radius]`` in units of the direction.
        num_points: odd grid size.
        seed, norm: for the random direction.
        chunk_size: samples per forward call.
    """
    alphas = centered_grid(radius, num_points)
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        if direction is None:
            direction = random_direction(model, seed=seed, norm=norm)
        d = objective.flatten(direction)
        results = _centre_first([objective.theta + float(a) * d for a in alphas], num_points // 2, objective)
    losses, accuracies = _unzip(results)
    return Slice1D(alphas, losses, accuracies)


def loss_slice_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    *,
    radius: float = 1.0,
    num_points: int = 21,
    seed: int = 0,
    norm: Norm = "filter",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Slice2D:
    """Mean loss on a plane through the model.

    Args:
        directions: two directions keyed by trainable parameter name; default two
            random directions drawn one after the other from one generator seeded by ``seed``.
        radius: each axis spans ``[-radius, radius]``.
        num_points: odd grid size per axis.
        seed, norm: for the random directions.
        chunk_size: samples per forward call.
    """
    coords = centered_grid(radius, num_points)
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        if directions is None:
            generator = torch.Generator().manual_seed(seed)
            directions = (
                random_direction(model, norm=norm, generator=generator),
                random_direction(model, norm=norm, generator=generator),
            )
        if len(directions) != 2:
            raise ValueError("directions: must be a pair")
        d1 = objective.flatten(directions[0], "directions[0]")
        d2 = objective.flatten(directions[1], "directions[1]")
        centre = objective.evaluate(objective.theta)
        check_finite(centre[0])
        results: list[tuple[float, float | None]] = []
        for i, x in enumerate(coords):
            row = objective.theta + float(x) * d1
            results.extend(
                centre if x == 0.0 and y == 0.0 else objective.evaluate(row + float(y) * d2) for y in coords
            )
            logger.info("loss_slice_2d: row %d/%d", i + 1, num_points)
    losses, accuracies = _unzip(results)
    shape = (num_points, num_points)
    return Slice2D(coords, coords.copy(), losses.reshape(shape), None if accuracies is None else accuracies.reshape(shape))


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Interpolation:
    """Mean loss along the straight path from ``model_a`` to ``model_b``.

    Trainable parameters and floating-point buffers (e.g. BatchNorm running
    statistics) are interpolated; everything else comes from ``model_a``.

    Args:
        alphas: path positions; must include 0 and 1 (values outside [0, 1]
            extrapolate). Default ``np.linspace(0, 1, 11)``.
        chunk_size: samples per forward call.
    """
    grid = np.linspace(0.0, 1.0, 11) if alphas is None else np.asarray(alphas, dtype=np.float64)
    if grid.ndim != 1 or not (np.any(grid == 0.0) and np.any(grid == 1.0)) or not np.isfinite(grid).all():
        raise ValueError("alphas: must be a 1-D sequence of finite numbers containing 0 and 1")
    with preserved(model_a), preserved(model_b):
        objective = Objective(model_a, loss_fn, data, chunk_size=chunk_size)
        theta_b = objective.flatten(dict(model_b.named_parameters()), "model_b")
        buffers_a = {n: b for n, b in model_a.named_buffers() if b.is_floating_point()}
        buffers_b = dict(model_b.named_buffers())
        for n, b in buffers_a.items():
            if n not in buffers_b or buffers_b[n].shape != b.shape:
                raise ValueError(f"model_b: buffer {n!r} missing or of another shape")
        order = [int(np.flatnonzero(grid == 0.0)[0]), int(np.flatnonzero(grid == 1.0)[0])]
        order += [i for i in range(len(grid)) if i not in order]
        by_index: dict[int, tuple[float, float | None]] = {}
        for i in order:
            a = float(grid[i])
            theta = (1.0 - a) * objective.theta + a * theta_b
            buffers = {n: (1.0 - a) * b + a * buffers_b[n].to(b.dtype) for n, b in buffers_a.items()}
            by_index[i] = objective.evaluate(theta, buffers)
            if i in order[:2]:
                check_finite(by_index[i][0])
        results = [by_index[i] for i in range(len(grid))]
    losses, accuracies = _unzip(results)
    loss_0 = losses[np.flatnonzero(grid == 0.0)[0]]
    loss_1 = losses[np.flatnonzero(grid == 1.0)[0]]
    barrier = float(np.max(losses - ((1.0 - grid) * loss_0 + grid * loss_1)))
    return Interpolation(grid, losses, accuracies, barrier)


@dataclass(frozen=True)
class PairwiseBarriers:
    """Interpolation barriers between every pair of models.

    Attributes:
        alphas: ``(n,)`` path positions.
        barriers: ``(m, m)`` symmetric, zero diagonal; ``barriers[i, j]`` is the
            :class:`Interpolation` barrier of the path from model ``i`` to model ``j``.
        losses: ``(m, m, n)``; ``losses[i, j] = losses[j, i]`` is the raw loss curve
            from model ``min(i, j)`` (alpha 0) to model ``max(i, j)`` (alpha 1); the
            diagonal holds each model's own loss at every alpha.
    """

    alphas: np.ndarray
    barriers: np.ndarray
    losses: np.ndarray


def pairwise_barriers(
    models: Sequence[nn.Module],
    loss_fn: LossFn,
    data: Iterable[Batch],
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PairwiseBarriers:
    """The matrix of linear-interpolation barriers between every pair of models on the same data.

    Runs :func:`interpolate` once per unordered pair ``i < j`` (``m (m - 1) / 2``
    paths); the barrier is symmetric because the straight line and the path are.

    Args:
        models: two or more models of one architecture; not modified.
        alphas: path positions containing 0 and 1; default ``np.linspace(0, 1, 11)``.
    """
    if len(models) < 2:
        raise ValueError("models: must hold at least two models")
    batches = list(data)
    grid = np.linspace(0.0, 1.0, 11) if alphas is None else np.asarray(alphas, dtype=np.float64)
    m = len(models)
    barriers = np.zeros((m, m))
    losses = np.zeros((m, m, grid.shape[0]))
    for i in range(m):
        for j in range(i + 1, m):
            path = interpolate(models[i], models[j], loss_fn, batches, grid, chunk_size=chunk_size)
            barriers[i, j] = barriers[j, i] = path.barrier
            losses[i, j] = losses[j, i] = path.losses
            losses[i, i] = path.losses[grid == 0.0][0]
            losses[j, j] = path.losses[grid == 1.0][0]
    return PairwiseBarriers(grid, barriers, losses)


def _centre_first(points: list[Tensor], centre: int, objective: Objective) -> list[tuple[float, float | None]]:
    """Evaluate every point, the model itself (``points[centre]``) first: a non-finite loss there is an error."""
    first = objective.evaluate(points[centre])
    check_finite(first[0])
    return [first if i == centre else objective.evaluate(p) for i, p in enumerate(points)]


def _unzip(results: list[tuple[float, float | None]]) -> tuple[np.ndarray, np.ndarray | None]:
    losses = np.array([loss for loss, _ in results])
    if any(acc is None for _, acc in results):
        return losses, None
    return losses, np.array([acc for _, acc in results], dtype=np.float64)
