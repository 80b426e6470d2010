"""A dataset component: ``num_classes``, ``input_shape``, per-class counts, ``load(data_dir)`` (generated, no files)."""

from __future__ import annotations

import os

import torch


class Bars:
    """Ten classes of 28x28 images, each a bar (rows 0-4: horizontal, 5-9: vertical) in Gaussian noise.

    Drawn from a fixed seed: the same tensors in every process, so the server's
    and the workers' partitions agree. Nothing is read from ``data_dir``.
    """

    num_classes = 10
    input_shape = (1, 28, 28)  # (channels, height, width): the models of MNIST fit
    train_per_class = 300
    test_per_class = 50
    train_class_counts = (train_per_class,) * num_classes
    test_class_counts = (test_per_class,) * num_classes
    augment = False  # a flipped vertical bar would still be its class, but a crop could cut it away
    seed = 2024
    noise = 0.8  # std of the pixel noise; the bars have amplitude 1

    def load(self, data_dir: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        train_x, train_y = self._split(self.train_per_class, generator)
        test_x, test_y = self._split(self.test_per_class, generator)
        return train_x, train_y, test_x, test_y

    def _split(self, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = per_class * self.num_classes
        labels = (torch.arange(count) % self.num_classes)[torch.randperm(count, generator=generator)]  # (count,)
        patterns = torch.zeros(self.num_classes, 28, 28)
        for label in range(5):
            patterns[label, 2 + 5 * label : 6 + 5 * label, 4:24] = 1.0  # horizontal bar, 4 rows thick
            patterns[5 + label, 4:24, 2 + 5 * label : 6 + 5 * label] = 1.0  # vertical bar, 4 columns thick
        noise = self.noise * torch.randn(count, 28, 28, generator=generator)
        images = (patterns[labels] + noise).unsqueeze(1)  # (count, 1, 28, 28)
        return images.to(torch.float32), labels
