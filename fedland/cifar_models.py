"""The CIFAR-shaped models: the prototype's CNN, He et al.'s ResNet-20 (with or without skips), ResNet-18.

Pure torch modules taking ``(batch, 3, 32, 32)`` inputs and returning logits;
build them with ``fedland.models.build_model`` (seeded initialisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarCNN", "ResNet18", "ResNet20"]


class CifarCNN(nn.Module):
    """The original prototype's CIFAR network ("CifarFedNet"), 0.59M parameters.

    Three blocks of 3x3 conv (32, 64, 64 channels) + BatchNorm + ReLU + 2x2
    max-pool, then 1024 -> 512 -> classes with dropout 0.5 before the last layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.bn2 = nn.BatchNorm2d(64)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, num_classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (batch, 32, 16, 16)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (batch, 64, 8, 8)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (batch, 64, 4, 4)
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, start_dim=1))))  # (batch, 512)
        return self.fc2(x)  # (batch, classes)


class _PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers; the shortcut is added before the last ReLU unless it is None."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    """He et al. 2016 (sec. 4.2) CIFAR ResNet with n = 3: 6n + 2 = 20 layers, ~0.27M parameters.

    3x3 conv to 16 channels, three stages of three basic blocks (16, 32, 64
    channels; the second and third start with stride 2), global average pooling
    and a linear layer. Shortcuts are identities, or option A (subsample and
    zero-pad) where the shape changes, so both variants have the same
    parameters. ``shortcuts=False`` is Li et al. 2018's "noshort" network.
    """

    def __init__(self, num_classes: int = 10, shortcuts: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                step = stride if index == 0 else 1
                shortcut: nn.Module | None = None
                if shortcuts:
                    changes = step != 1 or in_planes != planes
                    shortcut = _PadShortcut(step, planes - in_planes) if changes else nn.Identity()
                blocks.append(_BasicBlock(in_planes, planes, step, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (batch, 16, 32, 32)
        x = self.layers(x)  # (batch, 64, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (batch, 64)
        return self.fc(x)  # (batch, classes)


class ResNet18(nn.Module):
    """He et al. 2016's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), ~11.2M parameters.

    Four stages of two basic blocks (64, 128, 256, 512 channels); where the
    shape changes the shortcut is a 1x1 conv + BatchNorm projection (option B).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for index in range(2):
                step = stride if index == 0 else 1
                shortcut: nn.Module = nn.Identity()
                if step != 1 or in_planes != planes:
                    shortcut = nn.Sequential(
                        nn.Conv2d(in_planes, planes, 1, stride=step, bias=False), nn.BatchNorm2d(planes)
                    )
                blocks.append(_BasicBlock(in_planes, planes, step, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (batch, 64, 32, 32)
        x = self.layers(x)  # (batch, 512, 4, 4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (batch, 512)
        return self.fc(x)  # (batch, classes)
