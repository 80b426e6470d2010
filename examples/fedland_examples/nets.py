"""A model component: a factory of ``num_classes`` returning an ``nn.Module``, with its ``input_shape``."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """One 3x3 convolution (8 channels), max-pooled to 7x7, and a linear layer; ~4k parameters."""

    input_shape = (1, 28, 28)  # (channels, height, width): MNIST and Fashion-MNIST

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.fc = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv(x)), 4)  # (batch, 8, 7, 7)
        return self.fc(torch.flatten(x, start_dim=1))  # (batch, classes)
