"""What the coordinator needs from fedland: experiment plans, partitions, models, evaluation."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedland.components import resolve_model
from fedland.plan import ExperimentPlan
from fedland.spec import ExperimentSpec
from fedland.strategies import NamedArrays
from fedland.training import Evaluation, batches, evaluate
from stack import wire

log = logging.getLogger(__name__)

#: Experiment plans kept per process (each holds its partition indices, a few MB at most).
PLAN_CACHE_SIZE = 32


class Resources:
    """The server's experiment plans (cached, bounded) and the model-side computations of the coordinator."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, eval_batch_size: int = 1000, device: str = "cpu"
    ) -> None:
        self.data_dir = Path(data_dir)
        self.eval_batch_size = eval_batch_size
        self.device = device  # FEDLAND_DEVICE of the landscape measurements
        self._plans: OrderedDict[str, ExperimentPlan] = OrderedDict()
        self._references: dict[tuple[str, int], NamedArrays] = {}
        self._lock = threading.Lock()  # the plans
        self._references_lock = threading.Lock()

    def load(self, spec: ExperimentSpec) -> None:
        """Load (and verify) the experiment's dataset now, so that a later request does not wait for it."""
        spec.dataset.load(self.data_dir)  # a built-in's files: cached per process by fedland

    def plan(self, spec: ExperimentSpec) -> ExperimentPlan:
        """The experiment's plan, built on first use and kept for the next rounds."""
        key = json.dumps({**spec.to_dict(), "timestamp": None}, sort_keys=True)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        # built outside the lock (a dataset load, a partition): other experiments' requests go on meanwhile
        built = ExperimentPlan(spec, spec.dataset.load(self.data_dir))
        with self._lock:
            plan = self._plans.setdefault(key, built)  # a concurrent build of the same plan: keep the first
            self._plans.move_to_end(key)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
            return plan

    def partition_summary(self, spec: ExperimentSpec) -> list[dict[str, Any]]:
        """The members stored when the experiment is queued: per client, its partition's statistics.

        Explicit ratio lists: every client (class counts, frequencies, Gini,
        sizes and partition digest on the real labels). A partition scheme:
        none; its members are stored when first selected (`member_summaries`),
        so queueing 100,000 members writes nothing per member.
        """
        if spec.partition is not None:
            return []
        return [part.to_stats() for part in self.plan(spec).partitions]

    def member_summaries(self, spec: ExperimentSpec, client_indices: Sequence[int]) -> list[dict[str, Any]]:
        """The statistics of these members' partitions (derived one by one for a scheme)."""
        return [part.to_stats() for part in self.plan(spec).member_partitions(client_indices)]

    def initial_weights(self, spec: ExperimentSpec) -> NamedArrays:
        """The round-0 model: `ExperimentPlan.model()` (the spec's model, by name or import path)."""
        return wire.from_module(self.plan(spec).model())

    def reference(self, model_name: str, num_classes: int = 10) -> NamedArrays:
        """Weights with the layout (keys, shapes, dtypes) every update of this model must have."""
        key = (model_name, num_classes)
        with self._references_lock:  # not the plans' lock: every update asks for it
            if key not in self._references:
                self._references[key] = wire.from_module(resolve_model(model_name).build(0, num_classes))
            return self._references[key]

    def evaluate(self, spec: ExperimentSpec, weights: dict[str, np.ndarray]) -> Evaluation:
        """Loss and accuracy of `weights` on the full test split."""
        plan = self.plan(spec)
        data = plan.dataset
        return evaluate(plan.model(weights), batches(data.test_x, data.test_y, self.eval_batch_size))
