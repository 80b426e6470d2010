"""Random filter-normalised directions and model-to-model directions."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn

from fedland.directions import model_direction, random_direction
from tests.fedland._landscape_helpers import assert_unchanged, messy_state, snapshot, tiny_cnn, tiny_mlp


def test_filter_normalisation_matches_each_filter_norm() -> None:
    model = tiny_cnn()
    direction = random_direction(model, seed=3)
    params = dict(model.named_parameters())
    assert list(direction) == list(params)
    for name, d in direction.items():
        w = params[name].detach()
        if w.dim() == 1:
            assert torch.count_nonzero(d) == 0, f"{name} should be ignored"
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-10, atol=0)


def test_layer_and_none_normalisation() -> None:
    model = tiny_mlp()
    params = dict(model.named_parameters())
    layer = random_direction(model, seed=1, norm="layer", ignore_1d=False)
    for name, d in layer.items():
        assert float(d.norm()) == pytest.approx(float(params[name].detach().norm()), rel=1e-10)
    raw = random_direction(model, seed=1, norm="none", ignore_1d=False)
    gen = torch.Generator().manual_seed(1)
    for name, d in raw.items():
        expected = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        assert torch.equal(d, expected)


def test_biases_kept_when_asked() -> None:
    model = tiny_mlp()
    direction = random_direction(model, seed=0, ignore_1d=False)
    assert float(direction["0.bias"].norm()) == pytest.approx(float(cast(nn.Linear, model[0]).bias.detach().norm()), rel=1e-10)


def test_same_seed_same_direction_and_global_rng_untouched() -> None:
    model = messy_state(tiny_cnn())
    before = snapshot(model)
    state = torch.random.get_rng_state()
    a = random_direction(model, seed=7)
    b = random_direction(model, seed=7)
    c = random_direction(model, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])
    assert_unchanged(model, before)
    assert "fc.bias" not in a  # frozen by messy_state: not a trainable parameter


def test_model_direction_is_the_difference() -> None:
    a, b = tiny_mlp(0), tiny_mlp(1)
    before_a, before_b = snapshot(a), snapshot(b)
    direction = model_direction(a, b)
    for name, p in a.named_parameters():
        assert torch.equal(direction[name], dict(b.named_parameters())[name].detach() - p.detach())
    from_state = model_direction(a.state_dict(), b.state_dict())
    assert all(torch.equal(from_state[n], direction[n]) for n in direction)
    assert_unchanged(a, before_a)
    assert_unchanged(b, before_b)


def test_bad_input_raises_value_error() -> None:
    with pytest.raises(ValueError, match="norm"):
        random_direction(tiny_mlp(), norm="model")  # type: ignore[arg-type]
    other = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    with pytest.raises(ValueError, match="model_to"):
        model_direction(tiny_mlp(), other)
    with pytest.raises(ValueError, match="model_to"):
        model_direction(tiny_mlp(), {"0.weight": torch.zeros(6, 4)})
