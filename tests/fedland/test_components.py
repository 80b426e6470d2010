"""Resolving components by built-in name or import path, from a package written to a temporary folder."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedland.algorithms import CLIENT_ALGORITHMS, LocalHyperparameters, MemberData, Scaffold
from fedland.components import (
    ModelComponent,
    is_import_path,
    resolve,
    resolve_client_algorithm,
    resolve_dataset,
    resolve_model,
    resolve_strategy,
)
from fedland.models import build_model
from fedland.strategies import STRATEGIES, ClientUpdate, FedAvg

torch.set_num_threads(1)

LAB_PACKAGE = {
    "__init__.py": "",
    "nets.py": """
        import torch
        from torch import nn

        class TinyNet(nn.Module):
            input_shape = (1, 4, 4)

            def __init__(self, num_classes):
                super().__init__()
                self.fc = nn.Linear(16, num_classes)

            def forward(self, x):
                return self.fc(torch.flatten(x, 1))

        def wrong_width(num_classes):
            return nn.Linear(16, num_classes + 1)
        wrong_width.input_shape = (16,)

        def not_a_module(num_classes):
            return "a string"
        not_a_module.input_shape = (16,)

        def no_shape(num_classes):
            return nn.Linear(16, num_classes)
    """,
    "data.py": """
        import torch

        class Blobs:
            num_classes = 3
            input_shape = (1, 4, 4)

            def load(self, data_dir):
                g = torch.Generator().manual_seed(0)
                y = torch.arange(12) % 3
                x = torch.randn(12, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1)
                return x[:9], y[:9], x[9:], y[9:]

        blobs = Blobs()
        one_class = type("OneClass", (), {"num_classes": 1, "input_shape": (1, 4, 4), "load": lambda self, d: None})()
    """,
    "algos.py": """
        from fedland.algorithms import LocalResult, local_sgd
        from fedland.strategies import FedAvg

        class CountingSGD:
            '''Plain local SGD that counts its rounds in its state.'''

            def train(self, model, data, *, seed, hyper, state, round_state):
                import numpy as np
                run = local_sgd(model, data, seed, hyper)
                rounds = int(state.get("rounds", np.zeros(()))) + 1
                return LocalResult(model=run.model, report=run.report, state={"rounds": np.asarray(rounds)})

        class NoTrain:
            pass

        class HalfFedAvg(FedAvg):
            pass

        class NoAverages:
            def aggregate(self, global_weights, updates, state): ...
            def aggregate_mean(self, global_weights, mean, state): ...
    """,
    "broken.py": "raise RuntimeError('lab module failed on import')\n",
}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package written to a temporary folder and put on sys.path; its name, unique to the test."""
    name = "lab_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    package = tmp_path / name
    package.mkdir()
    for filename, source in LAB_PACKAGE.items():
        (package / filename).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_built_in_names_resolve_through_the_same_contracts() -> None:
    model = resolve_model("FedCNN")
    assert isinstance(model, ModelComponent) and model.input_shape == (1, 28, 28)
    built, reference = model.build(seed=4, num_classes=10), build_model("FedCNN", seed=4, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), reference.state_dict().values()))
    dataset = resolve_dataset("CIFAR100")
    assert dataset.num_classes == 100 and dataset.input_shape == (3, 32, 32)
    assert resolve_strategy("FedAvgM") is STRATEGIES["FedAvgM"]
    assert resolve_client_algorithm("SCAFFOLD") is CLIENT_ALGORITHMS["SCAFFOLD"] is Scaffold
    assert is_import_path("a.b:c") and not is_import_path("FedAvg")
    with pytest.raises(ValueError, match=r"^model: unknown model 'WideNet'; built-ins: FedNet, .*import path"):
        resolve_model("WideNet")
    with pytest.raises(ValueError, match="^strategy.name: unknown strategy 'FedFoo'"):
        resolve_strategy("FedFoo")
    with pytest.raises(ValueError, match="^kind: must be one of"):
        resolve("optimizer", "SGD")


def test_a_model_by_import_path_is_checked_by_building_it(lab: str) -> None:
    component = resolve_model(f"{lab}.nets:TinyNet")
    assert component.input_shape == (1, 4, 4)
    rng = torch.random.get_rng_state()
    first, second, other = (component.build(seed=seed, num_classes=5).state_dict() for seed in (2, 2, 3))
    assert torch.equal(rng, torch.random.get_rng_state())  # building draws from the seed only
    assert first["fc.weight"].shape == (5, 16) and torch.equal(first["fc.weight"], second["fc.weight"])
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    assert component.build(seed=2, num_classes=5)(torch.zeros(7, 1, 4, 4)).shape == (7, 5)


@pytest.mark.parametrize(("attr", "message"), [
    ("wrong_width", r"must return logits of shape \(batch, num_classes\) = \(2, 2\), got \(2, 3\)"),
    ("not_a_module", "returned str for num_classes=2, not an nn.Module"),
    ("no_shape", "needs an input_shape attribute"),
])
def test_a_model_that_breaks_the_contract_is_refused(lab: str, attr: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^model: '{lab}.nets:{attr}' .*{message}"):
        resolve_model(f"{lab}.nets:{attr}")


def test_import_failures_name_the_field_and_the_path(lab: str) -> None:
    with pytest.raises(ValueError, match=rf"^model: cannot import module '{lab}.absent' of '{lab}.absent:Net'"):
        resolve_model(f"{lab}.absent:Net")
    with pytest.raises(ValueError, match=rf"^model: module '{lab}.nets' has no attribute 'WideNet'"):
        resolve_model(f"{lab}.nets:WideNet")
    with pytest.raises(ValueError, match=rf"^dataset_name: importing module '{lab}.broken' .*failed.*lab module failed"):
        resolve_dataset(f"{lab}.broken:data")
    with pytest.raises(ValueError, match="^client_algorithm: import path ':Thing' must read 'package.module:attr'"):
        resolve_client_algorithm(":Thing")
    with pytest.raises(ValueError, match="^experiments.model: unknown model"):
        resolve_model("Nope", field="experiments.model")


def test_a_dataset_by_import_path_loads_its_arrays(lab: str, tmp_path: Path) -> None:
    source = resolve_dataset(f"{lab}.data:blobs")
    assert source.num_classes == 3 and source.input_shape == (1, 4, 4)
    train_x, train_y, test_x, test_y = source.load(tmp_path)
    assert train_x.shape == (9, 1, 4, 4) and test_y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="^dataset_name: .*needs num_classes, an integer >= 2; got 1"):
        resolve_dataset(f"{lab}.data:one_class")
    with pytest.raises(ValueError, match="^dataset_name: .*needs num_classes"):
        resolve_dataset(f"{lab}.data:Blobs.load")


def test_a_strategy_by_import_path_meets_the_strategy_protocol(lab: str) -> None:
    factory = resolve_strategy(f"{lab}.algos:HalfFedAvg")
    weights, state = factory().aggregate({"w": np.zeros(2)}, [ClientUpdate({"w": np.array([2.0, 4.0])}, 1)], {})
    np.testing.assert_array_equal(weights["w"], [2.0, 4.0])
    assert isinstance(factory(), FedAvg) and state == {}
    with pytest.raises(ValueError, match="^strategy.name: .*needs a bool class attribute 'averages'"):
        resolve_strategy(f"{lab}.algos:NoAverages")


def test_a_client_algorithm_by_import_path_trains_through_the_contract(lab: str) -> None:
    factory: Callable[[], object] = resolve_client_algorithm(f"{lab}.algos:CountingSGD")
    algorithm = factory()
    model = torch.nn.Linear(2, 2)
    data = MemberData(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))
    settings = LocalHyperparameters(epochs=1, batch_size=2, learning_rate=0.1)
    first = algorithm.train(model, data, seed=0, hyper=settings, state={}, round_state={})  # type: ignore[attr-defined]
    second = algorithm.train(model, data, seed=0, hyper=settings, state=first.state, round_state={})  # type: ignore[attr-defined]
    assert int(second.state["rounds"]) == 2 and first.report.num_examples == 4
    with pytest.raises(ValueError, match=r"^client_algorithm: .*needs a method train\(model, data"):
        resolve_client_algorithm(f"{lab}.algos:NoTrain")
