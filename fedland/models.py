"""The models experiments can name, and a seeded builder that leaves the global RNG alone."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "FedCNN", "FedNet", "build_model"]


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


_MODELS: dict[str, type[nn.Module]] = {"FedNet": FedNet, "FedCNN": FedCNN}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def build_model(name: str, seed: int) -> nn.Module:
    """Build a model with weights drawn from ``seed`` only.

    Same name and seed give bit-identical weights; the global torch RNG is not
    read or advanced. Weights follow PyTorch's default ``Linear``/``Conv2d``
    initialisation: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Args:
        name: a key of ``MODEL_NAMES``.
        seed: seeds a private ``torch.Generator``.

    Returns:
        The model on CPU, in training mode.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model: unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    # Build on the meta device so the layers' own initialisation draws nothing.
    with torch.device("meta"):
        model = _MODELS[name]()
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
    return model
