"""One training task: the client's data, its partition check, and the measured local round.

No HTTP here: `LocalData` caches what the client holds between rounds and
`run_round` turns a global model into a local one plus its statistics. What
the client must compute exactly as the server does (partition, subsets, seeds,
model) comes from `fedland.plan.ExperimentPlan`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedland.algorithms import LocalHyperparameters, MemberData
from fedland.device import resolve_device
from fedland.generalization import generalization_gap
from fedland.measure import measure_client_round, member_densities
from fedland.plan import ClientData, ExperimentPlan
from fedland.spec import ExperimentSpec
from fedland.training import Evaluation, batches, evaluate
from stack import wire

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024


class PartitionMismatch(RuntimeError):
    """The partition recomputed here differs from the server's: the dataset files differ."""


StateDict = dict[str, torch.Tensor]  # torch tensors by name (numpy ones: fedland.strategies.NamedArrays)


PLAN_CACHE_ENTRIES = 4  # experiments whose plan (partitions) a worker keeps
MEMBER_CACHE_BYTES = 256 * 2**20  # members' labels and index arrays a worker keeps (images are shared)


@dataclass
class LocalData:
    """What a worker keeps between tasks, least recently used first out.

    The plans (partitions) of the last `PLAN_CACHE_ENTRIES` experiments, the data
    of the members it trained (views of the shared images: at most
    `MEMBER_CACHE_BYTES` of labels and indices), and the global model each member
    last trained from. The dataset itself is cached per process by
    ``load_dataset`` (a few entries), its images memory-mapped from the compact copy
    (a dataset named by import path: loaded once per plan, ``spec.dataset.load``).
    """

    data_dir: Path
    device: str = "cpu"  # FEDLAND_DEVICE: where rounds are computed
    max_plans: int = PLAN_CACHE_ENTRIES
    max_member_bytes: int = MEMBER_CACHE_BYTES
    _plans: OrderedDict[str, ExperimentPlan] = field(default_factory=OrderedDict)
    _members: OrderedDict[tuple[str, int], ClientData] = field(default_factory=OrderedDict)
    # (experiment_id, client_index) -> (round, weights) of the global model trained from
    # in its latest round, for the landscape's `cosine_to_previous_update`
    _last_global: dict[tuple[str, int], tuple[int, StateDict]] = field(default_factory=dict)

    def plan(self, experiment_id: str, spec: ExperimentSpec) -> ExperimentPlan:
        """The experiment's plan (cached: see the class docstring)."""
        if experiment_id not in self._plans:
            self._plans[experiment_id] = ExperimentPlan(spec, spec.dataset.load(self.data_dir))
            while len(self._plans) > self.max_plans:
                gone, _ = self._plans.popitem(last=False)
                self._last_global = {key: last for key, last in self._last_global.items() if key[0] != gone}
        self._plans.move_to_end(experiment_id)
        return self._plans[experiment_id]

    def client_data(self, experiment_id: str, plan: ExperimentPlan, client_index: int, partition_digest: str) -> ClientData:
        """This client's train/test data, its partition checked against the server's digest."""
        digest = plan.member_partition(client_index).digest()
        if digest != partition_digest:
            raise PartitionMismatch(
                f"experiment {experiment_id} client {client_index}: local partition digest {digest[:12]}... "
                f"!= server's {partition_digest[:12]}...; the {plan.spec.dataset_name} files under {self.data_dir} "
                "differ from the server's"
            )
        key = (experiment_id, client_index)
        if key in self._members:
            self._members.move_to_end(key)
            return self._members[key]
        data = plan.client_data(client_index)
        self._members[key] = data
        while len(self._members) > 1 and sum(_nbytes(d) for d in self._members.values()) > self.max_member_bytes:
            self._members.popitem(last=False)
        log.debug(
            "experiment %s client %d: %d train / %d test examples",
            experiment_id, client_index, data.num_train, int(data.test_y.shape[0]),
        )
        return data

    def previous_global(self, experiment_id: str, client_index: int, server_round: int) -> StateDict | None:
        """The global model this client trained from in round ``server_round - 1``, if it did."""
        last = self._last_global.get((experiment_id, client_index))
        return last[1] if last is not None and last[0] == server_round - 1 else None

    def remember_global(self, experiment_id: str, client_index: int, server_round: int, model: torch.nn.Module) -> None:
        """Keep the global model of ``server_round`` for the next round's landscape."""
        weights = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        # only a round's predecessor is ever asked for: keep the memory to one round's members
        self._last_global = {key: last for key, last in self._last_global.items() if last[0] >= server_round - 1}
        self._last_global[(experiment_id, client_index)] = (server_round, weights)


def _nbytes(data: ClientData) -> int:
    """Bytes a member's data holds of its own: its labels and index arrays (the images are shared)."""
    labels = sum(int(t.element_size() * t.nelement()) for t in (data.train_y, data.test_y))
    return labels + data.train_x.nbytes + data.test_x.nbytes


def load_weights(plan: ExperimentPlan, payload: bytes) -> torch.nn.Module:
    """The plan's model carrying the weights in the safetensors `payload` (checked first)."""
    weights = wire.decode(payload)
    wire.check_compatible(weights, wire.from_module(plan.model()))
    return plan.model(weights)


def _measure(model: torch.nn.Module, data: ClientData) -> dict[str, Any]:
    """Train and local test loss and accuracy; without a local test set (member_test_split none) train only."""
    train: Evaluation = evaluate(model, batches(data.train_x, data.train_y, EVAL_BATCH_SIZE))
    if int(data.test_y.shape[0]) == 0:  # absent, not zero: no test metric and no generalisation gap
        return {"train_loss": float(train.loss), "train_accuracy": float(train.accuracy)}
    test: Evaluation = evaluate(model, batches(data.test_x, data.test_y, EVAL_BATCH_SIZE))
    if math.isfinite(train.loss) and math.isfinite(test.loss):
        gap = generalization_gap(train.loss, train.accuracy, test.loss, test.accuracy)
    else:  # a diverged model: its update goes to the server as it is, which refuses it naming the statistic
        gap = {"loss": float(test.loss) - float(train.loss), "accuracy": float(train.accuracy) - float(test.accuracy)}
    return {
        "train_loss": float(train.loss),
        "train_accuracy": float(train.accuracy),
        "test_loss": float(test.loss),
        "test_accuracy": float(test.accuracy),
        "generalization_gap": gap,
    }


@dataclass(frozen=True)
class RoundResult:
    weights: bytes  # safetensors of the local model
    num_examples: int
    stats: dict[str, Any]
    state: bytes | None = None  # the client algorithm's new state and message (stack.wire.encode_member_state), if any


@dataclass(frozen=True)
class MemberInputs:
    """What the member's client algorithm starts a round from: its own state and the strategy's round payload."""

    state: dict[str, Any] = field(default_factory=dict)
    round_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decode(cls, payload: bytes) -> MemberInputs:
        """From the server's safetensors (``stack.wire.encode_member_inputs``)."""
        state, round_state = wire.split(wire.decode(payload), wire.STATE_PREFIX, wire.ROUND_PREFIX)
        return cls(state, round_state)


def run_round(
    plan: ExperimentPlan,
    data: ClientData,
    global_model: torch.nn.Module,
    server_round: int,
    fetch_s: float,
    previous_global: StateDict | None = None,
    *,
    device: str | torch.device = "cpu",
    inputs: MemberInputs | None = None,
) -> RoundResult:
    """Evaluate the global model, train locally, evaluate the local model; time each step.

    In rounds the spec's landscape schedules, also measures the landscape on the
    client's fixed subset (`stats["landscape"]`; `{"error": ...}` if that fails,
    the round goes on). `previous_global` is the global model this client trained
    from in the round before, if any (for `cosine_to_previous_update`). Everything
    is computed on `device` (FEDLAND_DEVICE; `global_model` is not moved, a copy is);
    the returned weights are CPU tensors either way. Training goes through the
    spec's client algorithm (``fedland.algorithms.ClientAlgorithm``), started
    from ``inputs`` (its state and the strategy's payload; empty when None).
    """
    spec = plan.spec
    where = resolve_device(device)
    if next(global_model.parameters()).device != where:
        global_model = copy.deepcopy(global_model).to(where)
        if previous_global is not None:
            previous_global = {name: tensor.to(where) for name, tensor in previous_global.items()}
    seed = plan.training_seed(data.client_index, server_round)
    started = time.perf_counter()
    global_stats = _measure(global_model, data)
    evaluated = time.perf_counter()
    algorithm = spec.client_algorithm.build(spec.strategy.prox_mu)
    hyper = LocalHyperparameters(
        epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.round_learning_rate(server_round),
        momentum=spec.momentum,
        augment=bool(spec.augment),
        device=str(where),
    )
    inputs = inputs or MemberInputs()
    result = algorithm.train(
        global_model, MemberData(data.train_x, data.train_y),
        seed=seed, hyper=hyper, state=inputs.state, round_state=inputs.round_state,
    )
    local_model, report = result.model, result.report
    trained = time.perf_counter()
    local_stats = _measure(local_model, data)
    done = time.perf_counter()
    landscape = None
    if spec.landscape.scheduled(server_round, spec.rounds):
        landscape = _landscape(plan, data.client_index, global_model, local_model, previous_global, seed,
                               last_round=server_round == spec.rounds)
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
    weights = {name: tensor.detach().cpu() for name, tensor in local_model.state_dict().items()}
    state = wire.encode_member_state(result.state, result.message) if result.state or result.message else None
    return RoundResult(wire.encode(weights), num_examples, stats, state)


def _landscape(
    plan: ExperimentPlan,
    client_index: int,
    global_model: torch.nn.Module,
    local_model: torch.nn.Module,
    previous: StateDict | None,
    seed: int,
    *,
    last_round: bool = False,
) -> dict[str, Any]:
    """The member's landscape document; in the experiment's last round also its spectral densities (`densities`),
    which the server's analysis stores (a failure leaves them out: the server then computes them itself)."""
    batch = plan.landscape_batch(client_index)
    try:
        landscape = measure_client_round(global_model, local_model, previous, batch, plan.spec.landscape, seed)
    except Exception as error:  # noqa: BLE001 - a failed measurement must not cost the round
        log.exception("client %d: landscape measurement failed", client_index)
        return {"error": f"{type(error).__name__}: {error}"}
    if last_round:
        started = time.perf_counter()
        try:
            landscape["densities"] = member_densities(global_model, local_model, batch, plan.spec.seed)
        except Exception:  # noqa: BLE001 - the server's analysis computes what is missing
            log.exception("client %d: spectral densities not measured", client_index)
        landscape["duration_s"] += time.perf_counter() - started
    return landscape
