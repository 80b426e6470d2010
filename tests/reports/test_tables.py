"""Export round-trips: the tables hold every number the store holds; files, models and TensorBoard events too."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from fedland.spec import ExperimentSpec, LandscapeSpec
from reports.export import MAX_MEMBER_SCALARS, export_main, write_tensorboard
from reports.tables import TABLES, group_id, load_tables, write_tables
from server.store import Store
from stack import records, wire
from stack.settings import StoreSettings
from tests.helpers import LocalStack, small_spec
from tests.reports.test_report import barrier_of, dip_of, insert_experiment, two_experiments, weights


def numeric_leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    """Every number in a stored record's fields (booleans as 0/1), with the keys leading to it."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and not math.isnan(value)):
        yield path, float(value)
    elif isinstance(value, Mapping):
        for key, child in value.items():
            yield from numeric_leaves(child, (*path, str(key)))
    elif isinstance(value, (list, tuple)):
        for child in value:
            yield from numeric_leaves(child, path)


def stored_documents(db: Any, experiment_id: str) -> Iterator[tuple[int, str, int | None, list[tuple[Any, float]]]]:
    """(round, source, member, numeric leaves) of every round, member report and landscape of the experiment."""
    for r in records.read_rounds(db, experiment_id):
        tree = {k: v for k, v in r.tree().items() if k not in ("experiment_id", "round")}
        yield r.round, records.ROUNDS, None, list(numeric_leaves(tree))
    for s in records.read_client_stats(db, experiment_id):
        tree = {k: v for k, v in s.tree().items() if k not in ("experiment_id", "round", "client_index")}
        yield s.round, records.CLIENT_STATS, s.client_index, list(numeric_leaves(tree))
    for kind in sorted(db[records.LANDSCAPES].distinct("kind", {"experiment_id": experiment_id})):
        for landscape in records.read_landscapes(db, experiment_id, kind):
            yield landscape.round, kind, None, list(numeric_leaves(landscape.content))


def named_after(measure: str, model: Any, path: tuple[str, ...]) -> bool:
    """Whether a row's measure (and model) names the stored key: ``landscape.global.trace`` -> global, ``...trace``."""
    last = measure.rsplit(".", 1)[-1]
    return last == path[-1] or (model == path[-1] and len(path) > 1 and last == path[-2])


def assert_tables_hold_the_store(tables: Mapping[str, pd.DataFrame], db: Any, experiment_id: str) -> int:
    """Every number of every stored document is a row of `measures` or `arrays` with its value, named after
    its key, of its model and member; and no row more. Returns the numbers checked."""
    measures, arrays = tables["measures"], tables["arrays"]
    checked = 0
    for server_round, source, member, leaves in stored_documents(db, experiment_id):
        rows = pd.concat([
            measures[(measures.experiment_id == experiment_id) & (measures["round"] == server_round)
                     & (measures.source == source)],
            arrays[(arrays.experiment_id == experiment_id) & (arrays["round"] == server_round)
                   & (arrays.source == source)],
        ])
        if member is not None:  # a member's report: its rows are that member's
            rows = rows[rows["member"] == member]
        # an entry's `client_index` (alignment, leave-one-out, surface points) is the member its other numbers are of
        members = [value for path, value in leaves if path[-1] == "client_index"]
        assert set(members) <= set(rows["member"].dropna())
        leaves = [(path, value) for path, value in leaves if path[-1] != "client_index"]
        assert len(rows) == len(leaves), (source, server_round, member, sorted({p for p, _ in leaves}),
                                          sorted(set(rows["measure"])))
        pool = rows.to_dict("records")
        for path, value in leaves:
            found = next((row for row in pool if row["value"] == pytest.approx(value, rel=1e-12, abs=1e-300)
                          and named_after(str(row["measure"]), row["model"], path)), None)
            assert found is not None, (source, server_round, member, path, value)
            if "global" in path or "local" in path:
                assert found["model"] in path, (path, found)
            pool.remove(found)
            checked += 1
    assert checked > 0
    return checked


def assert_partition_and_settings(tables: Mapping[str, pd.DataFrame], db: Any, experiment_id: str) -> None:
    experiment = records.read_experiment(db, experiment_id)
    assert experiment is not None
    partition = tables["partition"].set_index(["experiment_id", "member"])
    for member in records.read_members(db, experiment_id):
        row = partition.loc[(experiment_id, member.client_index)]
        assert (row["num_train"], row["num_test"]) == (member.num_train, member.num_test)
        assert row["gini_index"] == pytest.approx(member.gini_index)
        assert row["partition_digest"] == member.partition_digest
        assert [row[f"train_class_{k}"] for k in range(10)] == list(member.class_counts)
        assert [row[f"test_class_{k}"] for k in range(10)] == list(member.test_class_counts)
        assert [row[f"class_frequency_{k}"] for k in range(10)] == pytest.approx(member.class_frequencies)
        assert [row[f"target_ratio_{k}"] for k in range(10)] == pytest.approx(
            experiment.spec.target_balance_ratios[member.client_index])
        assert row["subset_fraction"] == pytest.approx(experiment.spec.subset_fractions[member.client_index])
    settings = tables["landscape_settings"].set_index("experiment_id").loc[experiment_id]
    for key, value in dataclasses.asdict(experiment.spec.landscape).items():
        assert settings[key] == pytest.approx(value)
    row = tables["experiments"].set_index("experiment_id").loc[experiment_id]
    assert json.loads(row["spec"]) == experiment.spec.to_dict()
    assert (row["learning_rate"], row["seed"], row["strategy.name"]) == (
        experiment.spec.learning_rate, experiment.spec.seed, experiment.spec.strategy.name)
    assert row["group_id"] == group_id(experiment.spec)


def store_analysis(store: Store, experiment_id: str) -> None:
    """Landscape documents of kinds the export has no rule for: round 0's evaluation, densities per member."""
    store.save_landscape(records.LandscapeRecord(experiment_id, 0, "initial_evaluation", {
        "test_loss": 2.31, "test_accuracy": 0.098, "num_test": 10_000}))
    store.save_landscape(records.LandscapeRecord(experiment_id, 3, "spectral_density", {"num_samples": 64, "curves": [
        {"model": "global", "client_index": None, "grid": [-1.0, 0.0, 1.0], "density": [0.1, 0.8, 0.1]},
        {"model": "local", "client_index": 1, "grid": [-2.0, 0.0, 2.0], "density": [0.2, 0.6, 0.2]}]}))


def test_tables_hold_every_stored_number_and_files_round_trip(store: Store, tmp_path: Path) -> None:
    measured_id, plain_id = two_experiments(store)
    store_analysis(store, measured_id)
    tables = load_tables(store.db)
    assert set(tables) == set(TABLES)
    assert list(tables["experiments"]["experiment_id"]) == [measured_id, plain_id]
    for experiment_id in (measured_id, plain_id):
        assert_tables_hold_the_store(tables, store.db, experiment_id)
        assert_partition_and_settings(tables, store.db, experiment_id)
    # the named measures where a reader looks for them
    measures = tables["measures"]
    final = store.get_round(measured_id, 3)
    assert final is not None and final.landscape is not None
    at = measures[(measures.experiment_id == measured_id) & (measures["round"] == 3)]

    def pick(**where: Any) -> list[float]:
        return list(at[np.logical_and.reduce([at[k] == v for k, v in where.items()])]["value"])

    assert pick(model="global", measure="test_accuracy", source="rounds") == [final.test_accuracy]
    assert pick(measure="landscape.flatness_gap.gaps", member=1) == [final.landscape["flatness_gap"]["gaps"][1]]
    assert pick(model="local", measure="landscape.flatness_gap", member=0) == [
        final.landscape["flatness_gap"]["local"][0]]
    assert pick(measure="landscape.client_alignment.cosine", member=1) == [
        final.landscape["client_alignment"][1]["cosine"]]
    initial = measures[(measures.experiment_id == measured_id) & (measures["round"] == 0)]
    assert initial.set_index(["model", "measure"])["value"].loc[("global", "initial_evaluation.test_accuracy")] == 0.098
    density = measures[(measures.measure == "spectral_density.curves.density") & (measures["member"] == 1)]
    assert list(density["model"]) == ["local"] * 3 and list(density["value"]) == [0.2, 0.6, 0.2]
    barriers = tables["arrays"][(tables["arrays"].experiment_id == measured_id) & (tables["arrays"]["round"] == 3)
                                & (tables["arrays"].measure == "pairwise_barriers.barriers")]
    assert barriers.set_index(["axis_0", "axis_1"])["value"].loc[(0, 1)] == pytest.approx(0.01 * 1 * 3)
    # the wide tables beside them
    per_client = tables["client_rounds"].set_index(["experiment_id", "round", "client_index"])
    assert per_client.loc[(measured_id, 2, 1), "barrier"] == pytest.approx(barrier_of(1, 2))
    assert per_client.loc[(measured_id, 3, 1), "dip"] == pytest.approx(dip_of(1, 3), abs=1e-12)
    assert list(tables["rounds"]["test_accuracy"][:3]) == [r.test_accuracy for r in store.rounds_of(measured_id)]

    for file_format, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        paths = write_tables(tables, tmp_path / file_format, file_format)
        assert {p.name for p in paths} == {f"{name}.{file_format}" for name in TABLES}
        back = {name: read(tmp_path / file_format / f"{name}.{file_format}") for name in TABLES}
        for experiment_id in (measured_id, plain_id):
            assert_tables_hold_the_store(back, store.db, experiment_id)


def test_replicates_across_seeds_share_a_group(store: Store) -> None:
    measured_id, plain_id = two_experiments(store)
    spec = records.read_experiment(store.db, measured_id)
    assert spec is not None
    insert_experiment(store, "exp-landscape-seed4", dataclasses.replace(spec.spec, id=None, seed=4))
    experiments = load_tables(store.db)["experiments"].set_index("experiment_id")
    assert experiments.loc[measured_id, "group_id"] == experiments.loc["exp-landscape-seed4", "group_id"]
    assert experiments.loc[plain_id, "group_id"] != experiments.loc[measured_id, "group_id"]
    assert list(experiments.loc[[measured_id, "exp-landscape-seed4", plain_id], "replicate"]) == [0, 1, 0]


def test_a_real_run_exports_every_measure(local_stack: Callable[..., LocalStack], tmp_path: Path) -> None:
    """Two rounds of a measured 2-member federation on real MNIST: PAC-Bayes, norms, surfaces, barriers."""
    stack = local_stack()
    lspec = LandscapeSpec(every=1, num_samples=64, top_k=2, trace_probes=4, interpolation_points=3, grid_points=3,
                          pac_bayes_samples=2, pac_bayes_steps=2, power_iterations=5)
    [experiment_id] = stack.api.submit_experiments([small_spec(2, rounds=2, fraction=0.02, landscape=lspec)])
    stack.add_clients(2)
    assert stack.wait_done(experiment_id, timeout_s=240).status == "finished"
    tables = load_tables(stack.db, [experiment_id])
    checked = assert_tables_hold_the_store(tables, stack.db, experiment_id)
    assert_partition_and_settings(tables, stack.db, experiment_id)
    names = set(tables["measures"]["measure"])
    for expected in ("landscape.generalization.pac_bayes.bound", "landscape.generalization.norms.spectral_sum",
                     "landscape.flatness_gap.mean_gap", "pca_surface.explained_variance_ratio"):
        assert expected in names
    assert {"pca_surface.losses", "pairwise_barriers.barriers"} <= set(tables["arrays"]["measure"])
    assert checked > 500


def test_models_export_with_manifest(store: Store, mongo_uri: str, mongo_db_name: str, tmp_path: Path) -> None:
    measured_id, _ = two_experiments(store)
    settings = StoreSettings(mongo_uri=mongo_uri, db_name=mongo_db_name)
    assert export_main([measured_id], "csv", tmp_path, settings, models=True, members=True) == 0
    manifest = json.loads((tmp_path / "models" / "manifest.json").read_text(encoding="utf-8"))["models"]
    spec = records.read_experiment(store.db, measured_id)
    assert spec is not None
    stored_rounds = {r.round: r for r in store.rounds_of(measured_id)}
    stats = {(s.round, s.client_index): s for s in records.read_client_stats(store.db, measured_id)}
    globals_ = [e for e in manifest if e["kind"] == "global"]
    assert [e["round"] for e in globals_] == [0, 1, 2, 3]
    assert {(e["round"], e["member"]) for e in manifest if e["kind"] == "member"} == set(stats)
    for entry in manifest:
        path = tmp_path / "models" / entry["file"]
        assert entry["experiment_id"] == measured_id
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        tensors = load_file(str(path))
        assert {k: list(v.shape) for k, v in tensors.items()} == entry["shapes"]
        assert entry["parameters"] == sum(v.size for v in tensors.values())
        if entry["kind"] == "global" and entry["round"] == 0:
            stored = {k: v.numpy() for k, v in weights(spec.spec, 0).items()}
        elif entry["kind"] == "global":
            stored = wire.decode(store.load_model(stored_rounds[entry["round"]].model_file_id))
        else:
            file_id = stats[(entry["round"], entry["member"])].weights_file_id
            assert file_id is not None
            stored = wire.decode(store.load_client_model(file_id))
        assert set(tensors) == set(stored)
        for name, array in tensors.items():
            np.testing.assert_array_equal(array, stored[name])


def test_tensorboard_reads_as_a_study(store: Store, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    measured_id, _ = two_experiments(store)
    many = ExperimentSpec(description="IID, 12 members", target_balance_ratios=[[0.1] * 10] * 12,
                          subset_fractions=[0.05] * 12, rounds=2, seed=5, landscape=LandscapeSpec(enabled=False))
    assert many.num_clients > MAX_MEMBER_SCALARS
    insert_experiment(store, "exp-many", many)
    tables = load_tables(store.db)
    runs = {path.name.rsplit("_", 1)[-1]: path for path in write_tensorboard(tables, tmp_path / "tb")}
    assert set(runs) == {measured_id, "exp-plain", "exp-many"}  # run names end in the id

    events = EventAccumulator(str(runs[measured_id]), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    spec = records.read_experiment(store.db, measured_id)
    assert spec is not None
    text = events.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text) == spec.spec.to_dict()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["learning_rate"].number_value == pytest.approx(spec.spec.learning_rate)
    assert start.hparams["strategy.name"].string_value == spec.spec.strategy.name
    assert start.hparams["landscape.every"].number_value == 1
    assert start.hparams["group_id"].string_value == group_id(spec.spec)
    assert "_hparams_/experiment" not in content  # the study's, once, at the top of the log dir
    top = EventAccumulator(str(tmp_path / "tb")).Reload().PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(top["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"global/test_accuracy", "global/test_loss"}
    assert {"learning_rate", "strategy.name", "seed", "group_id", "landscape.every"} <= {
        h.name for h in experiment.hparam_infos}

    accuracy = events.Scalars("global/test_accuracy")
    assert [e.step for e in accuracy] == [1, 2, 3]
    assert [e.value for e in accuracy] == pytest.approx([r.test_accuracy for r in store.rounds_of(measured_id)])
    assert [e.value for e in events.Scalars("global/landscape.top_eigenvalues/1")] == pytest.approx(
        [r.landscape["global"]["top_eigenvalues"][1] for r in store.rounds_of(measured_id) if r.landscape])
    reports = records.read_client_stats(store.db, measured_id)
    for histogram in events.Histograms("members/local/landscape.trace"):
        values = [s.stats["landscape"]["local"]["trace"] for s in reports if s.round == histogram.step]
        assert histogram.histogram_value.num == len(values) == 2
        assert (histogram.histogram_value.min, histogram.histogram_value.max) == pytest.approx(
            (min(values), max(values)), rel=1e-6)
    local = events.Scalars("member_1/local/test_accuracy")
    assert [e.value for e in local] == pytest.approx(
        [s.stats["local"]["test_accuracy"] for s in reports if s.client_index == 1], rel=1e-6)

    crowd = EventAccumulator(str(runs["exp-many"]), size_guidance={"histograms": 0}).Reload()
    assert not [tag for tag in crowd.Tags()["scalars"] if tag.startswith("member_")]
    histogram = crowd.Histograms("members/local/test_accuracy")
    assert [h.step for h in histogram] == [1, 2] and histogram[0].histogram_value.num == 12


def test_export_command_of_six_experiments_takes_seconds(
    store: Store, mongo_uri: str, mongo_db_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured_id, plain_id = two_experiments(store)
    spec = records.read_experiment(store.db, measured_id)
    assert spec is not None
    for seed in (4, 5, 6, 7):
        insert_experiment(store, f"exp-seed{seed}", dataclasses.replace(spec.spec, id=None, seed=seed))
    settings = StoreSettings(mongo_uri=mongo_uri, db_name=mongo_db_name)
    for file_format in ("csv", "parquet", "tensorboard"):
        started = time.perf_counter()
        assert export_main([], file_format, tmp_path / file_format, settings, models=True) == 0
        assert time.perf_counter() - started < 10.0, file_format
    out = capsys.readouterr().out
    assert "experiments (6 rows)" in out and "wrote 24 models" in out
    assert list(pd.read_csv(tmp_path / "csv" / "rounds.csv")["test_accuracy"][:3]) == pytest.approx(
        [r.test_accuracy for r in store.rounds_of(measured_id)])
    assert export_main(["nope"], "csv", tmp_path / "x", settings) == 2
    assert "experiment_id: no experiment 'nope'" in capsys.readouterr().err


def test_export_command_line_writes_tables_and_models(store: Store, mongo_uri: str, mongo_db_name: str,
                                                      tmp_path: Path) -> None:
    measured_id, _ = two_experiments(store)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FEDLAND_MONGO_URI": mongo_uri, "FEDLAND_DB": mongo_db_name}

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "main.py", "export", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    refused = export("--members", "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "--members needs --models" in refused.stderr
    assert not (tmp_path / "refused").exists()
    done = export(measured_id, "--format", "parquet", "--models", "--members", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "wrote 10 models" in done.stdout  # rounds 0..3, and 2 members x 3 rounds
    assert set(pd.read_parquet(tmp_path / "out" / "measures.parquet")["experiment_id"]) == {measured_id}
    assert (tmp_path / "out" / "models" / measured_id / "round_0_global.safetensors").is_file()


def test_a_queued_group_exports_its_group_and_replicate_index(store: Store) -> None:
    from fedland.replicates import expand_replicates, replicate_group

    measured_id, plain_id = two_experiments(store)
    stored = records.read_experiment(store.db, measured_id)
    assert stored is not None
    replicated = dataclasses.replace(stored.spec, id=None, seed=10, replicates=3)
    for replica in reversed(expand_replicates(replicated)):  # created last-first: the index is the spec's, not the order
        insert_experiment(store, f"exp-replica-{replica.replicate}", replica)
    experiments = load_tables(store.db)["experiments"].set_index("experiment_id")
    replicas = [f"exp-replica-{r}" for r in range(3)]
    assert list(experiments.loc[replicas, "replicate"]) == [0, 1, 2]
    assert list(experiments.loc[replicas, "seed"]) == [10, 11, 12]
    assert set(experiments.loc[replicas, "group_id"]) == {replicate_group(replicated)}
    assert experiments.loc[measured_id, "group_id"] != replicate_group(replicated)  # replicates=3 is another study
