"""Curvature of the dataset-mean loss: Hessian-vector products, top eigenvalues, trace, density.

The Hessian is that of the *mean* loss over the whole dataset (per-batch
products are averaged with batch-size weights, never summed), with respect to
the trainable parameters in ``named_parameters()`` order. Every function leaves
the model exactly as it found it and draws randomness only from a
``torch.Generator`` seeded by its ``seed`` argument.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fedland import _krylov
from fedland._objective import Batch, LossFn, Objective, check_finite, check_int, check_real, preserved

logger = logging.getLogger(__name__)

#: Up to this many samples, the gradient graph is built once and reused by every product.
RETAIN_GRAPH_MAX_SAMPLES = 4096


class CurvatureOperator(Protocol):
    """What the Krylov, trace and density routines need of a symmetric curvature matrix.

    :class:`HessianOperator`, ``fedland.curvature.GGNOperator``,
    ``fedland.curvature.FisherOperator`` and ``fedland.curvature.SubsetOperator``
    all satisfy it.
    """

    @property
    def dim(self) -> int: ...

    @property
    def params(self) -> Tensor: ...

    num_hvps: int

    def matvec(self, vector: Tensor) -> Tensor: ...


class HessianOperator:
    """Exact Hessian-vector products of the dataset-mean loss, as a ``(dim,) -> (dim,)`` map.

    Products are double backward passes. For data up to ``retain_graph_max_samples``
    the gradient's autograd graph is built once and kept, so each product costs one
    backward pass through it (measured ~1.6x faster than rebuilding it, and faster
    than ``torch.func`` forward-over-reverse, with or without ``vmap``, and than
    batched ``is_grads_batched`` products); larger data is processed group by group,
    rebuilding the graph each time to bound memory. The pass that builds the graph
    also yields the loss, accuracy and gradient (:meth:`value_and_gradient`).

    The operator reads the model's parameter values when it is built and never
    writes to the model; build it again if the model changes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Batch],
        *,
        chunk_size: int | None = None,
        retain_graph_max_samples: int = RETAIN_GRAPH_MAX_SAMPLES,
    ) -> None:
        self._objective = Objective(model, loss_fn, data, chunk_size=chunk_size, group_size=retain_graph_max_samples)
        self._retain = self._objective.num_examples <= retain_graph_max_samples
        self._graphs: list[tuple[Tensor, Tensor]] | None = None
        self._first_order: tuple[float, float | None, Tensor] | None = None
        self.num_hvps = 0

    @property
    def dim(self) -> int:
        """Number of trainable parameters."""
        return self._objective.dim

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters, in the order of the flat vectors."""
        return list(self._objective.names)

    @property
    def params(self) -> Tensor:
        """The point the Hessian is taken at, as a flat ``(dim,)`` vector."""
        return self._objective.theta

    @property
    def objective(self) -> Objective:
        """The dataset-mean loss the operator differentiates (for evaluations at other points)."""
        return self._objective

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """A flat ``(dim,)`` vector as tensors keyed by parameter name."""
        return self._objective.unflatten(vector)

    def matvec(self, vector: Tensor) -> Tensor:
        """``H @ vector`` for a flat ``(dim,)`` vector."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector: must have shape ({self.dim},), got {tuple(vector.shape)}")
        v = vector.to(self._objective.dtype)
        self.num_hvps += 1
        out = torch.zeros_like(self._objective.theta)
        with torch.enable_grad():
            for leaf, grad in self._gradient_graphs():
                (hv,) = torch.autograd.grad(grad, leaf, grad_outputs=v, retain_graph=self._retain)
                out += hv
        check_finite(out, "Hessian-vector product")
        return out

    __call__ = matvec

    def value_and_gradient(self) -> tuple[float, float | None, Tensor]:
        """Mean loss, accuracy (None unless outputs are class scores) and gradient ``(dim,)`` at :attr:`params`.

        Read off the pass that builds the products' graph (run now if no product has run yet).
        """
        if self._first_order is None:
            with torch.enable_grad():
                for _ in self._gradient_graphs():
                    pass
        if self._first_order is None:
            raise RuntimeError("the gradient pass did not record the loss and gradient")
        loss, accuracy, grad = self._first_order
        return loss, accuracy, grad.clone()

    def _gradient_graphs(self) -> Iterable[tuple[Tensor, Tensor]]:
        if self._graphs is not None:
            yield from self._graphs
            return
        graphs = []
        loss_sum, grad_sum = 0.0, torch.zeros_like(self._objective.theta)
        correct_sum: int | None = 0
        for group in self._objective.groups:
            leaf = self._objective.theta.clone().requires_grad_(True)
            loss, correct = self._objective.group_loss(leaf, group)
            check_finite(float(loss.detach()))
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
            check_finite(grad.detach(), "gradient of the loss")
            loss_sum += float(loss.detach())
            correct_sum = None if correct is None or correct_sum is None else correct_sum + correct
            grad_sum += grad.detach()
            if self._retain:
                graphs.append((leaf, grad))
            yield leaf, grad
        if self._first_order is None:
            accuracy = None if correct_sum is None else correct_sum / self._objective.num_examples
            self._first_order = (loss_sum, accuracy, grad_sum)
        if self._retain:
            self._graphs = graphs


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], vector: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``H v`` of the dataset-mean loss for ``v`` keyed by trainable parameter name.

    Returns:
        Tensors keyed like ``vector``.
    """
    with preserved(model):
        op = HessianOperator(model, loss_fn, data)
        flat = op._objective.flatten(vector, "vector")
        return {n: t.clone() for n, t in op.unflatten(op.matvec(flat)).items()}


@dataclass(frozen=True)
class EigenResult:
    """Top Hessian eigenvalues.

    Attributes:
        values: eigenvalues, descending.
        vectors: ``(k, dim)`` unit eigenvector estimates, flat in parameter order.
        residuals: ``||H x - lambda x||`` bounds per eigenpair.
        num_hvps: Hessian-vector products used.
        converged: whether every pair met the tolerance within the iteration cap.
    """

    values: np.ndarray
    vectors: Tensor
    residuals: np.ndarray
    num_hvps: int
    converged: bool


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-5,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | None = None,
    check_steps: int = 0,
) -> EigenResult:
    """The ``k`` largest eigenvalues of the Hessian of the dataset-mean loss.

    Args:
        k: how many eigenvalues.
        method: ``"lanczos"`` (full reorthogonalization; algebraically largest) or
            ``"power"`` (power iteration with deflation; largest in magnitude).
        tol: relative residual tolerance. Lanczos accepts when every wanted Ritz pair
            has ``||H x_i - theta_i x_i|| <= tol * max(|theta_i|, 0.01 max|theta|)``
            and the next Ritz value, even raised by its residual, cannot overtake
            the k-th (or has converged too); see ``fedland._krylov.lanczos_top``.
            Power iteration stops when ``||H q - theta q|| <= tol * |theta|``.
        max_iter: cap on products (Lanczos, in total; must be >= k) or per eigenvalue (power).
        seed: seeds the starting vectors. The Lanczos start is the normalised
            gradient plus a normalised Gaussian vector (the gradient comes free
            with the products' graph and lies mostly in the top eigenspace).
        chunk_size: samples per forward call; None chooses it from the model's activation size.
        check_steps: Lanczos only: products of an optional restart check, a second
            Krylov sequence from a fresh random vector orthogonal to the first, run
            once the first is accepted (0, the default, skips it).

    Returns:
        An :class:`EigenResult`. What ``converged=True`` guarantees: each value
        ``theta_i`` is within its residual ``r_i`` of an eigenvalue of the Hessian
        (symmetric matrices: ``|theta_i - lambda| <= r_i``, and
        ``<= r_i^2 / gap`` given the gap to the rest of the spectrum), and, for
        Lanczos, no unconverged Ritz value of the Krylov space could still rise
        past ``theta_k`` (plus, with ``check_steps``, the same held after a second
        sequence from an independent random vector). That the values are the *k
        largest* is then very likely but not certain: an eigenvalue whose
        eigenvector the random start(s) barely touch can still be missed; no
        matrix-free method can exclude it. ``converged`` is False if the cap was hit first.
    """
    _check_eigen_arguments(k, method, tol, max_iter, check_steps)
    with preserved(model):
        op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size)
        return operator_top_eigenvalues(
            op, k, method=method, tol=tol, max_iter=max_iter, seed=seed, check_steps=check_steps
        )


def _check_eigen_arguments(k: int, method: str, tol: float, max_iter: int, check_steps: int) -> None:
    check_int(k, "k")
    check_real(tol, "tol")
    check_int(max_iter, "max_iter")
    if method not in ("lanczos", "power"):
        raise ValueError("method: must be 'lanczos' or 'power'")
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"max_iter: must be >= k ({k}): Lanczos spends at least one product per eigenvalue")
    check_int(check_steps, "check_steps", minimum=0)


def operator_top_eigenvalues(
    op: CurvatureOperator,
    k: int,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-5,
    max_iter: int = 100,
    seed: int = 0,
    check_steps: int = 0,
) -> EigenResult:
    """:func:`top_eigenvalues` on an existing operator (shared with other metrics of the same model and data)."""
    _check_eigen_arguments(k, method, tol, max_iter, check_steps)
    if k > op.dim:
        raise ValueError(f"k: must be <= the number of parameters ({op.dim})")
    used = op.num_hvps
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(op.dim, generator=generator, dtype=op.params.dtype).to(op.params.device)
    if isinstance(op, HessianOperator):
        start = _gradient_start(op, start)
    if method == "lanczos":
        ritz = _krylov.lanczos_top(
            op.matvec, start, k, tol=tol, max_iter=max_iter, generator=generator, check_steps=check_steps
        )
    else:
        ritz = _krylov.power_top(op.matvec, start, k, tol=tol, max_iter=max_iter, generator=generator)
    if not ritz.converged:
        logger.warning("top_eigenvalues: not converged after %d products (tol=%g)", op.num_hvps - used, tol)
    return EigenResult(ritz.values, ritz.vectors, ritz.residuals, op.num_hvps - used, ritz.converged)


def _gradient_start(op: HessianOperator, random: Tensor) -> Tensor:
    """``g / ||g|| + z / ||z||``: the gradient (free from the products' graph) plus the random start.

    The gradient of a trained network lies mostly in the top eigenspace of its
    Hessian (Gur-Ari et al. 2018, "Gradient descent happens in a tiny
    subspace"), so Lanczos from it resolves the top eigenvalues in fewer
    products (FedCNN on 500 MNIST images: 1e-4 relative error after 4 products
    instead of 6). The random half keeps every eigenvector as visible as from
    a random start, so no eigenvalue is easier to miss. A zero gradient leaves the random start.
    """
    grad = op.value_and_gradient()[2]
    norm = float(grad.norm())
    if norm == 0.0:
        return random
    return grad / norm + random / random.norm()


@dataclass(frozen=True)
class TraceResult:
    """A stochastic estimate of the Hessian trace.

    Attributes:
        estimate: the trace estimate.
        std_error: its standard error (for Hutch++, that of the Hutchinson part
            on the deflated remainder, the only random term once the sketch is fixed).
        num_hvps: Hessian-vector products used.
        method: ``"hutch++"`` or ``"hutchinson"``.
    """

    estimate: float
    std_error: float
    num_hvps: int
    method: str


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    num_hvps: int = 60,
    seed: int = 0,
    chunk_size: int | None = None,
) -> TraceResult:
    """Estimate the trace of the Hessian of the dataset-mean loss with Rademacher probes.

    Args:
        method: ``"hutch++"`` (Meyer et al. 2021; far lower variance when a few
            eigenvalues dominate, as in neural networks) or ``"hutchinson"``.
        num_hvps: product budget (>= 4 for Hutch++, >= 2 for Hutchinson).
        seed: seeds the probes.
        chunk_size: samples per forward call; None chooses it from the model's activation size.
    """
    minimum = {"hutch++": 4, "hutchinson": 2}
    if method not in minimum:
        raise ValueError("method: must be 'hutch++' or 'hutchinson'")
    check_int(num_hvps, "num_hvps")
    if num_hvps < minimum[method]:
        raise ValueError(f"num_hvps: must be >= {minimum[method]} for {method}")
    with preserved(model):
        op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size)
        return operator_trace(op, method=method, num_hvps=num_hvps, seed=seed)


def operator_trace(
    op: CurvatureOperator,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    num_hvps: int = 60,
    seed: int = 0,
) -> TraceResult:
    """:func:`hessian_trace` on an existing operator (shared with other metrics of the same model and data)."""
    minimum = {"hutch++": 4, "hutchinson": 2}
    if method not in minimum:
        raise ValueError("method: must be 'hutch++' or 'hutchinson'")
    check_int(num_hvps, "num_hvps")
    if num_hvps < minimum[method]:
        raise ValueError(f"num_hvps: must be >= {minimum[method]} for {method}")
    generator = torch.Generator().manual_seed(seed)
    estimator = _krylov.hutch_plus_plus if method == "hutch++" else _krylov.hutchinson
    est = estimator(op.matvec, op.dim, num_hvps, generator, op.params)
    return TraceResult(est.estimate, est.std_error, est.num_matvecs, method)


@dataclass(frozen=True)
class SpectralDensity:
    """An estimate of the Hessian's eigenvalue density.

    Attributes:
        nodes: quadrature nodes (Ritz values of every probe).
        weights: their weights; all together sum to 1.
        grid: points the smoothed density is evaluated at.
        density: Gaussian-smoothed density on ``grid``; integrates to 1 (trapezoid rule).
        sigma: the kernel's standard deviation.
        num_hvps: Hessian-vector products used.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    num_hvps: int


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    num_probes: int = 4,
    lanczos_steps: int = 80,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Args:
        num_probes: independent Rademacher starting vectors.
        lanczos_steps: Lanczos steps (products) per probe.
        grid_points: size of the evaluation grid, spanning the nodes +- 5 sigma.
        sigma: Gaussian kernel width; default 1% of the nodes' range.
        seed: seeds the probes.
        chunk_size: samples per forward call; None chooses it from the model's activation size.
    """
    with preserved(model):
        op = HessianOperator(model, loss_fn, data, chunk_size=chunk_size)
        return operator_spectral_density(
            op, num_probes=num_probes, lanczos_steps=lanczos_steps, grid_points=grid_points, sigma=sigma, seed=seed
        )


def operator_spectral_density(
    op: CurvatureOperator,
    *,
    num_probes: int = 4,
    lanczos_steps: int = 80,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """:func:`spectral_density` of an existing operator (the Hessian, a GGN, a Fisher, a parameter subset)."""
    check_int(num_probes, "num_probes")
    check_int(lanczos_steps, "lanczos_steps")
    check_int(grid_points, "grid_points", minimum=2)
    if sigma is not None:
        check_real(sigma, "sigma")
    used = op.num_hvps
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, _ = _krylov.slq_nodes(op.matvec, op.dim, lanczos_steps, num_probes, generator, op.params)
    span = float(nodes.max() - nodes.min())
    width = sigma if sigma is not None else max(0.01 * span, 1e-12 * max(abs(nodes).max(), 1.0))
    grid = np.linspace(nodes.min() - 5 * width, nodes.max() + 5 * width, grid_points)
    density = weights @ np.exp(-0.5 * ((nodes[:, None] - grid[None, :]) / width) ** 2)  # (grid_points,)
    density /= np.trapezoid(density, grid)
    return SpectralDensity(nodes, weights, grid, density, width, op.num_hvps - used)
