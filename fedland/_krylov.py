"""Matrix-free linear algebra on a symmetric operator given as ``matvec``.

Pure functions of a ``matvec: (dim,) -> (dim,)`` callable and an injected
``torch.Generator``: Lanczos with full reorthogonalization, power iteration,
Hutchinson and Hutch++ trace estimators, and stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Ritz:
    """Ritz pairs of the top of the spectrum and how far they are trusted."""

    values: np.ndarray  # (k,) descending
    vectors: Tensor  # (k, dim) orthonormal rows
    residuals: np.ndarray  # (k,) bound on ||A x - theta x||
    num_matvecs: int
    converged: bool


class _Lanczos:
    """Lanczos with full (twice-applied) reorthogonalization against all previous vectors."""

    def __init__(self, matvec: MatVec, start: Tensor, max_steps: int) -> None:
        self.matvec = matvec
        self.basis = start.new_zeros(max_steps, start.shape[0])  # (m, dim)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
        self.steps = 0
        self.next = start / start.norm()
        self.beta = 0.0

    def step(self) -> float:
        """One product; returns the new residual norm beta."""
        j = self.steps
        q = self.next
        self.basis[j] = q
        w = self.matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - self.beta * self.basis[j - 1]
        done = self.basis[: j + 1]
        for _ in range(2):  # "twice is enough" (Parlett)
            w = w - done.T @ (done @ w)
        self.alphas.append(alpha)
        self.steps = j + 1
        self.beta = float(w.norm())
        self.next = w / self.beta if self.beta > 0 else w
        return self.beta

    def restart(self, start: Tensor) -> None:
        """Continue from a fresh vector orthogonal to the basis (after an invariant subspace)."""
        done = self.basis[: self.steps]
        for _ in range(2):
            start = start - done.T @ (done @ start)
        self.betas.append(0.0)
        self.beta = 0.0
        self.next = start / start.norm()

    def accept_beta(self) -> None:
        self.betas.append(self.beta)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix T."""
        m = self.steps
        t = np.diag(np.asarray(self.alphas, dtype=np.float64))
        off = np.asarray(self.betas[: m - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
        theta, s = np.linalg.eigh(t)
        return theta, s


def lanczos_top(
    matvec: MatVec,
    start: Tensor,
    k: int,
    *,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> Ritz:
    """The ``k`` algebraically largest eigenpairs by Lanczos.

    Stops when every wanted Ritz pair has residual ``|beta_m s_{m,i}| <=
    tol * max(|theta_i|, 0.01 * max|theta|)``; the floor keeps eigenvalues
    near zero from demanding an absolute accuracy float arithmetic cannot give.
    """
    dim = start.shape[0]
    max_steps = min(max_iter, dim)
    lz = _Lanczos(matvec, start, max_steps)
    converged = False
    theta, s, res = np.zeros(0), np.zeros((0, 0)), np.zeros(0)
    while lz.steps < max_steps:
        beta = lz.step()
        theta, s = lz.ritz()
        want = min(k, lz.steps)
        res = np.abs(beta * s[-1, -want:])
        scale = np.maximum(np.abs(theta[-want:]), 0.01 * np.abs(theta).max())
        invariant = beta <= 1e-10 * max(float(np.abs(theta).max()), 1e-300) or lz.steps == dim
        if lz.steps >= k and (bool(np.all(res <= tol * scale)) or invariant):
            converged = True
            break
        if lz.steps == max_steps:
            break
        if invariant:
            lz.restart(torch.randn(dim, generator=generator, dtype=start.dtype, device="cpu").to(start.device))
        else:
            lz.accept_beta()
    want = min(k, lz.steps)
    order = np.arange(len(theta) - 1, len(theta) - 1 - want, -1)
    coeffs = torch.as_tensor(s[:, order].T.copy(), dtype=start.dtype, device=start.device)  # (k, m)
    vectors = coeffs @ lz.basis[: lz.steps]
    return Ritz(theta[order], vectors, res[::-1].copy(), lz.steps, converged)


def power_top(
    matvec: MatVec,
    start: Tensor,
    k: int,
    *,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> Ritz:
    """The ``k`` largest-magnitude eigenpairs by power iteration with deflation.

    Each pair stops when ``||A q - theta q|| <= tol * |theta|`` (``max_iter``
    products per pair at most).
    """
    dim = start.shape[0]
    found: list[Tensor] = []
    values, residuals = [], []
    products, converged = 0, True
    q = start
    for i in range(k):
        if i > 0:
            q = torch.randn(dim, generator=generator, dtype=start.dtype, device="cpu").to(start.device)
        q = _project_out(q, found)
        q = q / q.norm()
        theta, res, ok = 0.0, math.inf, False
        for _ in range(max_iter):
            w = matvec(q)
            products += 1
            theta = float(q @ w)
            res = float((w - theta * q).norm())
            if res <= tol * abs(theta):
                ok = True
                break
            w = _project_out(w, found)
            q = w / w.norm()
        converged = converged and ok
        found.append(q)
        values.append(theta)
        residuals.append(res)
    order = np.argsort(values)[::-1]
    vectors = torch.stack([found[i] for i in order])
    return Ritz(np.asarray(values)[order], vectors, np.asarray(residuals)[order], products, converged)


def _project_out(v: Tensor, basis: list[Tensor]) -> Tensor:
    for u in basis:
        v = v - (u @ v) * u
    return v


def rademacher(dim: int, count: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``(count, dim)`` random signs, drawn on the CPU so results do not depend on the device."""
    signs = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error."""

    estimate: float
    std_error: float
    num_matvecs: int


def hutchinson(matvec: MatVec, dim: int, num_matvecs: int, generator: torch.Generator, like: Tensor) -> TraceEstimate:
    """Hutchinson's estimator with Rademacher probes; standard error from the sample spread."""
    probes = rademacher(dim, num_matvecs, generator, like)
    samples = np.array([float(z @ matvec(z)) for z in probes])
    return TraceEstimate(float(samples.mean()), _std_error(samples), num_matvecs)


def hutch_plus_plus(
    matvec: MatVec, dim: int, num_matvecs: int, generator: torch.Generator, like: Tensor
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace plus Hutchinson on the rest.

    A third of the products sketch ``Q = orth(A S)``, a third give ``tr(Q^T A Q)``
    exactly, and the rest run Hutchinson on ``(I - QQ^T) A (I - QQ^T)``. The standard
    error is that of the Hutchinson part given ``Q``, the only random term left.
    """
    sketch = num_matvecs // 3
    probes = num_matvecs - 2 * sketch
    s = rademacher(dim, sketch, generator, like)  # (sketch, dim)
    y = torch.stack([matvec(v) for v in s])  # (sketch, dim)
    q = torch.linalg.qr(y.T.double()).Q.T.to(like.dtype)  # (sketch, dim) orthonormal rows
    top = sum(float(v @ matvec(v)) for v in q)
    g = rademacher(dim, probes, generator, like)
    g = g - (g @ q.T) @ q
    samples = np.array([float(z @ matvec(z)) for z in g])
    return TraceEstimate(top + float(samples.mean()), _std_error(samples), num_matvecs)


def _std_error(samples: np.ndarray) -> float:
    if samples.size < 2:
        return math.inf
    return float(samples.std(ddof=1) / math.sqrt(samples.size))


def slq_nodes(
    matvec: MatVec, dim: int, steps: int, num_probes: int, generator: torch.Generator, like: Tensor
) -> tuple[np.ndarray, np.ndarray, int]:
    """Stochastic Lanczos quadrature: nodes and weights (summing to 1) of the spectral measure."""
    nodes, weights, products = [], [], 0
    for z in rademacher(dim, num_probes, generator, like):
        lz = _Lanczos(matvec, z, min(steps, dim))
        while lz.steps < min(steps, dim):
            beta = lz.step()
            if beta <= 1e-10 * max(abs(a) for a in lz.alphas) or lz.steps == min(steps, dim):
                break
            lz.accept_beta()
        products += lz.steps
        theta, s = lz.ritz()
        nodes.append(theta)
        weights.append(s[0] ** 2 / num_probes)
    return np.concatenate(nodes), np.concatenate(weights), products
