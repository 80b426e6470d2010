"""Devices: resolve_device, and CPU results bit-identical to before the device argument existed."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import torch

from fedland.datasets import load_dataset
from fedland.device import resolve_device
from fedland.models import build_model
from fedland.training import batches, evaluate, train_local

torch.set_num_threads(1)
DATA_DIR = os.environ.get("FEDLAND_DATA_DIR")

#: Recorded with fedland/ of main at commit 36d58aa (before this change): `train_local` then had no device or augment argument.
BEFORE = {  # one torch thread, as set above
    "FedNet": ("6e6237834256ef665da63a8124048810992830219b8abdb1f5750b638058ce81",
               [1.9926193380355834, 1.0420563634236653], 0.8829971160888672, 0.72),
    "FedCNN": ("881220f1d4ad97a6ee7981cab1016e10d7ccdd2b3a7315ed82c5e59e3ecb73fe",
               [2.0543200985590615, 1.1797459888458253], 0.8957959899902344, 0.698),
}


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    with pytest.raises(ValueError, match="^device: must be one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"asks for GPU {count} but torch sees {count} GPU"):
        resolve_device(f"cuda:{count}")


@pytest.mark.skipif(not DATA_DIR, reason="FEDLAND_DATA_DIR is unset (real MNIST needed)")
@pytest.mark.parametrize("name", sorted(BEFORE))
def test_cpu_training_is_bit_identical_to_before(name: str) -> None:
    data = load_dataset("MNIST", DATA_DIR or "")
    model = build_model(name, 3)
    options: tuple[dict[str, Any], ...] = ({}, {"device": "cpu"})
    for kwargs in options:
        trained, report = train_local(
            model, data.train_x[:600], data.train_y[:600], epochs=2, batch_size=32, learning_rate=0.05,
            momentum=0.5, seed=11, prox_mu=0.01, **kwargs,
        )
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in trained.state_dict().values())).hexdigest()
        evaluation = evaluate(trained, batches(data.test_x[:500], data.test_y[:500], 128), **kwargs)
        assert (digest, report.epoch_losses, evaluation.loss, evaluation.accuracy) == BEFORE[name]


def test_dropout_is_seeded_and_leaves_the_global_rng_alone() -> None:
    x, y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    model = build_model("CifarCNN", 1)
    before = torch.random.get_rng_state()
    first, _ = train_local(model, x, y, epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0, seed=4)
    again, _ = train_local(model, x, y, epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
