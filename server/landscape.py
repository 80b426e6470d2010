"""The round-level landscape measurement of the server (DEVELOPERS.md "Landscape measurements").

Run by the coordinator for each scheduled round after its ``rounds`` document is
written (in the background, the last round before the experiment finishes): the
aggregated model's scalars on a held-out subset of the test split, each
client's alignment with the aggregate update, the gradient dissimilarity B over
the clients' own landscape subsets, leave-one-out contributions on the full
test split, the PCA loss surface (stored as a ``landscapes`` document), and, in
rounds of at most ``PAIRWISE_MAX_MEMBERS`` participants, the matrix of
interpolation barriers between every pair of client models (on the held-out
subset) and the local-vs-global flatness gap (each local model's top Hessian
eigenvalue on its own landscape subset against the global model's on their union).
A failure never fails the round: the round gets ``{"error": "..."}``; a store
that does not answer is not a failure of the measurement (`StoreUnavailable`
propagates, and the measurement thread measures the round again). The
inputs are rebuilt from the store by ``load_aggregated_round``, the one way both
the normal path and the recovery at start-up get them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedland.device import resolve_device
from fedland.measure import (
    PAIRWISE_MAX_MEMBERS,
    cosine_or_none,
    finite_or_none,
    flatness_gap_document,
    gap_document,
    measure_model,
    pairwise_barriers,
    pca_surface,
)
from fedland.scalars import gradient_dissimilarity
from fedland.spec import ExperimentSpec
from fedland.strategies import ClientUpdate, NamedArrays, make_strategy
from server.resources import Resources
from server.round_inputs import load_round_inputs
from server.store import Store, StoreUnavailable
from stack import records, wire
from stack.records import Document, LandscapeRecord

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def leave_one_out(
    aggregate: Callable[[Sequence[ClientUpdate]], NamedArrays],
    updates: Sequence[ClientUpdate],
    client_indices: Sequence[int],
    evaluate: Callable[[NamedArrays], tuple[float, float]],
    full: tuple[float, float],
) -> list[Document]:
    """Per client, ``metric(aggregate without it) - metric(aggregate of all)`` for test loss and accuracy.

    Args:
        aggregate: the round's aggregation (same previous weights and strategy state) of some updates.
        updates: the round's updates, in the order of ``client_indices``.
        client_indices: the clients' indices.
        evaluate: ``weights -> (test_loss, test_accuracy)``.
        full: ``(test_loss, test_accuracy)`` of the aggregate of all updates.

    Returns:
        ``[{"client_index", "delta_test_loss", "delta_test_accuracy"}]``; the deltas
        are None with a single client or when the strategy cannot aggregate the rest.
    """
    if len(updates) != len(client_indices):
        raise ValueError("client_indices: must have one entry per update")
    out = []
    for position, client_index in enumerate(client_indices):
        delta_loss: float | None = None
        delta_accuracy: float | None = None
        rest = [u for i, u in enumerate(updates) if i != position]
        if rest:
            try:
                loss, accuracy = evaluate(aggregate(rest))
                delta_loss, delta_accuracy = finite_or_none(loss - full[0]), finite_or_none(accuracy - full[1])
            except ValueError as error:  # e.g. Krum needs more clients than remain
                log.warning("leave-one-out without client %d: %s", client_index, error)
        out.append(
            {"client_index": int(client_index), "delta_test_loss": delta_loss, "delta_test_accuracy": delta_accuracy}
        )
    return out


@dataclass(frozen=True)
class AggregatedRound:
    """What the coordinator knows right after aggregating a round: the inputs of its measurement."""

    spec: ExperimentSpec
    experiment_id: str
    server_round: int
    previous: NamedArrays  # the global model the round trained from
    state: NamedArrays  # the strategy state the round started from
    updates: Sequence[ClientUpdate]
    client_indices: Sequence[int]  # of each update, same order
    new_global: NamedArrays
    full_evaluation: tuple[float, float]  # (loss, accuracy) of new_global on the full test split


def load_aggregated_round(store: Store, spec: ExperimentSpec, experiment_id: str, server_round: int) -> AggregatedRound:
    """The inputs of a stored round's measurement, rebuilt from the store.

    The previous global model, strategy state and the participants' updates come
    from ``load_round_inputs``, the new global model from the round's
    ``model_file_id`` and the full evaluation from its ``test_loss``/``test_accuracy``.

    Raises:
        LookupError: the round, the previous model or a participant's update is not stored.
    """
    round_record = store.get_round(experiment_id, server_round)
    if round_record is None:
        raise LookupError(f"round {server_round} of experiment {experiment_id} is not aggregated")
    participants = list(round_record.participants)
    inputs = load_round_inputs(store, experiment_id, server_round, participants)
    return AggregatedRound(
        spec=spec,
        experiment_id=experiment_id,
        server_round=server_round,
        previous=inputs.previous,
        state=inputs.state,
        updates=inputs.updates,
        client_indices=inputs.client_indices,
        new_global=wire.decode(store.load_model(round_record.model_file_id)),
        full_evaluation=(round_record.test_loss, round_record.test_accuracy),
    )


def measure_stored_round(
    store: Store, resources: Resources, spec: ExperimentSpec, experiment_id: str, server_round: int
) -> Document:
    """``measure_round`` of a round rebuilt by ``load_aggregated_round``, or ``{"error": ...}``; raises only `StoreUnavailable`."""
    try:
        aggregated = load_aggregated_round(store, spec, experiment_id, server_round)
    except StoreUnavailable:
        raise  # not the round's fault: measured again once the store answers (`LandscapeWorker`)
    except Exception as error:  # noqa: BLE001 - a round that cannot be rebuilt gets an error, not a crash
        log.exception("experiment %s round %d: cannot rebuild the round to measure it", experiment_id, server_round)
        return {"error": f"{type(error).__name__}: {error}"}
    return measure_round(store, resources, aggregated)


def measure_round(store: Store, resources: Resources, aggregated: AggregatedRound) -> Document:
    """The ``rounds.landscape`` document (and its stored surface), or ``{"error": ...}``; raises only `StoreUnavailable`."""
    try:
        return _measure_round(store, resources, aggregated)
    except StoreUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - a failed measurement must not cost the round
        log.exception(
            "experiment %s round %d: landscape measurement failed", aggregated.experiment_id, aggregated.server_round
        )
        return {"error": f"{type(error).__name__}: {error}"}


def _measure_round(store: Store, resources: Resources, aggregated: AggregatedRound) -> Document:
    spec, experiment_id, server_round = aggregated.spec, aggregated.experiment_id, aggregated.server_round
    previous, state, updates = aggregated.previous, aggregated.state, aggregated.updates
    client_indices, new_global, full = aggregated.client_indices, aggregated.new_global, aggregated.full_evaluation
    started = time.perf_counter()
    lspec = spec.landscape
    plan = resources.plan(spec)
    seed = plan.server_measurement_seed(server_round)
    held_out = plan.held_out_batch()
    device = resolve_device(resources.device)
    previous_model, global_model = plan.model(previous).to(device), plan.model(new_global).to(device)
    local_models = [plan.model(update.weights).to(device) for update in updates]
    strategy = make_strategy(spec.strategy, spec.participation)
    client_batches = [plan.landscape_batch(i) for i in client_indices]  # each participant's subset, built once

    def evaluate(weights: NamedArrays) -> tuple[float, float]:
        evaluation = resources.evaluate(spec, weights)
        return float(evaluation.loss), float(evaluation.accuracy)

    surface = pca_surface(
        global_model, local_models, F.cross_entropy, held_out, lspec.grid_points, lspec.grid_radius,
        reference=previous_model, seed=seed,
    )
    for point in surface["client_points"]:
        point["client_index"] = int(client_indices[point["client_index"]])
    doc: Document = {
        "num_samples": int(held_out[0][1].shape[0]),
        "global": measure_model(global_model, F.cross_entropy, held_out, lspec, seed),
        "client_alignment": [
            {"client_index": int(i), "cosine": cosine_or_none(local, global_model, previous_model)}
            for i, local in zip(client_indices, local_models)
        ],
        "gradient_dissimilarity": finite_or_none(
            gradient_dissimilarity(global_model, F.cross_entropy, client_batches)
        ),
        "generalization_gap": gap_document(
            global_model, [batch for batches in client_batches for batch in batches], held_out
        ),
        "leave_one_out": leave_one_out(
            lambda rest: strategy.aggregate(previous, rest, state)[0], updates, client_indices, evaluate, full
        ),
    }
    if len(local_models) <= PAIRWISE_MAX_MEMBERS:
        indices = [int(i) for i in client_indices]
        if len(local_models) >= 2:
            alphas = np.linspace(0.0, 1.0, lspec.interpolation_points)
            barriers = {"client_indices": indices, **pairwise_barriers(local_models, held_out, alphas)}
            doc["pairwise_barriers_id"] = store.save_landscape(
                LandscapeRecord(experiment_id, server_round, records.PAIRWISE_BARRIERS, barriers)
            )
        doc["flatness_gap"] = {
            "client_indices": indices,
            **flatness_gap_document(global_model, local_models, client_batches, seed),
        }
    doc["surface_id"] = store.save_landscape(LandscapeRecord(experiment_id, server_round, records.SURFACE, surface))
    doc["duration_s"] = time.perf_counter() - started
    return doc
