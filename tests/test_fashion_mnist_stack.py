"""Real Fashion-MNIST (Debian's copy, verified by content) through the stack: server and worker processes.

The data directory comes from FEDLAND_DATA_DIR (the `data_dir` fixture), as in
production; the server's stored numbers are recomputed here from the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedland.datasets import load_dataset
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec, LandscapeSpec
from fedland.training import batches, evaluate
from server.store import Store
from stack import records, wire
from tests.helpers import LocalStack, assert_complete, small_spec

pytestmark = pytest.mark.slow


def test_fashion_mnist_two_members_two_rounds(local_stack: Callable[..., LocalStack], data_dir: Path) -> None:
    if not (data_dir / "fashion-mnist").is_dir():
        pytest.skip(f"{data_dir} has no fashion-mnist/")
    spec = ExperimentSpec.from_dict(
        small_spec(num_clients=2, rounds=2, dataset_name="FashionMNIST", landscape=LandscapeSpec(enabled=False))
    )
    stack = local_stack()
    [experiment_id] = stack.api.submit_experiments([spec.to_dict()])
    stack.add_clients(2)
    stack.wait_done(experiment_id, timeout_s=300)
    assert_complete(stack, experiment_id, num_clients=2, rounds=2)

    plan = ExperimentPlan(spec, load_dataset("FashionMNIST", data_dir, download=False))
    members = {m.client_index: m for m in records.read_members(stack.db, experiment_id)}
    for index, part in enumerate(plan.partitions):  # partitions of the real Fashion-MNIST labels
        assert members[index].partition_digest == part.digest()
        assert members[index].class_counts == tuple(part.class_counts)
    # the round-1 global model is the initial one: each worker's evaluation of it on its member's data
    for report in records.read_client_stats(stack.db, experiment_id, 1):
        data = plan.client_data(report.client_index)
        expected = evaluate(plan.model(), batches(data.train_x, data.train_y, 1024))
        assert report.stats["global"]["train_loss"] == pytest.approx(expected.loss, rel=1e-6)
    # the aggregate of round 2 on the full Fashion-MNIST test split, recomputed from the stored weights
    last = records.read_round(stack.db, experiment_id, 2)
    assert last is not None
    store = Store.from_database(stack.db)
    model = plan.model(wire.decode(store.load_model(last.model_file_id)))
    full = evaluate(model, batches(plan.dataset.test_x, plan.dataset.test_y, 1000))
    assert last.test_loss == pytest.approx(full.loss, rel=1e-6)
    assert last.test_accuracy == pytest.approx(full.accuracy) and full.accuracy > 0.3  # chance is 0.1
