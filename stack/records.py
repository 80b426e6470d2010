"""Every document the stack stores: typed records, their collections and GridFS buckets.

The one owner of the store's schema (DEVELOPERS.md "Store"). The server writes
only through these records and the reports and the export read only through
them; nothing else spells a collection, a bucket or a document's key.

Documents open on who and when (identity fields first, then times as BSON
dates), so a person reading them in Mongo Express finds their way; bulky arrays
(loss surfaces, pairwise barrier matrices) live in `landscapes`, one document
per round and kind, referenced from the round's landscape by id. Records hold
times as float seconds since the epoch (the coordinator's clock); `to_doc`
writes them as BSON datetimes (UTC, millisecond precision) and `from_doc` reads
them back.

A store written by an earlier release is upgraded in place by
`python main.py upgrade-store` (`stack.store_upgrade`); `check_schema` refuses
to work on one that was not, naming that command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from pymongo.database import Database

if TYPE_CHECKING:  # imported where a spec is parsed: reading the other records needs no torch
    from fedland.spec import ExperimentSpec

__all__ = [
    "ACTIVE",
    "CLIENT_MODELS",
    "MEMBER_STATES",
    "MemberStateFile",
    "CLIENT_STATS",
    "COLLECTIONS",
    "DONE",
    "Document",
    "EXPERIMENTS",
    "LANDSCAPES",
    "MEMBERS",
    "MODELS",
    "REFUSED_UPDATES",
    "ROUNDS",
    "SCHEMA_VERSION",
    "ClientModelFile",
    "ClientStatsRecord",
    "DensityCurve",
    "ExperimentAnalysis",
    "ExperimentRecord",
    "InitialEvaluation",
    "LandscapeRecord",
    "MemberRecord",
    "ModelFile",
    "RefusedUpdateRecord",
    "RoundRecord",
    "SchemaError",
    "SpectralDensities",
    "StoredFile",
    "StudyRecords",
    "TrajectoryAnalysis",
    "WorkerRecord",
    "check_schema",
    "from_date",
    "to_date",
]

#: A stored document as pymongo reads and writes it (the one such alias of the stack).
Document = dict[str, Any]

# Collections -------------------------------------------------------------------
EXPERIMENTS = "experiments"  # ExperimentRecord
MEMBERS = "members"  # MemberRecord: one per experiment x member (its partition and assignment)
WORKERS = "workers"  # WorkerRecord: one per registered worker process
CLIENT_STATS = "client_stats"  # ClientStatsRecord: one per experiment x round x reporting member
ROUNDS = "rounds"  # RoundRecord: one per aggregated round
LANDSCAPES = "landscapes"  # LandscapeRecord: a round's bulky arrays, one per experiment x round x kind
REFUSED_UPDATES = "refused_updates"  # RefusedUpdateRecord: an update the server refused, and why
STORE_INFO = "store_info"  # one document: the schema version of the store
COLLECTIONS = (EXPERIMENTS, MEMBERS, WORKERS, CLIENT_STATS, ROUNDS, LANDSCAPES, REFUSED_UPDATES, STORE_INFO)

# GridFS buckets ----------------------------------------------------------------
MODELS = "models"  # ModelFile: a global model after a round (0: the initial one), or a strategy's state
CLIENT_MODELS = "client_models"  # ClientModelFile: a member's update the server needs later
MEMBER_STATES = "member_states"  # MemberStateFile: a member's client-algorithm state and message after a round

#: The schema `to_doc` writes. Version 1 (no `store_info`) is the previous release's.
SCHEMA_VERSION = 2

ACTIVE = ("queued", "running")
DONE = ("finished", "failed")


class SchemaError(RuntimeError):
    """The store holds documents of another schema version (upgrade it, or use a newer release)."""


# Times -----------------------------------------------------------------------


def to_date(seconds: float | None) -> datetime | None:
    """Seconds since the epoch as the naive UTC datetime pymongo stores as a BSON date."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(float(seconds), tz=timezone.utc).replace(tzinfo=None)


def from_date(value: Any) -> float | None:
    """A stored time (BSON date, or the previous release's float seconds) as seconds since the epoch."""
    if value is None:
        return None
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return aware.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return from_date(datetime.fromisoformat(value))
    raise TypeError(f"not a stored time: {value!r}")


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts, recursively: what pymongo stores."""
    if isinstance(value, Mapping):
        return {str(key): _plain(child) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(child) for child in value]
    return value


def _changes(record_type: type[Any], dates: frozenset[str], values: Mapping[str, Any]) -> Document:
    """A `$set` of some fields of a record, by their field names, times converted."""
    names = {f.name for f in dataclasses.fields(record_type)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"{record_type.__name__} has no field {unknown[0]!r}")
    return {key: to_date(value) if key in dates else _plain(value) for key, value in values.items()}


# Records -----------------------------------------------------------------------


_EXPERIMENT_DATES = frozenset({"created_at", "started_at", "finished_at"})


@dataclass(frozen=True)
class ExperimentRecord:
    """An experiment: its spec and where it stands (`experiments`, `_id` = `id`)."""

    id: str
    spec: ExperimentSpec
    status: str = "queued"  # queued | running | finished | failed
    current_round: int = 1  # the round being trained, 1..rounds (stays at rounds once finished)
    created_at: float = 0.0
    started_at: float | None = None  # the first member assigned
    finished_at: float | None = None  # after the last round's measurements, or when it failed
    error: str | None = None  # why it failed

    def to_doc(self) -> Document:
        from fedland.replicates import replicate_group
        from fedland.spec import fingerprint

        return {
            "_id": self.id,
            "description": self.spec.description,  # what a person looks for first; the spec owns it
            "status": self.status,
            "current_round": self.current_round,
            "rounds": self.spec.rounds,
            "created_at": to_date(self.created_at),
            "started_at": to_date(self.started_at),
            "finished_at": to_date(self.finished_at),
            "error": self.error,
            "fingerprint": fingerprint(self.spec),  # derived from the spec, stored to find a twin by one query
            "group_id": replicate_group(self.spec),  # derived too: the replicates across seeds, by one query
            "spec": self.spec.with_id(self.id).to_dict(),
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ExperimentRecord:
        """The record of a stored document; its `fingerprint` and `group_id` are not read (the spec gives them)."""
        from fedland.spec import ExperimentSpec

        experiment_id = str(doc["_id"])
        return cls(
            id=experiment_id,
            spec=ExperimentSpec.from_dict(doc["spec"]).with_id(experiment_id),
            status=str(doc["status"]),
            current_round=int(doc["current_round"]),
            created_at=from_date(doc["created_at"]) or 0.0,
            started_at=from_date(doc.get("started_at")),
            finished_at=from_date(doc.get("finished_at")),
            error=doc.get("error"),
        )

    def replace(self, **changes: Any) -> ExperimentRecord:
        return dataclasses.replace(self, **changes)

    @classmethod
    def fingerprint_change(cls, doc: Mapping[str, Any]) -> Document:
        """The `$set` that gives a stored experiment document written without one its `fingerprint`."""
        return {"fingerprint": cls.from_doc(doc).to_doc()["fingerprint"]}

    @classmethod
    def changed_doc(cls, doc: Mapping[str, Any], changes: Mapping[str, Any]) -> Document:
        """A stored experiment document with these fields (not `id` or `spec`) changed, times as dates."""
        values = _changes(cls, _EXPERIMENT_DATES, changes)
        if {"id", "spec"} & set(values):
            raise KeyError("an experiment's id and spec never change")
        return {**doc, **values}

    @classmethod
    def matches(cls, doc: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
        """Whether a stored experiment document holds these field values."""
        return all(doc.get(name) == value for name, value in _changes(cls, _EXPERIMENT_DATES, where).items())


@dataclass(frozen=True)
class MemberRecord:
    """A member of a federation: its data partition and who trains it (`members`)."""

    experiment_id: str
    client_index: int
    worker_id: str | None = None  # the worker training it in `assigned_round`
    assigned_round: int | None = None
    assigned_at: float | None = None
    reported_round: int = 0  # the last round it reported
    num_train: int = 0
    num_test: int = 0
    gini_index: float = 0.0
    partition_digest: str = ""
    class_counts: tuple[int, ...] = ()
    test_class_counts: tuple[int, ...] = ()
    class_frequencies: tuple[float, ...] = ()

    DATES: ClassVar[frozenset[str]] = frozenset({"assigned_at"})

    @classmethod
    def of_partition(cls, experiment_id: str, stats: Mapping[str, Any]) -> MemberRecord:
        """A new member from `fedland.partition.ClientPartition.to_stats()`."""
        return cls(
            experiment_id=experiment_id,
            client_index=int(stats["client_index"]),
            num_train=int(stats["num_train"]),
            num_test=int(stats["num_test"]),
            gini_index=float(stats["gini_index"]),
            partition_digest=str(stats["partition_digest"]),
            class_counts=_ints(stats["class_counts"]),
            test_class_counts=_ints(stats["test_class_counts"]),
            class_frequencies=tuple(float(f) for f in stats["class_frequencies"]),
        )

    def to_doc(self) -> Document:
        doc = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        doc["assigned_at"] = to_date(self.assigned_at)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> MemberRecord:
        return cls(
            experiment_id=str(doc["experiment_id"]),
            client_index=int(doc["client_index"]),
            worker_id=doc.get("worker_id"),
            assigned_round=None if doc.get("assigned_round") is None else int(doc["assigned_round"]),
            assigned_at=from_date(doc.get("assigned_at")),
            reported_round=int(doc.get("reported_round") or 0),
            num_train=int(doc["num_train"]),
            num_test=int(doc["num_test"]),
            gini_index=float(doc["gini_index"]),
            partition_digest=str(doc["partition_digest"]),
            class_counts=_ints(doc.get("class_counts") or ()),
            test_class_counts=_ints(doc.get("test_class_counts") or ()),
            class_frequencies=tuple(float(f) for f in doc.get("class_frequencies") or ()),
        )

    @classmethod
    def changes(cls, **values: Any) -> Document:
        return _changes(cls, cls.DATES, values)

    @staticmethod
    def key(experiment_id: str, client_index: int | None = None) -> Document:
        """The filter of one member (or of every member of the experiment)."""
        key: Document = {"experiment_id": experiment_id}
        if client_index is not None:
            key["client_index"] = client_index
        return key


@dataclass(frozen=True)
class WorkerRecord:
    """A registered worker process (`workers`)."""

    worker_id: str
    hostname: str
    pid: int
    status: str = "alive"  # alive | lost
    registered_at: float = 0.0
    last_seen: float = 0.0  # flushed from the coordinator's memory every few seconds
    status_at: float | None = None
    secret_sha256: str | None = None  # of the worker's own secret (server/auth.py); None: registered before secrets

    DATES: ClassVar[frozenset[str]] = frozenset({"registered_at", "last_seen", "status_at"})

    def to_doc(self) -> Document:
        return {
            "worker_id": self.worker_id,
            "hostname": self.hostname,
            "pid": self.pid,
            "status": self.status,
            "registered_at": to_date(self.registered_at),
            "last_seen": to_date(self.last_seen),
            "status_at": to_date(self.status_at),
            "secret_sha256": self.secret_sha256,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> WorkerRecord:
        return cls(
            worker_id=str(doc["worker_id"]),
            hostname=str(doc["hostname"]),
            pid=int(doc["pid"]),
            status=str(doc.get("status") or "alive"),
            registered_at=from_date(doc.get("registered_at")) or 0.0,
            last_seen=from_date(doc.get("last_seen")) or 0.0,
            status_at=from_date(doc.get("status_at")),
            secret_sha256=doc.get("secret_sha256"),
        )

    @classmethod
    def changes(cls, **values: Any) -> Document:
        return _changes(cls, cls.DATES, values)

    @staticmethod
    def key(worker_id: str) -> Document:
        return {"worker_id": worker_id}

    @staticmethod
    def with_secret() -> Document:
        """The filter of workers that hold a secret."""
        return {"secret_sha256": {"$type": "string"}}


#: The keys of a worker's stats object (checked by `server.validation.check_stats`), in stored order.
STATS_KEYS = ("duration_s", "global", "local", "train_loss_per_epoch", "landscape")


@dataclass(frozen=True)
class ClientStatsRecord:
    """One member's report of one round (`client_stats`): who, when, and the stats its worker measured.

    `stats` holds the worker's validated stats object (`STATS_KEYS`): durations,
    the received global and the trained local model's evaluations, the training
    loss per epoch and the landscape measurements (`fedland.measure`'s documents).
    """

    experiment_id: str
    round: int
    client_index: int
    worker_id: str
    received_at: float
    num_examples: int
    weights_file_id: str | None = None  # GridFS `client_models`; None: the update lives only in the round's sum
    stats: Mapping[str, Any] = field(default_factory=dict)
    # GridFS `member_states`: the client algorithm's new state and message (None: it sent none; not written then)
    state_file_id: str | None = None

    DATES: ClassVar[frozenset[str]] = frozenset({"received_at"})

    def to_doc(self) -> Document:
        return {
            "experiment_id": self.experiment_id,
            "round": self.round,
            "client_index": self.client_index,
            "worker_id": self.worker_id,
            "received_at": to_date(self.received_at),
            "num_examples": self.num_examples,
            "weights_file_id": self.weights_file_id,
            **({} if self.state_file_id is None else {"state_file_id": self.state_file_id}),
            **{key: _plain(self.stats[key]) for key in STATS_KEYS if key in self.stats},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ClientStatsRecord:
        file_id = doc.get("weights_file_id")
        return cls(
            experiment_id=str(doc["experiment_id"]),
            round=int(doc["round"]),
            client_index=int(doc["client_index"]),
            worker_id=str(doc.get("worker_id") or ""),
            received_at=from_date(doc.get("received_at")) or 0.0,
            num_examples=int(doc["num_examples"]),
            weights_file_id=None if file_id is None else str(file_id),
            stats={key: doc[key] for key in STATS_KEYS if key in doc},
            state_file_id=None if doc.get("state_file_id") is None else str(doc["state_file_id"]),
        )

    @property
    def landscape(self) -> Mapping[str, Any] | None:
        value = self.stats.get("landscape")
        return value if isinstance(value, Mapping) else None

    def tree(self) -> Document:
        """The stored fields by name (identity, then stats): what a report's path reads."""
        return {
            "experiment_id": self.experiment_id, "round": self.round, "client_index": self.client_index,
            "worker_id": self.worker_id, "received_at": self.received_at, "num_examples": self.num_examples,
            "weights_file_id": self.weights_file_id, **self.stats,
        }

    @staticmethod
    def key(experiment_id: str, server_round: int | None = None, client_index: int | None = None) -> Document:
        key: Document = {"experiment_id": experiment_id}
        if server_round is not None:
            key["round"] = server_round
        if client_index is not None:
            key["client_index"] = client_index
        return key


@dataclass(frozen=True)
class RoundRecord:
    """An aggregated round (`rounds`): the new global model on the full test split, and its files.

    `landscape` is set later, once, by the server's measurement (`None` until
    then): `fedland.measure`'s round document, with `surface_id` and
    `pairwise_barriers_id` naming its `landscapes` documents, or ``{"error": text}``.
    """

    experiment_id: str
    round: int
    started_at: float  # end of the previous round, or the experiment's start
    finished_at: float
    test_loss: float
    test_accuracy: float
    num_test: int
    selected: tuple[int, ...]  # the members drawn
    participants: tuple[int, ...]  # those whose update was aggregated (fewer only after a deadline)
    num_examples: int
    strategy: str
    duration_s: float
    aggregation_s: float
    model_file_id: str  # GridFS `models`: the global model after this round
    strategy_state_file_id: str  # GridFS `models`: the strategy's arrays after this round
    landscape: Mapping[str, Any] | None = None

    DATES: ClassVar[frozenset[str]] = frozenset({"started_at", "finished_at"})

    def to_doc(self) -> Document:
        doc: Document = {
            "experiment_id": self.experiment_id,
            "round": self.round,
            "started_at": to_date(self.started_at),
            "finished_at": to_date(self.finished_at),
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "num_test": self.num_test,
            "num_examples": self.num_examples,
            "selected": list(self.selected),
            "participants": list(self.participants),
            "strategy": self.strategy,
            "duration_s": self.duration_s,
            "aggregation_s": self.aggregation_s,
            "model_file_id": self.model_file_id,
            "strategy_state_file_id": self.strategy_state_file_id,
        }
        if self.landscape is not None:
            doc["landscape"] = _plain(self.landscape)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RoundRecord:
        return cls(
            experiment_id=str(doc["experiment_id"]),
            round=int(doc["round"]),
            started_at=from_date(doc.get("started_at")) or 0.0,
            finished_at=from_date(doc.get("finished_at")) or 0.0,
            test_loss=float(doc["test_loss"]),
            test_accuracy=float(doc["test_accuracy"]),
            num_test=int(doc.get("num_test") or 0),
            selected=_ints(doc.get("selected") or ()),
            participants=_ints(doc.get("participants") or ()),
            num_examples=int(doc.get("num_examples") or 0),
            strategy=str(doc.get("strategy") or ""),
            duration_s=float(doc.get("duration_s") or 0.0),
            aggregation_s=float(doc.get("aggregation_s") or 0.0),
            model_file_id=str(doc["model_file_id"]),
            strategy_state_file_id=str(doc["strategy_state_file_id"]),
            landscape=doc.get("landscape"),
        )

    def tree(self) -> Document:
        """The stored fields by name: what a report's path reads (times as seconds)."""
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.landscape is None:
            del tree["landscape"]
        return tree

    @staticmethod
    def key(experiment_id: str, server_round: int | None = None) -> Document:
        key: Document = {"experiment_id": experiment_id}
        if server_round is not None:
            key["round"] = server_round
        return key


#: Kinds of `landscapes` documents (the round's landscape names them by `surface_id`, `pairwise_barriers_id`).
SURFACE = "pca_surface"
PAIRWISE_BARRIERS = "pairwise_barriers"
#: Kinds of the experiment's analysis (`server.analysis`), read by kind: no round's landscape names them.
INITIAL_EVALUATION = "initial_evaluation"  # round 0: the initial model on the full test split
TRAJECTORY = "trajectory"  # round R: the global models of rounds 0..R on their PCA plane
SPECTRAL_DENSITY = "spectral_density"  # the last measured round: Hessian eigenvalue densities
ANALYSIS_KINDS = (INITIAL_EVALUATION, TRAJECTORY, SPECTRAL_DENSITY)


@dataclass(frozen=True)
class LandscapeRecord:
    """A round's bulky arrays (`landscapes`): a loss surface or a pairwise barrier matrix.

    `content` is `fedland.measure`'s document of that kind (`pca_surface`,
    `pairwise_barriers`); the round's landscape names it by id.
    """

    experiment_id: str
    round: int
    kind: str
    content: Mapping[str, Any] = field(default_factory=dict)

    def to_doc(self) -> Document:
        return {"experiment_id": self.experiment_id, "round": self.round, "kind": self.kind, **_plain(self.content)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> LandscapeRecord:
        identity = ("_id", "experiment_id", "round", "kind")
        return cls(
            experiment_id=str(doc["experiment_id"]),
            round=int(doc["round"]),
            kind=str(doc["kind"]),
            content={key: value for key, value in doc.items() if key not in identity},
        )

    def key(self) -> Document:
        return {"experiment_id": self.experiment_id, "round": self.round, "kind": self.kind}


def _floats(values: Sequence[Any]) -> tuple[float | None, ...]:
    """Stored numbers as floats, `null` (a non-finite value) as None."""
    return tuple(None if value is None else float(value) for value in values)


@dataclass(frozen=True)
class InitialEvaluation:
    """The initial (round 0) model on the full test split (`landscapes`, kind `INITIAL_EVALUATION`, round 0)."""

    test_loss: float | None
    test_accuracy: float | None
    num_test: int

    def record(self, experiment_id: str) -> LandscapeRecord:
        return LandscapeRecord(experiment_id, 0, INITIAL_EVALUATION, dataclasses.asdict(self))

    @classmethod
    def from_record(cls, landscape: LandscapeRecord) -> InitialEvaluation:
        doc = landscape.content
        loss, accuracy = _floats([doc.get("test_loss"), doc.get("test_accuracy")])
        return cls(loss, accuracy, int(doc["num_test"]))


@dataclass(frozen=True)
class TrajectoryAnalysis:
    """The global models of rounds 0..R on the first two PCs of ``theta_r - theta_R`` (`landscapes`, kind `TRAJECTORY`).

    Stored at round R; a later analysis of the same experiment replaces it.
    """

    rounds: tuple[int, ...]
    coords: tuple[tuple[float, float], ...]  # (len(rounds), 2): along PC 1 and PC 2, parameter-space units
    explained_variance_ratio: tuple[float, float]
    xs: tuple[float, ...]  # (n,) contour grid along PC 1, centred on the last model
    ys: tuple[float, ...]  # (n,)
    losses: tuple[tuple[float | None, ...], ...]  # (n, n): losses[j][i] at (xs[i], ys[j]); None where not finite
    num_samples: int  # test examples of the contour losses

    def record(self, experiment_id: str) -> LandscapeRecord:
        return LandscapeRecord(experiment_id, self.rounds[-1], TRAJECTORY, dataclasses.asdict(self))

    @classmethod
    def from_record(cls, landscape: LandscapeRecord) -> TrajectoryAnalysis:
        doc = landscape.content
        first, second = (float(v) for v in doc["explained_variance_ratio"])
        return cls(
            rounds=_ints(doc["rounds"]),
            coords=tuple((float(x), float(y)) for x, y in doc["coords"]),
            explained_variance_ratio=(first, second),
            xs=tuple(float(v) for v in doc["xs"]),
            ys=tuple(float(v) for v in doc["ys"]),
            losses=tuple(_floats(row) for row in doc["losses"]),
            num_samples=int(doc["num_samples"]),
        )


@dataclass(frozen=True)
class DensityCurve:
    """A Hessian eigenvalue density of one model on one data subset."""

    model: str  # "global" or "local"
    client_index: int | None  # whose landscape subset; None: the analysis test subset
    grid: tuple[float, ...]  # (points,) eigenvalues
    density: tuple[float, ...]  # (points,) integrates to 1 on grid; 0 where not finite


@dataclass(frozen=True)
class SpectralDensities:
    """The densities of one measured round (`landscapes`, kind `SPECTRAL_DENSITY`, at that round)."""

    round: int
    num_samples: int  # of the global model's test subset (the clients': their landscape subsets)
    curves: tuple[DensityCurve, ...]

    def record(self, experiment_id: str) -> LandscapeRecord:
        content = {"num_samples": self.num_samples, "curves": [dataclasses.asdict(c) for c in self.curves]}
        return LandscapeRecord(experiment_id, self.round, SPECTRAL_DENSITY, content)

    @classmethod
    def from_record(cls, landscape: LandscapeRecord) -> SpectralDensities:
        doc = landscape.content
        curves = tuple(
            DensityCurve(
                model=str(c["model"]),
                client_index=None if c.get("client_index") is None else int(c["client_index"]),
                grid=tuple(float(v) for v in c["grid"]),
                density=tuple(float(v) for v in c["density"]),
            )
            for c in doc["curves"]
        )
        return cls(landscape.round, int(doc["num_samples"]), curves)


@dataclass(frozen=True)
class RefusedUpdateRecord:
    """An update the server refused after its member was identified, and why (`refused_updates`)."""

    experiment_id: str
    round: int
    client_index: int
    worker_id: str
    refused_at: float
    field: str  # the input that broke a rule (e.g. ``weights['fc1.weight']``)
    rule: str

    def to_doc(self) -> Document:
        return {
            "experiment_id": self.experiment_id,
            "round": self.round,
            "client_index": self.client_index,
            "worker_id": self.worker_id,
            "refused_at": to_date(self.refused_at),
            "field": self.field,
            "rule": self.rule,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RefusedUpdateRecord:
        return cls(
            experiment_id=str(doc["experiment_id"]),
            round=int(doc["round"]),
            client_index=int(doc["client_index"]),
            worker_id=str(doc["worker_id"]),
            refused_at=from_date(doc["refused_at"]) or 0.0,
            field=str(doc["field"]),
            rule=str(doc["rule"]),
        )


# GridFS files ------------------------------------------------------------------

GLOBAL = "global"  # ModelFile kinds
STRATEGY_STATE = "strategy_state"


@dataclass(frozen=True)
class ModelFile:
    """The metadata of a `models` file: a global model or strategy state after `round` (0: initial)."""

    experiment_id: str
    round: int
    kind: str  # GLOBAL | STRATEGY_STATE

    @property
    def filename(self) -> str:
        return f"{self.experiment_id}-{self.kind}-{self.round}.safetensors"

    def metadata(self) -> Document:
        return {"experiment_id": self.experiment_id, "round": self.round, "kind": self.kind}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelFile:
        return cls(str(metadata["experiment_id"]), int(metadata["round"]), str(metadata["kind"]))

    @staticmethod
    def query(experiment_id: str, server_round: int, kind: str) -> Document:
        """The filter of a bucket's files collection that finds these files."""
        return {"metadata.experiment_id": experiment_id, "metadata.round": server_round, "metadata.kind": kind}


@dataclass(frozen=True)
class MemberStateFile:
    """The metadata of a `member_states` file: what member `client_index`'s client algorithm returned in `round`.

    The file holds its new persistent state and its message to the strategy
    (``stack.wire.encode_member_state``); the member's `ClientStatsRecord` of that
    round references it (``state_file_id``), so it lives and goes with the update.
    """

    experiment_id: str
    round: int
    client_index: int

    @property
    def filename(self) -> str:
        return f"{self.experiment_id}-client{self.client_index}-state-{self.round}.safetensors"

    def metadata(self) -> Document:
        return {"experiment_id": self.experiment_id, "round": self.round, "client_index": self.client_index}


@dataclass(frozen=True)
class ClientModelFile:
    """The metadata of a `client_models` file: a member's update of a round."""

    experiment_id: str
    round: int
    client_index: int

    @property
    def filename(self) -> str:
        return f"{self.experiment_id}-client{self.client_index}-{self.round}.safetensors"

    def metadata(self) -> Document:
        return {"experiment_id": self.experiment_id, "round": self.round, "client_index": self.client_index}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ClientModelFile:
        return cls(str(metadata["experiment_id"]), int(metadata["round"]), int(metadata["client_index"]))


# Schema ------------------------------------------------------------------------


def schema_version(db: Database[Document]) -> int | None:
    """The store's schema version: `SCHEMA_VERSION` or older; None for an empty store."""
    info = db[STORE_INFO].find_one({"_id": "schema"})
    if info is not None:
        return int(info["version"])
    if db[EXPERIMENTS].find_one({}, {"_id": 1}) is None:
        return None
    return 1


def check_schema(db: Database[Document], *, claim: bool = False) -> None:
    """Refuse a store of another schema version, naming the way out; `claim` marks an empty store as current."""
    version = schema_version(db)
    if version is None:
        if claim:
            db[STORE_INFO].update_one({"_id": "schema"}, {"$set": {"version": SCHEMA_VERSION}}, upsert=True)
        return
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the store {db.name!r} was written by an earlier fedland release (schema {version}, "
            f"this release reads {SCHEMA_VERSION}): upgrade it in place with `python main.py upgrade-store`"
        )
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the store {db.name!r} was written by a newer fedland release (schema {version}, "
            f"this release reads {SCHEMA_VERSION}): use that release"
        )


def mark_schema(db: Database[Document], version: int = SCHEMA_VERSION) -> None:
    db[STORE_INFO].update_one({"_id": "schema"}, {"$set": {"version": version}}, upsert=True)


# Reading (the reports, the export and the server's reads) ----------------------------


def _sorted(cursor: Any, keys: Sequence[tuple[str, int]]) -> Iterator[Document]:
    return iter(cursor.sort(list(keys)))


def read_experiment(db: Database[Document], experiment_id: str) -> ExperimentRecord | None:
    doc = db[EXPERIMENTS].find_one({"_id": experiment_id})
    return None if doc is None else ExperimentRecord.from_doc(doc)


def read_experiments(db: Database[Document], statuses: Sequence[str] | None = None) -> list[ExperimentRecord]:
    """Experiments with one of these statuses (every one when None), oldest first."""
    query: Document = {} if statuses is None else {"status": {"$in": list(statuses)}}
    cursor = db[EXPERIMENTS].find(query)
    return [ExperimentRecord.from_doc(doc) for doc in _sorted(cursor, [("created_at", 1), ("_id", 1)])]


def read_unfinished_twin(db: Database[Document], spec_fingerprint: str) -> ExperimentRecord | None:
    """The oldest queued or running experiment whose spec has this `fedland.spec.fingerprint`, if any."""
    cursor = db[EXPERIMENTS].find({"fingerprint": spec_fingerprint, "status": {"$in": list(ACTIVE)}})
    return next((ExperimentRecord.from_doc(doc) for doc in _sorted(cursor, [("created_at", 1), ("_id", 1)])), None)


def experiments_without_fingerprint(db: Database[Document]) -> list[Document]:
    """Stored experiment documents written before fingerprints were stored (`stack.store_upgrade` adds them)."""
    return list(db[EXPERIMENTS].find({"fingerprint": {"$exists": False}}))


def experiment_ids(db: Database[Document], statuses: Sequence[str] | None = None) -> list[str]:
    """Ids of the experiments with one of these statuses (every one when None), oldest first, without parsing."""
    query: Document = {} if statuses is None else {"status": {"$in": list(statuses)}}
    cursor = db[EXPERIMENTS].find(query, {"_id": 1})
    return [str(doc["_id"]) for doc in _sorted(cursor, [("created_at", 1), ("_id", 1)])]


def read_members(
    db: Database[Document], experiment_id: str, client_indices: Sequence[int] | None = None
) -> list[MemberRecord]:
    """The experiment's stored members (all, or those of `client_indices`), by client_index."""
    where = MemberRecord.key(experiment_id)
    if client_indices is not None:
        where["client_index"] = {"$in": [int(i) for i in client_indices]}
    cursor = db[MEMBERS].find(where)
    return [MemberRecord.from_doc(doc) for doc in _sorted(cursor, [("client_index", 1)])]


def read_client_stats(
    db: Database[Document], experiment_id: str, server_round: int | None = None
) -> list[ClientStatsRecord]:
    """The reports of one round (or of all), by (round, client_index)."""
    cursor = db[CLIENT_STATS].find(ClientStatsRecord.key(experiment_id, server_round))
    return [ClientStatsRecord.from_doc(doc) for doc in _sorted(cursor, [("round", 1), ("client_index", 1)])]


def read_round(db: Database[Document], experiment_id: str, server_round: int) -> RoundRecord | None:
    doc = db[ROUNDS].find_one(RoundRecord.key(experiment_id, server_round))
    return None if doc is None else RoundRecord.from_doc(doc)


def read_rounds(db: Database[Document], experiment_id: str) -> list[RoundRecord]:
    cursor = db[ROUNDS].find(RoundRecord.key(experiment_id))
    return [RoundRecord.from_doc(doc) for doc in _sorted(cursor, [("round", 1)])]


def read_refused_updates(db: Database[Document], experiment_id: str) -> list[RefusedUpdateRecord]:
    """The experiment's refused updates, by round then time."""
    cursor = db[REFUSED_UPDATES].find({"experiment_id": experiment_id})
    return [RefusedUpdateRecord.from_doc(doc) for doc in _sorted(cursor, [("round", 1), ("refused_at", 1)])]


def read_landscapes(db: Database[Document], experiment_id: str, kind: str) -> list[LandscapeRecord]:
    cursor = db[LANDSCAPES].find({"experiment_id": experiment_id, "kind": kind})
    return [LandscapeRecord.from_doc(doc) for doc in _sorted(cursor, [("round", 1)])]


def read_round_arrays(db: Database[Document], experiment_id: str) -> dict[int, dict[str, Mapping[str, Any]]]:
    """Per round, its `landscapes` arrays by kind, surfaces and analysis excepted (`read_landscapes` gives those)."""
    arrays: dict[int, dict[str, Mapping[str, Any]]] = {}
    cursor = db[LANDSCAPES].find({"experiment_id": experiment_id, "kind": {"$nin": [SURFACE, *ANALYSIS_KINDS]}})
    for doc in _sorted(cursor, [("round", 1), ("kind", 1)]):
        landscape = LandscapeRecord.from_doc(doc)
        arrays.setdefault(landscape.round, {})[landscape.kind] = landscape.content
    return arrays


@dataclass(frozen=True)
class ExperimentAnalysis:
    """What the server's analysis stored for an experiment; None where it is not stored."""

    initial_evaluation: InitialEvaluation | None = None
    trajectory: TrajectoryAnalysis | None = None
    spectral_densities: SpectralDensities | None = None


def read_analysis(db: Database[Document], experiment_id: str) -> ExperimentAnalysis:
    """The experiment's stored analysis (`INITIAL_EVALUATION`, the latest `TRAJECTORY` and `SPECTRAL_DENSITY`)."""
    found: dict[str, LandscapeRecord] = {}
    cursor = db[LANDSCAPES].find({"experiment_id": experiment_id, "kind": {"$in": list(ANALYSIS_KINDS)}})
    for doc in _sorted(cursor, [("round", 1)]):
        landscape = LandscapeRecord.from_doc(doc)
        found[landscape.kind] = landscape  # the latest round of each kind
    initial, trajectory, densities = (found.get(kind) for kind in ANALYSIS_KINDS)
    return ExperimentAnalysis(
        initial_evaluation=None if initial is None else InitialEvaluation.from_record(initial),
        trajectory=None if trajectory is None else TrajectoryAnalysis.from_record(trajectory),
        spectral_densities=None if densities is None else SpectralDensities.from_record(densities),
    )


def files_collection(bucket: str) -> str:
    """The files collection of a GridFS bucket, as pymongo names it."""
    return f"{bucket}.files"


def chunks_collection(bucket: str) -> str:
    """The chunks collection of a GridFS bucket, as pymongo names it."""
    return f"{bucket}.chunks"


def initial_model_id(db: Database[Document], experiment_id: str) -> str | None:
    """Id of the experiment's round-0 global model (the newest such file), or None."""
    files = list(db[files_collection(MODELS)].find(ModelFile.query(experiment_id, 0, GLOBAL), {"_id": 1}))
    return str(max(file["_id"] for file in files)) if files else None


def progress_signature(db: Database[Document], experiment_id: str) -> tuple[Any, ...]:
    """What changes as an experiment progresses: status, round, and counts of its rounds, measures and reports."""
    doc = db[EXPERIMENTS].find_one({"_id": experiment_id}, {"status": 1, "current_round": 1}) or {}
    rounds = RoundRecord.key(experiment_id)
    return (
        doc.get("status"), doc.get("current_round"), db[ROUNDS].count_documents(rounds),
        db[ROUNDS].count_documents({**rounds, "landscape": {"$exists": True}}),
        db[CLIENT_STATS].count_documents(ClientStatsRecord.key(experiment_id)),
        db[LANDSCAPES].count_documents({"experiment_id": experiment_id}),
    )


# Batched reading (the export: a few queries for any number of experiments) -----------


@dataclass(frozen=True)
class StoredFile:
    """A GridFS file by its id, with its metadata record (`ModelFile` or `ClientModelFile`) and size in bytes."""

    file_id: Any  # the bucket's `_id` (an ObjectId), as `GridFSBucket.open_download_stream` takes it
    length: int
    file: ModelFile | ClientModelFile


@dataclass(frozen=True)
class StudyRecords:
    """Every stored document of some experiments, read with one query per collection (`read_study`)."""

    experiments: tuple[ExperimentRecord, ...]  # in the order asked
    members: tuple[MemberRecord, ...]  # by (experiment, client_index)
    rounds: tuple[RoundRecord, ...]  # by (experiment, round)
    client_stats: tuple[ClientStatsRecord, ...]  # by (experiment, round, client_index)
    landscapes: tuple[LandscapeRecord, ...]  # every kind, by (experiment, round, kind)
    refused_updates: tuple[RefusedUpdateRecord, ...]  # by (experiment, round, refused_at)


def _of_experiments(db: Database[Document], collection: str, ids: Sequence[str]) -> list[Document]:
    # sorted here, not by the store: one `$in` query per collection, whatever the number of experiments
    return list(db[collection].find({"experiment_id": {"$in": list(ids)}}))


def read_study(db: Database[Document], ids: Sequence[str]) -> StudyRecords:
    """The experiments with these ids and all their documents; raises ValueError naming an id the store lacks."""
    order = {experiment_id: position for position, experiment_id in enumerate(ids)}
    found = {str(doc["_id"]): doc for doc in db[EXPERIMENTS].find({"_id": {"$in": list(ids)}})}
    missing = [experiment_id for experiment_id in ids if experiment_id not in found]
    if missing:
        known = ", ".join(experiment_ids(db)) or "none"
        raise ValueError(f"experiment_id: no experiment {missing[0]!r} in the store (known: {known})")

    def by_experiment(*fields: str) -> Any:
        return lambda record: (order[record.experiment_id], *(getattr(record, name) for name in fields))

    def read(collection: str, record_type: Any, *fields: str) -> tuple[Any, ...]:
        docs = _of_experiments(db, collection, ids)
        return tuple(sorted((record_type.from_doc(doc) for doc in docs), key=by_experiment(*fields)))

    return StudyRecords(
        experiments=tuple(ExperimentRecord.from_doc(found[experiment_id]) for experiment_id in ids),
        members=read(MEMBERS, MemberRecord, "client_index"),
        rounds=read(ROUNDS, RoundRecord, "round"),
        client_stats=read(CLIENT_STATS, ClientStatsRecord, "round", "client_index"),
        landscapes=read(LANDSCAPES, LandscapeRecord, "round", "kind"),
        refused_updates=read(REFUSED_UPDATES, RefusedUpdateRecord, "round", "refused_at"),
    )


def read_model_files(
    db: Database[Document], ids: Sequence[str], *, members: bool = False
) -> list[StoredFile]:
    """The global models (`MODELS`, kind `GLOBAL`, round 0 included) of these experiments, or with `members`
    the members' stored models (`CLIENT_MODELS`); one query, the newest file of each (experiment, round, member).
    """
    bucket = CLIENT_MODELS if members else MODELS
    query: Document = {"metadata.experiment_id": {"$in": list(ids)}}
    if not members:
        query["metadata.kind"] = GLOBAL
    newest: dict[Any, StoredFile] = {}
    for doc in db[files_collection(bucket)].find(query, {"_id": 1, "length": 1, "metadata": 1}):
        metadata = doc.get("metadata") or {}
        file: ModelFile | ClientModelFile = (
            ClientModelFile.from_metadata(metadata) if members else ModelFile.from_metadata(metadata)
        )
        stored = StoredFile(doc["_id"], int(doc.get("length") or 0), file)
        if file not in newest or str(newest[file].file_id) < str(doc["_id"]):
            newest[file] = stored
    order = {experiment_id: position for position, experiment_id in enumerate(ids)}
    return sorted(newest.values(), key=lambda s: (order[s.file.experiment_id], s.file.round,
                                                  getattr(s.file, "client_index", -1)))
