"""The default update screening never refuses an honest update of the example experiments.

Every member that trains in round 1 of each experiment of `main.py` (the 100-member
federation's tiny, skewed Dirichlet members included) trains with the real client
code from the real round-0 model on real MNIST; each update's distance from the
global model (`fedland.strategies.relative_distance`, what the server screens) must
stay far inside the default `update_screening`. Round 1 starts from the random
initial model: the largest move an honest member makes. A refused update is the
only way screening changes a result, so none refused means results unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedland.datasets import load_dataset
from fedland.participation import selected_members
from fedland.plan import ExperimentPlan
from fedland.spec import DEFAULT_UPDATE_SCREENING
from fedland.strategies import relative_distance
from fedland.training import train_local
from main import EXPERIMENTS
from stack import wire

pytestmark = pytest.mark.slow


def test_no_honest_update_of_the_examples_comes_near_the_default_screening(data_dir: Path) -> None:
    distances: dict[str, list[float]] = {}
    for spec in EXPERIMENTS:
        assert spec.update_screening == DEFAULT_UPDATE_SCREENING  # the examples run with screening on
        plan = ExperimentPlan(spec, load_dataset(spec.dataset_name, data_dir))
        global_model = plan.model()
        initial = wire.from_module(global_model)
        for member in selected_members(spec, 1):
            data = plan.client_data(member)
            local_model, _ = train_local(
                global_model, data.train_x, data.train_y, epochs=spec.local_epochs, batch_size=spec.batch_size,
                learning_rate=spec.learning_rate, momentum=spec.momentum, seed=plan.training_seed(member, 1),
                prox_mu=spec.strategy.prox_mu, augment=bool(spec.augment),
            )
            distance = relative_distance(wire.from_module(local_model), initial)
            distances.setdefault(spec.description, []).append(distance)
    largest = max(max(values) for values in distances.values())
    assert np.isfinite(largest) and largest > 0.0
    assert largest < DEFAULT_UPDATE_SCREENING / 20, distances  # a wide margin, not a near miss
    assert len(distances["Dirichlet alpha=0.5, 100 members, 10 per round, FedAvg"]) == 10
