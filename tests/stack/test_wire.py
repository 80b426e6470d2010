"""safetensors wire format: round trips and every refusal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedland.models import build_model
from stack import wire


def reference() -> dict[str, np.ndarray]:
    return {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "steps": np.asarray([7], dtype=np.int64)}


def test_round_trip_keeps_values_and_dtypes_of_arrays_and_tensors() -> None:
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": np.asarray([1, -2], dtype=np.int64)}
    decoded = wire.decode(wire.encode(state))
    assert set(decoded) == {"a", "b"}
    assert decoded["a"].dtype == np.float32 and decoded["a"].shape == (2, 3)
    np.testing.assert_array_equal(decoded["a"], np.arange(6).reshape(2, 3))
    assert decoded["b"].dtype == np.int64 and decoded["b"].tolist() == [1, -2]


def test_module_round_trip_loads_into_a_fresh_model() -> None:
    model = build_model("FedNet", 3)
    weights = wire.from_module(model)
    other = build_model("FedNet", 4)
    other.load_state_dict(wire.to_state_dict(wire.decode(wire.encode(weights))))
    for name, value in other.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0)
    # copies: changing the arrays leaves the module alone
    first = next(iter(weights))
    weights[first][...] = 0
    assert model.state_dict()[first].abs().sum() > 0


def test_compatible_weights_pass() -> None:
    wire.check_compatible(reference(), reference())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("steps"), "missing key 'steps'"),
        (lambda w: w.update(extra=np.zeros(1, np.float32)), "unexpected key 'extra'"),
        (lambda w: w.update({"fc.weight": np.zeros((3, 2), np.float32)}), r"weights\['fc.weight'\]: shape"),
        (lambda w: w.update({"fc.weight": np.zeros((2, 3), np.float64)}), r"weights\['fc.weight'\]: dtype"),
        (lambda w: w["fc.weight"].__setitem__((0, 1), np.nan), r"weights\['fc.weight'\]: contains NaN"),
        (lambda w: w["fc.weight"].__setitem__((1, 2), -np.inf), r"weights\['fc.weight'\]: contains NaN or Inf"),
    ],
)
def test_check_compatible_refuses_and_names_the_key(
    change: Callable[[dict[str, np.ndarray]], object], message: str
) -> None:
    weights = reference()
    change(weights)
    decoded = wire.decode(wire.encode(weights))  # refusals hold after the wire too
    with pytest.raises(ValueError, match=message):
        wire.check_compatible(decoded, reference())


@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 64, wire.encode(reference())[:-3]])
def test_decode_refuses_bad_bytes(data: bytes) -> None:
    with pytest.raises(ValueError, match="safetensors"):
        wire.decode(data)


def test_encode_refuses_non_tensors() -> None:
    with pytest.raises(ValueError, match=r"weights\['x'\]"):
        wire.encode({"x": [1.0, 2.0]})


def test_zero_dimensional_buffers_keep_their_shape() -> None:
    # BatchNorm's num_batches_tracked is a 0-d int64 tensor
    import torch

    from fedland.models import build_model

    model = build_model("ResNet20", seed=0)
    weights = wire.decode(wire.encode(model.state_dict()))
    assert weights["bn1.num_batches_tracked"].shape == () and weights["bn1.num_batches_tracked"].dtype == "int64"
    wire.check_compatible(weights, wire.from_module(model))
    assert torch.equal(wire.to_state_dict(weights)["bn1.running_var"], model.state_dict()["bn1.running_var"])
