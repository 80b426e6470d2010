"""One training task: the client's data, its partition check, and the measured local round.

No HTTP here: `LocalData` caches what the client holds between rounds and
`run_round` turns a global model into a local one plus its statistics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedland.datasets import Dataset, load_dataset
from fedland.measure import landscape_subset, measure_client_round
from fedland.models import build_model
from fedland.partition import ClientPartition, partition
from fedland.spec import ExperimentSpec
from fedland.training import Evaluation, batches, evaluate, train_local
from stack import wire

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024


class PartitionMismatch(RuntimeError):
    """The partition recomputed here differs from the server's: the dataset files differ."""


def round_seed(spec_seed: int, client_index: int, server_round: int) -> int:
    """Training seed of one client in one round, derived from the experiment seed."""
    sequence = np.random.SeedSequence([spec_seed, client_index, server_round])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class ClientData:
    """A client's share of the dataset for one experiment."""

    experiment_id: str
    client_index: int
    train_x: torch.Tensor  # (n_train, *input_shape)
    train_y: torch.Tensor  # (n_train,)
    test_x: torch.Tensor  # (n_test, *input_shape)
    test_y: torch.Tensor  # (n_test,)
    # (round, weights): the global model this client trained from in its latest round,
    # kept for the landscape's `cosine_to_previous_update`
    last_global: tuple[int, dict[str, torch.Tensor]] | None = None


@dataclass
class LocalData:
    """The current partition of the dataset under `data_dir`, cached between rounds.

    (`load_dataset` itself caches the decoded files per process.)
    """

    data_dir: Path
    _current: ClientData | None = None

    def client_data(
        self, experiment_id: str, client_index: int, spec: ExperimentSpec, partition_digest: str
    ) -> ClientData:
        """This client's train/test data, recomputed from the spec and checked against the server's digest."""
        current = self._current
        if current is not None and (current.experiment_id, current.client_index) == (
            experiment_id,
            client_index,
        ):
            return current
        dataset: Dataset = load_dataset(spec.dataset_name, self.data_dir)
        parts = partition(
            dataset.train_y, dataset.test_y, spec.target_balance_ratios, spec.subset_fractions, spec.seed
        )
        part: ClientPartition = parts[client_index]
        digest = part.digest()
        if digest != partition_digest:
            raise PartitionMismatch(
                f"experiment {experiment_id} client {client_index}: local partition digest {digest[:12]}... "
                f"!= server's {partition_digest[:12]}...; the {spec.dataset_name} files under {self.data_dir} "
                "differ from the server's"
            )
        train_idx = torch.from_numpy(part.train_indices)
        test_idx = torch.from_numpy(part.test_indices)
        self._current = ClientData(
            experiment_id,
            client_index,
            dataset.train_x[train_idx],
            dataset.train_y[train_idx],
            dataset.test_x[test_idx],
            dataset.test_y[test_idx],
        )
        log.info(
            "experiment %s client %d: %d train / %d test examples",
            experiment_id, client_index, len(train_idx), len(test_idx),
        )
        return self._current


def load_weights(spec: ExperimentSpec, payload: bytes) -> torch.nn.Module:
    """The spec's model carrying the weights in the safetensors `payload`."""
    model = build_model(spec.model, seed=spec.seed)
    weights = wire.decode(payload)
    wire.check_compatible(weights, wire.from_module(model))
    model.load_state_dict(wire.to_state_dict(weights))
    return model


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
    spec: ExperimentSpec,
    data: ClientData,
    global_model: torch.nn.Module,
    server_round: int,
    fetch_s: float,
) -> RoundResult:
    """Evaluate the global model, train locally, evaluate the local model; time each step.

    In rounds the spec's landscape schedules, also measures the landscape on the
    client's fixed subset (`stats["landscape"]`; `{"error": ...}` if that fails,
    the round goes on). Records the global model in `data.last_global`.
    """
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
        seed=round_seed(spec.seed, data.client_index, server_round),
        prox_mu=spec.strategy.prox_mu,
    )
    trained = time.perf_counter()
    local_stats = _measure(local_model, data)
    done = time.perf_counter()
    previous = data.last_global[1] if data.last_global and data.last_global[0] == server_round - 1 else None
    data.last_global = (server_round, {n: t.detach().clone() for n, t in global_model.state_dict().items()})
    landscape = None
    if spec.landscape.scheduled(server_round, spec.rounds):
        landscape = _landscape(spec, data, global_model, local_model, previous, server_round)
    finished = time.perf_counter()
    num_examples = int(data.train_y.shape[0])
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


def landscape_batch(spec: ExperimentSpec, data: ClientData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The client's fixed landscape subset of its train data, as one batch (the server draws the same)."""
    indices = torch.from_numpy(
        landscape_subset(int(data.train_y.shape[0]), spec.landscape.num_samples, (spec.seed, data.client_index))
    )
    return [(data.train_x[indices], data.train_y[indices])]


def _landscape(
    spec: ExperimentSpec,
    data: ClientData,
    global_model: torch.nn.Module,
    local_model: torch.nn.Module,
    previous: dict[str, torch.Tensor] | None,
    server_round: int,
) -> dict[str, Any]:
    try:
        return measure_client_round(
            global_model,
            local_model,
            previous,
            landscape_batch(spec, data),
            spec.landscape,
            round_seed(spec.seed, data.client_index, server_round),
        )
    except Exception as error:  # noqa: BLE001 - a failed measurement must not cost the round
        log.exception("experiment %s round %d: landscape measurement failed", data.experiment_id, server_round)
        return {"error": f"{type(error).__name__}: {error}"}
