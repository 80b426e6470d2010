"""Model weights on the wire and in the store: safetensors by name, never pickle."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import safetensors.numpy
import torch

from fedland.strategies import NamedArrays


def _as_array(name: str, value: object) -> np.ndarray:
    # np.require, not np.ascontiguousarray: the latter turns a 0-d array (BatchNorm's
    # num_batches_tracked) into shape (1,)
    if isinstance(value, torch.Tensor):
        return np.require(value.detach().cpu().numpy(), requirements="C")
    if isinstance(value, np.ndarray):
        return np.require(value, requirements="C")
    raise ValueError(f"weights[{name!r}] must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def encode(state: Mapping[str, object]) -> bytes:
    """Serialise named tensors/arrays to safetensors bytes, keeping each dtype."""
    arrays = {str(name): _as_array(str(name), value) for name, value in state.items()}
    return bytes(safetensors.numpy.save(arrays))


def decode(data: bytes) -> NamedArrays:
    """Parse safetensors bytes into named numpy arrays; bad bytes raise ValueError."""
    try:
        return dict(safetensors.numpy.load(bytes(data)))
    except Exception as error:  # untrusted bytes: any parse failure is the sender's fault
        raise ValueError(f"weights: not a valid safetensors payload ({error})") from None


STATE_PREFIX = "state/"  # a member's persistent client-algorithm state, in a member-state payload
MESSAGE_PREFIX = "message/"  # its message to the server strategy
ROUND_PREFIX = "round/"  # the strategy's round payload, in what a member's round starts from


def encode_member_state(state: Mapping[str, object], message: Mapping[str, object]) -> bytes:
    """A client algorithm's new state and message as one safetensors payload (keys prefixed)."""
    return encode({**{STATE_PREFIX + k: v for k, v in state.items()}, **{MESSAGE_PREFIX + k: v for k, v in message.items()}})


def encode_member_inputs(state: Mapping[str, object], round_state: Mapping[str, object]) -> bytes:
    """What a member's round starts from: its stored state and the strategy's round payload (keys prefixed)."""
    return encode({**{STATE_PREFIX + k: v for k, v in state.items()}, **{ROUND_PREFIX + k: v for k, v in round_state.items()}})


def split(arrays: Mapping[str, np.ndarray], *prefixes: str) -> tuple[NamedArrays, ...]:
    """The arrays under each prefix, the prefix removed; ValueError naming a key under none of them."""
    parts: tuple[NamedArrays, ...] = tuple({} for _ in prefixes)
    for key, value in arrays.items():
        for part, prefix in zip(parts, prefixes):
            if key.startswith(prefix) and len(key) > len(prefix):
                part[key[len(prefix):]] = value
                break
        else:
            raise ValueError(f"state: key {key!r} is under none of {', '.join(prefixes)}")
    return parts


def check_compatible(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming the key if `weights` differ from `reference` in layout or hold NaN/Inf."""
    missing = sorted(set(reference) - set(weights))
    if missing:
        raise ValueError(f"weights: missing key {missing[0]!r}")
    unexpected = sorted(set(weights) - set(reference))
    if unexpected:
        raise ValueError(f"weights: unexpected key {unexpected[0]!r}")
    for name, expected in reference.items():
        value = weights[name]
        if value.shape != expected.shape:
            raise ValueError(f"weights[{name!r}]: shape {value.shape} != expected {expected.shape}")
        if value.dtype != expected.dtype:
            raise ValueError(f"weights[{name!r}]: dtype {value.dtype} != expected {expected.dtype}")
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            raise ValueError(f"weights[{name!r}]: contains NaN or Inf")


def to_state_dict(weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Copy named arrays into tensors for `module.load_state_dict`."""
    return {name: torch.from_numpy(np.array(value, copy=True)) for name, value in weights.items()}


def from_module(model: torch.nn.Module) -> NamedArrays:
    """Copy a module's state dict (parameters and buffers) into named numpy arrays."""
    return {name: value.detach().cpu().numpy().copy() for name, value in model.state_dict().items()}
