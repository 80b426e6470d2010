"""The models experiments can name, and a seeded builder that leaves the global RNG alone.

MNIST-shaped inputs ``(1, 28, 28)``: ``FedNet`` (MLP), ``FedCNN``. CIFAR-shaped
inputs ``(3, 32, 32)``: ``CifarCNN`` (the original prototype's CIFAR network),
``ResNet20`` and ``ResNet20-noshort`` (He et al. 2016's CIFAR ResNet, and Li et
al. 2018's variant without skip connections), ``ResNet18`` (He et al.'s
ImageNet ResNet-18 with the usual CIFAR stem). ``MODEL_INPUT_SHAPES`` says
which input each model takes, so the spec can refuse a model that does not fit
its dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedland.cifar_models import CifarCNN, ResNet18, ResNet20

__all__ = ["MODEL_INPUT_SHAPES", "MODEL_NAMES", "CifarCNN", "FedCNN", "FedNet", "ResNet18", "ResNet20", "build_model"]


class FedNet(nn.Module):
    """MLP 784-64-32-10 with ReLU hidden layers; returns logits (no final activation)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, start_dim=1)  # (batch, 784)
        x = torch.relu(self.fc1(x))  # (batch, 64)
        x = torch.relu(self.fc2(x))  # (batch, 32)
        return self.fc3(x)  # (batch, classes)


class FedCNN(nn.Module):
    """Two 5x5 conv + max-pool blocks and two linear layers (no BatchNorm); ~215k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (batch, 16, 14, 14)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (batch, 32, 7, 7)
        x = torch.relu(self.fc1(torch.flatten(x, start_dim=1)))  # (batch, 128)
        return self.fc2(x)  # (batch, classes)


_MNIST_SHAPE = (1, 28, 28)
_CIFAR_SHAPE = (3, 32, 32)
_MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, int, int]]] = {
    "FedNet": (FedNet, _MNIST_SHAPE),
    "FedCNN": (FedCNN, _MNIST_SHAPE),
    "CifarCNN": (CifarCNN, _CIFAR_SHAPE),
    "ResNet20": (lambda classes: ResNet20(classes, shortcuts=True), _CIFAR_SHAPE),
    "ResNet20-noshort": (lambda classes: ResNet20(classes, shortcuts=False), _CIFAR_SHAPE),
    "ResNet18": (ResNet18, _CIFAR_SHAPE),
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)
#: The ``(channels, height, width)`` of one input each model takes.
MODEL_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {name: shape for name, (_, shape) in _MODELS.items()}


def build_model(name: str, seed: int, num_classes: int = 10) -> nn.Module:
    """Build a model with weights drawn from ``seed`` only.

    Same name, seed and classes give bit-identical weights; the global torch
    RNG is not read or advanced. Weights follow PyTorch's default
    ``Linear``/``Conv2d`` initialisation: weight and bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), drawn module by module in ``modules()`` order; BatchNorm
    starts at weight 1, bias 0, running mean 0, running variance 1.

    Args:
        name: a key of ``MODEL_NAMES``.
        seed: seeds a private ``torch.Generator``.
        num_classes: outputs of the last layer (the dataset's class count).

    Returns:
        The model on CPU, in training mode.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model: unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
    # Build on the meta device so the layers' own initialisation draws nothing.
    with torch.device("meta"):
        model = _MODELS[name][0](num_classes)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()  # deterministic: ones, zeros, and a zeroed step count
    return model
