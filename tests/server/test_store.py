"""Store over a real nx-27017: member documents, unique indexes, GridFS."""

from __future__ import annotations

import pytest

from server.store import DuplicateError, Store


def add_slots(store: Store, experiment_id: str, count: int) -> None:
    store.insert_experiments(
        [{"id": experiment_id, "status": "running", "created_at": 1.0}],
        [{"experiment_id": experiment_id, "client_index": i, "worker_id": None, "assigned_round": None,
          "reported_round": 0} for i in range(count)],
    )


def test_member_assignment_report_and_a_lost_report(store: Store) -> None:
    add_slots(store, "e", 3)
    store.assign_member("e", 1, "w1", 1, now=5.0)
    store.assign_member("e", 2, "w2", 1, now=6.0)
    assert [(m["worker_id"], m["assigned_round"]) for m in store.slots("e")] == [(None, None), ("w1", 1), ("w2", 1)]
    store.insert_client_stats({"experiment_id": "e", "client_index": 1, "round": 1, "worker_id": "w1"})
    store.release_member("e", 2)  # w2 was lost
    store.mark_round_reported("e", [1], 1)  # the round closed with member 1's update
    members = store.slots("e")
    assert [(m["worker_id"], m["reported_round"]) for m in members] == [(None, 0), (None, 1), (None, 0)]
    store.unreport("e", 1, 1)  # its update was lost with a restart: it trains again
    assert store.slot("e", 1)["reported_round"] == 0 and store.count("client_stats") == 0


def test_unique_indexes_guard_duplicates(store: Store) -> None:
    add_slots(store, "e", 1)
    doc = {"experiment_id": "e", "client_index": 0, "round": 1, "client_id": "c", "num_examples": 1}
    store.insert_client_stats(doc)
    with pytest.raises(DuplicateError):
        store.insert_client_stats({**doc, "client_id": "other"})
    store.insert_round({"experiment_id": "e", "round": 1})
    with pytest.raises(DuplicateError):
        store.insert_round({"experiment_id": "e", "round": 1})
    assert store.count("client_stats") == 1 and store.count("rounds") == 1


def test_gridfs_round_trip_by_metadata(store: Store) -> None:
    first = store.save_model(b"initial", "e", 0, "global")
    assert store.find_model_id("e", 0, "global") == first
    assert store.find_model_id("e", 0, "strategy_state") is None
    assert store.load_model(first) == b"initial"
    client_file = store.save_client_model(b"\x00" * 300_000, "e", 1, 0)  # spans two chunks
    assert store.load_client_model(client_file) == b"\x00" * 300_000
    store.delete_client_model(client_file)
    assert store.count("client_models.files") == 0


def test_delete_orphan_files_keeps_exactly_the_referenced_ones(store: Store) -> None:
    import numpy as np

    from stack import wire

    data = wire.encode({"w": np.zeros(3, np.float32)})
    store.insert_experiments([{"id": "e1", "status": "running"}], [])
    initial_id = store.save_model(data, "e1", 0, "global")  # round 0 of an existing experiment
    model_id = store.save_model(data, "e1", 1, "global")
    state_id = store.save_model(data, "e1", 1, "strategy_state")
    update_id = store.save_client_model(data, "e1", 1, 0)
    kept = {initial_id, model_id, state_id, update_id}
    store.insert_round({"experiment_id": "e1", "round": 1, "model_file_id": model_id, "strategy_state_file_id": state_id})
    store.insert_client_stats({"experiment_id": "e1", "client_index": 0, "round": 1, "weights_file_id": update_id})
    orphans = [
        store.save_model(data, "gone", 0, "global"),  # a submit cut off before its experiment insert
        store.save_model(data, "e1", 2, "global"),  # an aggregation cut off before its rounds document
        store.save_client_model(data, "e1", 2, 1),  # an update cut off before its stats
    ]
    assert store.delete_orphan_files() == len(orphans)
    files = {str(f["_id"]) for name in ("models", "client_models") for f in store.db[f"{name}.files"].find()}
    assert files == kept
    assert store.delete_orphan_files() == 0  # idempotent
