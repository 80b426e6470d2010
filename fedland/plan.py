"""The client/server agreement of one experiment, computed in one place.

Every quantity the client and the server must compute identically lives here:
the partition, a client's train/test data, the landscape subsets (a client's own
and the server's held-out one), the seeds of training and measurement, and the
model built from stored weights. Both sides build an ``ExperimentPlan`` from the
spec and the dataset and ask it; neither re-derives any of these.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedland.components import resolve_model
from fedland.datasets import Dataset, Images
from fedland.measure import landscape_subset
from fedland.partition import ClientPartition, partition
from fedland.partition_scheme import ClassPools, scheme_member
from fedland.spec import ExperimentSpec

__all__ = ["ANALYSIS_STREAM", "HELD_OUT_STREAM", "ClientData", "ExperimentPlan", "derived_seed"]

Batch = tuple[torch.Tensor, torch.Tensor]

#: Second word of the seeds of the server's held-out subset and measurements; no client has this index.
HELD_OUT_STREAM = 2**32
#: Scheme members whose partitions a plan keeps (a round's members, and then some).
DERIVED_CACHE = 1024
#: Second word of the seed of the test subset of the experiment's analysis (trajectory, spectral density).
ANALYSIS_STREAM = 2**32 + 1


def derived_seed(*words: int) -> int:
    """A 63-bit seed derived from non-negative integers (e.g. experiment seed, client, round)."""
    sequence = np.random.SeedSequence(list(words))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's share of the dataset: views (index arrays) into the shared images, chosen by its partition."""

    client_index: int
    train_x: Images  # (num_train, *input_shape), float32 when indexed
    train_y: torch.Tensor  # (num_train,)
    test_x: Images  # (num_test, *input_shape), float32 when indexed
    test_y: torch.Tensor  # (num_test,)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


class ExperimentPlan:
    """What the client and the server agree on for one experiment (spec + dataset: ``spec.dataset.load(data_dir)``)."""

    def __init__(self, spec: ExperimentSpec, dataset: Dataset) -> None:
        if dataset.name != spec.dataset_name:
            raise ValueError(f"dataset: the spec needs {spec.dataset_name!r}, got {dataset.name!r}")
        self.spec = spec
        self.dataset = dataset
        self._derived: OrderedDict[int, ClientPartition] = OrderedDict()  # scheme members, most recent last
        self._derived_lock = threading.Lock()

    @functools.cached_property
    def partitions(self) -> list[ClientPartition]:
        """Every client's partition in client order (all at once: for explicit ratio lists, or a few members)."""
        spec = self.spec
        if spec.partition is not None:
            return [self.member_partition(i) for i in range(spec.num_clients)]
        return partition(
            self.dataset.train_y, self.dataset.test_y, spec.target_balance_ratios, spec.subset_fractions, spec.seed,
            spec.member_test_split,
        )

    def member_partition(self, client_index: int) -> ClientPartition:
        """Member ``client_index``'s partition: the one rule both sides call.

        Explicit ratio lists: ``fedland.partition`` over every client (computed
        once). A partition scheme: ``fedland.partition_scheme.scheme_member`` for
        this member alone (the most recent ``DERIVED_CACHE`` are kept).
        """
        self._check_client(client_index)
        spec = self.spec
        if spec.partition is None:
            return self.partitions[client_index]
        with self._derived_lock:
            cached = self._derived.get(client_index)
            if cached is not None:
                self._derived.move_to_end(client_index)
                return cached
        derived = scheme_member(spec.partition, self.dataset.info, self._pools, client_index, spec.member_test_split)
        with self._derived_lock:
            self._derived[client_index] = derived
            while len(self._derived) > DERIVED_CACHE:
                self._derived.popitem(last=False)
        return derived

    def member_partitions(self, client_indices: Sequence[int]) -> list[ClientPartition]:
        """The partitions of these members, in the order given."""
        return [self.member_partition(i) for i in client_indices]

    @functools.cached_property
    def _pools(self) -> ClassPools:
        return ClassPools.of_labels(self.dataset.train_y, self.dataset.test_y, self.spec.num_classes)

    def client_data(self, client_index: int) -> ClientData:
        """Client ``client_index``'s train and test examples: views of the dataset's images, not copies."""
        part = self.member_partition(client_index)
        train, test = torch.from_numpy(part.train_indices), torch.from_numpy(part.test_indices)
        data = self.dataset
        return ClientData(
            client_index, data.train_x.subset(train), data.train_y[train], data.test_x.subset(test), data.test_y[test]
        )

    # -- landscape subsets ------------------------------------------------------

    def landscape_indices(self, client_index: int) -> np.ndarray:
        """Indices into the client's train partition of its landscape subset (ascending)."""
        part = self.member_partition(client_index)
        return landscape_subset(part.num_train, self.spec.landscape.subset_size, (self.spec.seed, client_index))

    def landscape_batch(self, client_index: int) -> list[Batch]:
        """The client's landscape subset of its own train data, as one batch."""
        part = self.member_partition(client_index)
        chosen = torch.from_numpy(part.train_indices[self.landscape_indices(client_index)])
        return [(self.dataset.train_x[chosen], self.dataset.train_y[chosen])]

    def held_out_indices(self) -> np.ndarray:
        """Indices into the test split of the server's landscape subset (never trained on)."""
        num_test = int(self.dataset.test_y.shape[0])
        return landscape_subset(num_test, self.spec.landscape.subset_size, (self.spec.seed, HELD_OUT_STREAM))

    def held_out_batch(self) -> list[Batch]:
        """The server's held-out landscape subset of the test split, as one batch."""
        chosen = torch.from_numpy(self.held_out_indices())
        return [(self.dataset.test_x[chosen], self.dataset.test_y[chosen])]

    def analysis_batch(self, size: int) -> list[Batch]:
        """A seeded subset of ``size`` test examples (all when fewer), as one batch: the experiment's analysis data."""
        num_test = int(self.dataset.test_y.shape[0])
        chosen = torch.from_numpy(landscape_subset(num_test, size, (self.spec.seed, ANALYSIS_STREAM)))
        return [(self.dataset.test_x[chosen], self.dataset.test_y[chosen])]

    # -- seeds ------------------------------------------------------------------

    def training_seed(self, client_index: int, server_round: int) -> int:
        """Seed of client ``client_index``'s training (and its landscape measurement) in a round."""
        return derived_seed(self.spec.seed, client_index, server_round)

    def server_measurement_seed(self, server_round: int) -> int:
        """Seed of the server's landscape measurement of a round (a 32-bit word, as stored results assume)."""
        sequence = np.random.SeedSequence([self.spec.seed, server_round, HELD_OUT_STREAM])
        return int(sequence.generate_state(1)[0])

    # -- models -----------------------------------------------------------------

    def model(self, weights: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> nn.Module:
        """The spec's model: the initial weights (``weights=None``) or carrying ``weights``.

        Raises:
            ValueError: ``weights`` lacks a key of the model, has an extra one, or a shape differs.
        """
        model = resolve_model(self.spec.model).build(self.spec.seed, self.spec.num_classes)
        if weights is None:
            return model
        expected = model.state_dict()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"weights: missing keys {missing}, unexpected keys {extra} for {self.spec.model}")
        state = {}
        for name, reference in expected.items():
            value = torch.as_tensor(weights[name])
            if tuple(value.shape) != tuple(reference.shape):
                raise ValueError(f"weights[{name!r}]: shape {tuple(value.shape)} != {tuple(reference.shape)}")
            state[name] = value
        model.load_state_dict(state)
        return model

    def _check_client(self, client_index: int) -> int:
        if not 0 <= client_index < self.spec.num_clients:
            raise ValueError(f"client_index: must be in [0, {self.spec.num_clients}), got {client_index}")
        return client_index
