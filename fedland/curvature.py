"""Curvature operators beside the Hessian: Gauss-Newton, empirical Fisher, a parameter subset.

Each is a symmetric ``(dim,) -> (dim,)`` map with the attributes of
``fedland.hessian.CurvatureOperator``, so ``operator_top_eigenvalues``,
``operator_trace`` and ``operator_spectral_density`` accept it unchanged. All
are taken of the dataset-mean loss ``L(theta) = (1/N) sum_i l_i(theta)`` of
``fedland._objective`` (per-batch mean losses weighted by batch size), in eval
mode, from parameter values read when the operator is built; none writes to the model.

- GGN (Schraudolph 2002; Martens 2020, "New insights and perspectives on the
  natural gradient method", sec. 8): ``G = J^T H_z J`` with ``J = dz/dtheta`` the
  Jacobian of the model outputs ``z`` and ``H_z = d^2 L / dz^2`` the Hessian of
  the loss in the outputs. PSD for losses convex in the outputs (cross-entropy, MSE).
- Empirical Fisher (Kunstner et al. 2019, "Limitations of the empirical Fisher
  approximation"): ``F = (1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of
  example ``i``'s loss alone.
- Subset (layer-wise curvature): ``P C P^T`` for a curvature ``C`` and the
  coordinates ``P`` of a named subset of parameters, i.e. the block of ``C`` on
  those parameters, the others held at their values (not frozen in the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fedland._objective import Batch, LossFn, Objective, _Group, check_finite, check_int, preserved
from fedland.hessian import (
    RETAIN_GRAPH_MAX_SAMPLES,
    EigenResult,
    HessianOperator,
    operator_top_eigenvalues,
)

Curvature = Literal["hessian", "ggn", "fisher"]
CURVATURES: tuple[str, ...] = ("hessian", "ggn", "fisher")


class _JacobianOperator:
    """``sum_groups J_g^T M_g J_g`` products, ``J_g`` the Jacobian of a per-group vector ``z_g(theta)``.

    ``z_g`` and ``M_g`` come from :meth:`_build`. ``J v`` is read off the graph of
    ``J^T u`` by the double-vjp trick (``d/du <J^T u, v> = J v``), so every
    product is three backward passes through a graph built once per group (and
    kept for data up to ``retain_graph_max_samples``).
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
        self._graphs: list[tuple[Tensor, Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]] | None = None
        self.num_hvps = 0

    @property
    def dim(self) -> int:
        """Number of trainable parameters."""
        return self._objective.dim

    @property
    def params(self) -> Tensor:
        """The point the curvature is taken at, flat ``(dim,)``."""
        return self._objective.theta

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters, in the order of the flat vectors."""
        return list(self._objective.names)

    @property
    def objective(self) -> Objective:
        """The dataset-mean loss the operator is built from."""
        return self._objective

    def matvec(self, vector: Tensor) -> Tensor:
        """``C @ vector`` for a flat ``(dim,)`` vector."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector: must have shape ({self.dim},), got {tuple(vector.shape)}")
        v = vector.to(self._objective.dtype)
        self.num_hvps += 1
        out = torch.zeros_like(self._objective.theta)
        with torch.enable_grad():
            for leaf, z, u, jt_u, weight in self._group_graphs():
                (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=v, retain_graph=True)
                (cv,) = torch.autograd.grad(z, leaf, grad_outputs=weight(jv), retain_graph=self._retain)
                out += cv
        check_finite(out, f"{type(self).__name__} product")
        return out

    __call__ = matvec

    def _build(self, leaf: Tensor, group: _Group) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        raise NotImplementedError

    def _group_graphs(self) -> Iterable[tuple[Tensor, Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]]:
        if self._graphs is not None:
            yield from self._graphs
            return
        graphs = []
        for group in self._objective.groups:
            leaf = self._objective.theta.clone().requires_grad_(True)
            z, weight = self._build(leaf, group)
            u = torch.zeros_like(z, requires_grad=True)
            (jt_u,) = torch.autograd.grad(z, leaf, grad_outputs=u, create_graph=True)
            entry = (leaf, z, u, jt_u, weight)
            if self._retain:
                graphs.append(entry)
            yield entry
        if self._retain:
            self._graphs = graphs


class GGNOperator(_JacobianOperator):
    """Generalized Gauss-Newton products ``G v = J^T H_z J v`` of the dataset-mean loss."""

    def _build(self, leaf: Tensor, group: _Group) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        z = self._objective.outputs(leaf, group)
        z_leaf = z.detach().requires_grad_(True)
        loss = self._objective.outputs_loss(z_leaf, group)
        check_finite(float(loss.detach()))
        (gz,) = torch.autograd.grad(loss, z_leaf, create_graph=True)
        if not gz.requires_grad:  # a loss linear in the outputs has H_z = 0
            return z, torch.zeros_like

        def weight(a: Tensor) -> Tensor:
            (hz,) = torch.autograd.grad(gz, z_leaf, grad_outputs=a, retain_graph=True)
            return hz

        return z, weight


class FisherOperator(_JacobianOperator):
    """Empirical Fisher products ``F v = (1/N) sum_i g_i (g_i . v)`` of the per-example losses."""

    def _build(self, leaf: Tensor, group: _Group) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        outputs = self._objective.outputs(leaf, group)
        with torch.no_grad():  # the per-example losses below hide a reduction="none" loss: check the batches'
            self._objective.outputs_loss(outputs.detach(), group)
        losses = self._objective.example_losses(outputs, group)  # (n_group,)
        check_finite(float(losses.detach().sum()))
        n = self._objective.num_examples
        return losses, lambda a: a / n


class SubsetOperator:
    """The block of a curvature operator on a named subset of its parameters.

    ``matvec`` embeds the subset vector with zeros elsewhere, applies the base
    operator and keeps the subset's coordinates: the curvature of the loss as a
    function of those parameters alone, the others fixed at their values.
    """

    def __init__(self, base: HessianOperator | _JacobianOperator, names: Sequence[str]) -> None:
        known = base.param_names
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise ValueError(
                f"names: {unknown[0]!r} is not a trainable parameter" if unknown else "names: must not be empty"
            )
        wanted = set(names)
        offsets = np.cumsum([0, *base.objective.numels])
        pieces = [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i, n in enumerate(known) if n in wanted]
        self.names = [n for n in known if n in wanted]
        self._index = torch.cat(pieces).to(base.params.device)
        self._base = base
        self.num_hvps = 0

    @property
    def dim(self) -> int:
        """Number of parameters in the subset."""
        return int(self._index.numel())

    @property
    def params(self) -> Tensor:
        """The subset's values, flat ``(dim,)``."""
        return self._base.params[self._index]

    def matvec(self, vector: Tensor) -> Tensor:
        """``P C P^T @ vector`` for a flat subset vector."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector: must have shape ({self.dim},), got {tuple(vector.shape)}")
        full = torch.zeros_like(self._base.params)
        full[self._index] = vector.to(full.dtype)
        self.num_hvps += 1
        return self._base.matvec(full)[self._index]

    __call__ = matvec


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    curvature: Curvature = "hessian",
    *,
    chunk_size: int | None = None,
) -> HessianOperator | GGNOperator | FisherOperator:
    """The Hessian, GGN or empirical Fisher of the dataset-mean loss as an operator.

    The operator reads the model when built and never writes to it; use it
    inside ``preserved(model)`` or while the model stays as it is.
    """
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, data, chunk_size=chunk_size)
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, data, chunk_size=chunk_size)
    if curvature == "fisher":
        return FisherOperator(model, loss_fn, data, chunk_size=chunk_size)
    raise ValueError(f"curvature: must be one of {', '.join(CURVATURES)}, got {curvature!r}")


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameters grouped by the module that owns them (``"conv1"`` -> ``["conv1.weight", "conv1.bias"]``)."""
    groups: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return groups


def layer_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    k: int = 1,
    curvature: Curvature = "hessian",
    tol: float = 1e-5,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, EigenResult]:
    """Top eigenvalues of the curvature restricted to each group of parameters (per-layer lambda_max).

    For a group ``S`` this is the top of the spectrum of the block ``C[S, S]``:
    the curvature of the loss as a function of ``S``'s parameters alone, the
    rest held at their values (Lanczos with the restart check, as ``top_eigenvalues``).

    Args:
        groups: name -> parameter names; default :func:`layer_groups` (one group per module).
        k, tol, max_iter, seed: as in ``top_eigenvalues``; ``k`` is capped at each group's size.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.

    Returns:
        Group name -> :class:`~fedland.hessian.EigenResult` (vectors over the group's parameters).
    """
    check_int(k, "k")
    with preserved(model):
        wanted = dict(groups) if groups is not None else layer_groups(model)
        if not wanted:
            raise ValueError("groups: must name at least one group")
        base = curvature_operator(model, loss_fn, data, curvature, chunk_size=chunk_size)
        results = {}
        for label, names in wanted.items():
            sub = SubsetOperator(base, list(names))
            results[label] = operator_top_eigenvalues(
                sub, min(k, sub.dim), tol=tol, max_iter=max(max_iter, min(k, sub.dim)), seed=seed
            )
    return results


@dataclass(frozen=True)
class FlatnessGap:
    """Local against global flatness (top curvature eigenvalue).

    Attributes:
        local: ``lambda_max`` of each local model's curvature on its own client's data.
        global_value: ``lambda_max`` of the global model's curvature on the union of the clients' data.
        gaps: ``local[i] - global_value``.
        mean_gap: ``sum_i p_i local[i] - global_value`` with ``p_i = n_i / sum_j n_j``.
    """

    local: list[float]
    global_value: float
    gaps: list[float]
    mean_gap: float


def flatness_gap(
    global_model: nn.Module,
    local_models: Sequence[nn.Module],
    loss_fn: LossFn,
    client_data: Sequence[Iterable[Batch]],
    *,
    curvature: Curvature = "hessian",
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    chunk_size: int | None = None,
) -> FlatnessGap:
    """The gap between each local model's sharpness on its own data and the global model's on all data.

    ``gap_i = lambda_max(C(theta_i; D_i)) - lambda_max(C(theta_global; D_1 u ... u D_n))``,
    the local-vs-global flatness comparison of FL landscape studies (e.g.
    Caldarola et al. 2022, "Improving generalization in federated learning by
    seeking flat minima"): a positive gap means clients sit in sharper regions
    of their own losses than the aggregate does on the union.

    Args:
        local_models: one model per client, in the order of ``client_data``.
        client_data: each client's batches; the union is their concatenation.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        tol, max_iter, seed: as in ``top_eigenvalues`` (k = 1).
    """
    if len(local_models) != len(client_data) or not local_models:
        raise ValueError("local_models: must be non-empty and hold one model per entry of client_data")
    datasets = [list(d) for d in client_data]
    sizes = [sum(int(y.shape[0]) for _, y in d) for d in datasets]

    def top(model: nn.Module, data: list[Batch]) -> float:
        with preserved(model):
            op = curvature_operator(model, loss_fn, data, curvature, chunk_size=chunk_size)
            return float(operator_top_eigenvalues(op, 1, tol=tol, max_iter=max_iter, seed=seed).values[0])

    local = [top(m, d) for m, d in zip(local_models, datasets)]
    global_value = top(global_model, [b for d in datasets for b in d])
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    return FlatnessGap(local, global_value, [v - global_value for v in local], float(p @ np.asarray(local)) - global_value)
