"""The server's store: collections and GridFS buckets over pymongo (nx-27017 or MongoDB).

All raw pymongo calls live here; the coordinator speaks in the methods below.
Times are float seconds since the epoch (from the coordinator's clock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import gridfs
import pymongo
import pymongo.errors
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database

from stack.settings import StoreTimeouts

log = logging.getLogger(__name__)

Doc = dict[str, Any]

ACTIVE = ("queued", "running")
DONE = ("finished", "failed")


#: The store did not answer in time (the HTTP layer answers 503 with Retry-After).
StoreUnavailable = pymongo.errors.ConnectionFailure


class DuplicateError(Exception):
    """A write hit a unique index (duplicate update, round already aggregated)."""


def _plain(doc: Mapping[str, Any] | None) -> Doc | None:
    if doc is None:
        return None
    return {key: value for key, value in doc.items() if key != "_id"}


def _round_zero_of(file: Mapping[str, Any], experiments: set[Any]) -> bool:
    metadata = file.get("metadata") or {}
    return bool(
        metadata.get("round") == 0 and metadata.get("kind") == "global" and metadata.get("experiment_id") in experiments
    )


class Store:
    """The fedland database: see DEVELOPERS.md "Store" for the schema."""

    def __init__(self, uri: str, db_name: str, *, timeouts: StoreTimeouts = StoreTimeouts()) -> None:
        self._client: pymongo.MongoClient[Doc] | None = pymongo.MongoClient(
            uri, tz_aware=False, **timeouts.client_options()
        )
        self.db: Database[Doc] = self._client[db_name]
        self._init_buckets()

    @classmethod
    def from_database(cls, db: Database[Doc]) -> Store:
        """Wrap an existing database handle (the caller keeps ownership of its client)."""
        store = cls.__new__(cls)
        store._client = None
        store.db = db
        store._init_buckets()
        return store

    def _init_buckets(self) -> None:
        self.models = gridfs.GridFSBucket(self.db, bucket_name="models")
        self.client_models = gridfs.GridFSBucket(self.db, bucket_name="client_models")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # collections -----------------------------------------------------------

    @property
    def experiments(self) -> Collection[Doc]:
        return self.db["experiments"]

    @property
    def clients(self) -> Collection[Doc]:
        return self.db["clients"]

    @property
    def workers(self) -> Collection[Doc]:
        return self.db["workers"]

    @property
    def client_stats(self) -> Collection[Doc]:
        return self.db["client_stats"]

    @property
    def rounds(self) -> Collection[Doc]:
        return self.db["rounds"]

    @property
    def landscapes(self) -> Collection[Doc]:
        return self.db["landscapes"]

    def ensure_indexes(self) -> None:
        """Create the unique indexes of the schema (idempotent)."""
        self.clients.create_index([("experiment_id", 1), ("client_index", 1)], unique=True)
        self.workers.create_index([("client_id", 1)], unique=True)
        self.client_stats.create_index(
            [("experiment_id", 1), ("client_index", 1), ("round", 1)], unique=True
        )
        self.rounds.create_index([("experiment_id", 1), ("round", 1)], unique=True)
        self.landscapes.create_index([("experiment_id", 1), ("round", 1), ("kind", 1)], unique=True)
        self.experiments.create_index([("status", 1), ("created_at", 1)])

    # experiments -----------------------------------------------------------

    def insert_experiments(self, experiments: list[Doc], members: list[Doc]) -> None:
        """Insert experiment documents (`_id` is their `id`) and their member documents, or neither.

        If an insert fails, what this call inserted is deleted again (best
        effort: the store may be what failed) and the error raised.
        """
        ids = [e["id"] for e in experiments]
        try:
            if experiments:
                self.experiments.insert_many([{"_id": e["id"], **e} for e in experiments])
            if members:
                self.clients.insert_many([dict(member) for member in members])
        except BaseException:
            try:
                self.clients.delete_many({"experiment_id": {"$in": ids}})
                self.experiments.delete_many({"_id": {"$in": ids}})
            except Exception as error:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not delete experiments %s of a failed submit: %s", ids, error)
            raise

    def get_experiment(self, experiment_id: str) -> Doc | None:
        return _plain(self.experiments.find_one({"_id": experiment_id}))

    def list_experiments(self) -> list[Doc]:
        cursor = self.experiments.find({}).sort([("created_at", 1), ("_id", 1)])
        return [doc for doc in (_plain(d) for d in cursor) if doc is not None]

    def active_experiments(self) -> list[Doc]:
        """Queued and running experiments, oldest first."""
        cursor = self.experiments.find({"status": {"$in": list(ACTIVE)}}).sort(
            [("created_at", 1), ("_id", 1)]
        )
        return [doc for doc in (_plain(d) for d in cursor) if doc is not None]

    def update_experiment(
        self, experiment_id: str, changes: Mapping[str, Any], *, where: Mapping[str, Any] | None = None
    ) -> bool:
        """Set `changes` if the experiment matches `where`; True if a document matched."""
        result = self.experiments.update_one({"_id": experiment_id, **(where or {})}, {"$set": dict(changes)})
        return result.matched_count > 0

    # members (the `clients` collection: one document per member) -----------

    def slot(self, experiment_id: str, client_index: int) -> Doc | None:
        """The member document of `client_index` (its partition and assignment)."""
        return _plain(self.clients.find_one({"experiment_id": experiment_id, "client_index": client_index}))

    def slots(self, experiment_id: str) -> list[Doc]:
        """Every member document of the experiment, by client_index."""
        cursor = self.clients.find({"experiment_id": experiment_id}).sort([("client_index", 1)])
        return [doc for doc in (_plain(d) for d in cursor) if doc is not None]

    def assign_member(self, experiment_id: str, client_index: int, worker_id: str, server_round: int, now: float) -> None:
        """Record that `worker_id` trains the member in `server_round` (the coordinator decided it)."""
        self.clients.update_one(
            {"experiment_id": experiment_id, "client_index": client_index},
            {"$set": {"worker_id": worker_id, "assigned_round": server_round, "assigned_at": now}},
        )

    def release_member(self, experiment_id: str, client_index: int) -> None:
        """The member's worker was lost: nobody trains it now."""
        self.clients.update_one(
            {"experiment_id": experiment_id, "client_index": client_index},
            {"$set": {"worker_id": None, "assigned_round": None, "assigned_at": None}},
        )

    def mark_round_reported(self, experiment_id: str, client_indices: list[int], server_round: int) -> None:
        """The members reported `server_round` (one write when the round closes); nobody trains them now."""
        self.clients.update_many(
            {"experiment_id": experiment_id, "client_index": {"$in": list(client_indices)}},
            {
                "$max": {"reported_round": server_round},
                "$set": {"worker_id": None, "assigned_round": None, "assigned_at": None},
            },
        )

    def unreport(self, experiment_id: str, client_index: int, server_round: int) -> None:
        """Forget the member's report of `server_round` (its update was lost with a restart): it trains again."""
        self.clients.update_one(
            {"experiment_id": experiment_id, "client_index": client_index},
            {"$set": {"reported_round": server_round - 1, "worker_id": None, "assigned_round": None}},
        )
        self.client_stats.delete_many(
            {"experiment_id": experiment_id, "client_index": client_index, "round": server_round}
        )

    def release_experiment_slots(self, experiment_id: str) -> int:
        """Clear every member's assignment (the experiment ended)."""
        result = self.clients.update_many(
            {"experiment_id": experiment_id, "worker_id": {"$ne": None}},
            {"$set": {"worker_id": None, "assigned_round": None, "assigned_at": None}},
        )
        return result.modified_count

    # workers ---------------------------------------------------------------

    def insert_worker(self, doc: Doc) -> None:
        self.workers.insert_one(dict(doc))

    def get_worker(self, worker_id: str) -> Doc | None:
        return _plain(self.workers.find_one({"client_id": worker_id}))

    def touch_workers(self, last_seen: Mapping[str, float]) -> None:
        """Write the workers' `last_seen` (the coordinator keeps liveness in memory and flushes it here)."""
        for worker_id, seen in last_seen.items():
            self.workers.update_one({"client_id": worker_id}, {"$max": {"last_seen": seen}})

    def set_worker_status(self, worker_id: str, status: str, now: float) -> None:
        self.workers.update_one({"client_id": worker_id}, {"$set": {"status": status, "status_at": now}})

    # client updates and rounds ---------------------------------------------

    def insert_client_stats(self, doc: Doc) -> None:
        try:
            self.client_stats.insert_one(dict(doc))
        except pymongo.errors.DuplicateKeyError as error:
            raise DuplicateError(str(error)) from None

    def stats_of_round(self, experiment_id: str, server_round: int) -> list[Doc]:
        cursor = self.client_stats.find({"experiment_id": experiment_id, "round": server_round}).sort(
            [("client_index", 1)]
        )
        return [doc for doc in (_plain(d) for d in cursor) if doc is not None]

    def insert_round(self, doc: Doc) -> None:
        try:
            self.rounds.insert_one(dict(doc))
        except pymongo.errors.DuplicateKeyError as error:
            raise DuplicateError(str(error)) from None

    def get_round(self, experiment_id: str, server_round: int) -> Doc | None:
        return _plain(self.rounds.find_one({"experiment_id": experiment_id, "round": server_round}))

    def latest_round(self, experiment_id: str) -> Doc | None:
        cursor = self.rounds.find({"experiment_id": experiment_id}).sort([("round", -1)]).limit(1)
        return next((_plain(doc) for doc in cursor), None)

    def set_round_landscape(self, experiment_id: str, server_round: int, landscape: Mapping[str, Any]) -> bool:
        """Set the round's `landscape` unless it already has one; True if this call set it."""
        result = self.rounds.update_one(
            {"experiment_id": experiment_id, "round": server_round, "landscape": {"$exists": False}},
            {"$set": {"landscape": dict(landscape)}},
        )
        return result.modified_count > 0

    def save_landscape(self, experiment_id: str, server_round: int, kind: str, content: Mapping[str, Any]) -> str:
        """Store a grid or curve of a round (`landscapes`); a round measured again replaces it. Returns its id."""
        key = {"experiment_id": experiment_id, "round": server_round, "kind": kind}

        def replace() -> Doc:
            return dict(self.landscapes.find_one_and_replace(
                key, {**key, **content}, upsert=True, return_document=ReturnDocument.AFTER
            ))

        try:
            saved = replace()
        except pymongo.errors.DuplicateKeyError:  # a concurrent measurement of the round inserted it first
            saved = replace()
        return str(saved["_id"])

    def rounds_without_landscape(self, experiment_id: str) -> list[int]:
        """Numbers of the experiment's aggregated rounds that have no `landscape` yet, ascending."""
        cursor = self.rounds.find(
            {"experiment_id": experiment_id, "landscape": {"$exists": False}}, {"round": 1}
        ).sort([("round", 1)])
        return [int(doc["round"]) for doc in cursor]

    def global_model_id(self, experiment_id: str, aggregated_round: int) -> str | None:
        """Id of the global model after `aggregated_round` (0: the initial model), or None if not aggregated."""
        if aggregated_round == 0:
            return self.find_model_id(experiment_id, 0, "global")
        doc = self.get_round(experiment_id, aggregated_round)
        return None if doc is None else str(doc["model_file_id"])

    def strategy_state_id(self, experiment_id: str, aggregated_round: int) -> str | None:
        """Id of the strategy state after `aggregated_round`; None before round 1 (empty state) or if absent."""
        if aggregated_round == 0:
            return None
        doc = self.get_round(experiment_id, aggregated_round)
        return None if doc is None else doc.get("strategy_state_file_id")

    def rounds_of(self, experiment_id: str) -> list[Doc]:
        cursor = self.rounds.find({"experiment_id": experiment_id}).sort([("round", 1)])
        return [doc for doc in (_plain(d) for d in cursor) if doc is not None]

    # GridFS ------------------------------------------------------------------

    def save_model(self, data: bytes, experiment_id: str, server_round: int, kind: str) -> str:
        """Store a `models` file (kind "global" or "strategy_state"); returns its id as a string."""
        metadata = {"experiment_id": experiment_id, "round": server_round, "kind": kind}
        name = f"{experiment_id}-{kind}-{server_round}.safetensors"
        return str(self.models.upload_from_stream(name, data, metadata=metadata))

    def find_model_id(self, experiment_id: str, server_round: int, kind: str) -> str | None:
        """Id of the newest `models` file with this metadata, or None."""
        query = {"metadata.experiment_id": experiment_id, "metadata.round": server_round, "metadata.kind": kind}
        files = list(self.db["models.files"].find(query, {"_id": 1}))
        if not files:
            return None
        return str(max(file["_id"] for file in files))

    def delete_model(self, file_id: str) -> None:
        try:
            self.models.delete(ObjectId(file_id))
        except gridfs.errors.NoFile:
            pass

    def load_model(self, file_id: str) -> bytes:
        return bytes(self.models.open_download_stream(ObjectId(file_id)).read())

    def save_client_model(self, data: bytes, experiment_id: str, server_round: int, client_index: int) -> str:
        metadata = {"experiment_id": experiment_id, "round": server_round, "client_index": client_index}
        name = f"{experiment_id}-client{client_index}-{server_round}.safetensors"
        return str(self.client_models.upload_from_stream(name, data, metadata=metadata))

    def load_client_model(self, file_id: str) -> bytes:
        return bytes(self.client_models.open_download_stream(ObjectId(file_id)).read())

    def delete_client_model(self, file_id: str) -> None:
        try:
            self.client_models.delete(ObjectId(file_id))
        except gridfs.errors.NoFile:
            pass

    def delete_orphan_files(self) -> int:
        """Delete GridFS files no document references, and chunks of no file; returns the files deleted.

        What a crash can leave between a file write and the document naming it
        (an update's weights before its stats, a round's models before its rounds
        document, a round-0 model before its experiment), and chunks of an upload
        cut off. Call it when no request is in flight (at start-up).
        """
        experiments = {doc["_id"] for doc in self.experiments.find({}, {"_id": 1})}
        referenced_models: set[Any] = set()
        for doc in self.rounds.find({}, {"model_file_id": 1, "strategy_state_file_id": 1}):
            for key in ("model_file_id", "strategy_state_file_id"):
                if doc.get(key) is not None:
                    referenced_models.add(str(doc[key]))
        referenced_updates = {
            str(doc["weights_file_id"]) for doc in self.client_stats.find({}, {"weights_file_id": 1})
            if doc.get("weights_file_id") is not None
        }
        deleted = 0
        for name, bucket, keep in (
            ("models", self.models, lambda f: str(f["_id"]) in referenced_models or _round_zero_of(f, experiments)),
            ("client_models", self.client_models, lambda f: str(f["_id"]) in referenced_updates),
        ):
            files = list(self.db[f"{name}.files"].find({}, {"_id": 1, "metadata": 1}))
            for file in files:
                if not keep(file):
                    try:
                        bucket.delete(file["_id"])
                        deleted += 1
                    except gridfs.errors.NoFile:
                        pass
            known = {file["_id"] for file in self.db[f"{name}.files"].find({}, {"_id": 1})}
            stray = {c["files_id"] for c in self.db[f"{name}.chunks"].find({}, {"files_id": 1})} - known
            if stray:
                self.db[f"{name}.chunks"].delete_many({"files_id": {"$in": list(stray)}})
        return deleted

    def count(self, collection: str, query: Mapping[str, Any] | None = None) -> int:
        """Number of documents in `collection` matching `query` (tests and reports)."""
        # find, not count_documents: nx-27017 cannot count GridFS collections with a filter
        return len(list(self.db[collection].find(dict(query or {}), {"_id": 1})))


def undo_files(file_ids: list[str], delete: Callable[[str], None]) -> None:
    """Delete files a failed request wrote (best effort: the store may be what failed)."""
    for file_id in file_ids:
        try:
            delete(file_id)
        except Exception as error:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not delete file %s of a failed request: %s", file_id, error)

