"""GGN, empirical Fisher and layer-wise curvature against dense float64 matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedland.curvature import (
    FisherOperator,
    GGNOperator,
    SubsetOperator,
    curvature_operator,
    flatness_gap,
    layer_groups,
    layer_top_eigenvalues,
)
from fedland.hessian import operator_spectral_density, operator_top_eigenvalues, operator_trace
from tests.fedland._landscape_helpers import (
    assert_unchanged,
    dense_fisher,
    dense_ggn,
    dense_hessian,
    make_data,
    messy_state,
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
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_products_match_dense(name: str, kind: str) -> None:
    model, data = _case(name)
    dense = (dense_ggn if kind == "ggn" else dense_fisher)(model, LOSS, data)
    op = curvature_operator(model, LOSS, data, kind)  # type: ignore[arg-type]
    assert isinstance(op, GGNOperator if kind == "ggn" else FisherOperator)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)  # the kept graph again
    rebuilt = curvature_operator(model, LOSS, data, kind)  # type: ignore[arg-type]
    rebuilt._retain = False  # group by group, graph rebuilt per product
    torch.testing.assert_close(rebuilt.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == 2


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_krylov_trace_density_accept_the_operators(kind: str) -> None:
    model, data = _case("mlp")
    dense = (dense_ggn if kind == "ggn" else dense_fisher)(model, LOSS, data)
    eig = torch.linalg.eigvalsh(dense).flip(0).numpy()
    assert eig[-1] > -1e-10  # both are PSD
    op = curvature_operator(model, LOSS, data, kind)  # type: ignore[arg-type]
    top = operator_top_eigenvalues(op, 2, tol=1e-9, seed=1)
    assert top.converged
    np.testing.assert_allclose(top.values, eig[:2], rtol=1e-7)
    trace = operator_trace(op, num_hvps=60, seed=0)
    assert abs(trace.estimate - float(eig.sum())) <= 3 * trace.std_error + 1e-9
    density = operator_spectral_density(op, num_probes=1, lanczos_steps=51, seed=0)
    assert np.abs(density.nodes[:, None] - eig[None, :]).min(axis=1).max() < 1e-7


def test_ggn_equals_hessian_for_a_linear_model() -> None:
    model = nn.Linear(4, 3).double()
    data = make_data((4,), [6, 9])
    ggn = dense_ggn(model, LOSS, data)
    torch.testing.assert_close(ggn, dense_hessian(model, LOSS, data), rtol=1e-10, atol=1e-12)
    op = GGNOperator(model, LOSS, data)
    v = torch.ones(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), ggn @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_layer_top_eigenvalues_match_dense_blocks(kind: str) -> None:
    model, data = _case("cnn")
    dense = {"hessian": dense_hessian, "ggn": dense_ggn, "fisher": dense_fisher}[kind](model, LOSS, data)
    groups = layer_groups(model)
    assert groups == {"conv": ["conv.weight", "conv.bias"], "bn": ["bn.weight", "bn.bias"], "fc": ["fc.weight", "fc.bias"]}
    before = snapshot(model)
    result = layer_top_eigenvalues(model, LOSS, data, k=2, curvature=kind, tol=1e-9, seed=2)  # type: ignore[arg-type]
    assert_unchanged(model, before)
    offset = 0
    for label, names in groups.items():
        size = sum(dict(model.named_parameters())[n].numel() for n in names)
        block = dense[offset : offset + size, offset : offset + size]
        offset += size
        expected = torch.linalg.eigvalsh(block).flip(0)[:2].numpy()
        assert result[label].converged
        np.testing.assert_allclose(result[label].values, expected, rtol=1e-7, atol=1e-10)
        assert result[label].vectors.shape == (2, size)


def test_subset_of_non_adjacent_parameters_and_frozen_model_parts() -> None:
    model, data = _case("mlp")
    model[0].bias.requires_grad_(False)  # frozen parameters stay out of every operator
    dense = dense_hessian(model, LOSS, data)  # over weight0 (24), weight2 (18), bias2 (3)
    base = curvature_operator(model, LOSS, data)
    sub = SubsetOperator(base, ["2.bias", "0.weight"])
    assert sub.names == ["0.weight", "2.bias"] and sub.dim == 27
    index = torch.cat([torch.arange(0, 24), torch.arange(42, 45)])
    v = torch.randn(27, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sub.matvec(v), dense[index][:, index] @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sub.params, base.params[index])
    with pytest.raises(ValueError, match="names: '0.bias' is not a trainable parameter"):
        SubsetOperator(base, ["0.bias"])


def test_flatness_gap_against_dense() -> None:
    global_model = tiny_mlp(0)
    locals_ = [tiny_mlp(1), tiny_mlp(2)]
    client_data = [make_data((4,), [7, 5], seed=1), make_data((4,), [11], seed=2)]
    states = [snapshot(m) for m in [global_model, *locals_]]
    result = flatness_gap(global_model, locals_, LOSS, client_data, tol=1e-9, seed=0)
    for m, s in zip([global_model, *locals_], states):
        assert_unchanged(m, s)
    local = [float(torch.linalg.eigvalsh(dense_hessian(m, LOSS, d))[-1]) for m, d in zip(locals_, client_data)]
    union = [b for d in client_data for b in d]
    glob = float(torch.linalg.eigvalsh(dense_hessian(global_model, LOSS, union))[-1])
    np.testing.assert_allclose(result.local, local, rtol=1e-7)
    assert result.global_value == pytest.approx(glob, rel=1e-7)
    np.testing.assert_allclose(result.gaps, [v - glob for v in local], rtol=1e-6)
    assert result.mean_gap == pytest.approx((12 * local[0] + 11 * local[1]) / 23 - glob, rel=1e-6)
    with pytest.raises(ValueError, match="local_models"):
        flatness_gap(global_model, locals_[:1], LOSS, client_data)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_operators_leave_the_model_untouched(kind: str) -> None:
    model, data = _case("cnn")
    model = messy_state(model)
    before = snapshot(model)
    op = curvature_operator(model, LOSS, data, kind)  # type: ignore[arg-type]
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    operator_top_eigenvalues(op, 1, tol=1e-3)
    assert_unchanged(model, before)


def test_unknown_curvature_is_a_value_error() -> None:
    model, data = _case("mlp")
    with pytest.raises(ValueError, match="curvature: must be one of hessian, ggn, fisher"):
        curvature_operator(model, LOSS, data, "kfac")  # type: ignore[arg-type]
