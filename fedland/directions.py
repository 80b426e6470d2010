"""Directions in parameter space: random filter-normalised ones, and from one model to another.

A direction is a ``dict[str, Tensor]`` keyed by trainable parameter name
(``requires_grad=True``, in ``named_parameters()`` order), shaped like the
parameters. Randomness comes only from a ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from fedland._objective import trainable_parameters

Direction = dict[str, Tensor]
Norm = Literal["filter", "layer", "none"]


def random_direction(
    model: nn.Module,
    *,
    seed: int = 0,
    norm: Norm = "filter",
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
) -> Direction:
    """A Gaussian direction scaled like the model's weights (Li et al. 2018).

    Args:
        model: the point the direction is scaled to; not modified.
        seed: seeds the Gaussian draw (ignored when ``generator`` is given).
        norm: ``"filter"``: each filter (slice along dim 0) gets the norm of the
            model's filter; ``"layer"``: each parameter tensor gets the model
            tensor's norm; ``"none"``: raw standard normal.
        ignore_1d: zero direction for 1-D parameters (biases, normalization
            scales and shifts), as Li et al. do. When False they are scaled as a
            whole tensor under ``"filter"`` and ``"layer"``.
        generator: draw from this generator instead (advances it).

    Returns:
        Tensors keyed by trainable parameter name.
    """
    if norm not in ("filter", "layer", "none"):
        raise ValueError("norm: must be 'filter', 'layer' or 'none'")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    direction: Direction = {}
    for name, param in trainable_parameters(model).items():
        w = param.detach()
        # drawn on the CPU so the same seed gives the same direction on any device
        d = torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)
        if w.dim() <= 1 and ignore_1d:
            d.zero_()
        elif norm == "filter" and w.dim() > 1:
            d *= _norms(w) / (_norms(d) + 1e-10)
        elif norm != "none":
            d *= w.norm() / (d.norm() + 1e-10)
        direction[name] = d
    return direction


def _norms(t: Tensor) -> Tensor:
    """Per-filter L2 norms, shaped to broadcast against ``t``."""
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def model_direction(model_from: nn.Module | Mapping[str, Tensor], model_to: nn.Module | Mapping[str, Tensor]) -> Direction:
    """The direction ``theta_to - theta_from`` over the trainable parameters of ``model_from``.

    Either side may be a module or a state dict holding those names.
    """
    start = _param_values(model_from, None, "model_from")
    end = _param_values(model_to, list(start), "model_to")
    for n in start:
        if end[n].shape != start[n].shape:
            raise ValueError(f"model_to: {n!r} has shape {tuple(end[n].shape)}, expected {tuple(start[n].shape)}")
    return {n: end[n] - start[n] for n in start}


def _param_values(model: nn.Module | Mapping[str, Tensor], names: list[str] | None, field: str) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        values = {n: p.detach() for n, p in model.named_parameters()}
        if names is None:
            return {n: t.detach() for n, t in trainable_parameters(model).items()}
    else:
        values = {n: t.detach() for n, t in model.items()}
        if names is None:
            return {n: t for n, t in values.items() if t.is_floating_point()}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{field}: missing parameter {missing[0]!r}")
    return {n: values[n] for n in names}
