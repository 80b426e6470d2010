"""``Images``: read-only images (uint8 or float32) that become normalised float32 only when indexed (one batch at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class Images:
    """Images ``(N, C, H, W)`` kept as uint8 (usually a shared memory map) or float32, normalised per access.

    Indexing (an int, a slice, an index array or tensor) returns a float32
    tensor of the chosen images, ``(pixel / 255 - mean_c) / std_c`` (float32
    pixels: ``(pixel - mean_c) / std_c``, without the 255): the same values,
    bit for bit, as normalising the whole split up front. ``subset``
    returns a view (an index array into the same pixels), never a copy of them.
    """

    dtype = torch.float32

    def __init__(
        self,
        pixels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        indices: np.ndarray | None = None,
    ) -> None:
        if pixels.dtype not in (np.uint8, np.float32) or pixels.ndim != 4:
            raise ValueError(f"pixels: must be uint8 or float32 (N, C, H, W), got {pixels.dtype} {pixels.shape}")
        if not len(mean) == len(std) == pixels.shape[1]:
            raise ValueError(f"mean/std: need one entry per channel ({pixels.shape[1]}), got {len(mean)}/{len(std)}")
        self._pixels = pixels
        self._mean = tuple(float(m) for m in mean)
        self._std = tuple(float(s) for s in std)
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._pixels) if self._indices is None else len(self._indices)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._pixels.shape[1:]))

    @property
    def nbytes(self) -> int:
        """Bytes this object holds of its own (its index array; the pixels are shared)."""
        return 0 if self._indices is None else int(self._indices.nbytes)

    @property
    def pixels(self) -> np.ndarray:
        """The images (uint8 or float32) this view chooses from, ``(N_all, C, H, W)``; read-only."""
        return self._pixels

    @property
    def indices(self) -> np.ndarray:
        """Which images of ``pixels`` this view holds, in order."""
        return np.arange(len(self._pixels)) if self._indices is None else self._indices

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> Images:
        """A view of the images at ``indices`` (positions in this view)."""
        chosen = _as_numpy_index(indices)
        rows = chosen if self._indices is None else self._indices[chosen]
        return Images(self._pixels, self._mean, self._std, np.asarray(rows, dtype=np.int64))

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = _as_numpy_index(index)
        if self._indices is not None:
            index = self._indices[index]
        chosen = self._pixels[index]
        if isinstance(chosen, np.memmap) or np.may_share_memory(chosen, self._pixels):
            chosen = np.array(chosen)  # a copy of only the chosen images, never of the map
        return self._normalised(torch.from_numpy(chosen))

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        values = pixels.to(torch.float32)
        if pixels.dtype == torch.uint8:
            values = values.div_(255.0)
        if len(self._mean) == 1:  # scalar arithmetic, as the single-channel datasets always were
            return values.sub_(self._mean[0]).div_(self._std[0])
        shape = (len(self._mean), 1, 1)
        mean = torch.tensor(self._mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(self._std, dtype=torch.float32).reshape(shape)
        return values.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"Images(shape={tuple(self.shape)}, {self._pixels.dtype} -> float32 per batch)"


def _as_numpy_index(index: Any) -> Any:
    if isinstance(index, torch.Tensor):
        if index.dtype == torch.bool:
            raise TypeError("index: boolean masks are not supported; pass positions")
        return index.cpu().numpy()
    if isinstance(index, tuple):
        raise TypeError("index: only the first (example) dimension is indexed here; index the returned tensor further")
    if isinstance(index, (list, range)):
        return np.asarray(index, dtype=np.int64)
    return index
