"""Store over a real nx-27017: member documents, unique indexes, GridFS."""

from __future__ import annotations

import pytest

from fedland.spec import ExperimentSpec
from server.store import DuplicateError, Store
from stack import records
from stack.records import (
    ClientModelFile,
    ClientStatsRecord,
    ExperimentRecord,
    MemberRecord,
    ModelFile,
    RoundRecord,
)
from tests.server.conftest import small_spec


def experiment(experiment_id: str, status: str = "running") -> ExperimentRecord:
    return ExperimentRecord(id=experiment_id, spec=ExperimentSpec.from_dict(small_spec()), status=status, created_at=1.0)


def add_members(store: Store, experiment_id: str, count: int) -> None:
    store.insert_experiments(
        [experiment(experiment_id)], [MemberRecord(experiment_id=experiment_id, client_index=i) for i in range(count)]
    )


def stats(
    experiment_id: str, client_index: int, server_round: int, worker_id: str = "c", weights_file_id: str | None = None
) -> ClientStatsRecord:
    return ClientStatsRecord(
        experiment_id=experiment_id, round=server_round, client_index=client_index, worker_id=worker_id,
        received_at=2.0, num_examples=1, weights_file_id=weights_file_id,
    )


def aggregated(experiment_id: str, server_round: int, model_file_id: str = "m", state_file_id: str = "s") -> RoundRecord:
    return RoundRecord(
        experiment_id=experiment_id, round=server_round, started_at=1.0, finished_at=2.0, test_loss=0.5,
        test_accuracy=0.9, num_test=10, selected=(0,), participants=(0,), num_examples=1, strategy="FedAvg",
        duration_s=1.0, aggregation_s=0.1, model_file_id=model_file_id, strategy_state_file_id=state_file_id,
    )


def test_member_assignment_report_and_a_lost_report(store: Store) -> None:
    add_members(store, "e", 3)
    store.assign_member("e", 1, "w1", 1, now=5.0)
    store.assign_member("e", 2, "w2", 1, now=6.0)
    assert [(m.worker_id, m.assigned_round) for m in store.members("e")] == [(None, None), ("w1", 1), ("w2", 1)]
    assert [m.assigned_at for m in store.members("e")] == [None, 5.0, 6.0]
    store.insert_client_stats(stats("e", 1, 1, worker_id="w1"))
    store.release_member("e", 2)  # w2 was lost
    store.mark_round_reported("e", [1], 1)  # the round closed with member 1's update
    members = store.members("e")
    assert [(m.worker_id, m.reported_round) for m in members] == [(None, 0), (None, 1), (None, 0)]
    store.unreport("e", 1, 1)  # its update was lost with a restart: it trains again
    member = store.member("e", 1)
    assert member is not None and member.reported_round == 0 and store.count(records.CLIENT_STATS) == 0


def test_unique_indexes_guard_duplicates(store: Store) -> None:
    add_members(store, "e", 1)
    store.insert_client_stats(stats("e", 0, 1, worker_id="c"))
    with pytest.raises(DuplicateError):
        store.insert_client_stats(stats("e", 0, 1, worker_id="other"))
    store.insert_round(aggregated("e", 1))
    with pytest.raises(DuplicateError):
        store.insert_round(aggregated("e", 1))
    assert store.count(records.CLIENT_STATS) == 1 and store.count(records.ROUNDS) == 1


def find_model_id(store: Store, experiment_id: str, server_round: int, kind: str) -> str | None:
    """Id of the `models` file with this metadata (the newest), or None."""
    files = store.db[records.files_collection(records.MODELS)].find(ModelFile.query(experiment_id, server_round, kind))
    ids = [file["_id"] for file in files]
    return str(max(ids)) if ids else None


def test_gridfs_round_trip_by_metadata(store: Store) -> None:
    first = store.save_model(b"initial", ModelFile("e", 0, records.GLOBAL))
    assert find_model_id(store, "e", 0, records.GLOBAL) == first
    assert records.initial_model_id(store.db, "e") == first
    assert find_model_id(store, "e", 0, records.STRATEGY_STATE) is None
    assert store.load_model(first) == b"initial"
    client_file = store.save_client_model(b"\x00" * 300_000, ClientModelFile("e", 1, 0))  # spans two chunks
    assert store.load_client_model(client_file) == b"\x00" * 300_000
    store.delete_client_model(client_file)
    assert store.count(records.files_collection(records.CLIENT_MODELS)) == 0


def test_delete_orphan_files_keeps_exactly_the_referenced_ones(store: Store) -> None:
    import numpy as np

    from stack import wire

    data = wire.encode({"w": np.zeros(3, np.float32)})
    store.insert_experiments([experiment("e1")], [])
    initial_id = store.save_model(data, ModelFile("e1", 0, records.GLOBAL))  # round 0 of an existing experiment
    model_id = store.save_model(data, ModelFile("e1", 1, records.GLOBAL))
    state_id = store.save_model(data, ModelFile("e1", 1, records.STRATEGY_STATE))
    update_id = store.save_client_model(data, ClientModelFile("e1", 1, 0))
    kept = {initial_id, model_id, state_id, update_id}
    store.insert_round(aggregated("e1", 1, model_id, state_id))
    store.insert_client_stats(stats("e1", 0, 1, weights_file_id=update_id))
    orphans = [
        store.save_model(data, ModelFile("gone", 0, records.GLOBAL)),  # a submit cut off before its experiment insert
        store.save_model(data, ModelFile("e1", 2, records.GLOBAL)),  # an aggregation cut off before its rounds document
        store.save_client_model(data, ClientModelFile("e1", 2, 1)),  # an update cut off before its stats
    ]
    assert store.delete_orphan_files() == len(orphans)
    files = {
        str(f["_id"])
        for bucket in (records.MODELS, records.CLIENT_MODELS)
        for f in store.db[records.files_collection(bucket)].find()
    }
    assert files == kept
    assert store.delete_orphan_files() == 0  # idempotent


def test_a_members_state_is_its_latest_kept_report_before_the_round_and_survives_a_restart(
    store: Store, mongo_uri: str, mongo_db_name: str
) -> None:
    import dataclasses

    import numpy as np

    from stack import wire
    from stack.records import MemberStateFile

    add_members(store, "e1", 2)

    def report(client_index: int, server_round: int, count: int) -> str:
        data = wire.encode_member_state({"count": np.asarray(count)}, {"delta/w": np.full(2, float(count))})
        file_id = store.save_member_state(data, MemberStateFile("e1", server_round, client_index))
        store.insert_client_stats(dataclasses.replace(stats("e1", client_index, server_round), state_file_id=file_id))
        return file_id

    first, second = report(0, 1, 1), report(0, 3, 3)
    store.insert_client_stats(stats("e1", 0, 4))  # a report without state (e.g. plain SGD) does not hide the last one
    report(1, 2, 20)
    assert store.member_state_id("e1", 0, 1) is None  # its first round
    assert store.member_state_id("e1", 0, 2) == store.member_state_id("e1", 0, 3) == first
    assert store.member_state_id("e1", 0, 4) == store.member_state_id("e1", 0, 9) == second
    restarted = Store(mongo_uri, mongo_db_name)  # a new server process reads the same
    try:
        state, message = wire.split(
            wire.decode(restarted.load_member_state(str(restarted.member_state_id("e1", 1, 3)))), "state/", "message/"
        )
        assert int(state["count"]) == 20 and message["delta/w"].tolist() == [20.0, 20.0]
        assert restarted.member_state_id("e1", 1, 2) is None
    finally:
        restarted.close()
    # a report lost with a restart takes its state with it: the member trains again from the one before
    store.unreport("e1", 0, 3)
    assert store.member_state_id("e1", 0, 4) == first
    assert store.delete_orphan_files() == 1  # the lost report's state file
    assert {str(f["_id"]) for f in store.db[records.files_collection(records.MEMBER_STATES)].find()} == {
        first, store.member_state_id("e1", 1, 3)
    }
