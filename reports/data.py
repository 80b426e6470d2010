"""Read one experiment's documents from the store into plain dataclasses and series.

Documents are the shapes of DEVELOPERS.md ("Store", "Landscape measurements").
Everything is read once; the figures and pages work on these objects only.
A value that is missing, ``null`` or not finite reads as absent, never as 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymongo.database import Database

from reports.models import ModelExtras, read_extras
from stack import records
from stack.records import Document

Path_ = Sequence[str | int]  # keys and list indices into a document, e.g. ("landscape", "local", "trace")


@dataclass(frozen=True)
class Series:
    """Values by round; rounds where the value is absent are left out."""

    rounds: tuple[int, ...]
    values: tuple[float, ...]

    def __bool__(self) -> bool:
        return len(self.rounds) > 0


@dataclass(frozen=True)
class PartitionSummary:
    """One client's share of the data, as the server stored it."""

    client_index: int
    num_train: int
    num_test: int
    gini_index: float | None
    class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    class_frequencies: tuple[float, ...]


@dataclass(frozen=True)
class Surface:
    """A ``pca_surface`` landscape: ``losses`` (len(y), len(x)) over the two principal directions."""

    round: int
    x: np.ndarray  # (nx,)
    y: np.ndarray  # (ny,)
    losses: np.ndarray  # (ny, nx)
    explained_variance_ratio: tuple[float, ...]
    client_points: tuple[tuple[int, float, float], ...]  # (client_index, x, y)
    second_direction: str = "principal"  # "random" when one client leaves no second principal direction
    scale: float | None = None  # the clients' RMS update norm: one axis unit, in parameter space


@dataclass(frozen=True)
class ExperimentData:
    """Everything the report shows about one experiment."""

    experiment_id: str
    description: str
    status: str
    error: str | None
    spec: Document  # the experiment's spec (`ExperimentSpec.to_dict()`)
    clients: tuple[PartitionSummary, ...]
    rounds: tuple[Document, ...]  # `rounds` documents, by round
    client_stats: tuple[Document, ...]  # `client_stats` documents, by (round, client_index)
    surfaces: tuple[Surface, ...]  # by round
    extras: ModelExtras = ModelExtras()  # the server's stored analysis of the models (round 0, trajectory, densities)

    @property
    def num_clients(self) -> int:
        scheme = self.spec.get("partition")
        listed = int(scheme.get("members") or 0) if isinstance(scheme, Mapping) else 0
        return max(len(self.spec.get("target_balance_ratios") or []), listed, len(self.clients))

    @property
    def planned_rounds(self) -> int:
        return int(self.spec.get("rounds") or 0)

    @property
    def landscape_enabled(self) -> bool:
        landscape = self.spec.get("landscape")
        return not isinstance(landscape, Mapping) or bool(landscape.get("enabled", True))

    @property
    def has_landscape(self) -> bool:
        """Whether any landscape measurement was stored."""
        return bool(self.surfaces) or any(
            isinstance(doc.get("landscape"), Mapping) for doc in (*self.rounds, *self.client_stats)
        )

    @property
    def label(self) -> str:
        """The description, or the id when there is none."""
        return self.description or self.experiment_id

    def round_series(self, path: Path_) -> Series:
        """A value of the ``rounds`` documents, e.g. ``("landscape", "gradient_dissimilarity")``."""
        return _series((doc["round"], value_at(doc, path)) for doc in self.rounds)

    def client_series(self, client_index: int, path: Path_) -> Series:
        """A value of one client's ``client_stats`` documents, e.g. ``("local", "test_accuracy")``."""
        return _series(
            (doc["round"], value_at(doc, path)) for doc in self.client_stats if doc["client_index"] == client_index
        )

    def client_mean_series(self, path: Path_) -> Series:
        """Per round, the mean over the clients that have the value."""
        by_round: dict[int, list[float]] = {}
        for doc in self.client_stats:
            value = value_at(doc, path)
            if value is not None:
                by_round.setdefault(doc["round"], []).append(value)
        return _series((r, math.fsum(v) / len(v)) for r, v in by_round.items())

    def round_client_series(self, list_path: Path_, client_index: int, key: str) -> Series:
        """A per-client entry of a list in the ``rounds`` documents (e.g. ``landscape.leave_one_out``)."""
        pairs = []
        for doc in self.rounds:
            entries = _get(doc, list_path)
            if isinstance(entries, list):
                for entry in entries:
                    if isinstance(entry, Mapping) and entry.get("client_index") == client_index:
                        pairs.append((doc["round"], value_at(entry, (key,))))
        return _series(pairs)

    def barrier_series(self, client_index: int, measure: Callable[..., float | None] | None = None) -> Series:
        """The barrier (``linear_barrier``, or ``measure``) of one client's global -> local curve, by round."""
        measure = measure or linear_barrier
        pairs = []
        for doc in self.client_stats:
            curve = interpolation_curve(doc) if doc["client_index"] == client_index else None
            if curve is not None:
                pairs.append((doc["round"], measure(*curve)))
        return _series(pairs)

    def mean_barrier_series(self) -> Series:
        by_round: dict[int, list[float]] = {}
        for doc in self.client_stats:
            curve = interpolation_curve(doc)
            value = linear_barrier(*curve) if curve is not None else None
            if value is not None:
                by_round.setdefault(doc["round"], []).append(value)
        return _series((r, math.fsum(v) / len(v)) for r, v in by_round.items())

    @property
    def running(self) -> bool:
        return self.status in ("queued", "running")

    def client_indices(self) -> list[int]:
        seen = {c.client_index for c in self.clients} | {int(d["client_index"]) for d in self.client_stats}
        return sorted(seen) if seen else list(range(self.num_clients))

    def stats_of(self, server_round: int) -> list[Document]:
        return [doc for doc in self.client_stats if doc["round"] == server_round]

    def unconverged(self, client_index: int | None, model: str = "global") -> Series:
        """The top eigenvalues whose search did not converge, by round: a client's, or the server's (None)."""
        docs = self.rounds if client_index is None else [d for d in self.client_stats if d["client_index"] == client_index]
        return _series(
            (d["round"], value_at(d, ("landscape", model, "top_eigenvalues", 0)))
            for d in docs if _get(d, ("landscape", model, "top_eigenvalues_converged")) is False
        )


def value_at(doc: Any, path: Path_) -> float | None:
    """The finite number at ``path`` in a document, or None."""
    value = _get(doc, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def interpolation_curve(doc: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """The stored ``(alphas, losses)`` of a client's global -> local interpolation, finite points only."""
    interpolation = _get(doc, ("landscape", "interpolation"))
    if not isinstance(interpolation, Mapping):
        return None
    alphas, losses = interpolation.get("alphas"), interpolation.get("losses")
    if not isinstance(alphas, list) or not isinstance(losses, list) or len(alphas) != len(losses):
        return None
    pairs = sorted((float(a), float(v)) for a, v in zip(alphas, losses)
                   if value_at({"a": a}, ("a",)) is not None and value_at({"v": v}, ("v",)) is not None)
    return ([a for a, _ in pairs], [v for _, v in pairs]) if len(pairs) >= 2 else None


#: How the report defines the barrier (Frankle et al. 2020; Entezari et al. 2022), for captions.
BARRIER_DEFINITION = "barrier = max over α of L(α) − [(1 − α)·L(0) + α·L(1)]"
DIP_DEFINITION = "dip = min over α of the same difference"


def _above_line(alphas: Sequence[float], losses: Sequence[float]) -> list[float] | None:
    points = dict(zip(alphas, losses))
    if 0.0 not in points or 1.0 not in points:
        return None
    start, end = points[0.0], points[1.0]
    return [v - ((1.0 - a) * start + a * end) for a, v in points.items()]


def linear_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float | None:
    """Height of the loss path above the straight line between its endpoint losses, at its highest point.

    ``max over alpha of L(alpha) - [(1 - alpha) L(0) + alpha L(1)]`` over the
    stored alphas (Frankle et al. 2020, linear mode connectivity, with the
    linear baseline of Entezari et al. 2022): >= 0, and 0 when the path never
    rises above the line. None without both endpoints.
    """
    heights = _above_line(alphas, losses)
    return None if heights is None else max(heights)


def path_dip(alphas: Sequence[float], losses: Sequence[float]) -> float | None:
    """How far the loss path sinks below that straight line: ``min over alpha`` of the same difference (<= 0)."""
    heights = _above_line(alphas, losses)
    return None if heights is None else min(heights)


def pac_bayes_text(doc: Any, path: Path_, decimals: int = 3) -> str:
    """A stored PAC-Bayes document as text: ``sigma [low, high]`` (95%), "saturated", or "–" when absent."""
    entry = _get(doc, path)
    if not isinstance(entry, Mapping):
        return "–"
    if entry.get("saturated") is True:
        return "saturated"
    sigma, low, high = (value_at(entry, (key,)) for key in ("sigma", "sigma_low", "sigma_high"))
    if sigma is None:
        return "–"
    if low is None:
        return f"{sigma:.{decimals}g}"
    return f"{sigma:.{decimals}g} [{low:.{decimals}g}, {'∞' if high is None else f'{high:.{decimals}g}'}]"


def _get(doc: Any, path: Path_) -> Any:
    for key in path:
        if isinstance(key, int) and isinstance(doc, list) and -len(doc) <= key < len(doc):
            doc = doc[key]
        elif isinstance(key, str) and isinstance(doc, Mapping):
            doc = doc.get(key)
        else:
            return None
    return doc


def _series(pairs: Iterable[tuple[int, float | None]]) -> Series:
    kept = sorted((int(r), v) for r, v in pairs if v is not None)
    return Series(tuple(r for r, _ in kept), tuple(v for _, v in kept))


# --- loading -----------------------------------------------------------------


def list_experiment_ids(db: Database[Any], *, status: str | None = "finished") -> list[str]:
    """Ids of the experiments with this status (all when None), oldest first."""
    return records.experiment_ids(db, None if status is None else [status])


def load_experiment(db: Database[Any], experiment_id: str) -> ExperimentData:
    """Read an experiment, its members, rounds, client stats, surfaces and analysis through `stack.records`.

    Raises ValueError naming ``experiment_id`` when the store has no such experiment.
    """
    records.check_schema(db)
    experiment = records.read_experiment(db, experiment_id)
    if experiment is None:
        known = ", ".join(list_experiment_ids(db, status=None)) or "none"
        raise ValueError(f"experiment_id: no experiment {experiment_id!r} in the store (known: {known})")
    arrays = records.read_round_arrays(db, experiment_id)
    surfaces = (_surface(s) for s in records.read_landscapes(db, experiment_id, records.SURFACE))
    return ExperimentData(
        experiment_id=experiment_id,
        description=experiment.spec.description,
        status=experiment.status,
        error=experiment.error,
        spec=experiment.spec.to_dict(),
        clients=tuple(_partition(member) for member in records.read_members(db, experiment_id)),
        rounds=tuple(_round_tree(r, arrays.get(r.round, {})) for r in records.read_rounds(db, experiment_id)),
        client_stats=tuple(stats.tree() for stats in records.read_client_stats(db, experiment_id)),
        surfaces=tuple(s for s in surfaces if s is not None),
        extras=read_extras(db, experiment_id, running=experiment.status in records.ACTIVE),
    )


def _round_tree(round_record: records.RoundRecord, arrays: Mapping[str, Mapping[str, Any]]) -> Document:
    """A round as the figures read it: its fields, with its `landscapes` arrays (by kind) in its landscape."""
    tree = round_record.tree()
    landscape = tree.get("landscape")
    if arrays and isinstance(landscape, Mapping):
        tree["landscape"] = {**landscape, **{kind: dict(content) for kind, content in arrays.items()}}
    return tree


def _partition(member: records.MemberRecord) -> PartitionSummary:
    return PartitionSummary(
        client_index=member.client_index,
        num_train=member.num_train,
        num_test=member.num_test,
        gini_index=value_at({"gini": member.gini_index}, ("gini",)),
        class_counts=member.class_counts,
        test_class_counts=member.test_class_counts,
        class_frequencies=member.class_frequencies,
    )


def _surface(landscape: records.LandscapeRecord) -> Surface | None:
    """A surface, or None when its grid is malformed (it is then left out)."""
    doc = landscape.content
    try:
        x = np.asarray(doc["x"], dtype=np.float64)
        y = np.asarray(doc["y"], dtype=np.float64)
        losses = np.asarray(doc["losses"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if x.ndim != 1 or y.ndim != 1 or losses.shape != (y.size, x.size) or x.size < 2 or y.size < 2:
        return None
    points = tuple(
        (int(p["client_index"]), float(p["x"]), float(p["y"]))
        for p in doc.get("client_points") or ()
        if value_at(p, ("x",)) is not None and value_at(p, ("y",)) is not None
    )
    return Surface(
        round=landscape.round,
        x=x,
        y=y,
        losses=losses,
        explained_variance_ratio=tuple(float(v) for v in doc.get("explained_variance_ratio") or ()),
        client_points=points,
        second_direction=str(doc.get("second_direction") or "principal"),
        scale=value_at(doc, ("scale",)),
    )
