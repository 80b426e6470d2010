"""The new datasets and models through the real stack: 2 clients x 2 rounds each, every metric stored and checked.

Each run uses tiny test-written files in the exact distributed formats
(tests/datasets_tiny.py); the server and client processes learn their registry
entries through a `sitecustomize.py` on PYTHONPATH, the test process by
monkeypatching `DATASETS`. Stored numbers are recomputed here with direct
`fedland` calls on the stored models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedland.datasets import DATASETS, load_dataset
from fedland.measure import mean_loss, measure_generalization
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec, LandscapeSpec, StrategySpec
from fedland.training import batches, evaluate
from server.store import Store
from stack import records, wire
from tests.datasets_tiny import registry_hook, write_tiny
from tests.helpers import LocalStack, assert_complete, finite

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

LSPEC = LandscapeSpec(
    every=1, num_samples=32, top_k=1, trace_probes=4, interpolation_points=3, grid_points=3,
    pac_bayes_samples=2, pac_bayes_steps=8, power_iterations=5,
)
RUNS = [  # every new dataset and every new model once
    ("FashionMNIST", "FedCNN"),
    ("CIFAR10", "CifarCNN"),
    ("CIFAR10", "ResNet20"),
    ("CIFAR100", "ResNet20-noshort"),
    pytest.param("CIFAR10", "ResNet18", marks=pytest.mark.skipif(
        not os.environ.get("FEDLAND_HEAVY_TESTS"),
        reason="ResNet-18 (11M parameters) did not finish round 1 in 600 s on a shared 2-core CPU; "
        "set FEDLAND_HEAVY_TESTS=1 to run it",
    )),
]
NEW_DATASETS = ("FashionMNIST", "CIFAR10", "CIFAR100")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny copies of the new datasets, registered here and (through sitecustomize) in the child processes."""
    directory = tmp_path / "data"
    infos = [write_tiny(name, directory, train_per_class=8 if name != "CIFAR100" else 2, test_per_class=2)
             for name in NEW_DATASETS]
    for info in infos:
        monkeypatch.setitem(DATASETS, info.name, info)
    hook = registry_hook(tmp_path, infos)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return directory


def _every_number_finite(value: Any, where: str) -> None:
    if isinstance(value, dict) and value.get("saturated") is True:  # a PAC-Bayes search near chance: no numbers
        assert all(item is None for key, item in value.items() if key != "saturated"), where
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if key != "error":
                _every_number_finite(item, f"{where}.{key}")
        assert "error" not in value, (where, value)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _every_number_finite(item, f"{where}[{index}]")
    elif value is None:
        assert where.endswith("cosine_to_previous_update") and "round1" in where, f"{where} is None"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value), where


@pytest.mark.parametrize(("dataset", "model"), RUNS, ids=["FashionMNIST-FedCNN", "CIFAR10-CifarCNN", "CIFAR10-ResNet20",
                                                          "CIFAR100-ResNet20-noshort", "CIFAR10-ResNet18"])
def test_new_dataset_and_model_through_the_stack(
    dataset: str, model: str, local_stack: Callable[..., LocalStack], data_dir: Path
) -> None:
    info = DATASETS[dataset]
    uniform = [1.0 / info.num_classes] * info.num_classes
    spec = ExperimentSpec(
        description=f"{dataset} {model}", dataset_name=dataset, model=model, rounds=2, batch_size=8,
        target_balance_ratios=[uniform, uniform], subset_fractions=[1.0, 1.0], learning_rate=0.01, momentum=0.5,
        seed=3, landscape=LSPEC, strategy=StrategySpec("FedAdam"),
    )
    stack = local_stack()
    [experiment_id] = stack.api.submit_experiments([spec.to_dict()])
    stack.add_clients(2)
    stack.wait_done(experiment_id, timeout_s=1800 if model == "ResNet18" else 600)
    assert_complete(stack, experiment_id, num_clients=2, rounds=2)
    store = Store.from_database(stack.db)
    plan = ExperimentPlan(spec, load_dataset(dataset, data_dir))

    for record in records.read_client_stats(stack.db, experiment_id):
        stats = record.stats
        for phase in ("global", "local"):
            assert set(stats[phase]) >= {"train_loss", "test_loss", "generalization_gap"}
        assert set(stats["landscape"]["local"]["generalization"]) == {"pac_bayes", "pac_bayes_magnitude", "norms"}
        where = f"client_stats.round{record.round}"
        _every_number_finite({k: stats[k] for k in ("global", "local", "landscape")}, where)
    round_records = records.read_rounds(stack.db, experiment_id)
    for round_record in round_records:
        assert round_record.landscape is not None and "generalization_gap" in round_record.landscape
        _every_number_finite(dict(round_record.landscape), "rounds.landscape")
    # the pairwise barriers, once inline in the round's landscape, live in `landscapes`
    pairwise = records.read_landscapes(stack.db, experiment_id, records.PAIRWISE_BARRIERS)
    assert [p.round for p in pairwise] == [r.round for r in round_records]
    for landscape in pairwise:
        _every_number_finite(dict(landscape.content), "rounds.landscape.pairwise_barriers")

    # round 2 of client 0, recomputed from the stored local model with direct fedland calls
    [report] = [s for s in records.read_client_stats(stack.db, experiment_id, 2) if s.client_index == 0]
    stats = report.stats
    assert report.weights_file_id is not None
    local = plan.model(wire.decode(store.load_client_model(report.weights_file_id)))
    data = plan.client_data(0)
    train = evaluate(local, batches(data.train_x, data.train_y, 1024))
    test = evaluate(local, batches(data.test_x, data.test_y, 1024))
    assert stats["local"]["train_loss"] == pytest.approx(train.loss, rel=1e-6)
    assert stats["local"]["generalization_gap"]["loss"] == pytest.approx(test.loss - train.loss, rel=1e-6, abs=1e-7)
    subset = plan.landscape_batch(0)
    assert stats["landscape"]["local"]["loss"] == pytest.approx(mean_loss(local, F.cross_entropy, subset)[0], rel=1e-6)
    direct = measure_generalization(local, subset, LSPEC, plan.training_seed(0, 2))
    stored = stats["landscape"]["local"]["generalization"]
    for key in ("pac_bayes", "pac_bayes_magnitude"):  # numbers to rounding; flags and nulls (saturated) exactly
        assert stored[key].keys() == direct[key].keys()
        for field, value in direct[key].items():
            if isinstance(value, float):
                assert stored[key][field] == pytest.approx(value, rel=1e-6), (key, field)
            else:
                assert stored[key][field] == value, (key, field)
    assert stored["norms"]["frobenius_sum"] == pytest.approx(direct["norms"]["frobenius_sum"], rel=1e-9)
    assert stored["norms"]["spectral_sum"] == pytest.approx(direct["norms"]["spectral_sum"], rel=1e-9)
    # the aggregated model of round 2 on the full test split
    last = records.read_round(stack.db, experiment_id, 2)
    assert last is not None
    global_model = plan.model(wire.decode(store.load_model(last.model_file_id)))
    full = evaluate(global_model, batches(plan.dataset.test_x, plan.dataset.test_y, 1000))
    assert last.test_loss == pytest.approx(full.loss, rel=1e-6) and finite(last.test_accuracy)
