"""Models: shapes, parameter counts, seeded bit-identical weights, global RNG untouched."""

from __future__ import annotations

import math

import pytest
import torch

from fedland.models import MODEL_NAMES, FedCNN, FedNet, build_model

torch.set_num_threads(1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape(name: str) -> None:
    model = build_model(name, seed=0)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert float(logits.min()) < 0  # raw logits: no ReLU or softmax on the output
    assert not torch.allclose(logits.sum(dim=1), torch.ones(5))


def test_parameter_counts() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("FedNet", 0)) == 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10 == 52_650
    conv = (1 * 16 * 25 + 16) + (16 * 32 * 25 + 32)
    dense = (32 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    assert count(build_model("FedCNN", 0)) == conv + dense == 215_370
    assert isinstance(build_model("FedNet", 0), FedNet) and isinstance(build_model("FedCNN", 0), FedCNN)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights_and_global_rng_untouched(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first, again, other = build_model(name, 5), build_model(name, 5), build_model(name, 6)
    assert torch.equal(torch.random.get_rng_state(), before)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
        assert not torch.equal(value, other.state_dict()[key])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weights_follow_default_uniform_init(name: str) -> None:
    model = build_model(name, seed=0)
    assert model.training
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = 1 / math.sqrt(module.weight[0].numel())
            for tensor in (module.weight.detach(), module.bias.detach()):
                assert float(tensor.abs().max()) <= bound
                assert float(tensor.abs().max()) > 0.9 * bound  # really spread over the interval
                assert tensor.device.type == "cpu" and torch.isfinite(tensor).all()


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="^model: unknown model 'VGG'; valid: FedNet, FedCNN"):
        build_model("VGG", 0)
