"""What the coordinator needs from fedland: datasets (loaded once), partitions, models, evaluation."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fedland.datasets import Dataset, load_dataset
from fedland.models import build_model
from fedland.partition import partition
from fedland.spec import ExperimentSpec
from fedland.training import Evaluation, batches, evaluate
from stack import wire

log = logging.getLogger(__name__)


class Resources:
    """Datasets cached per process and the model-side computations of the coordinator."""

    def __init__(self, data_dir: str | os.PathLike[str], *, eval_batch_size: int = 1000) -> None:
        self.data_dir = Path(data_dir)
        self.eval_batch_size = eval_batch_size
        self._datasets: dict[str, Dataset] = {}
        self._references: dict[str, wire.Weights] = {}
        self._lock = threading.Lock()

    def dataset(self, name: str) -> Dataset:
        """The named dataset, loaded from the data dir on first use."""
        with self._lock:
            if name not in self._datasets:
                log.info("loading dataset %s from %s", name, self.data_dir)
                self._datasets[name] = load_dataset(name, self.data_dir)
            return self._datasets[name]

    def client_stats(self, spec: ExperimentSpec) -> list[dict[str, Any]]:
        """Per client: class counts, frequencies, Gini, sizes and partition digest on the real labels."""
        data = self.dataset(spec.dataset_name)
        parts = partition(
            data.train_y, data.test_y, spec.target_balance_ratios, spec.subset_fractions, spec.seed
        )
        return [part.to_stats() for part in parts]

    def initial_weights(self, spec: ExperimentSpec) -> wire.Weights:
        """The round-0 model: `build_model(spec.model, spec.seed)`."""
        return wire.from_module(build_model(spec.model, spec.seed))

    def reference(self, model_name: str) -> wire.Weights:
        """Weights with the layout (keys, shapes, dtypes) every update of this model must have."""
        with self._lock:
            if model_name not in self._references:
                self._references[model_name] = wire.from_module(build_model(model_name, 0))
            return self._references[model_name]

    def evaluate(self, spec: ExperimentSpec, weights: dict[str, np.ndarray]) -> Evaluation:
        """Loss and accuracy of `weights` on the full test split."""
        data = self.dataset(spec.dataset_name)
        model = build_model(spec.model, spec.seed)
        model.load_state_dict(wire.to_state_dict(weights))
        return evaluate(model, batches(data.test_x, data.test_y, self.eval_batch_size))
