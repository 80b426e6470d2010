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
    DatasetComponent,
    ModelComponent,
    is_import_path,
    resolve,
    resolve_client_algorithm,
    resolve_dataset,
    resolve_model,
    resolve_strategy,
)
from fedland.models import build_model
from fedland.partition_scheme import PartitionScheme
from fedland.spec import ExperimentSpec, SpecError
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
            train_class_counts = (3, 3, 3)
            test_class_counts = (1, 1, 1)
            augment = True

            def load(self, data_dir):
                g = torch.Generator().manual_seed(0)
                y = torch.arange(12) % 3
                x = torch.randn(12, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1)
                return x[:9], y[:9], x[9:], y[9:]

        blobs = Blobs()
        one_class = type("OneClass", (), {"num_classes": 1, "input_shape": (1, 4, 4), "load": lambda self, d: None})()

        class Uncounted(Blobs):
            train_class_counts = None

        class ShortCounts(Blobs):
            test_class_counts = (1, 1)

        class Miscounted(Blobs):
            train_class_counts = (4, 3, 2)

        class WrongShape(Blobs):
            input_shape = (1, 5, 5)

        class DoubleImages(Blobs):
            def load(self, data_dir):
                x, y, tx, ty = super().load(data_dir)
                return x.double(), y, tx, ty

        class FloatLabels(Blobs):
            def load(self, data_dir):
                x, y, tx, ty = super().load(data_dir)
                return x, y.float(), tx, ty

        class NoFiles(Blobs):
            def load(self, data_dir):
                raise FileNotFoundError(f"{data_dir}/blobs.npz")

        class NeedsArguments(Blobs):
            def __init__(self, size):
                self.size = size
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
    dataset = resolve_dataset(f"{lab}.data:blobs")
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (f"{lab}.data:blobs", 3, (1, 4, 4))
    assert (dataset.train_class_counts, dataset.test_class_counts, dataset.augment) == ((3, 3, 3), (1, 1, 1), True)
    assert dataset_facts(resolve_dataset(f"{lab}.data:Blobs")) == dataset_facts(dataset)  # a class: its instance
    loaded = dataset.load(tmp_path)
    assert loaded.name == f"{lab}.data:blobs" and loaded.info is dataset
    g = torch.Generator().manual_seed(0)  # the lab's own draw, repeated: float images come back as they are
    expected = torch.randn(12, 1, 4, 4, generator=g) + (torch.arange(12) % 3).view(-1, 1, 1, 1)
    assert torch.equal(loaded.train_x[np.arange(9)], expected[:9]) and torch.equal(loaded.test_x[0:3], expected[9:])
    assert loaded.train_y.dtype == torch.int64 and loaded.test_y.tolist() == [0, 1, 2]
    assert torch.equal(loaded.train_x.subset(np.array([4, 1]))[np.arange(2)], expected[[4, 1]])


def dataset_facts(dataset: DatasetComponent) -> tuple[object, ...]:
    return (
        dataset.num_classes, dataset.input_shape, dataset.train_class_counts, dataset.test_class_counts, dataset.augment
    )


@pytest.mark.parametrize(("attr", "message"), [
    ("one_class", "needs num_classes, an integer >= 2; got 1"),
    ("Blobs.load", "needs num_classes"),
    ("Uncounted", r"needs train_class_counts, 3 non-negative ints \(one per class, .*got None"),
    ("ShortCounts", r"needs test_class_counts, 3 non-negative ints .*got \(1, 1\)"),
    ("NeedsArguments", "is a class; building it without arguments raised TypeError"),
])
def test_a_dataset_that_breaks_the_contract_is_refused(lab: str, attr: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^dataset_name: '{lab}.data:{attr}' .*{message}"):
        resolve_dataset(f"{lab}.data:{attr}")


@pytest.mark.parametrize(("attr", "message"), [
    ("Miscounted", r"\.load's train_y has class counts \(3, 3, 3\), but train_class_counts declares \(4, 3, 2\)"),
    ("WrongShape", r"\.load's train_x must be float32 \(N, \*input_shape\) = \(N, 1, 5, 5\) images, got torch.float32 \(9, 1, 4, 4\)"),
    ("DoubleImages", r"\.load's train_x must be float32 .* images, got torch.float64 \(9, 1, 4, 4\)"),
    ("FloatLabels", r"\.load's train_y must be a 1-d integer tensor, got torch.float32 \(9,\)"),
    ("NoFiles", r"\.load\('/no/such/dir'\) raised FileNotFoundError\('/no/such/dir/blobs.npz'\)"),
])
def test_a_dataset_whose_arrays_break_its_declaration_is_refused_at_load(lab: str, attr: str, message: str) -> None:
    dataset = resolve_dataset(f"{lab}.data:{attr}")  # the declaration itself is well formed
    with pytest.raises(ValueError, match=f"^dataset_name: '{lab}.data:{attr}'{message}"):
        dataset.load("/no/such/dir")
    with pytest.raises(ValueError, match=f"^dataset_name: '{lab}.data:{attr}'{message}"):
        dataset.verify("/no/such/dir")  # the launcher's check before it starts anything


def test_a_spec_checks_a_dataset_by_import_path_when_it_is_made(lab: str) -> None:
    spec = ExperimentSpec(
        dataset_name=f"{lab}.data:blobs", model=f"{lab}.nets:TinyNet",
        target_balance_ratios=[[1 / 3] * 3], subset_fractions=[1.0],
    )
    assert (spec.num_classes, spec.augment, spec.dataset.num_train) == (3, True, 9)  # augment: the dataset's default
    with pytest.raises(SpecError, match=rf"^dataset_name: cannot import module '{lab}.absent' of '{lab}.absent:Data'"):
        ExperimentSpec(dataset_name=f"{lab}.absent:Data", target_balance_ratios=[[1.0] * 10], subset_fractions=[0.1])
    with pytest.raises(SpecError, match=rf"^dataset_name: '{lab}.data:Uncounted' needs train_class_counts"):
        ExperimentSpec(dataset_name=f"{lab}.data:Uncounted", target_balance_ratios=[[1 / 3] * 3], subset_fractions=[1.0])
    with pytest.raises(SpecError, match=rf"^model: FedNet takes inputs of shape \(1, 28, 28\) but '?{lab}.data:blobs"):
        ExperimentSpec(dataset_name=f"{lab}.data:blobs", target_balance_ratios=[[1 / 3] * 3], subset_fractions=[1.0])
    # partition feasibility against the declared counts, at submission
    with pytest.raises(SpecError, match=rf"^partition.classes_per_member: must be at most 3 \(the classes of {lab}.data:blobs\)"):
        ExperimentSpec(
            dataset_name=f"{lab}.data:blobs", model=f"{lab}.nets:TinyNet",
            partition=PartitionScheme(scheme="shards", members=2, classes_per_member=4),
        )
    with pytest.raises(SpecError, match=r"^target_balance_ratios\[0\]: has 2 entries but the dataset has 3 classes"):
        ExperimentSpec(
            dataset_name=f"{lab}.data:blobs", model=f"{lab}.nets:TinyNet",
            target_balance_ratios=[[0.5, 0.5]], subset_fractions=[1.0],
        )
    with pytest.raises(SpecError, match=r"client 0 needs 9 samples of class 0 but only 3 exist in the train split"):
        ExperimentSpec(
            dataset_name=f"{lab}.data:blobs", model=f"{lab}.nets:TinyNet",
            target_balance_ratios=[[1.0, 0.0, 0.0]], subset_fractions=[1.0],
        )


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
