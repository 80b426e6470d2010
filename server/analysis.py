"""The experiment's analysis: what a report draws that needs a model evaluated, computed once and stored.

Run in the experiment's measurement lane (`server.measurements.LandscapeWorker`): the
initial model's evaluation when the experiment is queued, and, before the
experiment is marked finished, the PCA trajectory of its global models and the
Hessian spectral densities of its last measured round. Each is a `landscapes`
document of its own kind (`stack.records.ANALYSIS_KINDS`); a report only reads
them (DEVELOPERS.md "The experiment's analysis"). Subsets and seeds come from
`fedland.plan.ExperimentPlan`, so the same store gives the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedland.measure import density_document, member_densities
from fedland.plan import ExperimentPlan
from fedland.slices import loss_slice_2d
from fedland.strategies import NamedArrays
from server.resources import Resources
from server.store import Store
from stack import records, wire
from stack.records import (
    DensityCurve,
    ExperimentRecord,
    InitialEvaluation,
    SpectralDensities,
    TrajectoryAnalysis,
)

log = logging.getLogger(__name__)

#: Test images the trajectory's loss contours are measured on (`ExperimentPlan.analysis_batch`).
TRAJECTORY_SAMPLES = 1000
TRAJECTORY_GRID = 21  # points per axis of the contour grid (odd: the final model is a grid point)
TRAJECTORY_MARGIN = 1.25  # the grid's half-width over the farthest round's coordinate
DENSITY_MAX_MEMBERS = 8  # participants (lowest indices first) whose local and received models get a density


def evaluate_initial(store: Store, resources: Resources, experiment: ExperimentRecord) -> bool:
    """Store the initial model's test loss and accuracy (full test split) unless stored; True if it stored them."""
    if records.read_analysis(store.db, experiment.id).initial_evaluation is not None:
        return False
    file_id = store.global_model_id(experiment.id, 0)
    if file_id is None:
        raise LookupError(f"experiment {experiment.id} has no initial model")
    evaluation = resources.evaluate(experiment.spec, wire.decode(store.load_model(file_id)))
    num_test = int(resources.plan(experiment.spec).dataset.test_y.shape[0])
    initial = InitialEvaluation(_finite(evaluation.loss), _finite(evaluation.accuracy), num_test)
    store.save_landscape(initial.record(experiment.id))
    return True


def analyse_finished(store: Store, resources: Resources, experiment: ExperimentRecord) -> None:
    """Store the trajectory of the global models and (landscapes measured) the last measured round's densities."""
    plan = resources.plan(experiment.spec)
    weights = global_models(store, experiment.id)
    if len(weights) >= 3:
        store.save_landscape(trajectory(plan, weights).record(experiment.id))
    else:
        log.info("experiment %s: %d global models, no trajectory (needs 3)", experiment.id, len(weights))
    if experiment.spec.landscape.enabled:
        densities = round_densities(store, plan, experiment.id, weights)
        if densities is not None:
            store.save_landscape(densities.record(experiment.id))


def global_models(store: Store, experiment_id: str) -> dict[int, NamedArrays]:
    """The stored global models by round (0: the initial one)."""
    ids = {0: store.global_model_id(experiment_id, 0)}
    ids.update({r.round: r.model_file_id for r in store.rounds_of(experiment_id)})
    return {r: wire.decode(store.load_model(i)) for r, i in sorted(ids.items()) if i is not None}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# trajectory ---------------------------------------------------------------------


def trajectory_plane(flat_models: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """PCA of ``theta_r - theta_last`` (rows); returns the unit directions (2, dim), coordinates (rows, 2), ratios."""
    differences = flat_models - flat_models[-1]  # (rounds, dim); the last row is 0
    centred = differences[:-1] - differences[:-1].mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    total = float(variance.sum()) or 1.0
    directions = vt[:2]
    if directions.shape[0] < 2:  # one difference: the second axis carries nothing
        directions = np.vstack([directions, np.zeros_like(directions)])
    ratios = tuple(float(v / total) for v in (list(variance[:2]) + [0.0, 0.0])[:2])
    return directions, differences @ directions.T, (ratios[0], ratios[1])


def trajectory(plan: ExperimentPlan, weights: Mapping[int, Mapping[str, np.ndarray]]) -> TrajectoryAnalysis:
    """The global models by round on their PCA plane (Li et al. 2018), with the loss on that plane around the last."""
    rounds = sorted(weights)
    last = plan.model(weights[rounds[-1]]).eval()
    names = [n for n, p in last.named_parameters() if p.requires_grad]
    flat = np.stack([_flat(weights[r], names) for r in rounds])  # (rounds, dim)
    directions, coords, ratios = trajectory_plane(flat)
    extent = float(np.abs(coords).max()) * TRAJECTORY_MARGIN or 1.0
    unflat = []
    for direction in directions:
        pieces, offset = {}, 0
        for name, parameter in last.named_parameters():
            size = parameter.numel()
            pieces[name] = torch.from_numpy(direction[offset:offset + size].reshape(parameter.shape)).float()
            offset += size
        unflat.append(pieces)
    data = plan.analysis_batch(TRAJECTORY_SAMPLES)
    plane = loss_slice_2d(last, nn.CrossEntropyLoss(), data, (unflat[0], unflat[1]), radius=extent,
                          num_points=TRAJECTORY_GRID, norm="none")
    losses = np.asarray(plane.losses, dtype=np.float64).T  # slice: losses[i, j] at (xs[i], ys[j]) -> (ny, nx)
    return TrajectoryAnalysis(
        rounds=tuple(rounds),
        coords=tuple((float(x), float(y)) for x, y in coords),
        explained_variance_ratio=ratios,
        xs=tuple(float(v) for v in plane.xs),
        ys=tuple(float(v) for v in plane.ys),
        losses=tuple(tuple(_finite(v) for v in row) for row in losses),
        num_samples=int(data[0][1].shape[0]),
    )


def _flat(weights: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in names])


# spectral densities -------------------------------------------------------------


def round_densities(
    store: Store, plan: ExperimentPlan, experiment_id: str, weights: Mapping[int, NamedArrays]
) -> SpectralDensities | None:
    """Densities of the last round whose members measured landscapes and whose updates and models are stored.

    The aggregate on the analysis test subset; per participant (the first
    ``DENSITY_MAX_MEMBERS``), the global model it trained from and its local
    model on its own landscape subset. None when no round qualifies.
    """
    measured = sorted({
        stats.round for stats in records.read_client_stats(store.db, experiment_id)
        if isinstance(stats.stats.get("landscape"), Mapping) and "error" not in stats.stats["landscape"]
        and stats.weights_file_id and stats.round in weights and stats.round - 1 in weights
    })
    if not measured:
        return None
    server_round = measured[-1]
    seed = plan.spec.seed
    received = plan.model(weights[server_round - 1]).eval()  # the global model the members trained from
    aggregate = plan.model(weights[server_round]).eval()
    curves = [_curve("global", None, density_document(
        aggregate, plan.analysis_batch(plan.spec.landscape.num_samples), seed))]
    members = [s for s in store.stats_of_round(experiment_id, server_round)
               if s.weights_file_id and s.client_index < plan.spec.num_clients]
    for stats in sorted(members, key=lambda s: s.client_index)[:DENSITY_MAX_MEMBERS]:
        member = _worker_densities(stats.stats.get("landscape"))
        if member is None:  # a worker of an earlier release, or its densities failed: computed here
            local = plan.model(wire.decode(store.load_client_model(str(stats.weights_file_id)))).eval()
            member = member_densities(received, local, plan.landscape_batch(stats.client_index), seed)
        curves.append(_curve("global", stats.client_index, member["global"]))
        curves.append(_curve("local", stats.client_index, member["local"]))
    return SpectralDensities(server_round, int(plan.spec.landscape.num_samples), tuple(curves))


def _worker_densities(landscape: Any) -> Mapping[str, Mapping[str, Sequence[float]]] | None:
    """The member's densities its worker measured in the last round (`fedland.measure.member_densities`), if whole."""
    densities = landscape.get("densities") if isinstance(landscape, Mapping) else None
    if not isinstance(densities, Mapping):
        return None
    for kind in ("global", "local"):
        curve = densities.get(kind)
        if not (isinstance(curve, Mapping) and isinstance(curve.get("grid"), list)
                and isinstance(curve.get("density"), list) and len(curve["grid"]) == len(curve["density"]) > 0):
            return None
    return densities


def _curve(kind: str, client_index: int | None, document: Mapping[str, Sequence[float]]) -> DensityCurve:
    return DensityCurve(kind, client_index, tuple(float(v) for v in document["grid"]),
                        tuple(float(v) for v in document["density"]))
