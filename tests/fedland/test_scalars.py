"""Scalar metrics against hand computations."""

from __future__ import annotations

import copy
import math
from typing import cast

import pytest
import torch
from torch import nn

from fedland.scalars import cosine_similarity, distance, gradient_dissimilarity, gradient_norm, path_norm, sharpness
from tests.fedland._landscape_helpers import (
    assert_unchanged,
    make_data,
    messy_state,
    plain_loss,
    snapshot,
    tiny_cnn,
    tiny_mlp,
)

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()
DATA = make_data((4,), [7, 13, 5, 15])


def _reference_gradient(model: nn.Module, data: list) -> list[torch.Tensor]:
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in data)
    loss = sum(LOSS(ref(x), y) * len(y) for x, y in data) / total
    return list(torch.autograd.grad(loss, params))


def test_gradient_norm_matches_autograd() -> None:
    model = tiny_mlp()
    expected = math.sqrt(sum(float((g**2).sum()) for g in _reference_gradient(model, DATA)))
    assert gradient_norm(model, LOSS, DATA) == pytest.approx(expected, rel=1e-12)


def test_sharpness_is_loss_after_normalised_ascent_step() -> None:
    model = tiny_mlp()
    grads = _reference_gradient(model, DATA)
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads):
            p.add_(0.1 * g / norm)
    expected = plain_loss(stepped, LOSS, DATA) - plain_loss(model, LOSS, DATA)
    assert sharpness(model, LOSS, DATA, rho=0.1) == pytest.approx(expected, rel=1e-10)
    assert expected > 0


def test_path_norm_of_two_layer_net_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))  # negative weights and biases
    w1, w2 = cast(nn.Linear, net[0]).weight.detach(), cast(nn.Linear, net[2]).weight.detach()
    paths = sum(float(w2[k, j] ** 2 * w1[j, i] ** 2) for i in range(3) for j in range(4) for k in range(2))
    assert path_norm(net, (3,)) == pytest.approx(math.sqrt(paths), rel=1e-12)


def test_path_norm_folds_eval_batchnorm_scale_and_drops_shift() -> None:
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        cast(torch.Tensor, net[1].running_mean).copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        cast(torch.Tensor, net[1].running_var).copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    net.train()
    before = snapshot(net)
    bn = cast(nn.BatchNorm1d, net[1])
    scale = bn.weight.detach() / torch.sqrt(cast(torch.Tensor, bn.running_var) + bn.eps)
    w1, w2 = cast(nn.Linear, net[0]).weight.detach(), cast(nn.Linear, net[3]).weight.detach()
    paths = float(((w2**2) @ torch.diag(scale**2) @ (w1**2)).sum())
    assert path_norm(net, (3,)) == pytest.approx(math.sqrt(paths), rel=1e-12)
    assert_unchanged(net, before)


def test_path_norm_folds_a_batchnorm_without_affine_parameters() -> None:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        cast(torch.Tensor, net[1].running_var).copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    bn = cast(nn.BatchNorm1d, net[1])
    scale = 1.0 / torch.sqrt(cast(torch.Tensor, bn.running_var) + bn.eps)
    w1, w2 = cast(nn.Linear, net[0]).weight.detach(), cast(nn.Linear, net[3]).weight.detach()
    paths = float(((w2**2) @ torch.diag(scale**2) @ (w1**2)).sum())
    assert path_norm(net, (3,)) == pytest.approx(math.sqrt(paths), rel=1e-12)


def test_distance_and_cosine_by_hand() -> None:
    a, b, ref = tiny_mlp(0), tiny_mlp(1), tiny_mlp(2)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    va, vb, vr = flat(a), flat(b), flat(ref)
    assert distance(a, b) == pytest.approx(float((va - vb).norm()), rel=1e-12)
    assert distance(a.state_dict(), b) == pytest.approx(float((va - vb).norm()), rel=1e-12)
    assert distance(a, a) == 0.0
    ua, ub = va - vr, vb - vr
    expected = float(ua @ ub / (ua.norm() * ub.norm()))
    assert cosine_similarity(a, b, reference=ref) == pytest.approx(expected, rel=1e-12)
    assert cosine_similarity(a.state_dict(), b.state_dict(), ref.state_dict()) == pytest.approx(expected, rel=1e-12)
    assert cosine_similarity(a, a) == pytest.approx(1.0, rel=1e-14)
    assert math.isnan(cosine_similarity(a, b, reference=a))


def test_distance_rejects_mismatched_weights() -> None:
    other = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with pytest.raises(ValueError, match="^b: "):
        distance(tiny_mlp(), other)
    with pytest.raises(ValueError, match="not in both"):
        distance(tiny_mlp().state_dict(), {"0.weight": torch.zeros(6, 4)})


def test_gradient_dissimilarity_is_one_for_identical_clients() -> None:
    model = tiny_mlp()
    assert gradient_dissimilarity(model, LOSS, [DATA, DATA, list(DATA)]) == pytest.approx(1.0, rel=1e-12)


def test_gradient_dissimilarity_weights_clients_by_size() -> None:
    model = tiny_mlp()
    clients = [make_data((4,), [10], seed=1), make_data((4,), [30, 20], seed=2)]
    g = [torch.cat([t.reshape(-1) for t in _reference_gradient(model, c)]) for c in clients]
    p = [10 / 60, 50 / 60]
    mean = p[0] * g[0] + p[1] * g[1]
    expected = math.sqrt((p[0] * float(g[0] @ g[0]) + p[1] * float(g[1] @ g[1])) / float(mean @ mean))
    assert gradient_dissimilarity(model, LOSS, clients) == pytest.approx(expected, rel=1e-12)
    assert expected > 1.0


def test_models_unchanged_and_global_rng_untouched() -> None:
    for model, data, shape in ((messy_state(tiny_mlp()), DATA, (4,)), (messy_state(tiny_cnn()), make_data((1, 6, 6), [6, 5]), (1, 6, 6))):
        before = snapshot(model)
        state = torch.random.get_rng_state()
        gradient_norm(model, LOSS, data)
        sharpness(model, LOSS, data)
        path_norm(model, shape)
        gradient_dissimilarity(model, LOSS, [data, data[:1]])
        distance(model, model)
        cosine_similarity(model, model)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert_unchanged(model, before)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="rho"):
        sharpness(tiny_mlp(), LOSS, DATA, rho=0.0)
    with pytest.raises(ValueError, match="input_shape"):
        path_norm(tiny_mlp(), ())
    with pytest.raises(ValueError, match="client_data"):
        gradient_dissimilarity(tiny_mlp(), LOSS, [])
