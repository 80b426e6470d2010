"""Seeded training-time augmentation: random crop with zero padding and horizontal flip.

A pure function of a batch and a ``torch.Generator``: the same generator state
gives the same output, on any device (the random draws are made on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CROP_PADDING", "random_crop_flip"]

#: Padding of the random crop, as in He et al. 2016's CIFAR recipe.
CROP_PADDING = 4


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """Each image padded by ``padding`` zeros, cropped back at a random offset, flipped with probability 1/2.

    The images are already normalised, so the zero padding is the dataset's
    mean colour. Draws, in order: the ``(N, 2)`` offsets in ``[0, 2 * padding]``
    (row, column) and ``N`` uniforms for the flips (flip when < 0.5).

    Args:
        images: ``(N, C, H, W)``; not modified.
        generator: a CPU generator; advanced by the draws.
        padding: pixels of zeros on each side (0 disables the crop).

    Returns:
        A new ``(N, C, H, W)`` tensor on the device of ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"images: must be (N, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding: must be an integer >= 0, got {padding!r}")
    n, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)  # (N, 2)
    flips = torch.rand(n, generator=generator) < 0.5  # (N,)
    rows = offsets[:, :1] + torch.arange(height)  # (N, H) into the padded image
    columns = torch.arange(width)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets[:, 1:]  # (N, W)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))  # (N, C, H+2p, W+2p)
    device = images.device
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows.to(device)[:, None, :, None],
        columns.to(device)[:, None, None, :],
    ]
