"""Tiny float64 models, data, and independent references for the landscape-metric tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Batches = list[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> scalar loss


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(4, 6) - Tanh - Linear(6, 3) in float64 (51 parameters)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.8)
    return model


class TinyCNN(nn.Module):
    """Conv(1->3, 3x3) - BatchNorm - ReLU - Linear(48 -> 3) on 1x6x6 inputs, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # (batch, 3, 4, 4)
        return self.fc(x.flatten(1))  # (batch, 3)


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A :class:`TinyCNN` with seeded weights and non-trivial BatchNorm running statistics."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyCNN().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        model.train()
        for _ in range(3):  # moves running_mean / running_var away from 0 / 1
            model(torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64) * 2 + 0.3)
    model.eval()
    return model


def make_data(input_shape: tuple[int, ...], sizes: list[int], seed: int = 0, classes: int = 3) -> Batches:
    """Random float64 inputs and class targets in batches of the given (unequal) sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((n, *input_shape), generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen),
        )
        for n in sizes
    ]


def plain_loss(model: nn.Module, loss_fn: nn.Module, data: Batches) -> float:
    """The reference mean loss: sum_b n_b * loss_b / sum_b n_b on an eval-mode copy."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        total = sum(float(loss_fn(ref(x), y)) * len(y) for x, y in data)
    return total / sum(len(y) for _, y in data)


def dense_hessian(model: nn.Module, loss_fn: nn.Module, data: Batches) -> Tensor:
    """The dense Hessian of the mean loss over trainable parameters, by torch.autograd.functional."""
    ref = copy.deepcopy(model).eval()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = sum(len(y) for _, y in data)

    def mean_loss(flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)}
        return sum(loss_fn(torch.func.functional_call(ref, params, (x,)), y) * len(y) for x, y in data) / total

    return torch.autograd.functional.hessian(mean_loss, theta)


def messy_state(model: nn.Module) -> nn.Module:
    """Put a model in train mode with populated ``.grad``s and one frozen parameter."""
    x = torch.randn(5, *_input_shape(model), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model.train()
    model(x).sum().backward()
    if isinstance(model, TinyCNN):
        model.bn.eval()  # mixed modes: train on the model, eval on one child
    first = next(model.parameters())
    first.grad = None  # one parameter without a gradient
    last = list(model.parameters())[-1]
    last.requires_grad_(False)
    return model


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    return (1, 6, 6) if isinstance(model, TinyCNN) else (4,)


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Everything a metric must leave alone, copied."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: None if p.grad is None else id(p.grad) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, dict[str, Any]]) -> None:
    """Fail unless the model matches its snapshot exactly."""
    after = snapshot(model)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (grad is None) == (now is None), f"{name}.grad presence changed"
        if grad is not None:
            assert torch.equal(now, grad), f"{name}.grad changed"
    for key in ("grad_ids", "requires_grad", "modes", "param_ids"):
        assert after[key] == before[key], f"{key} changed"


class _Point(nn.Module):
    """Outputs its parameter vector for every input row."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, x: Tensor) -> Tensor:
        return self.theta.expand(x.shape[0], -1)  # (batch, n)


def quadratic(eigenvalues: Tensor, seed: int = 0) -> tuple[_Point, LossFn, Batches, Tensor]:
    """A loss ``0.5 theta^T A theta`` whose Hessian ``A = Q diag(eigenvalues) Q^T`` is known.

    Returns the model, the loss function, a dataset, and ``A``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues.double()) @ q.T

    def loss_fn(out: Tensor, _targets: Tensor) -> Tensor:
        return 0.5 * torch.einsum("bi,ij,bj->b", out, a, out).mean()

    model = _Point(torch.randn(n, generator=gen, dtype=torch.float64))
    data = [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3)), (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))]
    return model, loss_fn, data, a


def _flat_function(model: nn.Module) -> tuple[LossFn, Tensor]:
    """``theta -> model`` as a function of the flat trainable parameters (eval-mode copy), and theta."""
    ref = copy.deepcopy(model).eval()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def call(flat: Tensor, x: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)}
        return torch.func.functional_call(ref, params, (x,))

    return call, theta


def dense_ggn(model: nn.Module, loss_fn: nn.Module, data: Batches) -> Tensor:
    """``J^T H_z J`` of the mean loss, with dense Jacobians and output Hessian (torch.autograd.functional)."""
    call, theta = _flat_function(model)
    total = sum(len(y) for _, y in data)
    x = torch.cat([x for x, _ in data])
    outputs = call(theta, x).detach()  # (N, C)
    sizes = [len(y) for _, y in data]

    def loss_of_outputs(z: Tensor) -> Tensor:
        return sum(loss_fn(o, y) * len(y) for o, (_, y) in zip(z.split(sizes), data)) / total

    jac = torch.autograd.functional.jacobian(lambda t: call(t, x), theta).reshape(-1, theta.numel())  # (N*C, dim)
    h_z = torch.autograd.functional.hessian(loss_of_outputs, outputs).reshape(outputs.numel(), outputs.numel())
    return jac.T @ h_z @ jac


def dense_fisher(model: nn.Module, loss_fn: nn.Module, data: Batches) -> Tensor:
    """``(1/N) sum_i g_i g_i^T`` from per-example gradients computed one by one."""
    call, theta = _flat_function(model)
    grads = []
    for x, y in data:
        for i in range(len(y)):
            grads.append(torch.autograd.functional.jacobian(lambda t: loss_fn(call(t, x[i : i + 1]), y[i : i + 1]), theta))
    g = torch.stack(grads)  # (N, dim)
    return g.T @ g / g.shape[0]
