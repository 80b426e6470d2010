"""The top-level ``fedland`` names: every export is the object ``__all__`` promises, never a submodule."""

from __future__ import annotations

import types

import torch
from torch import nn

import fedland
import fedland.scalars
from tests.fedland._landscape_helpers import make_data, tiny_mlp

torch.set_num_threads(1)


def test_no_export_is_shadowed_by_a_submodule() -> None:
    modules = [name for name in fedland.__all__ if isinstance(getattr(fedland, name), types.ModuleType)]
    assert modules == []


def test_fedland_sharpness_is_the_sam_sharpness_function() -> None:
    model, data = tiny_mlp(), make_data((4,), [7, 5])
    loss_fn = nn.CrossEntropyLoss()
    assert fedland.sharpness is fedland.scalars.sharpness
    value = fedland.sharpness(model, loss_fn, data, rho=0.1)
    assert value == fedland.scalars.sharpness(model, loss_fn, data, rho=0.1) and value > 0.0
