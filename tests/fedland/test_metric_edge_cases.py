"""Metric edge cases: no missed eigenvalue, each misuse a clear error, Hutch++ on few parameters, attention on CPU."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedland.ascent_sharpness import adaptive_sharpness, worst_case_sharpness
from fedland.curvature import curvature_operator, flatness_gap, layer_top_eigenvalues
from fedland.generalization import generalization_gap, pac_bayes_flatness, weight_norms, zero_one_error
from fedland.hessian import (
    HessianOperator,
    hessian_trace,
    hessian_vector_product,
    operator_trace,
    spectral_density,
    top_eigenvalues,
)
from fedland.scalars import gradient_dissimilarity, gradient_norm, sharpness
from fedland.slices import interpolate, loss_slice_1d, loss_slice_2d, pairwise_barriers
from tests.fedland._landscape_helpers import dense_hessian, make_data, quadratic, tiny_mlp

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()


# 1. a missed eigenvalue reported as converged

def test_fedcnn_fifth_eigenvalue_is_not_missed(data_dir: str) -> None:
    """Lanczos accepting on residuals alone at tol=1e-2 took 4.839 (the 6th eigenvalue) for the 5th (5.056)."""
    from fedland.datasets import load_dataset
    from fedland.models import build_model
    from fedland.training import train_local

    data = load_dataset("MNIST", data_dir, download=False)
    x, y = data.train_x[:250], data.train_y[:250]
    model, _ = train_local(build_model("FedCNN", seed=0), x, y, epochs=1, batch_size=32, learning_rate=0.05,
                           momentum=0.9, seed=0)
    op = HessianOperator(model, LOSS, [(x, y)])
    from fedland.hessian import operator_top_eigenvalues

    result = operator_top_eigenvalues(op, 5, tol=1e-2, max_iter=60, seed=0)
    reference = operator_top_eigenvalues(op, 6, tol=1e-4, max_iter=100, seed=1)  # float32: ~4e-5 is the floor
    assert result.converged and reference.converged
    np.testing.assert_allclose(result.values, reference.values[:5], rtol=1e-2)
    assert reference.values[4] - reference.values[5] > 0.1  # the 5th (5.056) and 6th (4.839) are distinct


def test_restart_check_finds_an_eigenvector_the_start_cannot_see() -> None:
    """An eigenvector exactly orthogonal to the start vector is invisible to one Krylov sequence."""
    n = 120
    start = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # the seed-0 start
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    m[:, 0] -= (m[:, 0] @ start) / (start @ start) * start  # first eigenvector orthogonal to the start
    q, _ = torch.linalg.qr(m)
    spectrum = torch.cat([torch.tensor([8.5, 10.0, 9.0, 8.0]), torch.linspace(0.0, 5.0, n - 4)]).double()
    a = q @ torch.diag(spectrum) @ q.T
    model, loss_fn, data, _ = quadratic(spectrum, seed=0)
    model.theta.data.zero_()

    def quad(out: Tensor, _t: Tensor) -> Tensor:
        return 0.5 * torch.einsum("bi,ij,bj->b", out, a, out).mean()

    plain = top_eigenvalues(model, quad, data, k=3, tol=1e-6, seed=0)
    assert plain.converged
    np.testing.assert_allclose(plain.values, [10.0, 9.0, 8.0], rtol=1e-6)  # 8.5 missed: the start cannot see it
    checked = top_eigenvalues(model, quad, data, k=3, tol=1e-6, seed=0, check_steps=6)
    assert checked.converged and checked.num_hvps >= plain.num_hvps + 6
    np.testing.assert_allclose(checked.values, [10.0, 9.0, 8.5], rtol=1e-6)


# 2. a non-scalar loss

def test_non_scalar_loss_is_a_value_error_naming_the_loss() -> None:
    model, data = tiny_mlp(), make_data((4,), [16, 16])
    per_example = nn.CrossEntropyLoss(reduction="none")
    message = r"loss_fn: CrossEntropyLoss\(\) must return a scalar \(mean-reduced\) loss, got \(16,\)"
    for call in (
        lambda: top_eigenvalues(model, per_example, data),
        lambda: loss_slice_1d(model, per_example, data, num_points=3),
        lambda: gradient_norm(model, per_example, data),
        lambda: hessian_trace(model, per_example, data, num_hvps=6),
        lambda: curvature_operator(model, per_example, data, "ggn").matvec(torch.ones(51, dtype=torch.float64)),
    ):
        with pytest.raises(ValueError, match=message):
            call()


# 3. max_iter < k

def test_max_iter_below_k_is_a_value_error() -> None:
    model, data = tiny_mlp(), make_data((4,), [10])
    with pytest.raises(ValueError, match=r"max_iter: must be >= k \(5\)"):
        top_eigenvalues(model, LOSS, data, k=5, max_iter=3)
    assert len(top_eigenvalues(model, LOSS, data, k=2, method="power", max_iter=1).values) == 2  # per eigenvalue


# 4. a non-finite loss: one behaviour everywhere

def _nan_model() -> nn.Module:
    model = tiny_mlp()
    with torch.no_grad():
        cast(nn.Linear, model[2]).bias[0] = math.nan
    return model


def test_non_finite_loss_is_one_error_in_every_metric() -> None:
    model, data = _nan_model(), make_data((4,), [6, 4])
    other = tiny_mlp(1)
    calls = {
        "top_eigenvalues": lambda: top_eigenvalues(model, LOSS, data),
        "power": lambda: top_eigenvalues(model, LOSS, data, method="power"),
        "spectral_density": lambda: spectral_density(model, LOSS, data, num_probes=1, lanczos_steps=3),
        "hessian_trace": lambda: hessian_trace(model, LOSS, data, num_hvps=6),
        "hessian_vector_product": lambda: hessian_vector_product(
            model, LOSS, data, {n: torch.ones_like(p) for n, p in model.named_parameters()}),
        "gradient_norm": lambda: gradient_norm(model, LOSS, data),
        "sharpness": lambda: sharpness(model, LOSS, data),
        "adaptive_sharpness": lambda: adaptive_sharpness(model, LOSS, data),
        "worst_case_sharpness": lambda: worst_case_sharpness(model, LOSS, data),
        "gradient_dissimilarity": lambda: gradient_dissimilarity(model, LOSS, [data]),
        "loss_slice_1d": lambda: loss_slice_1d(model, LOSS, data, num_points=3),
        "loss_slice_2d": lambda: loss_slice_2d(model, LOSS, data, num_points=3),
        "interpolate": lambda: interpolate(other, model, LOSS, data),
        "pairwise_barriers": lambda: pairwise_barriers([other, model], LOSS, data),
        "ggn": lambda: top_eigenvalues_of(model, data, "ggn"),
        "fisher": lambda: top_eigenvalues_of(model, data, "fisher"),
        "layer_top_eigenvalues": lambda: layer_top_eigenvalues(model, LOSS, data),
        "flatness_gap": lambda: flatness_gap(other, [model], LOSS, [data]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"loss: is not finite \(NaN or inf\) at the model"):
            call()
            pytest.fail(f"{name} did not raise")


def top_eigenvalues_of(model: nn.Module, data: list, kind: str) -> None:
    from fedland.hessian import operator_top_eigenvalues

    operator_top_eigenvalues(curvature_operator(model, LOSS, data, kind), 1)  # type: ignore[arg-type]


def test_infinite_inputs_are_the_same_error() -> None:
    model, data = tiny_mlp(), make_data((4,), [6])
    data[0][0][0, 0] = math.inf
    from fedland._objective import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="loss: is not finite"):
        top_eigenvalues(model, LOSS, data)


# 5. Hutch++ with fewer parameters than its sketch

@pytest.mark.parametrize("budget", [150, 180, 300])
def test_hutch_plus_plus_reports_the_products_it_ran(budget: int) -> None:
    model, data = tiny_mlp(), make_data((4,), [9, 7])  # 51 parameters
    op = HessianOperator(model, LOSS, data)
    result = operator_trace(op, num_hvps=budget, seed=0)
    assert result.num_hvps == op.num_hvps
    if budget // 3 >= 51:  # the sketch spans the space: exact trace from 51 products
        assert result.num_hvps == 51 and result.std_error == 0.0
        assert result.estimate == pytest.approx(float(torch.trace(dense_hessian(model, LOSS, data))), rel=1e-10)
    else:
        assert result.num_hvps == budget


# 6. attention models on CPU

class _Attention(nn.Module):
    """TransformerEncoderLayer (or bare MultiheadAttention) over 5 tokens of width 4, mean-pooled to 3 classes."""

    def __init__(self, bare: bool) -> None:
        super().__init__()
        self.bare = bare
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention(x, x, x, need_weights=False)[0] if self.bare else self.encoder(x)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("bare", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_models_work_on_cpu(bare: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _Attention(bare).to(dtype).eval()
    for p in (model.attention if not bare else model.encoder).parameters():
        p.requires_grad_(False)  # only the branch in use is differentiated
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 5, 4, generator=gen).to(dtype), torch.randint(0, 3, (6,), generator=gen))]
    result = top_eigenvalues(model, LOSS, data, k=2, tol=1e-4)
    assert hessian_trace(model, LOSS, data, num_hvps=6).num_hvps == 6
    if dtype == torch.float64:
        with sdpa_kernel(SDPBackend.MATH):  # the reference needs the math backend too
            dense = dense_hessian(model, LOSS, data)
        np.testing.assert_allclose(result.values, torch.linalg.eigvalsh(dense).flip(0)[:2].numpy(), rtol=1e-4)


# 7. misuse the checks used to let through: each a ValueError naming the argument

def test_radius_nan_or_inf_is_a_value_error_naming_rho() -> None:
    model, data = tiny_mlp(), make_data((4,), [8])
    for bad in (math.nan, math.inf, -math.inf, 0.0, -0.1):
        for call in (
            lambda: sharpness(model, LOSS, data, rho=bad),
            lambda: adaptive_sharpness(model, LOSS, data, rho=bad),
            lambda: worst_case_sharpness(model, LOSS, data, rho=bad),
        ):
            with pytest.raises(ValueError, match=r"^rho: must be a finite number > 0"):
                call()


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("eta", lambda m, d: adaptive_sharpness(m, LOSS, d, eta=math.nan)),
        ("eta", lambda m, d: worst_case_sharpness(m, LOSS, d, eta=math.inf)),
        ("steps", lambda m, d: worst_case_sharpness(m, LOSS, d, steps=0)),
        ("steps", lambda m, d: adaptive_sharpness(m, LOSS, d, steps=1.5)),  # type: ignore[arg-type]
        ("tol", lambda m, d: top_eigenvalues(m, LOSS, d, tol=math.nan)),
        ("tol", lambda m, d: layer_top_eigenvalues(m, LOSS, d, tol=math.inf)),
        ("tol", lambda m, d: flatness_gap(m, [m], LOSS, [d], tol=math.nan)),
        ("k", lambda m, d: layer_top_eigenvalues(m, LOSS, d, k=0)),
        ("max_iter", lambda m, d: top_eigenvalues(m, LOSS, d, max_iter=2.5)),  # type: ignore[arg-type]
        ("num_hvps", lambda m, d: hessian_trace(m, LOSS, d, num_hvps=6.5)),  # type: ignore[arg-type]
        ("sigma", lambda m, d: spectral_density(m, LOSS, d, num_probes=1, lanczos_steps=3, sigma=math.inf)),
        ("num_probes", lambda m, d: spectral_density(m, LOSS, d, num_probes=0)),
        ("radius", lambda m, d: loss_slice_1d(m, LOSS, d, radius=math.nan, num_points=3)),
        ("radius", lambda m, d: loss_slice_2d(m, LOSS, d, radius=math.inf, num_points=3)),
        ("chunk_size", lambda m, d: gradient_norm(m, LOSS, d, chunk_size=0)),
        ("alphas", lambda m, d: interpolate(m, tiny_mlp(1), LOSS, d, alphas=[0.0, math.nan, 1.0])),
        ("direction", lambda m, d: loss_slice_1d(
            m, LOSS, d, {n: torch.full_like(p, math.inf) for n, p in m.named_parameters()}, num_points=3)),
        ("vector", lambda m, d: hessian_vector_product(
            m, LOSS, d, {n: torch.full_like(p, math.nan) for n, p in m.named_parameters()})),
        ("deviation", lambda m, d: pac_bayes_flatness(m, zero_one_error, d, deviation=math.inf)),
        ("sigma_max", lambda m, d: pac_bayes_flatness(m, zero_one_error, d, sigma_max=math.nan)),
        ("samples", lambda m, d: pac_bayes_flatness(m, zero_one_error, d, samples=1)),
        ("power_iterations", lambda m, d: weight_norms(m, power_iterations=0)),
        ("train_loss", lambda m, d: generalization_gap(math.nan, 0.5, 1.0, 0.4)),
        ("test_accuracy", lambda m, d: generalization_gap(0.1, 0.5, 1.0, "0.4")),  # type: ignore[arg-type]
    ],
)
def test_each_bad_argument_is_a_value_error_naming_it(field: str, call: object) -> None:
    model, data = tiny_mlp(), make_data((4,), [8])
    with pytest.raises(ValueError, match=rf"^{field}: "):
        call(model, data)  # type: ignore[operator]


def test_a_nan_loss_inside_the_sharpness_ball_is_the_non_finite_error() -> None:
    """The ascent used to pass over NaN losses (max() ignores them) and report the rise of the finite points."""
    from fedland._objective import NonFiniteLossError

    model, data = tiny_mlp(), make_data((4,), [8])
    with torch.no_grad():
        base_outputs = model(data[0][0]).clone()

    def nan_away_from_the_model(outputs: Tensor, targets: Tensor) -> Tensor:
        moved = (outputs - base_outputs).abs().max() > 1e-3  # finite at the model, NaN once it moves
        return nn.functional.cross_entropy(outputs, targets) * torch.where(moved, math.nan, 1.0)

    for call in (
        lambda: worst_case_sharpness(model, nan_away_from_the_model, data, rho=1.0, steps=3),
        lambda: adaptive_sharpness(model, nan_away_from_the_model, data, rho=1.0, steps=3),
    ):
        with pytest.raises(NonFiniteLossError, match=r"^loss: is NaN at ascent step 1 inside the ball"):
            call()
    assert worst_case_sharpness(model, LOSS, data, rho=1.0, steps=3) > 0  # the same ascent with a finite loss


def test_fisher_refuses_a_per_example_loss() -> None:
    """Per-example losses of one example each are scalars: the Fisher used to accept reduction='none'."""
    from fedland.curvature import FisherOperator

    model, data = tiny_mlp(), make_data((4,), [16, 16])
    per_example = nn.CrossEntropyLoss(reduction="none")
    message = r"^loss_fn: CrossEntropyLoss\(\) must return a scalar \(mean-reduced\) loss, got \(16,\)"
    with pytest.raises(ValueError, match=message):
        FisherOperator(model, per_example, data).matvec(torch.ones(51))
    with pytest.raises(ValueError, match=message):
        layer_top_eigenvalues(model, per_example, data, curvature="fisher")
    with pytest.raises(ValueError, match=message):
        flatness_gap(model, [model], per_example, [data], curvature="fisher")
    assert layer_top_eigenvalues(model, LOSS, data, curvature="fisher")["0"].values[0] > 0  # a mean loss works


def test_pac_bayes_refuses_a_per_example_loss_by_name() -> None:
    model, data = tiny_mlp(), make_data((4,), [16])
    with pytest.raises(ValueError, match=r"^loss_fn: CrossEntropyLoss\(\) must return a scalar"):
        pac_bayes_flatness(model, nn.CrossEntropyLoss(reduction="none"), data)

    def per_example_error(outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.argmax(dim=1) != targets).float()

    with pytest.raises(ValueError, match=r"^loss_fn: .*per_example_error must return a scalar"):
        pac_bayes_flatness(model, per_example_error, data)


def test_pac_bayes_on_nan_weights_or_inputs_is_the_non_finite_error() -> None:
    """The 0-1 error of NaN outputs is finite: it used to give sigma 0 and flatness inf."""
    from fedland._objective import NonFiniteLossError

    model, data = tiny_mlp(), make_data((4,), [16])
    with pytest.raises(NonFiniteLossError, match=r"^weights: is not finite"):
        pac_bayes_flatness(_nan_model(), zero_one_error, data)
    for bad in (math.nan, math.inf):
        inputs = data[0][0].clone()
        inputs[3, 1] = bad
        with pytest.raises(NonFiniteLossError, match=r"^inputs: is not finite"):
            pac_bayes_flatness(model, zero_one_error, [(inputs, data[0][1])])
    with pytest.raises(NonFiniteLossError, match=r"^loss: is not finite"):
        pac_bayes_flatness(model, lambda outputs, targets: LOSS(outputs, targets) * math.inf, data)


def test_weight_measures_refuse_non_finite_weights() -> None:
    from fedland._objective import NonFiniteLossError
    from fedland.scalars import cosine_similarity, distance, path_norm

    finite, broken = tiny_mlp(), _nan_model()
    for call in (
        lambda: weight_norms(broken),
        lambda: path_norm(broken, (4,)),
        lambda: distance(finite, broken),
        lambda: cosine_similarity(broken, finite),
        lambda: cosine_similarity(finite, finite, broken.state_dict()),
    ):
        with pytest.raises(NonFiniteLossError, match="weights"):
            call()
    assert distance(finite, finite) == 0.0
