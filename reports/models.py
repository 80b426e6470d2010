"""What the report draws from the server's analysis of the stored models: round 0, trajectory, spectral densities.

The server evaluates the models once, on its measurement thread (`server.analysis`:
the initial model when the experiment is queued, the trajectory and the densities
before the experiment is marked finished), and stores the results through
`stack.records`. This module only reads them into arrays for the figures; a report
never evaluates a model. What is not stored is missing, and ``reasons`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pymongo.database import Database

from stack import records


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
    client_index: int | None  # whose subset (None: the analysis test subset)
    grid: np.ndarray  # (points,) eigenvalues
    density: np.ndarray  # (points,) integrates to 1 on grid


@dataclass(frozen=True)
class ModelExtras:
    """The stored analysis of the models; ``reasons`` says why a part is missing."""

    round0: dict[str, float] | None = None  # {"test_loss", "test_accuracy"} of the initial model, full test split
    trajectory: Trajectory | None = None
    densities: tuple[Density, ...] = ()
    density_round: int | None = None
    density_samples: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # "round0" | "trajectory" | "density" -> why missing


#: Why a part of the analysis is missing, by what the experiment's status says about it.
MISSING_ROUND0 = ("the store holds no evaluation of the initial model (round 0): the server evaluates it when the "
                  "experiment is queued; a store written before it did so has none")
PENDING = "the server computes it once the experiment's last round is measured, before the experiment is finished"
MISSING_AFTER = ("the store holds no {what}: computed by the server before an experiment is finished (a store "
                 "written before it did so, an experiment that failed, or {why})")


def read_extras(db: Database[records.Document], experiment_id: str, *, running: bool) -> ModelExtras:
    """The experiment's stored analysis (`stack.records.read_analysis`) as the figures draw it."""
    analysis = records.read_analysis(db, experiment_id)
    reasons: dict[str, str] = {}
    round0 = None
    initial = analysis.initial_evaluation
    if initial is not None and initial.test_loss is not None and initial.test_accuracy is not None:
        round0 = {"test_loss": initial.test_loss, "test_accuracy": initial.test_accuracy}
    else:
        reasons["round0"] = MISSING_ROUND0
    trajectory = None if analysis.trajectory is None else _trajectory(analysis.trajectory)
    if trajectory is None:
        reasons["trajectory"] = PENDING if running else MISSING_AFTER.format(
            what="trajectory", why="fewer than three global models (rounds 0..2)")
    densities: tuple[Density, ...] = ()
    density_round, density_samples = None, 0
    stored = analysis.spectral_densities
    if stored is not None:
        densities = tuple(Density(c.model, c.client_index, np.asarray(c.grid, dtype=np.float64),
                                  np.asarray(c.density, dtype=np.float64)) for c in stored.curves)
        density_round, density_samples = stored.round, stored.num_samples
    if not densities:
        reasons["density"] = PENDING if running else MISSING_AFTER.format(
            what="spectral densities", why="no measured round with its global models and client models stored")
    return ModelExtras(round0, trajectory, densities, density_round, density_samples, reasons)


def _trajectory(stored: records.TrajectoryAnalysis) -> Trajectory:
    losses = np.array([[np.nan if v is None else v for v in row] for row in stored.losses], dtype=np.float64)
    return Trajectory(
        rounds=stored.rounds,
        coords=np.asarray(stored.coords, dtype=np.float64).reshape(-1, 2),
        explained_variance_ratio=stored.explained_variance_ratio,
        xs=np.asarray(stored.xs, dtype=np.float64),
        ys=np.asarray(stored.ys, dtype=np.float64),
        losses=losses,
        num_samples=stored.num_samples,
    )
