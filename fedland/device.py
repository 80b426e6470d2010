"""Where computations run: ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``."""

from __future__ import annotations

import re

import torch

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` a device name means, with an explicit index for CUDA.

    ``"auto"`` is the first GPU when torch sees one, else the CPU; ``"cuda"``
    is the current GPU (``cuda:<index>``, so devices compare equal to a
    tensor's); ``"cuda:N"`` GPU N. A ``torch.device`` is checked the same way.

    Raises:
        ValueError: an unknown name, or a GPU that torch does not see (naming how many it sees).
    """
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(name)
    if match is None:
        raise ValueError(f"device: must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1)) if match.group(1) is not None else (torch.cuda.current_device() if count else 0)
    if index >= count:
        raise ValueError(f"device: {device!r} asks for GPU {index} but torch sees {count} GPU(s)")
    return torch.device("cuda", index)
