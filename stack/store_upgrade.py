"""Upgrade a store written by an earlier release to the schema of `stack.records`, in place.

`python main.py upgrade-store` runs `upgrade_store` on the configured store and
prints what it changed. Schema 1 (the release before typed records) differs in:

- `experiments`: the spec's fields at the top level beside the store's; times as float seconds;
- `clients`: the members, now in `members`;
- `workers`: the worker's id in `client_id`, now `worker_id`;
- every time (`created_at`, `assigned_at`, `received_at`, `started_at`, ...) as float seconds, now BSON dates;
- `rounds.landscape.pairwise_barriers` inline, now a `landscapes` document named by `pairwise_barriers_id`.

Within schema 2, experiments written before fingerprints were stored lack
`fingerprint` (`fedland.spec.fingerprint`, which finds a rerun's unfinished twin):
`add_fingerprints` writes it, here and whenever the server prepares the store.

Each document is rewritten through its record (identity fields first), in place
and by `_id`; a document already in the new shape is left alone, so an upgrade
cut off part-way is finished by running it again. Nothing is deleted before its
replacement is written: `clients` is dropped only once every member is in
`members`. The schema mark is written last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pymongo.database import Database

from fedland.spec import STORE_KEYS, ExperimentSpec
from stack import records
from stack.records import (
    ClientStatsRecord,
    Document,
    ExperimentRecord,
    LandscapeRecord,
    MemberRecord,
    RoundRecord,
    WorkerRecord,
)

__all__ = ["add_fingerprints", "upgrade_store"]

_LEGACY_MEMBERS = "clients"
_LEGACY_WORKER_KEY = "client_id"  # the unique index on it would refuse every upgraded worker (no such field)


def _experiment(doc: Mapping[str, Any]) -> ExperimentRecord | None:
    if isinstance(doc.get("spec"), Mapping):
        return None  # already upgraded
    fields = {key: value for key, value in doc.items() if key not in STORE_KEYS}
    experiment_id = str(doc["_id"])
    return ExperimentRecord(
        id=experiment_id,
        spec=ExperimentSpec.from_dict(fields).with_id(experiment_id),
        status=str(doc["status"]),
        current_round=int(doc["current_round"]),
        created_at=records.from_date(doc.get("created_at")) or 0.0,
        started_at=records.from_date(doc.get("started_at")),
        finished_at=records.from_date(doc.get("finished_at")),
        error=doc.get("error"),
    )


def _worker(doc: Mapping[str, Any]) -> WorkerRecord | None:
    if "client_id" not in doc:
        return None
    return WorkerRecord.from_doc({**doc, "worker_id": doc["client_id"]})


def _has_float_time(doc: Mapping[str, Any], names: frozenset[str]) -> bool:
    return any(isinstance(doc.get(name), (int, float)) and not isinstance(doc.get(name), bool) for name in names)


def _client_stats(doc: Mapping[str, Any]) -> ClientStatsRecord | None:
    if not _has_float_time(doc, ClientStatsRecord.DATES):
        return None
    return ClientStatsRecord.from_doc({**doc, "worker_id": doc.get("worker_id") or doc.get("client_id")})


def _rewrite(
    db: Database[Document], collection: str, convert: Callable[[Mapping[str, Any]], Any | None]
) -> int:
    """Replace each document that `convert` turns into a record by that record's document; returns how many."""
    changed = 0
    for doc in list(db[collection].find({})):
        record = convert(doc)
        if record is not None:
            db[collection].replace_one({"_id": doc["_id"]}, {"_id": doc["_id"], **record.to_doc()})
            changed += 1
    return changed


def _upgrade_rounds(db: Database[Document]) -> tuple[int, int]:
    """Rounds rewritten, and pairwise barrier matrices moved to `landscapes`."""
    changed = moved = 0
    for doc in list(db[records.ROUNDS].find({})):
        landscape = doc.get("landscape")
        pairwise = landscape.get(records.PAIRWISE_BARRIERS) if isinstance(landscape, Mapping) else None
        if not _has_float_time(doc, RoundRecord.DATES) and pairwise is None:
            continue
        round_record = RoundRecord.from_doc(doc)
        if isinstance(landscape, Mapping) and isinstance(pairwise, Mapping):
            saved = LandscapeRecord(round_record.experiment_id, round_record.round, records.PAIRWISE_BARRIERS, pairwise)
            db[records.LANDSCAPES].replace_one(saved.key(), saved.to_doc(), upsert=True)
            stored = db[records.LANDSCAPES].find_one(saved.key(), {"_id": 1})
            if stored is None:
                raise RuntimeError(f"pairwise barriers of {saved.key()} were not stored")
            rest = {key: value for key, value in landscape.items() if key != records.PAIRWISE_BARRIERS}
            round_record = RoundRecord.from_doc({**doc, "landscape": {**rest, "pairwise_barriers_id": str(stored["_id"])}})
            moved += 1
        db[records.ROUNDS].replace_one({"_id": doc["_id"]}, {"_id": doc["_id"], **round_record.to_doc()})
        changed += 1
    return changed, moved


def _upgrade_members(db: Database[Document]) -> int:
    if _LEGACY_MEMBERS not in db.list_collection_names():
        return 0
    legacy = list(db[_LEGACY_MEMBERS].find({}))
    for doc in legacy:
        member = MemberRecord.from_doc(doc)
        key = MemberRecord.key(member.experiment_id, member.client_index)
        db[records.MEMBERS].replace_one(key, member.to_doc(), upsert=True)
    if len(list(db[records.MEMBERS].find({}, {"_id": 1}))) < len(legacy):
        raise RuntimeError(f"{records.MEMBERS}: fewer documents than in {_LEGACY_MEMBERS}; {_LEGACY_MEMBERS} kept")
    db.drop_collection(_LEGACY_MEMBERS)
    return len(legacy)


def _drop_legacy_worker_index(db: Database[Document]) -> None:
    if records.WORKERS not in db.list_collection_names():
        return
    for name, index in db[records.WORKERS].index_information().items():
        if any(key == _LEGACY_WORKER_KEY for key, _ in index["key"]):
            db[records.WORKERS].drop_index(name)


def add_fingerprints(db: Database[Document]) -> int:
    """Write the `fingerprint` of each schema-2 experiment that lacks one; returns how many."""
    changed = 0
    for doc in records.experiments_without_fingerprint(db):
        if not isinstance(doc.get("spec"), Mapping):
            continue  # schema 1: `upgrade_store` rewrites it whole
        # $set of one string: a server updating the document meanwhile loses nothing
        db[records.EXPERIMENTS].update_one({"_id": doc["_id"]}, {"$set": ExperimentRecord.fingerprint_change(doc)})
        changed += 1
    return changed


def _fingerprints_added(db: Database[Document]) -> list[str]:
    count = add_fingerprints(db)
    return [f"{records.EXPERIMENTS}: {count} documents: 'fingerprint' added"] if count else []


def upgrade_store(db: Database[Document]) -> list[str]:
    """Upgrade `db` in place to `records.SCHEMA_VERSION`; returns one line per change (none: it was current)."""
    version = records.schema_version(db)
    if version is None or version == records.SCHEMA_VERSION:
        if version is None:
            records.mark_schema(db)
        return _fingerprints_added(db)
    if version > records.SCHEMA_VERSION:
        raise records.SchemaError(
            f"the store {db.name!r} has schema {version}, newer than this release's {records.SCHEMA_VERSION}"
        )
    changes: list[str] = []
    count = _rewrite(db, records.EXPERIMENTS, _experiment)
    if count:
        changes.append(f"{records.EXPERIMENTS}: {count} documents: the spec nested under 'spec', times as dates")
    count = _upgrade_members(db)
    if count:
        changes.append(f"{records.MEMBERS}: {count} documents moved from '{_LEGACY_MEMBERS}' (dropped), "
                       "assignment times as dates")
    _drop_legacy_worker_index(db)
    count = _rewrite(db, records.WORKERS, _worker)
    if count:
        changes.append(f"{records.WORKERS}: {count} documents: 'client_id' renamed 'worker_id', times as dates")
    count = _rewrite(db, records.CLIENT_STATS, _client_stats)
    if count:
        changes.append(f"{records.CLIENT_STATS}: {count} documents: identity fields first, 'received_at' as a date")
    count, moved = _upgrade_rounds(db)
    if count:
        changes.append(f"{records.ROUNDS}: {count} documents: times as dates"
                       + (f"; the pairwise barriers of {moved} rounds moved to '{records.LANDSCAPES}'" if moved else ""))
    records.mark_schema(db)
    changes.append(f"schema: version {version} -> {records.SCHEMA_VERSION}")
    return changes
