"""Hessian metrics against dense float64 Hessians and matrices with known spectra."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from fedland._objective import DEFAULT_CHUNK_SIZE, Objective, auto_chunk_size
from fedland.hessian import (
    HessianOperator,
    hessian_trace,
    hessian_vector_product,
    operator_top_eigenvalues,
    operator_trace,
    spectral_density,
    top_eigenvalues,
)
from fedland.models import build_model
from fedland.scalars import gradient_norm
from tests.fedland._landscape_helpers import (
    assert_unchanged,
    dense_hessian,
    make_data,
    messy_state,
    quadratic,
    snapshot,
    tiny_cnn,
    tiny_mlp,
)

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()


def _case(name: str):
    if name == "mlp":
        return tiny_mlp(), make_data((4,), [7, 13, 5, 15])
    return tiny_cnn(), make_data((1, 6, 6), [9, 16, 7])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hvp_matches_dense_hessian(name: str) -> None:
    model, data = _case(name)
    dense = dense_hessian(model, LOSS, data)
    op = HessianOperator(model, LOSS, data)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == 1
    by_name = hessian_vector_product(model, LOSS, data, op.unflatten(v))
    flat = torch.cat([by_name[n].reshape(-1) for n in op.param_names])
    torch.testing.assert_close(flat, dense @ v, rtol=1e-10, atol=1e-12)


def test_hvp_without_retained_graph_matches() -> None:
    model, data = _case("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = HessianOperator(model, LOSS, data).matvec(v)
    rebuilt = HessianOperator(model, LOSS, data, retain_graph_max_samples=16, chunk_size=3)  # several groups
    torch.testing.assert_close(rebuilt.matvec(v), kept, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rebuilt.matvec(v), kept, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("retain", [4096, 16])
def test_value_and_gradient_from_the_products_graph(retain: int) -> None:
    model, data = _case("mlp")
    before = snapshot(model)
    op = HessianOperator(model, LOSS, data, retain_graph_max_samples=retain, chunk_size=3)
    loss, accuracy, grad = op.value_and_gradient()  # before any product: builds the graph itself
    expected_loss, expected_grad = Objective(model, LOSS, data).gradient(op.params)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert float(grad.norm()) == pytest.approx(gradient_norm(model, LOSS, data), rel=1e-12)
    outputs = torch.cat([model(x) for x, _ in data])
    targets = torch.cat([y for _, y in data])
    assert accuracy == float((outputs.argmax(1) == targets).double().mean())
    op.matvec(grad)
    assert op.value_and_gradient()[0] == loss and op.num_hvps == 1  # no products spent on it
    assert_unchanged(model, before)


def test_shared_operator_gives_the_same_numbers_as_separate_calls() -> None:
    model, data = _case("cnn")
    op = HessianOperator(model, LOSS, data)
    eigen = operator_top_eigenvalues(op, 2, tol=1e-3, seed=4)
    trace = operator_trace(op, num_hvps=9, seed=4)
    assert op.num_hvps == eigen.num_hvps + trace.num_hvps and trace.num_hvps == 9
    separate = top_eigenvalues(model, LOSS, data, k=2, tol=1e-3, seed=4)
    assert np.array_equal(eigen.values, separate.values) and eigen.num_hvps == separate.num_hvps
    assert trace == hessian_trace(model, LOSS, data, num_hvps=9, seed=4)


def test_automatic_chunk_size_follows_the_activation_size() -> None:
    x = torch.zeros(3, 1, 28, 28)
    small, large = auto_chunk_size(build_model("FedNet", 0), x), auto_chunk_size(build_model("FedCNN", 0), x)
    assert small > 256  # a 256-sample landscape subset is one forward call
    assert large == DEFAULT_CHUNK_SIZE
    model, data = _case("mlp")
    assert Objective(model, LOSS, data, chunk_size=None).chunk_size == auto_chunk_size(model, data[0][0])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_top_eigenvalues_match_dense(name: str) -> None:
    model, data = _case(name)
    expected = torch.linalg.eigvalsh(dense_hessian(model, LOSS, data)).flip(0)[:3].numpy()
    result = top_eigenvalues(model, LOSS, data, k=3, tol=1e-8)
    assert result.converged
    np.testing.assert_allclose(result.values, expected, rtol=1e-5)
    assert result.num_hvps <= 60
    assert result.vectors.shape == (3, sum(p.numel() for p in model.parameters()))


def test_power_iteration_matches_dense() -> None:
    model, data = _case("mlp")
    dense = dense_hessian(model, LOSS, data)
    eig = torch.linalg.eigvalsh(dense)
    expected = eig[eig.abs().argmax()].item()
    result = top_eigenvalues(model, LOSS, data, method="power", tol=1e-7, max_iter=2000)
    assert result.converged
    assert result.values[0] == pytest.approx(expected, rel=1e-5)


def test_quadratic_known_spectrum() -> None:
    spectrum = torch.cat([torch.tensor([50.0, 20.0, 10.0, 9.0]), torch.linspace(-2.0, 5.0, 36)])
    model, loss_fn, data, _ = quadratic(spectrum)
    result = top_eigenvalues(model, loss_fn, data, k=4, tol=1e-9)
    np.testing.assert_allclose(result.values, [50.0, 20.0, 10.0, 9.0], rtol=1e-8)
    assert result.converged and result.num_hvps < 40
    trace = hessian_trace(model, loss_fn, data, num_hvps=30)
    assert abs(trace.estimate - float(spectrum.sum())) <= 3 * trace.std_error


def test_averaging_not_summing() -> None:
    model, data = _case("mlp")
    once = top_eigenvalues(model, LOSS, data, k=2, tol=1e-9)
    twice = top_eigenvalues(model, LOSS, data + data, k=2, tol=1e-9)
    rebatched = top_eigenvalues(model, LOSS, [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))], k=2, tol=1e-9)
    np.testing.assert_allclose(twice.values, once.values, rtol=1e-9)
    np.testing.assert_allclose(rebatched.values, once.values, rtol=1e-9)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_within_three_standard_errors(method: Literal["hutch++", "hutchinson"]) -> None:
    model, data = _case("cnn")
    exact = float(torch.trace(dense_hessian(model, LOSS, data)))
    result = hessian_trace(model, LOSS, data, method=method, num_hvps=45, seed=1)
    assert result.num_hvps == 45 and result.method == method
    assert 0 < result.std_error < abs(exact)
    assert abs(result.estimate - exact) <= 3 * result.std_error


def test_hutch_plus_plus_beats_hutchinson_on_decaying_spectrum() -> None:
    spectrum = 100.0 * torch.arange(1, 201, dtype=torch.float64) ** -2.0
    model, loss_fn, data, _ = quadratic(spectrum, seed=4)
    exact = float(spectrum.sum())
    errors = {}
    for method in ("hutch++", "hutchinson"):
        estimates = [hessian_trace(model, loss_fn, data, method=method, num_hvps=24, seed=s).estimate for s in range(8)]
        errors[method] = float(np.mean(np.abs(np.array(estimates) - exact)))
    assert errors["hutch++"] < 0.5 * errors["hutchinson"]


def test_density_integrates_to_one_with_mass_at_eigenvalues() -> None:
    spectrum = torch.cat([torch.full((10,), 1.0), torch.full((20,), 5.0), torch.full((10,), 12.0)])
    model, loss_fn, data, _ = quadratic(spectrum, seed=2)
    result = spectral_density(model, loss_fn, data, num_probes=3, lanczos_steps=10, sigma=0.2, seed=0)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-12)
    assert result.weights.sum() == pytest.approx(1.0, abs=1e-12)
    # three distinct eigenvalues: each probe's Krylov space is exhausted after three steps
    assert result.num_hvps == 9
    distance = np.min(np.abs(result.nodes[:, None] - np.array([1.0, 5.0, 12.0])[None, :]), axis=1)
    assert np.all(distance < 1e-8)
    density_at = lambda x: np.interp(x, result.grid, result.density)  # noqa: E731
    assert min(density_at(1.0), density_at(5.0), density_at(12.0)) > 100 * max(density_at(3.0), density_at(8.5))
    mass = {lam: result.weights[np.abs(result.nodes - lam) < 1e-6].sum() for lam in (1.0, 5.0, 12.0)}
    assert mass[5.0] == pytest.approx(0.5, abs=0.15)


def test_density_of_network_covers_dense_spectrum() -> None:
    model, data = _case("mlp")
    eig = torch.linalg.eigvalsh(dense_hessian(model, LOSS, data)).numpy()
    result = spectral_density(model, LOSS, data, num_probes=2, lanczos_steps=51, seed=0)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-12)
    # with a full Krylov space (45 steps: the zero eigenvalue has multiplicity 7) the nodes
    # are exactly the distinct dense eigenvalues
    gaps = np.abs(result.nodes[:, None] - eig[None, :])  # (nodes, eigenvalues)
    assert result.num_hvps == 90
    assert gaps.min(axis=1).max() < 1e-8 and gaps.min(axis=0).max() < 1e-8


def test_same_seed_same_numbers_and_global_rng_untouched() -> None:
    model, data = _case("cnn")
    state = torch.random.get_rng_state()
    a = hessian_trace(model, LOSS, data, num_hvps=12, seed=5)
    b = hessian_trace(model, LOSS, data, num_hvps=12, seed=5)
    c = hessian_trace(model, LOSS, data, num_hvps=12, seed=6)
    e1 = top_eigenvalues(model, LOSS, data, k=2, seed=5, tol=1e-3)
    e2 = top_eigenvalues(model, LOSS, data, k=2, seed=5, tol=1e-3)
    d1 = spectral_density(model, LOSS, data, num_probes=1, lanczos_steps=5, seed=5)
    d2 = spectral_density(model, LOSS, data, num_probes=1, lanczos_steps=5, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == b and a.estimate != c.estimate
    assert np.array_equal(e1.values, e2.values) and e1.num_hvps == e2.num_hvps
    assert np.array_equal(d1.density, d2.density)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_unchanged(name: str) -> None:
    model, data = _case(name)
    model = messy_state(model)
    before = snapshot(model)
    op = HessianOperator(model, LOSS, data)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    hessian_vector_product(model, LOSS, data, op.unflatten(torch.ones(op.dim, dtype=torch.float64)))
    top_eigenvalues(model, LOSS, data, k=2, tol=1e-4)
    top_eigenvalues(model, LOSS, data, method="power", tol=1e-2)
    hessian_trace(model, LOSS, data, num_hvps=6)
    spectral_density(model, LOSS, data, num_probes=1, lanczos_steps=4)
    assert_unchanged(model, before)


def test_frozen_parameters_are_excluded() -> None:
    model, data = _case("mlp")
    model[2].bias.requires_grad_(False)
    dense = dense_hessian(model, LOSS, data)
    assert dense.shape == (48, 48)
    result = top_eigenvalues(model, LOSS, data, tol=1e-9)
    assert result.values[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


def test_bad_arguments_raise_value_error() -> None:
    model, data = _case("mlp")
    with pytest.raises(ValueError, match="k"):
        top_eigenvalues(model, LOSS, data, k=0)
    with pytest.raises(ValueError, match="method"):
        top_eigenvalues(model, LOSS, data, method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_hvps"):
        hessian_trace(model, LOSS, data, num_hvps=3)
    with pytest.raises(ValueError, match="data"):
        top_eigenvalues(model, LOSS, [])
    with pytest.raises(ValueError, match="vector"):
        HessianOperator(model, LOSS, data).matvec(torch.ones(3, dtype=torch.float64))
