"""Store over a real nx-27017: atomic slot claims, unique indexes, reaping, GridFS."""

from __future__ import annotations

import threading

import pytest

from server.store import DuplicateError, Store


def add_slots(store: Store, experiment_id: str, count: int) -> None:
    store.insert_experiments(
        [{"id": experiment_id, "status": "running", "created_at": 1.0}],
        [{"experiment_id": experiment_id, "client_index": i, "client_id": None, "heartbeat_at": None,
          "reported_round": 0} for i in range(count)],
    )


def test_concurrent_claims_take_distinct_slots(store: Store) -> None:
    add_slots(store, "e", 2)
    claims: list[tuple[str, int | None]] = []
    barrier = threading.Barrier(6)

    def claim(client_id: str) -> None:
        barrier.wait()
        slot = store.claim_slot("e", client_id, now=5.0)
        claims.append((client_id, None if slot is None else slot["client_index"]))

    threads = [threading.Thread(target=claim, args=(f"c{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = sorted(index for _, index in claims if index is not None)
    assert taken == [0, 1]
    holders = {slot["client_index"]: slot["client_id"] for slot in store.slots("e")}
    assert sorted((c, i) for c, i in claims if i is not None) == sorted((c, i) for i, c in holders.items())


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


def test_reap_frees_only_stale_slots(store: Store) -> None:
    add_slots(store, "e", 3)
    store.claim_slot("e", "old", now=10.0)
    store.claim_slot("e", "fresh", now=50.0)
    freed = store.reap_slots(cutoff=40.0)
    assert [(slot["client_index"], slot["client_id"]) for slot in freed] == [(0, "old")]
    assert [slot["client_id"] for slot in store.slots("e")] == [None, "fresh", None]


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
