"""Client algorithms and components by import path through the running stack.

Real `python -m server` and `python -m client` processes on the nx-27017 store
(tests/helpers.py `LocalStack`), FedNet or a workspace model on an MNIST subset
(or a workspace dataset), 2 members, 2 rounds, a cheap landscape in the last round.
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.work import MemberInputs, run_round
from fedland.algorithms import round_payload
from fedland.spec import ExperimentSpec, LandscapeSpec
from fedland.strategies import make_strategy
from server.resources import Resources
from server.store import Store
from stack import records, wire
from tests.helpers import LocalStack, assert_complete, finite, small_spec, wait_until

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # as the child processes (FEDLAND_TORCH_THREADS=1)

CHEAP = LandscapeSpec(
    every=2, num_samples=64, top_k=1, trace_probes=4, interpolation_points=3, grid_points=3,
    pac_bayes_samples=2, pac_bayes_steps=2, power_iterations=5,
)

WORKSPACE = {
    "__init__.py": "",
    "nets.py": """
        import torch
        from torch import nn

        class TinyCNN(nn.Module):
            '''A 4-channel convolution, pooled, and a linear layer.'''

            input_shape = (1, 28, 28)

            def __init__(self, num_classes):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
                self.fc = nn.Linear(4 * 7 * 7, num_classes)

            def forward(self, x):
                x = torch.max_pool2d(torch.relu(self.conv(x)), 4)  # (batch, 4, 7, 7)
                return self.fc(x.flatten(1))
    """,
    "algos.py": """
        from dataclasses import dataclass

        import numpy as np
        from fedland.algorithms import LocalResult, local_sgd

        @dataclass(frozen=True)
        class CountingSGD:
            '''Local SGD that counts the rounds the member trained in its persistent state.'''

            start: int = 0

            def train(self, model, data, *, seed, hyper, state, round_state):
                run = local_sgd(model, data, seed, hyper)
                rounds = int(state.get("rounds", np.asarray(self.start))) + 1
                return LocalResult(model=run.model, report=run.report, state={"rounds": np.asarray(rounds)})

        class Failing:
            '''A client algorithm whose training raises.'''

            def train(self, model, data, *, seed, hyper, state, round_state):
                raise RuntimeError("the lab's step diverged on purpose")
    """,
    "data.py": """
        import torch

        class Quadrants:
            '''Four classes of 28x28 images: one bright quadrant (the class) in seeded noise.'''

            num_classes = 4
            input_shape = (1, 28, 28)
            train_class_counts = (60, 60, 60, 60)
            test_class_counts = (20, 20, 20, 20)

            def load(self, data_dir):
                generator = torch.Generator().manual_seed(5)
                train_x, train_y = self.split(60, generator)
                test_x, test_y = self.split(20, generator)
                return train_x, train_y, test_x, test_y

            def split(self, per_class, generator):
                labels = torch.arange(4 * per_class) % 4
                images = 0.5 * torch.randn(len(labels), 1, 28, 28, generator=generator)
                for label in range(4):
                    row, col = divmod(label, 2)
                    images[labels == label, :, 14 * row : 14 * row + 14, 14 * col : 14 * col + 14] += 1.0
                return images, labels
    """,
    "aggregation.py": """
        from dataclasses import dataclass
        from fedland.strategies import FedAvg

        @dataclass(frozen=True)
        class PlainMean(FedAvg):
            '''FedAvg under another name, from the workspace.'''
    """,
}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A workspace folder holding a package (model, dataset, client algorithm, strategy); on this process's path too."""
    folder = tmp_path / "workspace"
    name = "lab_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (folder / name).mkdir(parents=True)
    for filename, source in WORKSPACE.items():
        (folder / name / filename).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    yield folder, name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def two_round_spec(landscape: LandscapeSpec = CHEAP, **changes: Any) -> dict[str, Any]:
    """A 2-member, 2-round FedNet experiment on 2% of MNIST with these keys changed (in their JSON form)."""
    return ExperimentSpec.from_dict({**small_spec(2, rounds=2, fraction=0.02, landscape=landscape), **changes}).to_dict()


def member_state(store: Store, stats: records.ClientStatsRecord) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A report's stored client-algorithm state and message."""
    assert stats.state_file_id is not None, stats
    state, message = wire.split(wire.decode(store.load_member_state(stats.state_file_id)), "state/", "message/")
    return state, message


def test_components_by_import_path_run_through_the_stack(
    local_stack: Callable[..., LocalStack], workspace: tuple[Path, str]
) -> None:
    folder, lab = workspace
    stack = local_stack(FEDLAND_WORKSPACE=str(folder))
    stack.client_env["FEDLAND_WORKSPACE"] = str(folder)
    spec = two_round_spec(
        model=f"{lab}.nets:TinyCNN",
        dataset_name=f"{lab}.data:Quadrants",
        target_balance_ratios=[[0.25] * 4] * 2,
        subset_fractions=[1.0, 1.0],
        strategy={"name": f"{lab}.aggregation:PlainMean"},
        client_algorithm={"name": f"{lab}.algos:CountingSGD", "start": 10},
    )
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(2)
    stack.wait_done(experiment_id, timeout_s=180)
    assert_complete(stack, experiment_id, num_clients=2, rounds=2)
    # the workspace's 4 x 60 train, 4 x 20 test images: half the train split per member, IID: 240 / 2 = 120 =
    # 4 x 30, and its test share in proportion (80 / 2 = 40 = 4 x 10)
    members = records.read_members(stack.db, experiment_id)
    assert [(m.class_counts, m.test_class_counts) for m in members] == [((30,) * 4, (10,) * 4)] * 2
    store = Store.from_database(stack.db)
    for stats in records.read_client_stats(stack.db, experiment_id):
        # the state went to the server after round 1 and came back for round 2
        state, message = member_state(store, stats)
        assert (int(state["rounds"]), message) == (10 + stats.round, {})
        if stats.round == 2:
            landscape = stats.landscape
            assert landscape is not None and "error" not in landscape, landscape
            assert finite(landscape["global"]["loss"]) and finite(landscape["local"]["trace"])
    model_id = store.global_model_id(experiment_id, 2)
    assert model_id is not None
    weights = wire.decode(store.load_model(model_id))
    assert set(weights) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}  # the workspace's model
    assert weights["fc.weight"].shape == (4, 4 * 7 * 7)  # ... built for the workspace dataset's 4 classes
    last = records.read_rounds(stack.db, experiment_id)[-1]
    assert last.num_test == 80 and last.landscape is not None  # evaluated on the workspace dataset's test split


ALGORITHMS: dict[str, dict[str, Any]] = {
    "SCAFFOLD": {"strategy": {"name": "SCAFFOLD"}, "client_algorithm": "SCAFFOLD"},
    "FedDyn": {"strategy": {"name": "FedDyn", "params": {"alpha": 0.1}}, "client_algorithm": {"name": "FedDyn", "alpha": 0.1}},
    "FedSAM": {"client_algorithm": {"name": "FedSAM", "rho": 0.05}},
    "FedASAM": {"client_algorithm": {"name": "FedASAM", "rho": 0.5, "eta": 0.01}},
    "FedSWA": {"strategy": {"name": "FedSWA", "params": {"start_round": 1, "lr_min": 0.01}}},
}


def test_each_algorithm_runs_through_the_stack(local_stack: Callable[..., LocalStack], data_dir: Path) -> None:
    stack = local_stack()
    specs = [two_round_spec(description=name, **changes) for name, changes in ALGORITHMS.items()]
    ids = dict(zip(ALGORITHMS, stack.api.submit_experiments(specs)))
    stack.add_clients(2)
    store = Store.from_database(stack.db)
    for name, experiment_id in ids.items():
        stack.wait_done(experiment_id, timeout_s=300)
        assert_complete(stack, experiment_id, num_clients=2, rounds=2)
        stats = records.read_client_stats(stack.db, experiment_id)
        assert all(s.landscape is not None and "error" not in s.landscape for s in stats if s.round == 2), name
        assert all((s.state_file_id is not None) == (name in ("SCAFFOLD", "FedDyn")) for s in stats), name
    check_scaffold(stack, store, ids["SCAFFOLD"], data_dir)
    check_feddyn(store, ids["FedDyn"])
    swa_state_id = store.strategy_state_id(ids["FedSWA"], 2)
    assert swa_state_id is not None
    swa_state = wire.decode(store.load_model(swa_state_id))
    assert int(swa_state["swa/count"]) == 2  # both rounds' models averaged (start_round 1, cycle 1)
    final_id = store.global_model_id(ids["FedSWA"], 2)
    first_id = store.global_model_id(ids["FedSWA"], 1)
    assert final_id is not None and first_id is not None
    final, first = wire.decode(store.load_model(final_id)), wire.decode(store.load_model(first_id))
    for key, value in final.items():
        np.testing.assert_allclose(swa_state[f"swa/model/{key}"], (first[key] + value) / 2, rtol=1e-6, atol=1e-7)


def check_scaffold(stack: LocalStack, store: Store, experiment_id: str, data_dir: Path) -> None:
    """c after round 1 is the weighted mean of the members' control deltas; round 2 recomputed here gives the stored c_i."""
    spec = stack.experiment(experiment_id).spec
    first = sorted(store.stats_of_round(experiment_id, 1), key=lambda s: s.client_index)
    total = sum(s.num_examples for s in first)
    state_id = store.strategy_state_id(experiment_id, 1)
    assert state_id is not None
    server_control = wire.decode(store.load_model(state_id))
    deltas = [member_state(store, s)[1] for s in first]
    assert set(server_control) == {key.replace("control_delta/", "control/") for key in deltas[0]}
    for key in deltas[0]:
        expected = sum(s.num_examples / total * d[key] for s, d in zip(first, deltas))  # participation 1
        np.testing.assert_allclose(server_control[key.replace("control_delta/", "control/")], expected, rtol=1e-6, atol=1e-9)
    # member 0's round 2, from what the server sent it: its c_i and the server's c
    resources = Resources(data_dir)
    plan = resources.plan(spec)
    model_id = store.global_model_id(experiment_id, 1)
    assert model_id is not None
    global_model = plan.model(wire.decode(store.load_model(model_id)))
    inputs = MemberInputs(
        state=member_state(store, first[0])[0],
        round_state=round_payload(make_strategy(spec.strategy, spec.participation), server_control),
    )
    result = run_round(plan, plan.client_data(0), global_model, 2, 0.0, inputs=inputs)
    assert result.state is not None
    recomputed, _ = wire.split(wire.decode(result.state), "state/", "message/")
    [second] = [s for s in store.stats_of_round(experiment_id, 2) if s.client_index == 0]
    stored, _ = member_state(store, second)
    for key, value in stored.items():
        np.testing.assert_allclose(recomputed[key], value, rtol=1e-5, atol=1e-7)


def check_feddyn(store: Store, experiment_id: str) -> None:
    """Each member's gradient state after round 1 is -alpha * (w_k - theta) (it starts at zero)."""
    for stats in store.stats_of_round(experiment_id, 1):
        state, message = member_state(store, stats)
        assert message == {} and set(state) == {f"grad/{key}" for key in ("fc1.weight", "fc1.bias", "fc2.weight",
                                                                           "fc2.bias", "fc3.weight", "fc3.bias")}
        assert all(np.isfinite(value).all() and np.abs(value).max() > 0 for value in state.values())


def test_a_component_a_worker_cannot_import_fails_the_experiment_with_the_path(
    local_stack: Callable[..., LocalStack], workspace: tuple[Path, str]
) -> None:
    folder, lab = workspace
    stack = local_stack(FEDLAND_WORKSPACE=str(folder))  # the server has the workspace; the workers do not
    spec = two_round_spec(LandscapeSpec(enabled=False), model=f"{lab}.nets:TinyCNN")
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(1)
    experiment = stack.wait_done(experiment_id, timeout_s=120)
    assert experiment.status == "failed"
    assert experiment.error is not None
    assert f"cannot import module '{lab}.nets' of '{lab}.nets:TinyCNN'" in experiment.error, experiment.error
    assert "model" in experiment.error and "FEDLAND_WORKSPACE=''" in experiment.error


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_example_workspace_runs_through_the_stack(
    local_stack: Callable[..., LocalStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    stack = local_stack(FEDLAND_WORKSPACE=str(EXAMPLES))
    stack.client_env["FEDLAND_WORKSPACE"] = str(EXAMPLES)
    spec = two_round_spec(
        model="fedland_examples.nets:SmallCNN",
        dataset_name="fedland_examples.data:Bars",
        subset_fractions=[0.2, 0.2],
        client_algorithm={"name": "fedland_examples.algorithms:ClippedSGD", "max_norm": 0.5},
    )
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(2)
    stack.wait_done(experiment_id, timeout_s=180)
    assert_complete(stack, experiment_id, num_clients=2, rounds=2)
    store = Store.from_database(stack.db)
    model_id = store.global_model_id(experiment_id, 2)
    assert model_id is not None
    assert set(wire.decode(store.load_model(model_id))) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    for stats in store.stats_of_round(experiment_id, 2):
        assert stats.landscape is not None and "error" not in stats.landscape
        assert finite(stats.landscape["local"]["top_eigenvalues"][0])
    last = records.read_rounds(stack.db, experiment_id)[-1]
    assert last.num_test == 500 and last.landscape is not None  # Bars: 10 x 50 test images
    # Bars' 3000 train images, 2 IID members of 20% of 3000 / 2: 300 = 10 x 30 each
    assert [m.class_counts for m in records.read_members(stack.db, experiment_id)] == [(30,) * 10] * 2


def test_scaffold_control_variates_survive_a_server_restart(local_stack: Callable[..., LocalStack]) -> None:
    stack = local_stack()
    spec = two_round_spec(
        LandscapeSpec(enabled=False), rounds=4, strategy={"name": "SCAFFOLD"}, client_algorithm="SCAFFOLD"
    )
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(2)
    store = Store.from_database(stack.db)
    wait_until(lambda: store.get_round(experiment_id, 1), 120, "round 1", stack.logs)
    assert stack.server is not None
    stack.server.stop(timeout_s=10)  # the server goes; c and every c_i stay in the store
    stopped_at = time.time()
    stack.start_server()
    stack.wait_done(experiment_id, timeout_s=240)
    assert_complete(stack, experiment_id, num_clients=2, rounds=4)
    last = store.get_round(experiment_id, 4)
    assert last is not None and last.finished_at > stopped_at  # the restarted server ran the rest
    control: dict[str, np.ndarray] = {}
    for server_round in range(1, 5):
        reports = store.stats_of_round(experiment_id, server_round)
        total = sum(s.num_examples for s in reports)
        deltas = [(s.num_examples / total, member_state(store, s)[1]) for s in reports]
        expected = {
            key.replace("control_delta/", "control/"): control.get(key.replace("control_delta/", "control/"), 0.0)
            + sum(weight * delta[key] for weight, delta in deltas)
            for key in deltas[0][1]
        }
        state_id = store.strategy_state_id(experiment_id, server_round)
        assert state_id is not None
        control = wire.decode(store.load_model(state_id))
        assert set(control) == set(expected)
        for key, value in expected.items():  # c_r = c_(r-1) + mean of round r's deltas, across the restart
            np.testing.assert_allclose(control[key], value, rtol=1e-6, atol=1e-9)


def test_a_client_algorithm_that_raises_fails_the_experiment_with_its_error(
    local_stack: Callable[..., LocalStack], workspace: tuple[Path, str]
) -> None:
    folder, lab = workspace
    stack = local_stack(FEDLAND_WORKSPACE=str(folder))
    stack.client_env["FEDLAND_WORKSPACE"] = str(folder)
    spec = two_round_spec(LandscapeSpec(enabled=False), client_algorithm=f"{lab}.algos:Failing")
    [experiment_id] = stack.api.submit_experiments([spec])
    stack.add_clients(1)
    experiment = stack.wait_done(experiment_id, timeout_s=120)
    assert experiment.status == "failed" and experiment.error is not None
    assert f"training with {lab}.algos:Failing raised RuntimeError: the lab's step diverged on purpose" in experiment.error
