"""The server's store: the collections and GridFS buckets of `stack.records`, over pymongo.

All of the server's pymongo calls live here, and every document goes through a
record of `stack.records` (the one owner of the schema): the coordinator and the
rounds speak in records and the methods below.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gridfs
import pymongo
import pymongo.errors
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from stack import records
from stack.records import (
    ClientModelFile,
    ClientStatsRecord,
    Document,
    ExperimentRecord,
    LandscapeRecord,
    MemberRecord,
    MemberStateFile,
    ModelFile,
    RefusedUpdateRecord,
    RoundRecord,
    WorkerRecord,
)
from stack.settings import StoreTimeouts
from stack.store_upgrade import add_fingerprints

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000  # MongoDB's error code of a unique index refusing an insert

#: The store did not answer in time (the HTTP layer answers 503 with Retry-After).
StoreUnavailable = pymongo.errors.ConnectionFailure
#: The store's client was closed (the server is shutting down).
StoreClosed = pymongo.errors.InvalidOperation

_UNASSIGNED = MemberRecord.changes(worker_id=None, assigned_round=None, assigned_at=None)
_SWAP_ATTEMPTS = 16  # an experiment's document changes a few times per round: a swap that keeps losing is a bug


class DuplicateError(Exception):
    """A write hit a unique index (duplicate update, round already aggregated)."""


class Store:
    """The fedland database: see DEVELOPERS.md "Store" and `stack.records` for the schema."""

    def __init__(self, uri: str, db_name: str, *, timeouts: StoreTimeouts = StoreTimeouts()) -> None:
        self._client: pymongo.MongoClient[Document] | None = pymongo.MongoClient(
            uri, tz_aware=False, **timeouts.client_options()
        )
        self.db: Database[Document] = self._client[db_name]
        self._init_buckets()

    @classmethod
    def from_database(cls, db: Database[Document]) -> Store:
        """Wrap an existing database handle (the caller keeps ownership of its client)."""
        store = cls.__new__(cls)
        store._client = None
        store.db = db
        store._init_buckets()
        return store

    def _init_buckets(self) -> None:
        #: Held by a submit from its search for unfinished twins to its insert: two identical specs
        #: submitted at once queue one experiment (one server process owns a store).
        self.submit_lock = threading.Lock()
        self.models = gridfs.GridFSBucket(self.db, bucket_name=records.MODELS)
        self.client_models = gridfs.GridFSBucket(self.db, bucket_name=records.CLIENT_MODELS)
        self.member_states = gridfs.GridFSBucket(self.db, bucket_name=records.MEMBER_STATES)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers (within the configured timeouts)."""
        self.db.command("ping")

    def prepare(self) -> None:
        """Refuse a store of another schema (`records.SchemaError`), mark a new one, create the indexes.

        Also writes the fingerprint of experiments stored without one (`stack.store_upgrade.add_fingerprints`).
        """
        records.check_schema(self.db, claim=True)
        self.db[records.MEMBERS].create_index([("experiment_id", 1), ("client_index", 1)], unique=True)
        self.db[records.WORKERS].create_index([("worker_id", 1)], unique=True)
        self.db[records.CLIENT_STATS].create_index(
            [("experiment_id", 1), ("round", 1), ("client_index", 1)], unique=True
        )
        self.db[records.ROUNDS].create_index([("experiment_id", 1), ("round", 1)], unique=True)
        self.db[records.LANDSCAPES].create_index([("experiment_id", 1), ("round", 1), ("kind", 1)], unique=True)
        self.db[records.EXPERIMENTS].create_index([("status", 1), ("created_at", 1)])
        self.db[records.REFUSED_UPDATES].create_index([("experiment_id", 1), ("round", 1)])
        self.db[records.EXPERIMENTS].create_index([("fingerprint", 1), ("status", 1)])  # a rerun's unfinished twin
        added = add_fingerprints(self.db)  # experiments stored before fingerprints were
        if added:
            log.info("added the fingerprint of %d experiments stored without one", added)

    # experiments -----------------------------------------------------------

    def insert_experiments(self, experiments: list[ExperimentRecord], members: list[MemberRecord]) -> None:
        """Insert experiments and their members, or neither.

        If an insert fails, what this call inserted is deleted again (best
        effort: the store may be what failed) and the error raised.
        """
        ids = [experiment.id for experiment in experiments]
        try:
            if experiments:
                self.db[records.EXPERIMENTS].insert_many([experiment.to_doc() for experiment in experiments])
            if members:
                self.db[records.MEMBERS].insert_many([member.to_doc() for member in members])
        except BaseException:
            try:
                self.db[records.MEMBERS].delete_many({"experiment_id": {"$in": ids}})
                self.db[records.EXPERIMENTS].delete_many({"_id": {"$in": ids}})
            except Exception as error:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not delete experiments %s of a failed submit: %s", ids, error)
            raise

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        return records.read_experiment(self.db, experiment_id)

    def unfinished_twin(self, spec_fingerprint: str) -> ExperimentRecord | None:
        """The oldest queued or running experiment with this spec fingerprint (`fedland.spec.fingerprint`)."""
        return records.read_unfinished_twin(self.db, spec_fingerprint)

    def list_experiments(self) -> list[ExperimentRecord]:
        return records.read_experiments(self.db)

    def active_experiments(self) -> list[ExperimentRecord]:
        """Queued and running experiments, oldest first."""
        return records.read_experiments(self.db, records.ACTIVE)

    def update_experiment(
        self, experiment_id: str, changes: Mapping[str, Any], *, where: Mapping[str, Any] | None = None
    ) -> bool:
        """Set these `ExperimentRecord` fields if the experiment's fields equal `where`; True if it did.

        The document is replaced whole (compare and swap on what it held), not
        `$set`: nx-27017 stores a `$set` date as a string, and these are dates.
        """
        for _ in range(_SWAP_ATTEMPTS):
            doc = self.db[records.EXPERIMENTS].find_one({"_id": experiment_id})
            if doc is None:
                return False
            if not ExperimentRecord.matches(doc, where or {}):
                return False
            held = {name: doc.get(name) for name in ("status", "current_round", "error")}
            result = self.db[records.EXPERIMENTS].replace_one(
                {"_id": experiment_id, **held}, ExperimentRecord.changed_doc(doc, changes)
            )
            if result.matched_count:
                return True
        raise RuntimeError(f"experiment {experiment_id}: changed {_SWAP_ATTEMPTS} times while being updated")

    # members -------------------------------------------------------------------

    def member(self, experiment_id: str, client_index: int) -> MemberRecord | None:
        """The member's partition and assignment."""
        doc = self.db[records.MEMBERS].find_one(MemberRecord.key(experiment_id, client_index))
        return None if doc is None else MemberRecord.from_doc(doc)

    def members(self, experiment_id: str, client_indices: Sequence[int] | None = None) -> list[MemberRecord]:
        """The stored members of the experiment (all, or these), by client_index."""
        return records.read_members(self.db, experiment_id, client_indices)

    def add_members(self, members: Sequence[MemberRecord]) -> None:
        """Store the members not stored yet (a scheme's members are stored when first selected); keep the others."""
        if not members:
            return
        try:
            self.db[records.MEMBERS].insert_many([member.to_doc() for member in members], ordered=False)
        except BulkWriteError as error:  # a concurrent open stored some of them first: theirs stand
            if any(failure.get("code") != DUPLICATE_KEY for failure in error.details.get("writeErrors", [])):
                raise

    def assign_member(self, experiment_id: str, client_index: int, worker_id: str, server_round: int, now: float) -> None:
        """Record that `worker_id` trains the member in `server_round` (the coordinator decided it)."""
        self.db[records.MEMBERS].update_one(
            MemberRecord.key(experiment_id, client_index),
            {"$set": MemberRecord.changes(worker_id=worker_id, assigned_round=server_round, assigned_at=now)},
        )

    def release_member(self, experiment_id: str, client_index: int) -> None:
        """The member's worker was lost: nobody trains it now."""
        self.db[records.MEMBERS].update_one(MemberRecord.key(experiment_id, client_index), {"$set": _UNASSIGNED})

    def mark_round_reported(self, experiment_id: str, client_indices: list[int], server_round: int) -> None:
        """The members reported `server_round` (one write when the round closes); nobody trains them now."""
        self.db[records.MEMBERS].update_many(
            {**MemberRecord.key(experiment_id), "client_index": {"$in": list(client_indices)}},
            {"$max": MemberRecord.changes(reported_round=server_round), "$set": _UNASSIGNED},
        )

    def unreport(self, experiment_id: str, client_index: int, server_round: int) -> None:
        """Forget the member's report of `server_round` (its update was lost with a restart): it trains again."""
        self.db[records.MEMBERS].update_one(
            MemberRecord.key(experiment_id, client_index),
            {"$set": MemberRecord.changes(reported_round=server_round - 1, worker_id=None, assigned_round=None)},
        )
        self.db[records.CLIENT_STATS].delete_many(ClientStatsRecord.key(experiment_id, server_round, client_index))

    def delete_client_stats(self, experiment_id: str, server_round: int, client_index: int) -> list[ClientStatsRecord]:
        """Delete the member's stats of the round; returns what was deleted (their weights files are the caller's)."""
        key = ClientStatsRecord.key(experiment_id, server_round, client_index)
        stale = [ClientStatsRecord.from_doc(doc) for doc in self.db[records.CLIENT_STATS].find(key)]
        self.db[records.CLIENT_STATS].delete_many(key)
        return stale

    def release_experiment_members(self, experiment_id: str) -> int:
        """Clear every member's assignment (the experiment ended)."""
        result = self.db[records.MEMBERS].update_many(
            {**MemberRecord.key(experiment_id), "worker_id": {"$ne": None}}, {"$set": _UNASSIGNED}
        )
        return result.modified_count

    # workers ---------------------------------------------------------------

    def insert_worker(self, worker: WorkerRecord) -> None:
        self.db[records.WORKERS].insert_one(worker.to_doc())

    def get_worker(self, worker_id: str) -> WorkerRecord | None:
        doc = self.db[records.WORKERS].find_one(WorkerRecord.key(worker_id))
        return None if doc is None else WorkerRecord.from_doc(doc)

    def worker_secret_digests(self) -> dict[str, str]:
        """Every worker's secret digest (worker id -> SHA-256 hex), for `server.auth.Credentials.load`."""
        workers = (WorkerRecord.from_doc(doc) for doc in self.db[records.WORKERS].find(WorkerRecord.with_secret()))
        return {worker.worker_id: worker.secret_sha256 for worker in workers if worker.secret_sha256}

    def touch_workers(self, last_seen: Mapping[str, float]) -> None:
        """Write the workers' `last_seen` (the coordinator keeps liveness in memory and flushes what moved)."""
        for worker_id, seen in last_seen.items():
            self.db[records.WORKERS].update_one(
                WorkerRecord.key(worker_id), {"$set": WorkerRecord.changes(last_seen=seen)}
            )

    def set_worker_status(self, worker_id: str, status: str, now: float) -> None:
        self.db[records.WORKERS].update_one(
            WorkerRecord.key(worker_id), {"$set": WorkerRecord.changes(status=status, status_at=now)}
        )

    # client updates and rounds ---------------------------------------------

    def insert_client_stats(self, stats: ClientStatsRecord) -> None:
        try:
            self.db[records.CLIENT_STATS].insert_one(stats.to_doc())
        except pymongo.errors.DuplicateKeyError as error:
            raise DuplicateError(str(error)) from None

    def insert_refused_update(self, refused: RefusedUpdateRecord) -> None:
        self.db[records.REFUSED_UPDATES].insert_one(refused.to_doc())

    def refused_updates(self, experiment_id: str) -> list[RefusedUpdateRecord]:
        return records.read_refused_updates(self.db, experiment_id)

    def stats_of_round(self, experiment_id: str, server_round: int) -> list[ClientStatsRecord]:
        return records.read_client_stats(self.db, experiment_id, server_round)

    def insert_round(self, round_record: RoundRecord) -> None:
        try:
            self.db[records.ROUNDS].insert_one(round_record.to_doc())
        except pymongo.errors.DuplicateKeyError as error:
            raise DuplicateError(str(error)) from None

    def get_round(self, experiment_id: str, server_round: int) -> RoundRecord | None:
        return records.read_round(self.db, experiment_id, server_round)

    def latest_round(self, experiment_id: str) -> RoundRecord | None:
        cursor = self.db[records.ROUNDS].find(RoundRecord.key(experiment_id)).sort([("round", -1)]).limit(1)
        return next((RoundRecord.from_doc(doc) for doc in cursor), None)

    def set_round_landscape(self, experiment_id: str, server_round: int, landscape: Mapping[str, Any]) -> bool:
        """Set the round's `landscape` unless it already has one; True if this call set it."""
        result = self.db[records.ROUNDS].update_one(
            {**RoundRecord.key(experiment_id, server_round), "landscape": {"$exists": False}},
            {"$set": {"landscape": dict(landscape)}},
        )
        return result.modified_count > 0

    def save_landscape(self, landscape: LandscapeRecord) -> str:
        """Store a round's arrays of one kind (`landscapes`); a round measured again replaces them. Returns the id."""

        def replace() -> Document:
            saved = self.db[records.LANDSCAPES].find_one_and_replace(
                landscape.key(), landscape.to_doc(), upsert=True, return_document=ReturnDocument.AFTER
            )
            if saved is None:  # upsert=True with ReturnDocument.AFTER always returns the document
                raise RuntimeError(f"landscape {landscape.key()} was not stored")
            return saved

        try:
            saved = replace()
        except pymongo.errors.DuplicateKeyError:  # a concurrent measurement of the round inserted it first
            saved = replace()
        return str(saved["_id"])

    def rounds_without_landscape(self, experiment_id: str) -> list[int]:
        """Numbers of the experiment's aggregated rounds that have no `landscape` yet, ascending."""
        cursor = self.db[records.ROUNDS].find(
            {**RoundRecord.key(experiment_id), "landscape": {"$exists": False}}, {"round": 1}
        ).sort([("round", 1)])
        return [int(doc["round"]) for doc in cursor]

    def global_model_id(self, experiment_id: str, aggregated_round: int) -> str | None:
        """Id of the global model after `aggregated_round` (0: the initial model), or None if not aggregated."""
        if aggregated_round == 0:
            return records.initial_model_id(self.db, experiment_id)
        round_record = self.get_round(experiment_id, aggregated_round)
        return None if round_record is None else round_record.model_file_id

    def strategy_state_id(self, experiment_id: str, aggregated_round: int) -> str | None:
        """Id of the strategy state after `aggregated_round`; None before round 1 (empty state) or if absent."""
        if aggregated_round == 0:
            return None
        round_record = self.get_round(experiment_id, aggregated_round)
        return None if round_record is None else round_record.strategy_state_file_id

    def rounds_of(self, experiment_id: str) -> list[RoundRecord]:
        return records.read_rounds(self.db, experiment_id)

    # GridFS ------------------------------------------------------------------

    def save_model(self, data: bytes, file: ModelFile) -> str:
        """Store a `models` file (a global model or a strategy state); returns its id as a string."""
        return str(self.models.upload_from_stream(file.filename, data, metadata=file.metadata()))

    def delete_model(self, file_id: str) -> None:
        try:
            self.models.delete(ObjectId(file_id))
        except gridfs.errors.NoFile:
            pass

    def load_model(self, file_id: str) -> bytes:
        return bytes(self.models.open_download_stream(ObjectId(file_id)).read())

    def save_client_model(self, data: bytes, file: ClientModelFile) -> str:
        return str(self.client_models.upload_from_stream(file.filename, data, metadata=file.metadata()))

    def load_client_model(self, file_id: str) -> bytes:
        return bytes(self.client_models.open_download_stream(ObjectId(file_id)).read())

    def delete_client_model(self, file_id: str) -> None:
        try:
            self.client_models.delete(ObjectId(file_id))
        except gridfs.errors.NoFile:
            pass

    def save_member_state(self, data: bytes, file: MemberStateFile) -> str:
        """Store a member's client-algorithm state and message (its `ClientStatsRecord` then references it)."""
        return str(self.member_states.upload_from_stream(file.filename, data, metadata=file.metadata()))

    def load_member_state(self, file_id: str) -> bytes:
        return bytes(self.member_states.open_download_stream(ObjectId(file_id)).read())

    def delete_member_state(self, file_id: str) -> None:
        try:
            self.member_states.delete(ObjectId(file_id))
        except gridfs.errors.NoFile:
            pass

    def member_state_id(self, experiment_id: str, client_index: int, before_round: int) -> str | None:
        """The state file of the member's latest kept report before round `before_round`, or None (a first round).

        Reports are kept only for updates that count (`Rounds.recover` removes the
        others), so a member that trains a round again starts from the same state.
        """
        query = {**ClientStatsRecord.key(experiment_id), "client_index": client_index, "round": {"$lt": before_round}}
        kept = [
            (int(doc["round"]), str(doc["state_file_id"]))
            for doc in self.db[records.CLIENT_STATS].find(query, {"round": 1, "state_file_id": 1})
            if doc.get("state_file_id") is not None
        ]
        return max(kept)[1] if kept else None

    def delete_orphan_files(self) -> int:
        """Delete GridFS files no document references, and chunks of no file; returns the files deleted.

        What a crash can leave between a file write and the document naming it
        (an update's weights before its stats, a round's models before its rounds
        document, a round-0 model before its experiment), and chunks of an upload
        cut off. Call it when no request is in flight (at start-up).
        """
        experiments = set(records.experiment_ids(self.db))
        referenced_models: set[str] = set()
        for doc in self.db[records.ROUNDS].find({}, {"model_file_id": 1, "strategy_state_file_id": 1}):
            for key in ("model_file_id", "strategy_state_file_id"):
                if doc.get(key) is not None:
                    referenced_models.add(str(doc[key]))
        reports = list(self.db[records.CLIENT_STATS].find({}, {"weights_file_id": 1, "state_file_id": 1}))
        referenced_updates = {str(doc["weights_file_id"]) for doc in reports if doc.get("weights_file_id") is not None}
        referenced_states = {str(doc["state_file_id"]) for doc in reports if doc.get("state_file_id") is not None}

        def round_zero(file: Mapping[str, Any]) -> bool:
            try:
                model = ModelFile.from_metadata(file.get("metadata") or {})
            except (KeyError, TypeError, ValueError):
                return False
            return model.round == 0 and model.kind == records.GLOBAL and model.experiment_id in experiments

        deleted = 0
        for name, bucket, keep in (
            (records.MODELS, self.models, lambda f: str(f["_id"]) in referenced_models or round_zero(f)),
            (records.CLIENT_MODELS, self.client_models, lambda f: str(f["_id"]) in referenced_updates),
            (records.MEMBER_STATES, self.member_states, lambda f: str(f["_id"]) in referenced_states),
        ):
            files_collection = self.db[records.files_collection(name)]
            for file in list(files_collection.find({}, {"_id": 1, "metadata": 1})):
                if not keep(file):
                    try:
                        bucket.delete(file["_id"])
                        deleted += 1
                    except gridfs.errors.NoFile:
                        pass
            known = {file["_id"] for file in files_collection.find({}, {"_id": 1})}
            chunks = self.db[records.chunks_collection(name)]
            stray = {c["files_id"] for c in chunks.find({}, {"files_id": 1})} - known
            if stray:
                chunks.delete_many({"files_id": {"$in": list(stray)}})
        return deleted

    def count(self, collection: str, query: Mapping[str, Any] | None = None) -> int:
        """Number of documents in `collection` (a `stack.records` name) matching `query` (tests and reports)."""
        # find, not count_documents: nx-27017 cannot count GridFS collections with a filter
        return len(list(self.db[collection].find(dict(query or {}), {"_id": 1})))


def undo_files(file_ids: list[str], delete: Callable[[str], None]) -> None:
    """Delete files a failed request wrote (best effort: the store may be what failed)."""
    for file_id in file_ids:
        try:
            delete(file_id)
        except Exception as error:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not delete file %s of a failed request: %s", file_id, error)
