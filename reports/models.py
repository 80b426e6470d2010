"""What the report computes from the stored models: the round-0 evaluation, the PCA trajectory, spectral densities.

The store keeps every global model (GridFS ``models``, round 0 = the initial
weights) and every client update (GridFS ``client_models``), as safetensors.
These functions read them back, evaluate them with ``fedland`` on MNIST from
``FEDLAND_DATA_DIR`` and return plain arrays; nothing is written to the store.
When the dataset is not available the figures that need it are skipped, saying why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gridfs
import numpy as np
import torch
from bson import ObjectId
from pymongo.database import Database
from torch import nn

from fedland.datasets import Dataset, load_dataset
from fedland.hessian import spectral_density
from fedland.measure import landscape_subset
from fedland.plan import ExperimentPlan
from fedland.slices import loss_slice_2d
from fedland.spec import ExperimentSpec
from fedland.training import evaluate
from stack import records, wire

log = logging.getLogger(__name__)

#: Test images the trajectory's loss contours are measured on (a seeded subset of the test split).
TRAJECTORY_SAMPLES = 1000
TRAJECTORY_GRID = 21  # points per axis of the contour grid (odd: the final model is a grid point)
DENSITY_PROBES, DENSITY_STEPS = 3, 40  # stochastic Lanczos quadrature (Ghorbani et al. 2019)
#: Second word of the seed of the report's test subset (clients use their index, the server 2**32).
REPORT_STREAM = 2**32 + 1


@dataclass(frozen=True)
class Trajectory:
    """The global models of rounds 0..R projected on the first two PCs of ``theta_r - theta_R`` (Li et al. 2018)."""

    rounds: tuple[int, ...]
    coords: np.ndarray  # (len(rounds), 2): coordinates along PC 1 and PC 2, parameter-space units
    explained_variance_ratio: tuple[float, float]
    xs: np.ndarray | None = None  # (n,) contour grid along PC 1, centred on the last model
    ys: np.ndarray | None = None  # (n,)
    losses: np.ndarray | None = None  # (n, n): losses[j, i] at (xs[i], ys[j]) on ``num_samples`` test images
    num_samples: int = 0


@dataclass(frozen=True)
class Density:
    """A Hessian eigenvalue density of one model on one data subset."""

    model: str  # "global" or "local"
    client_index: int | None  # whose subset (None: the report's test subset)
    grid: np.ndarray  # (points,) eigenvalues
    density: np.ndarray  # (points,) integrates to 1 on grid


@dataclass(frozen=True)
class ModelExtras:
    """What the report computed from the stored models; ``reasons`` says why a part is missing."""

    round0: dict[str, float] | None = None  # {"test_loss", "test_accuracy"} of the initial model, full test split
    trajectory: Trajectory | None = None
    densities: tuple[Density, ...] = ()
    density_round: int | None = None
    density_samples: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # "round0" | "trajectory" | "density" -> why missing


def global_model_ids(db: Database[Any], experiment_id: str, rounds: list[Mapping[str, Any]]) -> dict[int, Any]:
    """GridFS ids of the global models by round: round 0 from the file metadata, the others from ``rounds``."""
    ids: dict[int, Any] = {}
    initial = records.initial_model_id(db, experiment_id)
    if initial is not None:
        ids[0] = initial
    for doc in rounds:
        if doc.get("model_file_id"):
            ids[int(doc["round"])] = doc["model_file_id"]
    return ids


def _read(db: Database[Any], bucket: str, file_id: Any) -> dict[str, np.ndarray] | None:
    try:
        key = ObjectId(file_id) if isinstance(file_id, str) and ObjectId.is_valid(file_id) else file_id
        return wire.decode(gridfs.GridFSBucket(db, bucket).open_download_stream(key).read())
    except (gridfs.errors.NoFile, ValueError) as error:
        log.warning("model %s in %s unreadable: %s", file_id, bucket, error)
        return None


def _model(plan: ExperimentPlan, weights: Mapping[str, np.ndarray]) -> nn.Module:
    return plan.model(weights).eval()  # the plan is the one owner of model-from-weights (classes, architecture)


def _flat(weights: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in names])


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


def compute_extras(
    db: Database[Any], experiment_id: str, spec: Mapping[str, Any], rounds: list[Mapping[str, Any]],
    client_stats: list[Mapping[str, Any]], data_dir: Path, *, densities: bool = True,
) -> ModelExtras:
    """Round-0 evaluation, trajectory and (last measured round) spectral densities of one experiment."""
    reasons: dict[str, str] = {}
    experiment = ExperimentSpec.from_dict(spec)
    try:
        dataset = load_dataset(experiment.dataset_name, data_dir, download=False)
    except (OSError, ValueError) as error:
        reason = f"the report evaluates stored models on the dataset, which is not available ({error})"
        return ModelExtras(reasons={"round0": reason, "trajectory": reason, "density": reason})
    plan = ExperimentPlan(experiment, dataset)
    seed = plan.spec.seed
    ids = global_model_ids(db, experiment_id, list(rounds))
    weights = {r: w for r, w in ((r, _read(db, records.MODELS, i)) for r, i in sorted(ids.items())) if w is not None}
    round0 = None
    if 0 in weights:
        result = evaluate(_model(plan, weights[0]), [(dataset.test_x, dataset.test_y)])
        round0 = {"test_loss": float(result.loss), "test_accuracy": float(result.accuracy)}
    else:
        reasons["round0"] = "the store holds no initial (round 0) model for this experiment"
    trajectory = None
    if len(weights) >= 3:
        trajectory = _trajectory(plan, weights, _test_subset(dataset, seed))
    else:
        reasons["trajectory"] = "a trajectory needs at least three stored global models (rounds 0..2)"
    found: tuple[Density, ...] = ()
    density_round = None
    if densities:
        found, density_round = _densities(db, plan, client_stats, dataset, weights, seed)
        if not found:
            reasons["density"] = "no measured round has both its global model and the client models stored"
    else:
        reasons["density"] = "spectral densities are computed once the experiment has finished"
    samples = plan.spec.landscape.num_samples
    return ModelExtras(round0, trajectory, found, density_round, samples, reasons)


def _test_subset(dataset: Dataset, seed: int, size: int = TRAJECTORY_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.from_numpy(landscape_subset(int(dataset.test_y.shape[0]), size, (seed, REPORT_STREAM)))
    return dataset.test_x[chosen], dataset.test_y[chosen]


def _trajectory(plan: ExperimentPlan, weights: Mapping[int, Mapping[str, np.ndarray]],
                data: tuple[torch.Tensor, torch.Tensor]) -> Trajectory:
    rounds = sorted(weights)
    last = _model(plan, weights[rounds[-1]])
    names = [n for n, p in last.named_parameters() if p.requires_grad]
    flat = np.stack([_flat(weights[r], names) for r in rounds])  # (rounds, dim)
    directions, coords, ratios = trajectory_plane(flat)
    extent = float(np.abs(coords).max()) * 1.25 or 1.0
    unflat = []
    for direction in directions:
        pieces, offset = {}, 0
        for name, parameter in last.named_parameters():
            size = parameter.numel()
            pieces[name] = torch.from_numpy(direction[offset:offset + size].reshape(parameter.shape)).float()
            offset += size
        unflat.append(pieces)
    plane = loss_slice_2d(last, nn.CrossEntropyLoss(), [data], (unflat[0], unflat[1]), radius=extent,
                          num_points=TRAJECTORY_GRID, norm="none")
    losses = np.asarray(plane.losses, dtype=np.float64).T  # slice: losses[i, j] at (xs[i], ys[j]) -> (ny, nx)
    return Trajectory(tuple(rounds), coords, ratios, np.asarray(plane.xs), np.asarray(plane.ys), losses,
                      int(data[1].shape[0]))


def _densities(
    db: Database[Any], plan: ExperimentPlan, client_stats: list[Mapping[str, Any]], dataset: Dataset,
    weights: Mapping[int, Mapping[str, np.ndarray]], seed: int,
) -> tuple[tuple[Density, ...], int | None]:
    measured = sorted({int(d["round"]) for d in client_stats if isinstance(d.get("landscape"), Mapping)
                       and d.get("weights_file_id") and int(d["round"]) in weights and int(d["round"]) - 1 in weights})
    if not measured:
        return (), None
    server_round = measured[-1]
    num_samples = plan.spec.landscape.num_samples
    # each client's landscape subset, exactly as the client measured it (the plan is the one owner of that rule)
    received = _model(plan, weights[server_round - 1])  # the global model the clients trained from
    loss_fn = nn.CrossEntropyLoss()
    aggregate = _model(plan, weights[server_round])  # the global model after this round
    found = [_density("global", None, aggregate, [_test_subset(dataset, seed, num_samples)], loss_fn, seed)]
    for doc in sorted(client_stats, key=lambda d: int(d["client_index"])):
        if int(doc["round"]) != server_round:
            continue
        local_weights = _read(db, records.CLIENT_MODELS, doc["weights_file_id"])
        i = int(doc["client_index"])
        if local_weights is None or i >= plan.spec.num_clients:
            continue
        batch = plan.landscape_batch(i)
        found.append(_density("global", i, received, batch, loss_fn, seed))
        found.append(_density("local", i, _model(plan, local_weights), batch, loss_fn, seed))
    return tuple(found), server_round


def _density(kind: str, client_index: int | None, model: nn.Module, data: list[Any], loss_fn: nn.Module,
             seed: int) -> Density:
    result = spectral_density(model, loss_fn, data, num_probes=DENSITY_PROBES, lanczos_steps=DENSITY_STEPS, seed=seed,
                              grid_points=400)
    density = np.asarray(result.density, dtype=np.float64)
    return Density(kind, client_index, np.asarray(result.grid, dtype=np.float64),
                   np.where(np.isfinite(density), density, 0.0))


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
