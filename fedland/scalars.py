"""Scalar landscape metrics: gradient norm, SAM sharpness, path norm, distances, gradient dissimilarity."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fedland._objective import DEFAULT_CHUNK_SIZE, Batch, LossFn, Objective, check_finite, check_real, preserved

ModelOrParams = nn.Module | Mapping[str, Tensor]  # a model, or tensors by parameter name


def gradient_norm(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> float:
    """L2 norm of the gradient of the dataset-mean loss over the trainable parameters."""
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        _, grad = objective.gradient(objective.theta)
    return float(grad.norm())


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    rho: float = 0.05,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """SAM sharpness: ``L(theta + rho * g / ||g||) - L(theta)`` with ``g`` the gradient of ``L``.

    Args:
        rho: radius of the ascent step (L2, in parameter units), as in Foret et al. 2021.
        chunk_size: samples per forward call.

    Returns:
        The loss increase; 0.0 at a point where the gradient vanishes.
    """
    check_real(rho, "rho")
    with preserved(model):
        objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
        loss, grad = objective.gradient(objective.theta)
        norm = grad.norm()
        if float(norm) == 0.0:
            return 0.0
        ascended, _ = objective.evaluate(objective.theta + (rho / norm) * grad)
    return ascended - loss


def path_norm(model: nn.Module, input_shape: Sequence[int]) -> float:
    """The L2 path norm of a ReLU network (Neyshabur et al. 2015).

    ``sqrt(sum over input-output paths of the product of squared weights)``,
    computed as the square root of the summed outputs of the network with every
    weight squared and every bias zeroed, fed a single all-ones input. Biases are
    excluded. An eval-mode BatchNorm is the per-channel linear map
    ``x * gamma / sqrt(var + eps)`` plus a bias, so its scale is squared and its
    shift dropped. Exact for networks of Linear/Conv layers, ReLU, Flatten and
    BatchNorm; pooling and other layers are applied as they are.

    Args:
        model: not modified.
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
    """
    if not input_shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError("input_shape: must be a non-empty sequence of positive sizes")
    for name, param in model.named_parameters():
        check_finite(param.detach(), f"weights: {name!r}")
    state: dict[str, Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_var is None:
                raise ValueError(f"model: BatchNorm {mod_name!r} without running statistics is not supported")
            scale = 1.0 / torch.sqrt(module.running_var.detach() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.detach()
            if module.running_mean is not None:
                state[f"{prefix}running_mean"] = torch.zeros_like(module.running_mean)
            if module.weight is not None:  # x * weight / sqrt(1 - eps + eps) = x * scale^2
                state[f"{prefix}running_var"] = torch.full_like(module.running_var, 1.0 - module.eps)
                state[f"{prefix}weight"] = scale**2
            else:  # no weight to carry the scale: x / sqrt(var' + eps) = x * scale^2
                state[f"{prefix}running_var"] = scale**-4 - module.eps
            if module.bias is not None:
                state[f"{prefix}bias"] = torch.zeros_like(module.bias)
    for name, param in model.named_parameters():
        if name not in state:
            state[name] = param.detach() ** 2 if param.dim() > 1 else torch.zeros_like(param)
    first = next(iter(model.parameters()))
    ones = torch.ones((1, *[int(s) for s in input_shape]), dtype=first.dtype, device=first.device)
    with preserved(model), torch.no_grad():
        model.eval()
        out = torch.func.functional_call(model, state, (ones,))
    return math.sqrt(max(float(out.sum()), 0.0))


def _values(weights: ModelOrParams) -> dict[str, Tensor]:
    if isinstance(weights, nn.Module):
        return {n: p.detach() for n, p in weights.named_parameters()}
    return {n: t.detach() for n, t in weights.items() if t.is_floating_point()}


def _pair(a: ModelOrParams, b: ModelOrParams, reference: ModelOrParams | None) -> tuple[Tensor, Tensor]:
    """Flat float64 vectors of ``a`` and ``b`` (minus ``reference``), over shared names.

    The names are a module's parameters if any argument is a module, else the
    floating-point entries of ``a``, which the other state dicts must match exactly.
    """
    sides = {"a": _values(a), "b": _values(b)}
    if reference is not None:
        sides["reference"] = _values(reference)
    modules = [k for k, w in (("a", a), ("b", b), ("reference", reference)) if isinstance(w, nn.Module)]
    names = list(sides[modules[0] if modules else "a"])
    for field, values in sides.items():
        if not modules and set(values) != set(names):
            extra = sorted(set(values) ^ set(names))
            raise ValueError(f"{field}: key {extra[0]!r} is not in both state dicts")
        for n in names:
            if n not in values:
                raise ValueError(f"{field}: missing {n!r}")
            if values[n].shape != sides["a"][n].shape:
                raise ValueError(f"{field}: {n!r} has shape {tuple(values[n].shape)}, expected {tuple(sides['a'][n].shape)}")
    flat = {k: torch.cat([v[n].reshape(-1).double().cpu() for n in names]) for k, v in sides.items()}
    for field, vector in flat.items():
        check_finite(vector, f"{field}: weights")
    if reference is not None:
        return flat["a"] - flat["reference"], flat["b"] - flat["reference"]
    return flat["a"], flat["b"]


def distance(a: ModelOrParams, b: ModelOrParams) -> float:
    """L2 distance between two models' parameters (modules: parameters; state dicts: float tensors)."""
    va, vb = _pair(a, b, None)
    return float((va - vb).norm())


def cosine_similarity(a: ModelOrParams, b: ModelOrParams, reference: ModelOrParams | None = None) -> float:
    """Cosine between two models' parameter vectors, or between their updates ``a - reference`` and ``b - reference``.

    Returns:
        The cosine in [-1, 1]; NaN if either vector is zero.
    """
    va, vb = _pair(a, b, reference)
    denom = float(va.norm() * vb.norm())
    return float(va @ vb) / denom if denom > 0 else math.nan


def gradient_dissimilarity(
    model: nn.Module,
    loss_fn: LossFn,
    client_data: Sequence[Iterable[Batch]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """FedProx's B (Li et al. 2020): ``sqrt(sum_i p_i ||g_i||^2 / ||sum_i p_i g_i||^2)``.

    ``g_i`` is the gradient of client ``i``'s mean loss and ``p_i = n_i / sum_j n_j``
    its share of the examples, in both the mean of squared norms and the mean
    gradient (which is then the gradient of the pooled mean loss). B >= 1, with
    equality when all clients' gradients agree.

    Args:
        client_data: one batch iterable per client.
        chunk_size: samples per forward call.

    Returns:
        B; ``inf`` if the mean gradient vanishes.
    """
    if len(client_data) < 1:
        raise ValueError("client_data: must hold at least one client")
    grads, sizes = [], []
    with preserved(model):
        for data in client_data:
            objective = Objective(model, loss_fn, data, chunk_size=chunk_size)
            grads.append(objective.gradient(objective.theta)[1].double())
            sizes.append(objective.num_examples)
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    stacked = torch.stack(grads)  # (clients, dim)
    mean_sq = float(p @ (stacked**2).sum(dim=1))
    mean_norm_sq = float((p @ stacked).norm() ** 2)
    return math.sqrt(mean_sq / mean_norm_sq) if mean_norm_sq > 0 else math.inf
