"""The launcher's pure parts: argument parsing, spec preparation, the summary table, main.py's experiments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main
from cli import main as launcher_main
from cli import parse_args
from fedland.spec import ExperimentSpec
from launch.launcher import default_workers, prepare
from launch.progress import Progress, summary_table


def spec(description: str, rounds: int = 5, fraction: float = 0.1) -> ExperimentSpec:
    return ExperimentSpec(
        description=description, target_balance_ratios=[[0.1] * 10] * 2, subset_fractions=[fraction] * 2, rounds=rounds
    )


def test_run_is_the_default_command() -> None:
    assert parse_args([]).command == "run"
    args = parse_args(["--clients", "4", "--rounds", "1", "--only", "IID"])
    assert (args.command, args.clients, args.rounds, args.only) == ("run", 4, 1, "IID")
    assert parse_args(["run", "--server", "http://h:8080"]).server == "http://h:8080"


def test_prepare_overrides_rounds_and_filters_by_description() -> None:
    specs = [spec("IID a", rounds=5), spec("non-IID b", rounds=7), spec("IID c", rounds=3)]
    prepared = prepare(specs, rounds=2, only="iid a")
    assert [(s.description, s.rounds) for s in prepared] == [("IID a", 2)]
    assert [s.rounds for s in prepare(specs, rounds=None, only=None)] == [5, 7, 3]
    assert [s.description for s in prepare(specs, rounds=None, only="IID")] == ["IID a", "non-IID b", "IID c"]


def test_prepare_expands_replicates_so_the_ids_line_up_with_the_specs() -> None:
    import dataclasses

    replicated = dataclasses.replace(spec("pair", rounds=4), seed=7, replicates=3)
    prepared = prepare([spec("single"), replicated], rounds=2, only=None)
    assert [(s.description, s.seed, s.replicate, s.rounds) for s in prepared] == [
        ("single", 0, None, 2), ("pair", 7, 0, 2), ("pair", 8, 1, 2), ("pair", 9, 2, 2)]
    assert prepare(prepared, rounds=None, only=None) == prepared  # already expanded: unchanged


def test_prepare_lists_every_invalid_experiment() -> None:
    with pytest.raises(ValueError) as raised:
        prepare([spec("first"), spec("second")], rounds=0, only=None)
    message = str(raised.value)
    assert "experiment 0 ('first'): rounds" in message and "experiment 1 ('second'): rounds" in message
    with pytest.raises(ValueError, match="no experiment matches --only 'zzz'"):
        prepare([spec("first")], rounds=None, only="zzz")


def test_a_bad_strategy_parameter_in_a_file_stops_the_run_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "bad.json"
    entry = spec("adam").to_dict() | {"strategy": {"name": "FedAdam", "params": {"bogus": 1}}}
    file.write_text(json.dumps([entry]), encoding="utf-8")
    assert launcher_main([], ["--experiments", str(file), "--no-reports"]) == 2
    assert "experiments[0].strategy.params.bogus: unknown parameter for FedAdam" in capsys.readouterr().err


def test_default_workers_are_the_most_members_a_round_trains_at_most_four() -> None:
    assert default_workers([spec("two clients")]) == 2
    many = ExperimentSpec.from_dict({**spec("x").to_dict(), "target_balance_ratios": [[0.1] * 10] * 100,
                                     "subset_fractions": [0.1] * 100, "clients_per_round": 10})
    assert default_workers([many, spec("two clients")]) == 4  # 10 per round, capped at 4
    one = ExperimentSpec.from_dict({**spec("x").to_dict(), "clients_per_round": 1})
    assert default_workers([one]) == 1


def test_summary_table_rows() -> None:
    documents = {
        "e1": {"description": "IID", "status": "finished", "rounds": 5, "started_at": 100.0, "finished_at": 112.5},
        "e2": {"description": "skewed", "status": "failed", "rounds": 5, "started_at": None, "finished_at": 101.0},
    }
    last = {"e1": {"round": 5, "test_loss": 0.16484, "test_accuracy": 0.95}, "e2": {}}
    lines = summary_table(["e1", "e2"], documents, last).splitlines()
    assert lines[0].split() == ["experiment", "status", "rounds", "test", "acc", "test", "loss", "duration", "s"]
    assert lines[2].split() == ["IID", "finished", "5/5", "0.9500", "0.1648", "12.5"]
    assert lines[3].split() == ["skewed", "failed", "0/5", "-", "-", "-"]


def test_progress_shows_why_an_experiment_failed(caplog: pytest.LogCaptureFixture) -> None:
    reason = "round 1: updates refused from 2 worker(s): worker a: meta.stats.local.train_loss is nan"
    with caplog.at_level("INFO"), Progress(["e1"], [spec("diverging")], enabled=False) as progress:
        progress.update({"e1": {"description": "diverging", "rounds": 5, "status": "running", "last_round": None}})
        progress.update({"e1": {"description": "diverging", "rounds": 5, "status": "failed", "error": reason}})
    assert caplog.messages[-1] == f"diverging: round 0/5, failed: {reason}"


def test_main_experiments_are_valid() -> None:
    # what main.py holds is the researcher's business; only that it is runnable is ours
    assert prepare(main.EXPERIMENTS, rounds=None, only=None)


def test_bad_data_files_stop_the_run_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"not an IDX file")
    monkeypatch.setenv("FEDLAND_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDLAND_STORE_DIR", str(tmp_path / "store"))
    assert launcher_main([spec("one")], ["--no-reports"]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # no store, server or client was started


MISCOUNTED = '''
import torch


class Miscounted:
    """Declares 5 train images of class 1, loads 4."""

    num_classes = 2
    input_shape = (1, 28, 28)
    train_class_counts = (4, 5)
    test_class_counts = (2, 2)

    def load(self, data_dir):
        return torch.zeros(8, 1, 28, 28), torch.arange(8) % 2, torch.zeros(4, 1, 28, 28), torch.arange(4) % 2
'''


def test_a_dataset_that_loads_other_counts_than_declared_stops_the_run_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = "lab_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (tmp_path / f"{package}.py").write_text(MISCOUNTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDLAND_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDLAND_STORE_DIR", str(tmp_path / "store"))
    made = ExperimentSpec(  # declared counts are feasible: the spec accepts it
        dataset_name=f"{package}:Miscounted", target_balance_ratios=[[0.5, 0.5]], subset_fractions=[0.5]
    )
    assert launcher_main([made], ["--no-reports"]) == 2
    assert "train_y has class counts (4, 4), but train_class_counts declares (4, 5)" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # no store, server or client was started
