"""Export round-trips: the tidy tables, their CSV/Parquet files and the TensorBoard events hold the stored numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from reports.tables import TABLES, export_main, load_tables, write_tables, write_tensorboard
from server.store import Store
from stack import records
from stack.settings import StoreSettings
from tests.reports.test_report import barrier_of, dip_of, two_experiments


def stored_equal(value: object, expected: object) -> bool:
    if expected is None:
        return isinstance(value, float) and math.isnan(value)
    return value == pytest.approx(expected)


def check_against_store(tables: dict[str, pd.DataFrame], store: Store, experiment_id: str) -> None:
    rounds = tables["rounds"].set_index(["experiment_id", "round"])
    for doc in (r.tree() for r in store.rounds_of(experiment_id)):
        row = rounds.loc[(experiment_id, doc["round"])]
        assert row["test_loss"] == pytest.approx(doc["test_loss"])
        assert row["test_accuracy"] == pytest.approx(doc["test_accuracy"])
        landscape = doc.get("landscape")
        if landscape:
            assert row["landscape_trace"] == pytest.approx(landscape["global"]["trace"])
            assert row["top_eigenvalue_2"] == pytest.approx(landscape["global"]["top_eigenvalues"][1])
            assert row["gradient_dissimilarity"] == pytest.approx(landscape["gradient_dissimilarity"])
        else:
            assert math.isnan(row["landscape_trace"]) if "landscape_trace" in row else True
    metrics = tables["client_metrics"].set_index(["experiment_id", "round", "client_index", "model"])
    per_client = tables["client_rounds"].set_index(["experiment_id", "round", "client_index"])
    docs = [stats.tree() for stats in records.read_client_stats(store.db, experiment_id)]
    assert len(docs) > 0
    for doc in docs:
        for model in ("global", "local"):
            row = metrics.loc[(experiment_id, doc["round"], doc["client_index"], model)]
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
                assert row[key] == pytest.approx(doc[model][key])
            if "landscape" in doc:
                block = doc["landscape"][model]
                assert row["landscape_trace_stderr"] == pytest.approx(block["trace_stderr"])
                assert row["top_eigenvalue_1"] == pytest.approx(block["top_eigenvalues"][0])
        row = per_client.loc[(experiment_id, doc["round"], doc["client_index"])]
        assert row["num_examples"] == doc["num_examples"]
        if "landscape" in doc:
            assert row["barrier_stored"] == pytest.approx(doc["landscape"]["interpolation"]["barrier"])
            assert row["barrier"] == pytest.approx(barrier_of(doc["client_index"], doc["round"]))
            assert row["dip"] == pytest.approx(dip_of(doc["client_index"], doc["round"]), abs=1e-12)
            assert stored_equal(row["cosine_to_previous_update"],
                                doc["landscape"]["update"]["cosine_to_previous_update"])
    curve = tables["interpolation"]
    one = curve[(curve.experiment_id == experiment_id) & (curve["round"] == 2) & (curve.client_index == 1)]
    found = [d for d in docs if d["round"] == 2 and d["client_index"] == 1]
    if found and "landscape" in found[0]:
        doc = found[0]
        assert list(one["loss"]) == pytest.approx(doc["landscape"]["interpolation"]["losses"])


def test_tables_files_and_tensorboard_round_trip(store: Store, tmp_path: Path) -> None:
    measured_id, plain_id = two_experiments(store)
    tables = load_tables(store.db)
    assert set(tables) == set(TABLES)
    assert list(tables["experiments"]["experiment_id"]) == [measured_id, plain_id]
    assert len(tables["client_metrics"]) == 2 * 3 * 2 * 2  # experiments x rounds x clients x models
    clients = tables["clients"].set_index(["experiment_id", "client_index"])
    for member in store.members(measured_id):
        row = clients.loc[(measured_id, member.client_index)]
        assert [row[f"train_class_{k}"] for k in range(10)] == list(member.class_counts)
    for experiment_id in (measured_id, plain_id):
        check_against_store(tables, store, experiment_id)

    for file_format, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        paths = write_tables(tables, tmp_path / file_format, file_format)
        assert {p.name for p in paths} == {f"{name}.{file_format}" for name in TABLES}
        back = {name: read(tmp_path / file_format / f"{name}.{file_format}") for name in TABLES}
        for experiment_id in (measured_id, plain_id):
            check_against_store(back, store, experiment_id)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = write_tensorboard(tables, tmp_path / "tb")
    assert len(runs) == 2
    events = EventAccumulator(str(runs[0])).Reload()
    accuracy = events.Scalars("global/test_accuracy")
    assert [e.step for e in accuracy] == [1, 2, 3]
    assert [e.value for e in accuracy] == pytest.approx([r.test_accuracy for r in store.rounds_of(measured_id)])
    local = events.Scalars("client_1/local/top_eigenvalue_1")
    stored = [s.stats["landscape"]["local"]["top_eigenvalues"][0]
              for s in records.read_client_stats(store.db, measured_id) if s.client_index == 1]
    assert sorted(e.value for e in local) == pytest.approx(sorted(stored), rel=1e-6)


def test_export_command(store: Store, mongo_uri: str, mongo_db_name: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    measured_id, _ = two_experiments(store)
    settings = StoreSettings(mongo_uri=mongo_uri, db_name=mongo_db_name)
    assert export_main([measured_id], "csv", tmp_path, settings) == 0
    assert "rounds (3 rows)" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "rounds.csv")["test_accuracy"]) == pytest.approx(
        [r.test_accuracy for r in store.rounds_of(measured_id)])
    assert export_main(["nope"], "csv", tmp_path / "x", settings) == 2
    assert "experiment_id: no experiment 'nope'" in capsys.readouterr().err
