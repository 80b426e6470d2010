"""The client's round without HTTP: data from the plan, partition check, training, statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.work import LocalData, PartitionMismatch, load_weights, run_round
from fedland.datasets import load_dataset
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec, LandscapeSpec
from fedland.training import batches, evaluate, train_local
from stack import wire
from tests.helpers import small_spec

torch.set_num_threads(1)


@pytest.fixture
def spec() -> ExperimentSpec:
    landscape = LandscapeSpec(every=2, num_samples=64, top_k=1, trace_probes=4, interpolation_points=3, grid_points=3)
    return ExperimentSpec.from_dict(small_spec(2, rounds=3, fraction=0.01, landscape=landscape))


def test_client_data_is_the_plan_s_and_a_foreign_digest_is_refused(spec: ExperimentSpec, data_dir: Path) -> None:
    local = LocalData(data_dir)
    plan = local.plan("exp", spec)
    assert local.plan("exp", spec) is plan  # kept while the client stays on the experiment
    data = local.client_data("exp", plan, 1, plan.partitions[1].digest())
    assert data.num_train == plan.partitions[1].num_train == 300  # floor(60000 / 2) * 0.01
    assert torch.equal(data.train_y, plan.dataset.train_y[torch.from_numpy(plan.partitions[1].train_indices)])
    with pytest.raises(PartitionMismatch, match="client 1: local partition digest"):
        local.client_data("exp", plan, 1, plan.partitions[0].digest())


def test_run_round_trains_like_train_local_and_reports_both_models(spec: ExperimentSpec, data_dir: Path) -> None:
    plan = ExperimentPlan(spec, load_dataset(spec.dataset_name, data_dir))
    data = plan.client_data(0)
    global_model = load_weights(plan, wire.encode(plan.model().state_dict()))
    before = {name: tensor.clone() for name, tensor in global_model.state_dict().items()}

    result = run_round(plan, data, global_model, server_round=1, fetch_s=0.25)

    # the global model is untouched; the local one is exactly train_local with the plan's seed
    assert all(torch.equal(before[name], tensor) for name, tensor in global_model.state_dict().items())
    expected, report = train_local(
        global_model, data.train_x, data.train_y, epochs=spec.local_epochs, batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, momentum=spec.momentum, seed=plan.training_seed(0, 1),
    )
    local = wire.decode(result.weights)
    assert all((local[name] == tensor.numpy()).all() for name, tensor in expected.state_dict().items())
    assert result.num_examples == data.num_train
    assert result.stats["train_loss_per_epoch"] == [float(loss) for loss in report.epoch_losses]
    test = evaluate(expected, batches(data.test_x, data.test_y, 1024))
    assert result.stats["local"]["test_loss"] == pytest.approx(test.loss, rel=1e-6)
    assert result.stats["global"]["train_accuracy"] < result.stats["local"]["train_accuracy"]
    assert result.stats["duration_s"]["fetch"] == 0.25
    assert result.stats["duration_s"]["total"] >= result.stats["duration_s"]["train"] > 0
    assert "landscape" not in result.stats  # every=2: round 1 is not measured


def test_previous_global_feeds_the_update_cosine_only_in_the_next_round(spec: ExperimentSpec, data_dir: Path) -> None:
    local = LocalData(data_dir)
    plan = local.plan("exp", spec)
    data = plan.client_data(0)
    first = plan.model()
    local.remember_global("exp", 0, 1, first)
    second = plan.model(wire.decode(run_round(plan, data, first, 1, 0.0).weights))
    previous = local.previous_global("exp", 0, 2)
    assert previous is not None and all(torch.equal(previous[k], v) for k, v in first.state_dict().items())
    assert local.previous_global("exp", 0, 3) is None and local.previous_global("exp", 1, 2) is None

    measured = run_round(plan, data, second, 2, 0.0, previous).stats["landscape"]
    cosine = measured["update"]["cosine_to_previous_update"]
    assert cosine is not None and -1 <= cosine <= 1
    unmeasured_history = run_round(plan, data, second, 2, 0.0, None).stats["landscape"]
    assert unmeasured_history["update"]["cosine_to_previous_update"] is None
