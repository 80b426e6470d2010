"""fedland.measure against the metrics it composes, dense Hessians and hand-computed projections."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fedland.hessian import hessian_trace, top_eigenvalues
from fedland.measure import (
    EIGEN_MAX_ITER,
    EIGEN_TOL,
    landscape_subset,
    measure_client_round,
    measure_model,
    pca_surface,
)
from fedland.scalars import gradient_norm, sharpness
from fedland.slices import interpolate
from fedland.spec import LandscapeSpec
from tests.fedland._landscape_helpers import (
    assert_unchanged,
    dense_hessian,
    make_data,
    plain_loss,
    snapshot,
    tiny_cnn,
    tiny_mlp,
)

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()
DATA = make_data((4,), [40])  # one materialised batch, as the stack passes it
LSPEC = LandscapeSpec(top_k=3, trace_probes=12, sharpness_rho=0.1, interpolation_points=6, grid_points=5)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def with_params(model: nn.Module, vector: Tensor) -> nn.Module:
    out = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(vector.to(torch.float64), out.parameters())
    return out


def moved(model: nn.Module, seed: int, size: float = 0.3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    return with_params(model, flat(model) + size * torch.randn(flat(model).shape, generator=gen, dtype=torch.float64))


def test_landscape_subset_is_a_fixed_sorted_sample() -> None:
    a = landscape_subset(1000, 64, (7, 2))
    assert a.dtype == np.int64 and a.shape == (64,)
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 1000
    assert np.array_equal(a, landscape_subset(1000, 64, (7, 2)))
    assert not np.array_equal(a, landscape_subset(1000, 64, (7, 3)))
    assert np.array_equal(landscape_subset(50, 64, 0), np.arange(50))  # fewer examples: all of them
    with pytest.raises(ValueError, match="^num_samples:"):
        landscape_subset(10, 0, 0)
    with pytest.raises(ValueError, match="^num_examples:"):
        landscape_subset(0, 5, 0)


def test_measure_model_equals_the_direct_metrics_and_a_dense_hessian() -> None:
    model = tiny_mlp(seed=3)
    before = snapshot(model)
    got = measure_model(model, LOSS, DATA, LSPEC, seed=11)
    assert_unchanged(model, before)

    eigen = top_eigenvalues(model, LOSS, DATA, k=3, tol=EIGEN_TOL, max_iter=EIGEN_MAX_ITER, seed=11)
    trace = hessian_trace(model, LOSS, DATA, num_hvps=12, seed=11)
    assert got["top_eigenvalues"] == [float(v) for v in eigen.values]
    assert (got["trace"], got["trace_stderr"]) == (trace.estimate, trace.std_error)
    assert got["grad_norm"] == gradient_norm(model, LOSS, DATA)
    assert got["sharpness"] == sharpness(model, LOSS, DATA, rho=0.1)
    assert got["loss"] == pytest.approx(plain_loss(model, LOSS, DATA), rel=1e-12)
    x, y = DATA[0]
    assert got["accuracy"] == float((model(x).argmax(1) == y).double().mean())

    dense = torch.linalg.eigvalsh(dense_hessian(model, LOSS, DATA)).flip(0)  # descending
    # the residual tolerance EIGEN_TOL bounds the eigenvalue error by about EIGEN_TOL^2 * lambda^2 / gap
    assert got["top_eigenvalues"] == pytest.approx(dense[:3].tolist(), rel=10 * EIGEN_TOL**2)
    assert got["trace"] == pytest.approx(float(dense.sum()), rel=0.5)  # a 12-product estimate


def test_client_round_document() -> None:
    previous = tiny_mlp(seed=1)
    global_model = moved(previous, seed=2)
    local = moved(global_model, seed=3)
    states = [snapshot(m) for m in (global_model, local)]
    doc = measure_client_round(global_model, local, previous.state_dict(), DATA, LSPEC, seed=5, loss_fn=LOSS)
    for model, before in zip((global_model, local), states):
        assert_unchanged(model, before)

    assert set(doc) == {"num_samples", "duration_s", "global", "local", "interpolation", "update"}
    assert doc["num_samples"] == 40 and doc["duration_s"] > 0
    assert doc["global"] == measure_model(global_model, LOSS, DATA, LSPEC, seed=5)
    assert doc["local"] == measure_model(local, LOSS, DATA, LSPEC, seed=5)
    path = interpolate(global_model, local, LOSS, DATA, np.linspace(0, 1, 6))
    assert doc["interpolation"] == {
        "alphas": path.alphas.tolist(), "losses": path.losses.tolist(), "barrier": path.barrier,
    }
    update, prior = flat(local) - flat(global_model), flat(global_model) - flat(previous)
    assert doc["update"]["distance"] == pytest.approx(float(update.norm()), rel=1e-12)
    expected = float(update @ prior / (update.norm() * prior.norm()))
    assert doc["update"]["cosine_to_previous_update"] == pytest.approx(expected, rel=1e-12)

    first = measure_client_round(global_model, local, None, DATA, LSPEC, seed=5, loss_fn=LOSS)
    assert first["update"]["cosine_to_previous_update"] is None
    # the global model did not move since the previous round: the cosine is undefined, stored as null
    same = measure_client_round(global_model, local, global_model.state_dict(), DATA, LSPEC, seed=5, loss_fn=LOSS)
    assert same["update"]["cosine_to_previous_update"] is None

    # without the members' PAC-Bayes: the same document less the two PAC-Bayes entries of each model
    assert {"pac_bayes", "pac_bayes_magnitude", "norms"} <= set(doc["local"]["generalization"])
    lean = measure_client_round(global_model, local, previous.state_dict(), DATA,
                                dataclasses.replace(LSPEC, member_pac_bayes=False), seed=5, loss_fn=LOSS)
    for which in ("global", "local"):
        full = doc[which]
        expected_generalization = {k: v for k, v in full["generalization"].items() if not k.startswith("pac_bayes")}
        assert lean[which] == {**full, "generalization": expected_generalization}
        assert set(expected_generalization) == {"norms"}


def _reference_plane(updates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit principal directions (sign rule: mean coordinate >= 0) and the singular values, by numpy."""
    _, s, vt = np.linalg.svd(updates.numpy(), full_matrices=False)
    v = torch.from_numpy(vt[:2].copy())
    v = torch.stack([-d if float((updates @ d).sum()) < 0 else d for d in v])
    return v[0], v[1], torch.from_numpy(s)


def test_pca_surface_three_clients_against_a_numpy_svd() -> None:
    reference = tiny_mlp(seed=4)
    center = moved(reference, seed=5, size=0.1)
    clients = [moved(reference, seed=10 + i) for i in range(3)]
    states = [snapshot(m) for m in (reference, center, *clients)]
    doc = pca_surface(center, clients, LOSS, DATA, 5, 2.0, reference=reference)
    for model, before in zip((reference, center, *clients), states):
        assert_unchanged(model, before)

    updates = torch.stack([flat(c) - flat(reference) for c in clients])  # (3, dim)
    v1, v2, s = _reference_plane(updates)
    scale = math.sqrt(float((s**2).sum()) / 3)
    assert doc["scale"] == pytest.approx(scale, rel=1e-12)
    assert doc["second_direction"] == "principal"
    assert doc["explained_variance_ratio"] == pytest.approx((s[:2] ** 2 / (s**2).sum()).tolist(), rel=1e-10)
    assert doc["x"] == doc["y"] == pytest.approx([-2.0, -1.0, 0.0, 1.0, 2.0])
    losses = np.array(doc["losses"])
    assert losses.shape == (5, 5)  # (len(y), len(x))
    assert losses[2, 2] == pytest.approx(plain_loss(center, LOSS, DATA), rel=1e-12)
    for j, i in [(0, 4), (1, 3), (4, 0)]:  # rows are y, columns x
        point = flat(center) + scale * (doc["x"][i] * v1 + doc["y"][j] * v2)
        assert losses[j, i] == pytest.approx(plain_loss(with_params(center, point), LOSS, DATA), rel=1e-10)
    for index, (client, p) in enumerate(zip(clients, doc["client_points"])):
        offset = flat(client) - flat(center)
        assert p["client_index"] == index
        assert (p["x"], p["y"]) == pytest.approx((float(offset @ v1) / scale, float(offset @ v2) / scale), rel=1e-10)


def test_pca_surface_two_clients_lie_in_the_plane() -> None:
    center = tiny_cnn(seed=1)  # BatchNorm buffers: only parameters span the plane
    clients = [moved(center, seed=20), moved(center, seed=21)]
    doc = pca_surface(center, clients, nn.CrossEntropyLoss(), make_data((1, 6, 6), [12, 9]), 3, 1.0)
    v1, v2, _ = _reference_plane(torch.stack([flat(c) - flat(center) for c in clients]))
    for client, p in zip(clients, doc["client_points"]):
        rebuilt = flat(center) + doc["scale"] * (p["x"] * v1 + p["y"] * v2)
        assert torch.allclose(rebuilt, flat(client), rtol=0, atol=1e-12)  # exact projections
    assert sum(doc["explained_variance_ratio"]) == pytest.approx(1.0, rel=1e-12)


def test_pca_surface_one_client_uses_a_seeded_orthogonal_direction() -> None:
    center = tiny_mlp(seed=6)
    client = moved(center, seed=7)
    doc = pca_surface(center, [client], LOSS, DATA, 3, 1.0, seed=3)
    assert doc["second_direction"] == "random"
    assert doc["explained_variance_ratio"] == [1.0, 0.0]
    assert doc["scale"] == pytest.approx(float((flat(client) - flat(center)).norm()), rel=1e-12)
    [point] = doc["client_points"]
    assert (point["x"], point["y"]) == pytest.approx((1.0, 0.0), abs=1e-12)
    # row y = 0, column x = 1: the client itself
    assert np.array(doc["losses"])[1, 2] == pytest.approx(plain_loss(client, LOSS, DATA), rel=1e-10)
    assert doc == pca_surface(center, [client], LOSS, DATA, 3, 1.0, seed=3)
    assert doc["losses"] != pca_surface(center, [client], LOSS, DATA, 3, 1.0, seed=4)["losses"]


def test_pca_surface_refuses_zero_updates() -> None:
    center = tiny_mlp()
    with pytest.raises(ValueError, match="^client_models:"):
        pca_surface(center, [copy.deepcopy(center)], LOSS, DATA, 3, 1.0)
    with pytest.raises(ValueError, match="^client_models:"):
        pca_surface(center, [], LOSS, DATA, 3, 1.0)


def test_pairwise_barriers_document_is_the_slices_matrix_as_json() -> None:
    import json

    from fedland.measure import pairwise_barriers
    from fedland.slices import pairwise_barriers as matrix

    permuted = tiny_mlp(0)  # the same function, hidden units in another order: a barrier between the two
    with torch.no_grad():
        order = torch.tensor([5, 4, 3, 2, 1, 0])
        first, last = cast(nn.Linear, permuted[0]), cast(nn.Linear, permuted[2])
        first.weight.copy_(first.weight[order])
        first.bias.copy_(first.bias[order])
        last.weight.copy_(last.weight[:, order])
    models = [tiny_mlp(0), permuted, tiny_mlp(1)]
    before = [snapshot(m) for m in models]
    doc = pairwise_barriers(models, DATA, np.linspace(0, 1, 5), loss_fn=LOSS)
    for m, b in zip(models, before):
        assert_unchanged(m, b)
    expected = matrix(models, LOSS, DATA, np.linspace(0, 1, 5))
    np.testing.assert_allclose(np.array(doc["barriers"]), expected.barriers, rtol=1e-12)
    np.testing.assert_allclose(np.array(doc["losses"]), expected.losses, rtol=1e-12)
    assert min(min(row) for row in doc["barriers"]) >= 0.0 and doc["losses"][0][0][2] == doc["losses"][0][1][0]
    assert doc["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    json.dumps(doc, allow_nan=False)


def test_flatness_gap_document_against_dense_hessians() -> None:
    from fedland.measure import flatness_gap_document

    global_model, locals_ = tiny_mlp(0), [tiny_mlp(1), tiny_mlp(2)]
    clients = [make_data((4,), [12], seed=1), make_data((4,), [9], seed=2)]
    doc = flatness_gap_document(global_model, locals_, clients, seed=0, loss_fn=LOSS)
    local = [float(torch.linalg.eigvalsh(dense_hessian(m, LOSS, d))[-1]) for m, d in zip(locals_, clients)]
    glob = float(torch.linalg.eigvalsh(dense_hessian(global_model, LOSS, clients[0] + clients[1]))[-1])
    assert doc["curvature"] == "hessian"
    assert doc["local"] == pytest.approx(local, rel=EIGEN_TOL) and doc["global"] == pytest.approx(glob, rel=EIGEN_TOL)
    assert doc["mean_gap"] == pytest.approx((12 * local[0] + 9 * local[1]) / 21 - glob, rel=0.05)


def test_a_model_with_a_nan_loss_is_stored_as_none() -> None:
    model = tiny_mlp()
    with torch.no_grad():
        cast(nn.Linear, model[0]).weight[0, 0] = math.nan
    doc = measure_model(model, LOSS, DATA, LSPEC, seed=0)
    assert doc["loss"] is None and doc["top_eigenvalues"] == [None, None, None] and doc["trace"] is None
    round_doc = measure_client_round(tiny_mlp(1), model, None, DATA, LSPEC, 0, loss_fn=LOSS)
    assert round_doc["interpolation"]["barrier"] is None and round_doc["local"]["loss"] is None
    assert round_doc["global"]["loss"] is not None
