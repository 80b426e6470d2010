"""Loss slices and interpolation against plain evaluation of perturbed copies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedland.directions import random_direction
from fedland.slices import centered_grid, interpolate, loss_slice_1d, loss_slice_2d
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
CNN_DATA = make_data((1, 6, 6), [9, 16, 7])


def _moved(model: nn.Module, steps: list[tuple[float, dict[str, torch.Tensor]]]) -> nn.Module:
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in copy_.named_parameters():
            for scale, direction in steps:
                if name in direction:
                    p.add_(scale * direction[name])
    return copy_


def _accuracy(model: nn.Module, data: list) -> float:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        correct = sum(int((ref(x).argmax(1) == y).sum()) for x, y in data)
    return correct / sum(len(y) for _, y in data)


def test_grid_has_exact_zero_and_rejects_even_sizes() -> None:
    grid = centered_grid(0.7, 21)
    assert grid[10] == 0.0 and grid[0] == -0.7 and grid[-1] == 0.7
    with pytest.raises(ValueError, match="num_points"):
        centered_grid(1.0, 20)
    with pytest.raises(ValueError, match="radius"):
        centered_grid(0.0, 21)


def test_slice_1d_matches_perturbed_copies() -> None:
    model = tiny_cnn()
    direction = random_direction(model, seed=2)
    result = loss_slice_1d(model, LOSS, CNN_DATA, direction, radius=0.5, num_points=5)
    np.testing.assert_array_equal(result.alphas, [-0.5, -0.25, 0.0, 0.25, 0.5])
    assert result.losses[2] == pytest.approx(plain_loss(model, LOSS, CNN_DATA), rel=1e-13)
    for alpha, loss in zip(result.alphas, result.losses):
        assert loss == pytest.approx(plain_loss(_moved(model, [(alpha, direction)]), LOSS, CNN_DATA), rel=1e-12)
    assert result.accuracies is not None and result.accuracies[2] == _accuracy(model, CNN_DATA)


def test_slice_2d_matches_perturbed_copies() -> None:
    model = tiny_mlp()
    data = make_data((4,), [7, 13, 5, 15])
    result = loss_slice_2d(model, LOSS, data, radius=1.0, num_points=3, seed=4)
    assert result.losses.shape == (3, 3)
    assert result.losses[1, 1] == pytest.approx(plain_loss(model, LOSS, data), rel=1e-13)
    gen = torch.Generator().manual_seed(4)
    d1, d2 = random_direction(model, generator=gen), random_direction(model, generator=gen)
    corner = _moved(model, [(result.xs[0], d1), (result.ys[2], d2)])
    assert result.losses[0, 2] == pytest.approx(plain_loss(corner, LOSS, data), rel=1e-12)
    assert result.accuracies is not None and result.accuracies[0, 2] == _accuracy(corner, data)
    given = loss_slice_2d(model, LOSS, data, (d1, d2), radius=1.0, num_points=3)
    np.testing.assert_array_equal(given.losses, result.losses)


def test_slice_is_independent_of_batching_and_chunking() -> None:
    model = tiny_cnn()
    whole = [(torch.cat([x for x, _ in CNN_DATA]), torch.cat([y for _, y in CNN_DATA]))]
    a = loss_slice_1d(model, LOSS, CNN_DATA, num_points=3, seed=1)
    b = loss_slice_1d(model, LOSS, whole, num_points=3, seed=1, chunk_size=1)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-13)


def test_interpolation_endpoints_and_barrier() -> None:
    model_a, model_b = tiny_cnn(0), tiny_cnn(1)
    result = interpolate(model_a, model_b, LOSS, CNN_DATA, alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert result.losses[0] == pytest.approx(plain_loss(model_a, LOSS, CNN_DATA), rel=1e-13)
    assert result.losses[-1] == pytest.approx(plain_loss(model_b, LOSS, CNN_DATA), rel=1e-13)
    mid = copy.deepcopy(model_a)
    with torch.no_grad():
        for t, t_b in zip(mid.state_dict().values(), model_b.state_dict().values()):
            if t.is_floating_point():
                t.copy_(0.5 * t + 0.5 * t_b)  # parameters and BatchNorm statistics
    assert result.losses[2] == pytest.approx(plain_loss(mid, LOSS, CNN_DATA), rel=1e-12)
    linear = (1 - result.alphas) * result.losses[0] + result.alphas * result.losses[-1]
    assert result.barrier == pytest.approx(float(np.max(result.losses - linear)), abs=1e-15)
    assert result.barrier >= 0.0


def test_same_seed_same_slice_global_rng_and_models_untouched() -> None:
    model = messy_state(tiny_cnn())
    other = messy_state(tiny_cnn(1))
    before, before_other = snapshot(model), snapshot(other)
    state = torch.random.get_rng_state()
    a = loss_slice_2d(model, LOSS, CNN_DATA, num_points=3, seed=3)
    b = loss_slice_2d(model, LOSS, CNN_DATA, num_points=3, seed=3)
    loss_slice_1d(model, LOSS, CNN_DATA, num_points=3, seed=3)
    interpolate(model, other, LOSS, CNN_DATA)
    assert torch.equal(torch.random.get_rng_state(), state)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert_unchanged(model, before)
    assert_unchanged(other, before_other)


def test_bad_input_raises_value_error() -> None:
    model = tiny_mlp()
    data = make_data((4,), [5])
    with pytest.raises(ValueError, match="alphas"):
        interpolate(model, tiny_mlp(1), LOSS, data, alphas=[0.0, 0.5])
    with pytest.raises(ValueError, match="direction"):
        loss_slice_1d(model, LOSS, data, {"0.weight": torch.zeros(6, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="num_points"):
        loss_slice_2d(model, LOSS, data, num_points=4)


def test_pairwise_barriers_match_each_interpolation() -> None:
    from fedland.slices import pairwise_barriers

    models = [tiny_cnn(s) for s in range(3)]
    data = make_data((1, 6, 6), [8, 5])
    before = [snapshot(m) for m in models]
    result = pairwise_barriers(models, LOSS, data, np.linspace(0, 1, 7))
    for m, b in zip(models, before):
        assert_unchanged(m, b)
    assert result.barriers.shape == (3, 3) and result.losses.shape == (3, 3, 7)
    assert np.array_equal(result.barriers, result.barriers.T) and np.all(np.diag(result.barriers) == 0)
    for i in range(3):
        assert result.losses[i, i] == pytest.approx(plain_loss(models[i], LOSS, data), rel=1e-12)
        for j in range(i + 1, 3):
            path = interpolate(models[i], models[j], LOSS, data, np.linspace(0, 1, 7))
            assert result.barriers[i, j] == path.barrier
            assert np.array_equal(result.losses[i, j], path.losses)
    with pytest.raises(ValueError, match="models"):
        pairwise_barriers(models[:1], LOSS, data)


def test_barrier_is_the_height_above_the_chord() -> None:
    """Frankle et al. 2020's barrier with a linear baseline: 0 for a curve below the chord, the bump otherwise."""
    a, b = tiny_mlp(0), tiny_mlp(0)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(0.0)  # the straight line from a to the all-zero model
    data = make_data((4,), [9])
    path = interpolate(a, b, LOSS, data, np.linspace(0, 1, 21))
    chord = (1 - path.alphas) * path.losses[0] + path.alphas * path.losses[-1]
    excess = path.losses - chord
    assert path.barrier == pytest.approx(max(float(excess.max()), 0.0), abs=1e-15)
    assert path.barrier >= 0.0 and excess[0] == 0.0 and excess[-1] == 0.0
