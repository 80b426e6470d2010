"""A store the previous release wrote (tests/stack/previous_release_store) is refused until upgraded, then reads the same.

The fixture holds the real nx-27017 files of the release before the typed
records: a FedAvg experiment with landscape measurements (pairwise barriers
inline in its rounds) and a FedMedian one without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedland.spec import STORE_KEYS, ExperimentSpec, fingerprint
from reports.data import load_experiment
from server.coordinator import Coordinator
from server.resources import Resources
from server.store import Store
from stack import records
from stack.embedded import EmbeddedMongo, connect
from stack.store_upgrade import upgrade_store
from tests.helpers import small_spec

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "previous_release_store"


def _legacy(store_dir: Path) -> dict[str, Any]:
    """The previous release's documents, read raw."""
    with EmbeddedMongo(store_dir) as uri:
        client = connect(uri)
        db = client["fedland"]
        legacy = {name: list(db[name].find({})) for name in ("experiments", "clients", "workers", "client_stats", "rounds")}
        with pytest.raises(records.SchemaError, match="python main.py upgrade-store"):
            records.check_schema(db)
        with pytest.raises(records.SchemaError, match="upgrade-store"):
            load_experiment(db, str(legacy["experiments"][0]["_id"]))
        client.close()
    return legacy


def _main(store_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDLAND_STORE_DIR": str(store_dir), "FEDLAND_LOG_LEVEL": "WARNING"}
    env.pop("FEDLAND_MONGO_URI", None)
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _upgrade(store_dir: Path) -> subprocess.CompletedProcess[str]:
    return _main(store_dir, "upgrade-store")


def test_previous_release_store_upgrades_in_place_and_reads_the_same(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(FIXTURE, store_dir, ignore=shutil.ignore_patterns("*.md", "*.json"))
    legacy = _legacy(store_dir)
    assert len(legacy["experiments"]) == 2 and len(legacy["rounds"]) == 3
    for command in (("report", "--out", str(tmp_path / "reports")), ("export", "--out", str(tmp_path / "export"))):
        refused = _main(store_dir, *command)  # before the upgrade: one line naming it, nothing written
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "python main.py upgrade-store" in refused.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / "export").exists()

    upgraded = _upgrade(store_dir)
    assert upgraded.returncode == 0, upgraded.stderr
    said = upgraded.stdout
    assert "experiments: 2 documents" in said and "members: 5 documents moved from 'clients'" in said
    assert "workers: 2 documents: 'client_id' renamed 'worker_id'" in said
    assert "the pairwise barriers of 2 rounds moved to 'landscapes'" in said and "schema: version 1 -> 2" in said
    again = _upgrade(store_dir)
    assert again.returncode == 0 and "nothing to upgrade" in again.stdout

    with EmbeddedMongo(store_dir) as uri:
        client = connect(uri)
        db = client["fedland"]
        records.check_schema(db)
        assert "clients" not in db.list_collection_names()
        for old in legacy["experiments"]:
            experiment = records.read_experiment(db, str(old["_id"]))
            assert experiment is not None
            fields = {key: value for key, value in old.items() if key not in STORE_KEYS}
            assert experiment.spec == ExperimentSpec.from_dict(fields)
            assert (experiment.status, experiment.current_round, experiment.error) == (
                old["status"], old["current_round"], old["error"])
            assert experiment.created_at == pytest.approx(old["created_at"], abs=1e-3)
            assert experiment.finished_at == pytest.approx(old["finished_at"], abs=1e-3)
            members = records.read_members(db, experiment.id)
            old_members = sorted((m for m in legacy["clients"] if m["experiment_id"] == experiment.id),
                                 key=lambda m: m["client_index"])
            assert [(m.client_index, m.partition_digest, list(m.class_counts), m.reported_round) for m in members] == [
                (m["client_index"], m["partition_digest"], m["class_counts"], m["reported_round"]) for m in old_members]
        for old in legacy["rounds"]:
            round_record = records.read_round(db, old["experiment_id"], old["round"])
            assert round_record is not None
            assert (round_record.test_loss, round_record.test_accuracy, list(round_record.participants)) == (
                old["test_loss"], old["test_accuracy"], old["participants"])
            assert round_record.model_file_id == old["model_file_id"]
            assert round_record.started_at == pytest.approx(old["started_at"], abs=1e-3)
            stored = db[records.ROUNDS].find_one({"_id": old["_id"]})
            assert stored is not None and list(stored)[:5] == ["_id", "experiment_id", "round", "started_at", "finished_at"]
            landscape = old.get("landscape")
            if landscape is None:
                assert round_record.landscape is None
                continue
            assert round_record.landscape is not None
            assert "pairwise_barriers" not in round_record.landscape
            moved = [b for b in records.read_landscapes(db, old["experiment_id"], records.PAIRWISE_BARRIERS)
                     if b.round == old["round"]]
            assert [dict(b.content) for b in moved] == [landscape["pairwise_barriers"]]
            # the reports see the same matrix, through the records
            data = load_experiment(db, old["experiment_id"])
            shown = next(r for r in data.rounds if r["round"] == old["round"])
            assert shown["landscape"]["pairwise_barriers"] == landscape["pairwise_barriers"]
            assert shown["landscape"]["global"] == landscape["global"]
        for old in legacy["client_stats"]:
            (stats,) = [s for s in records.read_client_stats(db, old["experiment_id"], old["round"])
                        if s.client_index == old["client_index"]]
            assert stats.worker_id == old["worker_id"] and stats.num_examples == old["num_examples"]
            assert dict(stats.stats) == {k: old[k] for k in records.STATS_KEYS if k in old}
            assert stats.received_at == pytest.approx(old["received_at"], abs=1e-3)
        for old in legacy["workers"]:
            worker = db[records.WORKERS].find_one({"worker_id": old["client_id"]})
            assert worker is not None and worker["hostname"] == old["hostname"]

        # a server starts on the upgraded store and serves what it holds
        store = Store.from_database(db)
        coordinator = Coordinator(store, Resources(tmp_path / "no-data"))
        summaries = {s["id"]: s for s in coordinator.list_experiments()}
        for old in legacy["experiments"]:
            last = max((r for r in legacy["rounds"] if r["experiment_id"] == old["_id"]), key=lambda r: r["round"])
            summary = summaries[str(old["_id"])]
            assert summary["status"] == "finished" and summary["last_round"] == {
                "round": last["round"], "test_loss": last["test_loss"], "test_accuracy": last["test_accuracy"]}
        coordinator.close()
        client.close()


def test_experiments_stored_without_a_fingerprint_get_one_and_are_found_as_twins(store: Store) -> None:
    spec = ExperimentSpec.from_dict(small_spec(num_clients=1, rounds=2))
    experiments = [records.ExperimentRecord(id=f"e-{i}", spec=spec.with_id(f"e-{i}"), created_at=1_700_000_000.0 + i)
                   for i in range(2)]
    for experiment in experiments:  # as this release wrote them before fingerprints were stored
        doc = experiment.to_doc()
        del doc["fingerprint"]
        store.db[records.EXPERIMENTS].insert_one(doc)
    assert records.read_experiments(store.db) == experiments  # they read as before
    identity = fingerprint(spec)
    assert records.read_unfinished_twin(store.db, identity) is None  # not findable yet

    assert upgrade_store(store.db) == ["experiments: 2 documents: 'fingerprint' added"]
    assert upgrade_store(store.db) == []  # current now
    twin = records.read_unfinished_twin(store.db, identity)
    assert twin is not None and twin.id == "e-0"  # the oldest

    store.db[records.EXPERIMENTS].update_many({}, {"$unset": {"fingerprint": ""}})
    Store.from_database(store.db).prepare()  # a server start adds them too
    assert store.count(records.EXPERIMENTS, {"fingerprint": identity}) == 2
