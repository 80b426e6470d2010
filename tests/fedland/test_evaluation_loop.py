"""The one evaluation loop: it leaves the model exactly as found, and every caller keeps its numbers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedland._objective import Objective, evaluation_loop
from fedland.generalization import pac_bayes_flatness, zero_one_error
from fedland.measure import mean_loss
from fedland.training import evaluate
from tests.fedland._landscape_helpers import TinyCNN, make_data, tiny_cnn, tiny_mlp

torch.set_num_threads(1)


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
    }


def _assert_as_found(model: nn.Module, before: dict[str, object]) -> None:
    values = before["values"]
    assert isinstance(values, dict)
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == before["flags"]
    for p, (grad, saved) in zip(model.parameters(), before["grads"]):  # type: ignore[call-overload]
        assert p.grad is grad  # the same tensor object ...
        assert saved is None or torch.equal(p.grad, saved)  # ... with its old values
    assert [m.training for m in model.modules()] == before["modes"]


def _awkward_cnn() -> TinyCNN:
    """A BatchNorm CNN in train mode, one submodule in eval, a frozen parameter and gradients attached."""
    model = tiny_cnn()
    assert isinstance(model, TinyCNN)
    model.train()
    model.fc.eval()
    list(model.conv.parameters())[1].requires_grad_(False)  # the bias
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    return model


def test_the_loop_leaves_the_model_exactly_as_found() -> None:
    model, data = _awkward_cnn(), make_data((1, 6, 6), [5, 3])
    before = _snapshot(model)
    seen: list[bool] = []

    def meddling(inputs: Tensor) -> Tensor:  # a forward that disturbs everything the loop must restore
        seen.append(model.training or model.bn.training)
        out = model(inputs)
        with torch.no_grad():
            model.fc.weight.add_(1.0)
            if model.fc.weight.grad is not None:
                model.fc.weight.grad.zero_()
        model.conv.weight.requires_grad_(False)
        bias = list(model.conv.parameters())[1]
        bias.grad = torch.ones_like(bias)
        model.train()
        return out

    totals = evaluation_loop(model, data, F.cross_entropy, forward=meddling)
    assert seen == [False, True]  # eval mode for the first batch; the meddling forward set train mode
    assert totals.count == 8 and totals.correct is None
    _assert_as_found(model, before)
    with pytest.raises(ValueError, match="^batches: no examples"):
        evaluation_loop(model, [], F.cross_entropy)
    _assert_as_found(model, before)


def _reference(
    model: nn.Module, data: list[tuple[Tensor, Tensor]], term: Callable[[Tensor, Tensor], float]
) -> tuple[float, int, int]:
    """The straightforward loop: eval mode, no grad, Python-float terms in batch order."""
    total, correct, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            total += term(out, y)
            correct += int((out.argmax(dim=1) == y).sum())
            count += int(y.shape[0])
    return total, correct, count


def test_training_evaluate_keeps_its_numbers_and_leaves_the_model() -> None:
    model, data = _awkward_cnn(), make_data((1, 6, 6), [7, 5, 9])
    before = _snapshot(model)
    result = evaluate(model, data)
    _assert_as_found(model, before)
    total, correct, count = _reference(model, data, lambda out, y: F.cross_entropy(out, y, reduction="sum").item())
    assert (result.loss, result.accuracy, result.num_examples) == (total / count, correct / count, count)


def test_mean_loss_keeps_its_numbers_and_leaves_the_model() -> None:
    model, data = _awkward_cnn(), make_data((1, 6, 6), [7, 5, 9])
    before = _snapshot(model)
    loss, accuracy = mean_loss(model, F.cross_entropy, data)
    _assert_as_found(model, before)
    total, correct, count = _reference(model, data, lambda out, y: float(F.cross_entropy(out, y)) * int(y.shape[0]))
    assert (loss, accuracy) == (total / count, correct / count)
    assert mean_loss(model, lambda out, y: ((out[:, 0] - y) ** 2).mean(), data)[1] is not None
    float_targets = [(x, y.double()) for x, y in data]
    assert mean_loss(model, lambda out, y: ((out[:, 0] - y) ** 2).mean(), float_targets)[1] is None


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, zero_one_error])
def test_pac_bayes_base_loss_keeps_its_numbers_and_leaves_the_model(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> None:
    model, data = _awkward_cnn(), make_data((1, 6, 6), [7, 5, 9])
    before = _snapshot(model)
    result = pac_bayes_flatness(model, loss_fn, data, samples=2, steps=2, seed=3)
    _assert_as_found(model, before)
    total, _, count = _reference(model, data, lambda out, y: float(loss_fn(out, y)) * int(y.shape[0]))
    assert result.base_loss == total / count


def test_objective_evaluate_keeps_its_numbers_and_leaves_the_model() -> None:
    model, data = tiny_mlp(), make_data((4,), [7, 5, 9, 4])
    last_weight = list(model.parameters())[2]
    last_weight.grad = torch.ones_like(last_weight)
    model.train()
    before = _snapshot(model)
    objective = Objective(model, F.cross_entropy, data, group_size=12)  # groups [7, 5], [9], [4]
    theta = objective.theta * 1.01
    loss, accuracy = objective.evaluate(theta)
    _assert_as_found(model, before)
    # the reference: per group, the batches' size-weighted shares added as tensors, then one float per group
    moved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, t in zip(model.parameters(), objective.unflatten(theta).values()):
            p.copy_(t)
        expected, correct = 0.0, 0
        model.eval()
        for group in ([data[0], data[1]], [data[2]], [data[3]]):
            out = model(torch.cat([x for x, _ in group]))
            share = out.new_zeros(())
            for o, (_, y) in zip(out.split([len(y) for _, y in group]), group):
                share = share + F.cross_entropy(o, y) * (y.shape[0] / 25)
                correct += int((o.argmax(dim=1) == y).sum())
            expected += float(share)
        for p, t in zip(model.parameters(), moved):
            p.copy_(t)
    assert (loss, accuracy) == (expected, correct / 25)
