"""Training: batching, evaluation against a hand computation, local SGD (and FedProx) on real MNIST."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, cast

import pytest
import torch
from torch.nn import functional as F

from fedland.datasets import load_dataset
from fedland.models import FedNet, build_model
from fedland.training import batches, evaluate, train_local

torch.set_num_threads(1)

DATA_DIR = os.environ.get("FEDLAND_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR, reason="FEDLAND_DATA_DIR is unset: point it at a directory holding mnist/ IDX files"
)


def toy_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, y


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_batches_in_order_and_shuffled() -> None:
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    plain = list(batches(x, y, 4))
    assert [b[1].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = list(batches(x, y, 4, torch.Generator().manual_seed(0)))
    order = torch.cat([b[1] for b in shuffled])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in shuffled)  # pairs stay together
    again = torch.cat([b[1] for b in batches(x, y, 4, torch.Generator().manual_seed(0))])
    assert torch.equal(order, again)
    with pytest.raises(ValueError, match="^batch_size"):
        list(batches(x, y, 0))


def test_evaluate_matches_a_full_batch_computation_and_restores_modes() -> None:
    model = cast(FedNet, build_model("FedNet", seed=1))
    x, y = toy_data(50)
    with torch.no_grad():
        logits = model(x)
    expected_loss = float(F.cross_entropy(logits, y))
    expected_accuracy = float((logits.argmax(1) == y).float().mean())
    before = state(model)
    model.fc2.eval()  # a mixed mode must come back as it was
    result = evaluate(model, batches(x, y, 16))  # batches of 16, 16, 16, 2: weighted by size
    assert result.num_examples == 50
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.accuracy == pytest.approx(expected_accuracy)
    assert model.training and not model.fc2.training and model.fc1.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="^batches"):
        evaluate(model, [])


def test_train_local_leaves_the_input_alone_and_is_deterministic() -> None:
    model = build_model("FedNet", seed=0)
    before = state(model)
    x, y = toy_data(100)
    kwargs: dict[str, Any] = dict(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9)
    trained, report = train_local(model, x, y, seed=3, **kwargs)
    again, _ = train_local(model, x, y, seed=3, **kwargs)
    other, _ = train_local(model, x, y, seed=4, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert trained is not model and all(p.grad is None for p in trained.parameters())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())
    assert not torch.equal(cast(FedNet, trained).fc1.weight, cast(FedNet, other).fc1.weight)
    assert not torch.equal(cast(FedNet, trained).fc1.weight, cast(FedNet, model).fc1.weight)
    assert report.num_examples == 100 and len(report.epoch_losses) == 2 and report.duration_s > 0


def test_prox_term_matches_a_hand_written_step() -> None:
    # Full-batch SGD without momentum: w1 = w0 - lr * g(w0); w2 = w1 - lr * (g(w1) + mu * (w1 - w0)).
    model = build_model("FedNet", seed=0)
    x, y = toy_data(32)
    lr, mu = 0.1, 5.0
    reference = build_model("FedNet", seed=0)
    anchor = [p.detach().clone() for p in reference.parameters()]
    for _ in range(2):
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for p, p0 in zip(cast(Iterator[torch.Tensor], reference.parameters()), anchor):  # p -= is Tensor math
                p -= lr * (cast(torch.Tensor, p.grad) + mu * (p - p0))  # backward() filled every grad
    trained, _ = train_local(model, x, y, epochs=2, batch_size=32, learning_rate=lr, momentum=0.0, seed=0, prox_mu=mu)
    for p, q in zip(trained.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_large_prox_mu_stays_closer_to_the_global_weights() -> None:
    model = build_model("FedNet", seed=0)
    x, y = toy_data(128)

    def distance(mu: float) -> float:
        trained, _ = train_local(
            model, x, y, epochs=3, batch_size=16, learning_rate=0.05, momentum=0.5, seed=0, prox_mu=mu
        )
        with torch.no_grad():
            return sum(float(((p - q) ** 2).sum()) for p, q in zip(trained.parameters(), model.parameters())) ** 0.5

    free, pulled = distance(0.0), distance(10.0)
    assert pulled < 0.5 * free


def test_bad_arguments_name_the_parameter() -> None:
    model = build_model("FedNet", seed=0)
    x, y = toy_data(8)
    ok: dict[str, Any] = dict(epochs=1, batch_size=4, learning_rate=0.1, momentum=0.0, seed=0)
    for name, value in [("epochs", 0), ("learning_rate", -1.0), ("momentum", 1.0), ("prox_mu", -0.1), ("batch_size", 0)]:
        with pytest.raises(ValueError, match=f"^{name}"):
            train_local(model, x, y, **{**ok, name: value})
    with pytest.raises(ValueError, match="^y: has 7 examples but x has 8"):
        train_local(model, x, y[:7], **ok)


@needs_mnist
def test_fednet_learns_mnist_from_2000_samples() -> None:
    assert DATA_DIR is not None  # needs_mnist: skipped unless it is set
    data = load_dataset("MNIST", DATA_DIR, download=False)
    model = build_model("FedNet", seed=0)
    trained, report = train_local(
        model, data.train_x[:2000], data.train_y[:2000],
        epochs=2, batch_size=16, learning_rate=0.01, momentum=0.9, seed=0,
    )
    before = evaluate(model, batches(data.test_x, data.test_y, 1000))
    after = evaluate(trained, batches(data.test_x, data.test_y, 1000))
    assert before.accuracy < 0.2 and after.num_examples == 10_000
    assert after.accuracy > 0.8
    assert report.epoch_losses[1] < report.epoch_losses[0]
