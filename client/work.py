"""One training task: the client's data, its partition check, and the measured local round.

No HTTP here: `LocalData` caches what the client holds between rounds and
`run_round` turns a global model into a local one plus its statistics. What
the client must compute exactly as the server does (partition, subsets, seeds,
model) comes from `fedland.plan.ExperimentPlan`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedland.datasets import load_dataset
from fedland.measure import measure_client_round
from fedland.plan import ClientData, ExperimentPlan
from fedland.spec import ExperimentSpec
from fedland.training import Evaluation, batches, evaluate, train_local
from stack import wire

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024


class PartitionMismatch(RuntimeError):
    """The partition recomputed here differs from the server's: the dataset files differ."""


Weights = dict[str, torch.Tensor]


@dataclass
class LocalData:
    """The plan of the experiment this client works on, and the global model it last trained from.

    The plan (partition included) is rebuilt only when the experiment changes;
    the dataset itself is cached per process by ``load_dataset``.
    """

    data_dir: Path
    _plan: tuple[str, ExperimentPlan] | None = None
    # (experiment_id, client_index) -> (round, weights) of the global model trained from
    # in its latest round, for the landscape's `cosine_to_previous_update`
    _last_global: dict[tuple[str, int], tuple[int, Weights]] = field(default_factory=dict)

    def plan(self, experiment_id: str, spec: ExperimentSpec) -> ExperimentPlan:
        """The experiment's plan (cached while the client stays on that experiment)."""
        if self._plan is None or self._plan[0] != experiment_id:
            self._plan = (experiment_id, ExperimentPlan(spec, load_dataset(spec.dataset_name, self.data_dir)))
            self._last_global = {}
        return self._plan[1]

    def client_data(self, experiment_id: str, plan: ExperimentPlan, client_index: int, partition_digest: str) -> ClientData:
        """This client's train/test data, its partition checked against the server's digest."""
        digest = plan.partitions[client_index].digest()
        if digest != partition_digest:
            raise PartitionMismatch(
                f"experiment {experiment_id} client {client_index}: local partition digest {digest[:12]}... "
                f"!= server's {partition_digest[:12]}...; the {plan.spec.dataset_name} files under {self.data_dir} "
                "differ from the server's"
            )
        data = plan.client_data(client_index)
        log.debug(
            "experiment %s client %d: %d train / %d test examples",
            experiment_id, client_index, data.num_train, int(data.test_y.shape[0]),
        )
        return data

    def previous_global(self, experiment_id: str, client_index: int, server_round: int) -> Weights | None:
        """The global model this client trained from in round ``server_round - 1``, if it did."""
        last = self._last_global.get((experiment_id, client_index))
        return last[1] if last is not None and last[0] == server_round - 1 else None

    def remember_global(self, experiment_id: str, client_index: int, server_round: int, model: torch.nn.Module) -> None:
        """Keep the global model of ``server_round`` for the next round's landscape."""
        weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        # only a round's predecessor is ever asked for: keep the memory to one round's members
        self._last_global = {key: last for key, last in self._last_global.items() if last[0] >= server_round - 1}
        self._last_global[(experiment_id, client_index)] = (server_round, weights)


def load_weights(plan: ExperimentPlan, payload: bytes) -> torch.nn.Module:
    """The plan's model carrying the weights in the safetensors `payload` (checked first)."""
    weights = wire.decode(payload)
    wire.check_compatible(weights, wire.from_module(plan.model()))
    return plan.model(weights)


def _measure(model: torch.nn.Module, data: ClientData) -> dict[str, float]:
    train: Evaluation = evaluate(model, batches(data.train_x, data.train_y, EVAL_BATCH_SIZE))
    test: Evaluation = evaluate(model, batches(data.test_x, data.test_y, EVAL_BATCH_SIZE))
    return {
        "train_loss": float(train.loss),
        "train_accuracy": float(train.accuracy),
        "test_loss": float(test.loss),
        "test_accuracy": float(test.accuracy),
    }


@dataclass(frozen=True)
class RoundResult:
    weights: bytes  # safetensors of the local model
    num_examples: int
    stats: dict[str, Any]


def run_round(
    plan: ExperimentPlan,
    data: ClientData,
    global_model: torch.nn.Module,
    server_round: int,
    fetch_s: float,
    previous_global: Weights | None = None,
) -> RoundResult:
    """Evaluate the global model, train locally, evaluate the local model; time each step.

    In rounds the spec's landscape schedules, also measures the landscape on the
    client's fixed subset (`stats["landscape"]`; `{"error": ...}` if that fails,
    the round goes on). `previous_global` is the global model this client trained
    from in the round before, if any (for `cosine_to_previous_update`).
    """
    spec = plan.spec
    seed = plan.training_seed(data.client_index, server_round)
    started = time.perf_counter()
    global_stats = _measure(global_model, data)
    evaluated = time.perf_counter()
    local_model, report = train_local(
        global_model,
        data.train_x,
        data.train_y,
        epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        momentum=spec.momentum,
        seed=seed,
        prox_mu=spec.strategy.prox_mu,
    )
    trained = time.perf_counter()
    local_stats = _measure(local_model, data)
    done = time.perf_counter()
    landscape = None
    if spec.landscape.scheduled(server_round, spec.rounds):
        landscape = _landscape(plan, data.client_index, global_model, local_model, previous_global, seed)
    finished = time.perf_counter()
    num_examples = data.num_train
    stats = {  # num_examples travels beside the stats, in the update's meta
        "duration_s": {
            "fetch": fetch_s,
            "eval_global": evaluated - started,
            "train": trained - evaluated,
            "eval_local": done - trained,
            "total": fetch_s + finished - started,  # includes the landscape (its own duration_s)
        },
        "global": global_stats,
        "local": local_stats,
        "train_loss_per_epoch": [float(loss) for loss in report.epoch_losses],
    }
    if landscape is not None:
        stats["landscape"] = landscape
    return RoundResult(wire.encode(local_model.state_dict()), num_examples, stats)


def _landscape(
    plan: ExperimentPlan,
    client_index: int,
    global_model: torch.nn.Module,
    local_model: torch.nn.Module,
    previous: Weights | None,
    seed: int,
) -> dict[str, Any]:
    try:
        return measure_client_round(
            global_model, local_model, previous, plan.landscape_batch(client_index), plan.spec.landscape, seed
        )
    except Exception as error:  # noqa: BLE001 - a failed measurement must not cost the round
        log.exception("client %d: landscape measurement failed", client_index)
        return {"error": f"{type(error).__name__}: {error}"}
