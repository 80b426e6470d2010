"""The landscape measurements of a federated round, as JSON-able dicts.

Pure functions over the metrics of ``fedland`` (``top_eigenvalues``,
``hessian_trace``, ``gradient_norm``, ``sharpness``, ``interpolate``,
``loss_slice_2d``, ...): the client and the server call them on a fixed subset
of their data, materialised once as a single batch, and store what they return.
Every float in a returned dict is finite or ``None`` (undefined, e.g. the cosine
with a zero update), so the dicts travel as strict JSON. Models are not modified.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedland._objective import NonFiniteLossError, auto_chunk_size, evaluation_loop, materialize, preserved
from fedland.curvature import Curvature, flatness_gap
from fedland.directions import model_direction
from fedland.generalization import generalization_gap, pac_bayes_flatness, weight_norms, zero_one_error
from fedland.hessian import HessianOperator, operator_top_eigenvalues, operator_trace, spectral_density
from fedland.scalars import cosine_similarity, distance
from fedland.slices import Interpolation, centered_grid, interpolate, loss_slice_2d
from fedland.slices import pairwise_barriers as barrier_matrix
from fedland.spec import LandscapeSpec

__all__ = [
    "DENSITY_POINTS",
    "DENSITY_PROBES",
    "DENSITY_STEPS",
    "EIGEN_MAX_ITER",
    "EIGEN_TOL",
    "density_document",
    "finite_or_none",
    "gap_document",
    "flatness_gap_document",
    "landscape_subset",
    "mean_loss",
    "measure_client_round",
    "MEASUREMENT_FLAGS",
    "cosine_or_none",
    "measure_generalization",
    "measure_model",
    "member_densities",
    "pairwise_barriers",
    "pca_surface",
]

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> scalar mean loss

#: Lanczos residual tolerance for the top eigenvalues: the eigenvalue error is about
#: residual^2 / gap (~1e-4 relative here), far below the sampling noise of a 256-example subset.
EIGEN_TOL = 1e-2
#: Pairwise barriers cost m(m-1)/2 paths and the flatness gap m + 1 Lanczos runs: a round's between-client
#: measures are taken only with at most this many participants (the other round-level measures are linear in m).
PAIRWISE_MAX_MEMBERS = 16
EIGEN_MAX_ITER = 60
#: The spectral densities of the experiment's analysis: stochastic Lanczos quadrature (Ghorbani et al. 2019) with
#: this many probes and Lanczos steps, evaluated on this many grid points.
DENSITY_PROBES, DENSITY_STEPS, DENSITY_POINTS = 3, 40, 400


#: The keys of a measurement document that hold a boolean (all other leaves are numbers, null or a name).
MEASUREMENT_FLAGS = frozenset({"saturated", "top_eigenvalues_converged"})


def landscape_subset(num_examples: int, num_samples: int, seed: int | Sequence[int]) -> np.ndarray:
    """The fixed subset a landscape measurement uses: sorted indices into ``num_examples`` examples.

    Args:
        num_examples: size of the data the subset is drawn from.
        num_samples: wanted size; all examples when there are fewer.
        seed: an integer or a sequence of non-negative integers (e.g.
            ``(spec.seed, client_index)``), fed to ``numpy.random.default_rng``.

    Returns:
        ``(min(num_samples, num_examples),)`` int64 indices, ascending, without repeats.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples: must be a positive integer, got {num_examples!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: must be a positive integer, got {num_samples!r}")
    if num_samples >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=num_samples, replace=False)).astype(np.int64)


def measure_model(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    lspec: LandscapeSpec,
    seed: int,
    *,
    pac_bayes: bool = True,
) -> dict[str, Any]:
    """Loss, accuracy and curvature scalars of one model on fixed data.

    The numbers are those of ``mean_loss``, ``gradient_norm``, ``sharpness``,
    ``top_eigenvalues(tol=EIGEN_TOL, max_iter=EIGEN_MAX_ITER, seed=seed)`` and
    ``hessian_trace(num_hvps=lspec.trace_probes, seed=seed)`` (up to rounding),
    computed from one ``HessianOperator``: the pass that builds its gradient
    graph gives loss, accuracy and gradient, and both Krylov methods reuse it.

    Args:
        model: not modified.
        loss_fn: mean-reduced loss ``(outputs, targets) -> scalar``.
        batches: the data; read once.
        lspec: ``top_k``, ``trace_probes`` and ``sharpness_rho`` are used.
        seed: seeds the Lanczos start and the trace probes.
        pac_bayes: False leaves the PAC-Bayes flatness out of ``generalization`` (``measure_generalization``).

    Returns:
        ``{"loss", "accuracy", "grad_norm", "top_eigenvalues": [top_k], "top_eigenvalues_converged", "trace",
        "trace_stderr", "sharpness", "generalization"}``; ``generalization`` is
        ``measure_generalization``'s document. Every value None (and a warning
        logged) when the loss or its gradient is not finite at the model.
    """
    try:
        return _measure_model(model, loss_fn, batches, lspec, seed, pac_bayes)
    except NonFiniteLossError as error:
        log.warning("measure_model: %s; stored as None", error)
        keys = ("loss", "accuracy", "grad_norm", "trace", "trace_stderr", "sharpness")
        return {**{k: None for k in keys}, "top_eigenvalues": [None] * lspec.top_k, "top_eigenvalues_converged": None,
                "generalization": None}


def _measure_model(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], lspec: LandscapeSpec, seed: int, pac_bayes: bool
) -> dict[str, Any]:
    with preserved(model):
        op = HessianOperator(model, loss_fn, batches)
        loss, accuracy, grad = op.value_and_gradient()
        eigen = operator_top_eigenvalues(op, lspec.top_k, tol=EIGEN_TOL, max_iter=EIGEN_MAX_ITER, seed=seed)
        trace = operator_trace(op, num_hvps=lspec.trace_probes, seed=seed)
        norm = grad.norm()
        sharp = 0.0
        if float(norm) != 0.0:
            ascended, _ = op.objective.evaluate(op.params + (lspec.sharpness_rho / norm) * grad)
            sharp = ascended - loss
    return {
        "loss": finite_or_none(loss),
        "accuracy": finite_or_none(accuracy),
        "grad_norm": finite_or_none(norm),
        "top_eigenvalues": [finite_or_none(v) for v in eigen.values],
        "top_eigenvalues_converged": bool(eigen.converged),
        "trace": finite_or_none(trace.estimate),
        "trace_stderr": finite_or_none(trace.std_error),
        "sharpness": finite_or_none(sharp),
        "generalization": measure_generalization(model, batches, lspec, seed, pac_bayes=pac_bayes),
    }


def measure_generalization(
    model: nn.Module, batches: Iterable[Batch], lspec: LandscapeSpec, seed: int, *, pac_bayes: bool = True
) -> dict[str, Any]:
    """PAC-Bayes flatness (plain and magnitude-aware, on the 0-1 error) and weight norms of one model.

    Uses ``pac_bayes_flatness(model, zero_one_error, batches, deviation=lspec.pac_bayes_deviation,
    samples=lspec.pac_bayes_samples, steps=lspec.pac_bayes_steps, seed=seed)`` (and with
    ``magnitude_aware=True``) and ``weight_norms(model, power_iterations=lspec.power_iterations, seed=seed)``.

    Returns:
        ``{"pac_bayes": {"saturated", "sigma", "sigma_low", "sigma_high", "flatness", "flatness_low",
        "flatness_high", "bound", "deviation", "deviation_stderr"}, "pac_bayes_magnitude": {...},
        "norms": {"frobenius_sum", "spectral_sum", "log_frobenius_product", "log_spectral_product",
        "layers": [{"name", "frobenius", "spectral"}]}}``. The ``_low``/``_high`` pairs are the 95%
        interval (``PacBayes``); every PAC-Bayes number is None when ``saturated`` (the search ran into
        an end of its range: the value would measure the range, not the model). Without ``pac_bayes`` the
        two PAC-Bayes entries are absent (not measured).
    """
    out: dict[str, Any] = {}
    for key, magnitude in (("pac_bayes", False), ("pac_bayes_magnitude", True)) if pac_bayes else ():
        result = pac_bayes_flatness(
            model, zero_one_error, batches, deviation=lspec.pac_bayes_deviation, samples=lspec.pac_bayes_samples,
            steps=lspec.pac_bayes_steps, magnitude_aware=magnitude, seed=seed,
        )
        # saturated: the search measured its own range, not the model; no number is stored for it
        number = (lambda value: None) if result.saturated else finite_or_none
        low, high = result.flatness_interval
        out[key] = {
            "saturated": result.saturated,
            "sigma": number(result.sigma),
            "sigma_low": number(result.sigma_low),
            "sigma_high": number(result.sigma_high),
            "flatness": number(result.flatness),
            "flatness_low": number(low),
            "flatness_high": number(high),
            "bound": number(result.bound),
            "deviation": number(result.deviation_at_sigma),
            "deviation_stderr": number(result.deviation_stderr),
        }
    norms = weight_norms(model, power_iterations=lspec.power_iterations, seed=seed)
    out["norms"] = {
        "frobenius_sum": finite_or_none(norms.frobenius_sum),
        "spectral_sum": finite_or_none(norms.spectral_sum),
        "log_frobenius_product": finite_or_none(norms.log_frobenius_product),
        "log_spectral_product": finite_or_none(norms.log_spectral_product),
        "layers": [
            {"name": layer.name, "frobenius": finite_or_none(layer.frobenius), "spectral": finite_or_none(layer.spectral)}
            for layer in norms.layers
        ],
    }
    return out


def gap_document(model: nn.Module, train: Iterable[Batch], test: Iterable[Batch]) -> dict[str, Any]:
    """``generalization_gap`` of ``model`` between two datasets (cross-entropy and accuracy, eval mode)."""
    train_loss, train_accuracy = mean_loss(model, F.cross_entropy, train)
    test_loss, test_accuracy = mean_loss(model, F.cross_entropy, test)
    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        return {"loss": None, "accuracy": None}  # no gap at a model whose loss is not finite
    gap = generalization_gap(train_loss, train_accuracy or 0.0, test_loss, test_accuracy or 0.0)
    return {key: finite_or_none(value) for key, value in gap.items()}


def measure_client_round(
    global_model: nn.Module,
    local_model: nn.Module,
    previous_global_weights: Mapping[str, Tensor] | None,
    batches: Iterable[Batch],
    lspec: LandscapeSpec,
    seed: int,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Any]:
    """The ``client_stats.landscape`` document of one client in one round.

    Args:
        global_model: the model the client trained from; not modified.
        local_model: the model it trained; not modified.
        previous_global_weights: the global model the client trained from in the
            previous round (by parameter name), or None when unknown.
        batches: the client's landscape subset.
        lspec: the experiment's landscape settings.
        seed: seeds the stochastic metrics (the same for both models).
        loss_fn: mean-reduced loss; cross-entropy by default.

    Returns:
        ``{"num_samples", "duration_s", "global", "local", "interpolation", "update"}``; the PAC-Bayes
        flatness of both models only when ``lspec.member_pac_bayes`` is not False.
    """
    started = time.perf_counter()
    pac_bayes = lspec.member_pac_bayes is not False
    data = materialize(batches)
    alphas = np.linspace(0.0, 1.0, lspec.interpolation_points)
    chunk = auto_chunk_size(global_model, data[0][0])
    path = _interpolation_or_none(global_model, local_model, loss_fn, data, alphas, chunk)
    update = model_direction(global_model, local_model)
    previous: float | None = None
    if previous_global_weights is not None:
        # global - previous, over the global model's trainable parameters (buffers in the weights are ignored)
        previous_update = {n: -t for n, t in model_direction(global_model, previous_global_weights).items()}
        previous = cosine_or_none(update, previous_update)
    return {
        "num_samples": sum(int(y.shape[0]) for _, y in data),
        "global": measure_model(global_model, loss_fn, data, lspec, seed, pac_bayes=pac_bayes),
        "local": measure_model(local_model, loss_fn, data, lspec, seed, pac_bayes=pac_bayes),
        "interpolation": {
            "alphas": [float(a) for a in alphas],
            "losses": [None] * len(alphas) if path is None else [finite_or_none(v) for v in path.losses],
            "barrier": None if path is None else finite_or_none(path.barrier),
        },
        "update": {
            "distance": _none_if_not_finite(lambda: distance(local_model, global_model)),
            "cosine_to_previous_update": previous,
        },
        "duration_s": time.perf_counter() - started,
    }


def _interpolation_or_none(
    a: nn.Module, b: nn.Module, loss_fn: LossFn, data: list[Batch], alphas: np.ndarray, chunk: int
) -> Interpolation | None:
    """The path from ``a`` to ``b``, or None (logged) when either end has a non-finite loss."""
    try:
        return interpolate(a, b, loss_fn, data, alphas, chunk_size=chunk)
    except NonFiniteLossError as error:
        log.warning("interpolation: %s; stored as None", error)
        return None


def pairwise_barriers(
    models: Sequence[nn.Module],
    batches: Iterable[Batch],
    alphas: Sequence[float] | np.ndarray,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Any]:
    """The round's matrix of interpolation barriers between every pair of client models.

    ``fedland.slices.pairwise_barriers`` on one fixed batch set (e.g. the
    server's held-out batch), as strict JSON.

    Args:
        models: the clients' trained models, in client order; not modified.
        batches: the data every path is measured on.
        alphas: path positions containing 0 and 1.
        loss_fn: mean-reduced loss; cross-entropy by default.

    Returns:
        ``{"alphas": [n], "barriers": [[m] * m], "losses": [[[n] * m] * m]}``:
        ``barriers[i][j]`` the barrier between clients ``i`` and ``j`` (0 on the
        diagonal, None where a path's loss is not finite), ``losses[i][j]`` the raw
        curve from ``min(i, j)`` to ``max(i, j)``.
    """
    data = materialize(batches)
    grid = np.asarray(alphas, dtype=np.float64)
    chunk = auto_chunk_size(models[0], data[0][0]) if models else 1
    try:
        result = barrier_matrix(models, loss_fn, data, grid, chunk_size=chunk)
    except NonFiniteLossError as error:
        log.warning("pairwise_barriers: %s; stored as None", error)
        m = len(models)
        return {"alphas": grid.tolist(), "barriers": [[None] * m for _ in range(m)],
                "losses": [[[None] * len(grid) for _ in range(m)] for _ in range(m)]}
    return {
        "alphas": [float(a) for a in result.alphas],
        "barriers": [[finite_or_none(v) for v in row] for row in result.barriers],
        "losses": [[[finite_or_none(v) for v in curve] for curve in row] for row in result.losses],
    }


def flatness_gap_document(
    global_model: nn.Module,
    local_models: Sequence[nn.Module],
    client_batches: Sequence[Iterable[Batch]],
    seed: int,
    *,
    curvature: Curvature = "hessian",
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Any]:
    """The round's local-vs-global flatness gap (``fedland.curvature.flatness_gap``) as strict JSON.

    Top eigenvalues use ``tol=EIGEN_TOL``, ``max_iter=EIGEN_MAX_ITER`` and ``seed``.

    Returns:
        ``{"curvature", "local": [m], "global", "gaps": [m], "mean_gap"}``; all None
        (logged) when a loss is not finite.
    """
    datasets = [materialize(b) for b in client_batches]
    try:
        gap = flatness_gap(global_model, local_models, loss_fn, datasets, curvature=curvature,
                           tol=EIGEN_TOL, max_iter=EIGEN_MAX_ITER, seed=seed)
    except NonFiniteLossError as error:
        log.warning("flatness_gap: %s; stored as None", error)
        m = len(local_models)
        return {"curvature": curvature, "local": [None] * m, "global": None, "gaps": [None] * m, "mean_gap": None}
    return {
        "curvature": curvature,
        "local": [finite_or_none(v) for v in gap.local],
        "global": finite_or_none(gap.global_value),
        "gaps": [finite_or_none(v) for v in gap.gaps],
        "mean_gap": finite_or_none(gap.mean_gap),
    }


def pca_surface(
    center_model: nn.Module,
    client_models: Sequence[nn.Module],
    loss_fn: LossFn,
    batches: Iterable[Batch],
    grid_points: int,
    radius: float,
    *,
    reference: nn.Module | Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss on the plane through ``center_model`` spanned by the clients' two principal update directions.

    The updates ``u_i = client_i - reference`` (trainable parameters, flattened)
    are stacked and decomposed, ``U = P S V^T`` (uncentred: the plane holds the
    updates themselves); ``v_1, v_2`` are the first two rows of ``V^T``, signed so
    the clients' mean coordinate is >= 0. With one client (or updates of rank 1)
    the second direction is a seeded random unit vector orthogonal to ``v_1``
    (``second_direction: "random"``, explained variance 0). Both axes are in the
    same unit ``scale = sqrt(mean_i ||u_i||^2)``, the clients' RMS update norm,
    so ``radius=1`` spans a typical update: the grid point ``(x, y)`` is
    ``center + scale * (x v_1 + y v_2)``, and client ``i`` sits at the
    projection of ``client_i - center`` onto the plane.

    Args:
        center_model: the surface's centre, e.g. the aggregated model; not modified.
        client_models: the clients' trained models, in client order.
        loss_fn: mean-reduced loss.
        batches: the data the loss is measured on.
        grid_points: odd number of points per axis.
        radius: each axis spans ``[-radius, radius]`` (in units of ``scale``).
        reference: the point the updates start from (the model the clients
            trained from); default ``center_model``.
        seed: seeds the random second direction when one is needed.

    Returns:
        ``{"x", "y", "losses" (len(y) rows of len(x)), "explained_variance_ratio": [2],
        "client_points": [{"client_index", "x", "y"}], "scale", "second_direction"}``;
        ``client_index`` is the position in ``client_models``.
    """
    if len(client_models) < 1:
        raise ValueError("client_models: must hold at least one model")
    start = center_model if reference is None else reference
    names = list(model_direction(center_model, center_model))  # trainable parameters, in order
    updates = -torch.stack(
        [_flat(model_direction(client, start), names).double() for client in client_models]
    )  # (clients, dim): client - start; `start` may be a state dict with buffers, so it goes second
    offsets = torch.stack(
        [_flat(model_direction(center_model, client), names).double() for client in client_models]
    )  # (clients, dim)
    _, singular, vt = torch.linalg.svd(updates, full_matrices=False)  # singular: (min(clients, dim),)
    total = float((singular**2).sum())
    if total == 0.0:
        raise ValueError("client_models: every client update is zero; the plane is undefined")
    scale = math.sqrt(total / len(client_models))
    v1 = _signed(vt[0], updates)
    if singular.shape[0] >= 2 and float(singular[1]) > 1e-12 * float(singular[0]):
        v2, second = _signed(vt[1], updates), "principal"
        ratio = [float(singular[0] ** 2) / total, float(singular[1] ** 2) / total]
    else:
        v2, second = _random_orthogonal(v1, seed), "random"
        ratio = [float(singular[0] ** 2) / total, 0.0]
    directions = (_unflat(scale * v1, center_model, names), _unflat(scale * v2, center_model, names))
    data = materialize(batches)
    try:
        surface = loss_slice_2d(
            center_model, loss_fn, data, directions, radius=radius, num_points=grid_points,
            chunk_size=auto_chunk_size(center_model, data[0][0]),
        )
        xs, ys, losses = surface.xs, surface.ys, surface.losses.T  # (len(y), len(x))
    except NonFiniteLossError as error:
        log.warning("pca_surface: %s; losses stored as None", error)
        xs = ys = centered_grid(radius, grid_points)
        losses = np.full((grid_points, grid_points), np.nan)
    coords = offsets @ torch.stack([v1, v2]).T / scale  # (clients, 2)
    return {
        "x": [float(v) for v in xs],
        "y": [float(v) for v in ys],
        "losses": [[finite_or_none(v) for v in row] for row in losses],
        "explained_variance_ratio": ratio,
        "client_points": [
            {"client_index": i, "x": float(coords[i, 0]), "y": float(coords[i, 1])} for i in range(len(client_models))
        ],
        "scale": scale,
        "second_direction": second,
    }


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch]) -> tuple[float, float | None]:
    """Size-weighted mean of ``loss_fn`` over the batches, and accuracy (None unless class scores), in eval mode.

    One ``evaluation_loop`` pass on the model's device; the model is left exactly as found.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    totals = evaluation_loop(model, batches, loss_fn, device=device, correct=_class_scores_correct)
    return totals.loss / totals.count, (None if totals.correct is None else totals.correct / totals.count)


def _class_scores_correct(outputs: Tensor, targets: Tensor) -> int | None:
    """Correct argmax predictions of scores ``(batch, classes)`` against labels ``(batch,)``; None otherwise."""
    if outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():
        return int((outputs.argmax(dim=1) == targets).sum())
    return None


def cosine_or_none(a: Any, b: Any, reference: Any = None) -> float | None:
    """``cosine_similarity(a, b, reference)``, None where it is NaN or a weight is not finite."""
    return _none_if_not_finite(lambda: cosine_similarity(a, b, reference))


def _none_if_not_finite(call: Callable[[], float]) -> float | None:
    try:
        return finite_or_none(call())
    except NonFiniteLossError:
        return None


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when finite, else None (JSON has no NaN or infinity)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _flat(direction: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([direction[n].reshape(-1) for n in names])


def _unflat(vector: Tensor, model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    out, offset = {}, 0
    for n in names:
        p = params[n]
        out[n] = vector[offset : offset + p.numel()].reshape(p.shape).to(p.dtype)
        offset += p.numel()
    return out


def _signed(direction: Tensor, updates: Tensor) -> Tensor:
    """``direction`` or its negative, whichever gives the updates a mean coordinate >= 0."""
    return -direction if float((updates @ direction).sum()) < 0 else direction


def _random_orthogonal(direction: Tensor, seed: int) -> Tensor:
    """A seeded Gaussian unit vector orthogonal to the unit vector ``direction``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(8):
        draw = torch.randn(direction.shape[0], generator=generator, dtype=torch.float64).to(direction.device)
        draw = draw - (draw @ direction) * direction
        draw = draw - (draw @ direction) * direction
        norm = float(draw.norm())
        if norm > 0:
            return draw / norm
    raise ValueError("client_models: no direction orthogonal to the update exists (one parameter?)")


def density_document(
    model: nn.Module, batches: Iterable[Batch], seed: int, *, loss_fn: LossFn = F.cross_entropy
) -> dict[str, list[float]]:
    """The Hessian's eigenvalue density of ``model`` on ``batches``: ``{"grid", "density"}`` (``DENSITY_*`` settings).

    The one definition of the analysis' densities: a worker computes its member's
    (``member_densities``) and the server the aggregate's with it. A non-finite
    density value is stored as 0. Raises ``NonFiniteLossError`` as ``spectral_density``.
    """
    result = spectral_density(model, loss_fn, batches, num_probes=DENSITY_PROBES, lanczos_steps=DENSITY_STEPS,
                              seed=seed, grid_points=DENSITY_POINTS)
    density = np.asarray(result.density, dtype=np.float64)
    return {
        "grid": [float(v) for v in np.asarray(result.grid, dtype=np.float64)],
        "density": [float(v) for v in np.where(np.isfinite(density), density, 0.0)],
    }


def member_densities(
    global_model: nn.Module, local_model: nn.Module, batches: Iterable[Batch], seed: int
) -> dict[str, dict[str, list[float]]]:
    """A member's densities in its experiment's last round, on its landscape subset, seeded by the experiment's seed:
    ``{"global": <the model it trained from>, "local": <the model it trained>}`` (``density_document`` each)."""
    data = materialize(batches)
    return {"global": density_document(global_model, data, seed), "local": density_document(local_model, data, seed)}
