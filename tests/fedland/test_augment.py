"""Training-time augmentation: seeded random crop and flip, applied by ``batches`` to training batches only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedland.augment import random_crop_flip
from fedland.training import batches


def test_augmentation_is_seeded_shape_preserving_and_a_crop_or_flip() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    first = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    again = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(first, again) and first.shape == images.shape
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 5, (2, 2), generator=generator)
    flips = torch.rand(2, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        dy, dx = (int(v) for v in offsets[i])
        crop = padded[i, :, dy : dy + 8, dx : dx + 8]
        assert torch.equal(first[i], crop.flip(-1) if flips[i] else crop)
    unpadded = random_crop_flip(images, torch.Generator().manual_seed(3), padding=0)  # flips only
    assert all(torch.equal(u, x) or torch.equal(u, x.flip(-1)) for u, x in zip(unpadded, images))


def test_batches_augment_training_only_and_need_a_generator() -> None:
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10)
    plain = list(batches(x, y, 4, torch.Generator().manual_seed(1)))
    augmented = list(batches(x, y, 4, torch.Generator().manual_seed(1), augment=True))
    assert [b[1].tolist() for b in plain] == [b[1].tolist() for b in augmented]  # same shuffle order
    assert not torch.equal(plain[0][0], augmented[0][0])
    with pytest.raises(ValueError, match="^augment:"):
        list(batches(x, y, 4, augment=True))
    assert np.array_equal(next(batches(x, y, 10))[0].numpy(), x.numpy())  # evaluation batches are untouched
