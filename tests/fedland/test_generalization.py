"""Generalization measures against analytic and dense references on small models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedland.generalization import (
    PAC_BAYES_DELTA,
    PAC_BAYES_EPSILON,
    generalization_gap,
    pac_bayes_flatness,
    weight_norms,
    zero_one_error,
)
from fedland.models import build_model

torch.set_num_threads(1)


def _linear_regression() -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]]))
    x = torch.randn(64, 4, generator=generator)
    return model, [(x, model(x).detach())]  # targets on the model: L(w) = 0


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def test_plain_sigma_matches_the_quadratic_expectation() -> None:
    # L(w + u) - L(w) = mean_x (u . x)^2 for the zero-residual model; over draws z the estimate is
    # sigma^2 * c with c = mean_s mean_x (z_s . x)^2, and E[c] = mean_x ||x||^2.
    model, data = _linear_regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = data[0][0]
    deviation = 0.3
    result = pac_bayes_flatness(model, _mse, data, deviation=deviation, samples=400, steps=20, seed=3)
    analytic = math.sqrt(deviation / float((x**2).sum(dim=1).mean()))
    assert result.sigma == pytest.approx(analytic, rel=0.12)  # Monte Carlo over 400 draws: ~4% standard error
    assert result.base_loss == pytest.approx(0.0, abs=1e-12)
    assert result.deviation_at_sigma <= deviation and result.deviation_at_sigma == pytest.approx(deviation, rel=1e-4)
    assert result.flatness == pytest.approx(1 / result.sigma**2)
    squared = float((model.weight.detach().double() ** 2).sum())
    assert result.bound == pytest.approx(squared / (4 * result.sigma**2) + math.log(64 / PAC_BAYES_DELTA) + 10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as found


def test_magnitude_aware_sigma_matches_the_quadratic_expectation() -> None:
    # Var(u_i) = sigma^2 w_i^2 + eps^2: E[rise] = sigma^2 mean_x sum_i x_i^2 w_i^2 + eps^2 mean_x ||x||^2
    model, data = _linear_regression()
    x, w = data[0][0], model.weight.detach()[0]
    deviation = 0.3
    result = pac_bayes_flatness(
        model, _mse, data, deviation=deviation, samples=400, steps=20, magnitude_aware=True, seed=4
    )
    weighted = float(((x * w) ** 2).sum(dim=1).mean())
    floor = PAC_BAYES_EPSILON**2 * float((x**2).sum(dim=1).mean())
    assert result.sigma == pytest.approx(math.sqrt((deviation - floor) / weighted), rel=0.12)  # Monte Carlo over 400 draws: ~4% standard error
    flat = w.double()
    eps2, s2 = PAC_BAYES_EPSILON**2, result.sigma**2
    expected = 0.25 * float(torch.log((eps2 + (s2 + 1) * (flat**2).sum() / 4) / (eps2 + s2 * flat**2)).sum())
    assert result.bound == pytest.approx(expected + math.log(64 / PAC_BAYES_DELTA) + 10)


def test_flatness_is_seeded_and_uses_the_error_by_default_choice() -> None:
    model = build_model("FedNet", seed=0)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator))]
    first = pac_bayes_flatness(model, zero_one_error, data, deviation=0.1, samples=2, steps=6, seed=5)
    again = pac_bayes_flatness(model, zero_one_error, data, deviation=0.1, samples=2, steps=6, seed=5)
    assert first == again and first.sigma > 0 and math.isfinite(first.bound)
    with pytest.raises(ValueError, match="^deviation:"):
        pac_bayes_flatness(model, zero_one_error, data, deviation=0.0)


def test_norms_match_dense_references() -> None:
    model = build_model("FedCNN", seed=2)
    summary = weight_norms(model, power_iterations=1000, seed=0)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}
    assert [layer.name for layer in summary.layers] == list(weights)
    for layer in summary.layers:
        matrix = weights[layer.name].reshape(weights[layer.name].shape[0], -1).double()
        assert layer.frobenius == pytest.approx(float(torch.linalg.matrix_norm(matrix)), rel=1e-12)
        dense = float(torch.linalg.matrix_norm(matrix, ord=2))
        assert layer.spectral == pytest.approx(dense, rel=1e-4) and layer.spectral <= dense * (1 + 1e-12)
    assert summary.frobenius_sum == pytest.approx(sum(layer.frobenius for layer in summary.layers))
    assert summary.log_spectral_product == pytest.approx(sum(math.log(layer.spectral) for layer in summary.layers))
    assert weight_norms(model, power_iterations=1000, seed=0) == summary


def test_generalization_gap_signs() -> None:
    assert generalization_gap(0.2, 0.95, 0.5, 0.9) == pytest.approx({"loss": 0.3, "accuracy": 0.05})


def test_sigma_interval_covers_the_analytic_sigma_at_its_stated_confidence() -> None:
    # The zero-residual linear model's expected rise is sigma^2 mean_x ||x||^2: sigma* is known exactly.
    model, data = _linear_regression()
    x = data[0][0]
    deviation = 0.3
    analytic = math.sqrt(deviation / float((x**2).sum(dim=1).mean()))
    results = [pac_bayes_flatness(model, _mse, data, deviation=deviation, samples=32, steps=14, seed=s) for s in range(60)]
    covered = sum(r.sigma_low <= analytic <= r.sigma_high for r in results)
    assert covered >= 51  # 95% of 60 is 57; 51 or more has probability > 0.99 at 95% coverage
    assert all(r.sigma_low <= r.sigma <= r.sigma_high and not r.saturated for r in results)
    # the interval is about as wide as the spread of sigma over seeds says
    sigmas = torch.tensor([r.sigma for r in results], dtype=torch.float64)
    spread = float(sigmas.std()) / float(sigmas.mean())
    half_widths = [r.relative_half_width for r in results]
    assert 1.0 * spread < sum(half_widths) / len(half_widths) < 3.5 * spread  # 1.96 standard deviations expected


def test_a_model_at_chance_is_saturated_not_flat(data_dir: str) -> None:
    """At chance accuracy the 0-1 error cannot rise by 0.1: sigma runs to its cap, flagged, never a number."""
    from fedland.datasets import load_dataset
    from fedland.measure import measure_generalization
    from fedland.spec import LandscapeSpec

    data = load_dataset("MNIST", data_dir, download=False)
    batches = [(data.train_x[:256], data.train_y[:256])]
    model = build_model("FedNet", seed=0)  # untrained: about 90% error
    for magnitude in (False, True):
        result = pac_bayes_flatness(model, zero_one_error, batches, samples=16, magnitude_aware=magnitude)
        assert result.base_loss > 0.85 and result.saturated
        assert result.sigma == 2.0**16 and result.sigma_high == math.inf and result.relative_half_width == math.inf
    document = measure_generalization(model, batches, LandscapeSpec(pac_bayes_samples=16), seed=0)
    for key in ("pac_bayes", "pac_bayes_magnitude"):
        assert document[key]["saturated"] is True
        assert all(value is None for name, value in document[key].items() if name != "saturated")


def test_the_default_interval_is_within_ten_percent_on_the_example_model(data_dir: str) -> None:
    """FedNet after one epoch on 2,000 MNIST images, measured on 256 others as the stack does."""
    from fedland.datasets import load_dataset
    from fedland.training import train_local

    data = load_dataset("MNIST", data_dir, download=False)
    model, _ = train_local(build_model("FedNet", seed=0), data.train_x[:2000], data.train_y[:2000], epochs=1,
                           batch_size=32, learning_rate=0.05, momentum=0.5, seed=0)
    batches = [(data.train_x[5000:5256], data.train_y[5000:5256])]
    for magnitude in (False, True):
        result = pac_bayes_flatness(model, zero_one_error, batches, magnitude_aware=magnitude, seed=1)
        assert not result.saturated and 0.15 < result.base_loss < 0.4
        assert result.relative_half_width <= 0.10
        assert result.draws <= 2 * 128 * (10 + 4)  # the typical cost the spec's budget counts, with room
        low, high = result.flatness_interval
        assert low <= result.flatness <= high
