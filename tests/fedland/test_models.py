"""Models: shapes, parameter counts, seeded bit-identical weights, global RNG untouched."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch

from fedland.models import MODEL_INPUT_SHAPES, MODEL_NAMES, FedCNN, FedNet, build_model

torch.set_num_threads(1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape(name: str) -> None:
    model = build_model(name, seed=0).eval()
    x = torch.randn(5, *MODEL_INPUT_SHAPES[name], generator=torch.Generator().manual_seed(1))
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
    for key, value in first.named_parameters():
        drawn = not key.split(".")[-2].startswith("bn") and ".shortcut.1." not in key  # BatchNorm starts at 1, 0
        assert torch.equal(value, other.state_dict()[key]) != drawn, key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weights_follow_default_uniform_init(name: str) -> None:
    model = build_model(name, seed=0)
    assert model.training
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = 1 / math.sqrt(module.weight[0].numel())
            for tensor in (module.weight.detach(), *([] if module.bias is None else [module.bias.detach()])):
                assert float(tensor.abs().max()) <= bound
                if tensor.numel() >= 100:
                    assert float(tensor.abs().max()) > 0.9 * bound  # really spread over the interval
                assert tensor.device.type == "cpu" and torch.isfinite(tensor).all()


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="^model: unknown model 'VGG'; valid: FedNet, FedCNN"):
        build_model("VGG", 0)


def test_cifar_parameter_counts_and_classes() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # the prototype's CNN: three 3x3 conv + BatchNorm blocks, 1024 -> 512 -> 10
    conv = (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 64 * 9 + 64)
    assert count(build_model("CifarCNN", 0)) == conv + 2 * (32 + 64 + 64) + (1024 * 512 + 512) + (512 * 10 + 10)
    assert count(build_model("ResNet20", 0)) == count(build_model("ResNet20-noshort", 0)) == 269_722  # He et al.: 0.27M
    assert count(build_model("ResNet18", 0)) == 11_173_962  # the CIFAR ResNet-18 of kuangliu/pytorch-cifar
    assert cast(torch.nn.Linear, build_model("ResNet18", 0, num_classes=100).fc).out_features == 100
    with pytest.raises(ValueError, match="^num_classes:"):
        build_model("ResNet20", 0, num_classes=1)


def test_noshort_differs_from_resnet20_only_in_the_skips() -> None:
    with_skips, without = build_model("ResNet20", 3).eval(), build_model("ResNet20-noshort", 3).eval()
    assert [k for k in with_skips.state_dict()] == [k for k in without.state_dict()]
    assert all(torch.equal(a, b) for a, b in zip(with_skips.state_dict().values(), without.state_dict().values()))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(with_skips(x), without(x))
