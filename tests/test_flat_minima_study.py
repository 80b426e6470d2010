"""experiments/flat-minima-mnist.toml: FedAvg, SCAFFOLD and FedSAM on one Dirichlet(0.1) federation.

Validated as written; run through the real stack (server, store, two workers) at
2 rounds, and its report compares the three on the flatness measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from fedland.algorithms import SGD, FedSAM, Scaffold
from fedland.spec import ExperimentSpec, load_specs
from reports import write_reports
from reports.compare import COMPARISONS, labels
from reports.data import load_experiment
from tests.helpers import LocalStack, assert_complete

FILE = Path(__file__).resolve().parents[1] / "experiments" / "flat-minima-mnist.toml"


def test_the_three_experiments_differ_only_in_the_algorithm() -> None:
    fedavg, scaffold, fedsam = load_specs(FILE)
    assert fedavg.partition is not None and fedavg.partition.to_dict()["scheme"] == "dirichlet"
    assert fedavg.partition.to_dict()["alpha"] == 0.1 and fedavg.num_clients == 20
    assert [spec.strategy.name for spec in (fedavg, scaffold, fedsam)] == ["FedAvg", "SCAFFOLD", "FedAvg"]
    assert fedavg.client_algorithm.build() == SGD()
    assert scaffold.client_algorithm.build() == Scaffold()
    assert fedsam.client_algorithm.build() == FedSAM(rho=0.05)
    changed = {"id", "timestamp", "description", "strategy", "client_algorithm"}
    same = [{k: v for k, v in spec.to_dict().items() if k not in changed} for spec in (fedavg, scaffold, fedsam)]
    assert same[0] == same[1] == same[2]
    assert all(spec.landscape.enabled and spec.landscape.every == 5 for spec in (fedavg, scaffold, fedsam))


def test_the_report_compares_the_flatness_measures() -> None:
    names = {chart.file_name for chart in COMPARISONS}
    assert {"global_top_eigenvalue.png", "global_trace.png", "mean_local_top_eigenvalue.png", "mean_barrier.png"} <= names


FLATNESS_FIGURES = ("global_top_eigenvalue.png", "global_trace.png", "mean_local_top_eigenvalue.png", "mean_barrier.png")


@pytest.mark.slow
def test_the_study_runs_and_its_report_puts_the_three_side_by_side(
    local_stack: Callable[..., LocalStack], tmp_path: Path
) -> None:
    specs = []
    for written in load_specs(FILE):  # as written, but 2 rounds: the landscape is measured in the last one
        shortened = written.to_dict()
        shortened["rounds"] = 2
        specs.append(ExperimentSpec.from_dict(shortened))
    stack = local_stack()
    ids = list(stack.api.submit_experiments([spec.to_dict() for spec in specs]))
    stack.add_clients(2)
    for experiment_id in ids:
        stack.wait_done(experiment_id, timeout_s=600)
        assert_complete(stack, experiment_id, num_clients=20, rounds=2)
    experiments = [load_experiment(stack.db, experiment_id) for experiment_id in ids]
    assert labels(experiments) == [spec.description for spec in specs]
    by_file = {chart.file_name: chart for chart in COMPARISONS}
    for name in FLATNESS_FIGURES:  # each algorithm has its value of each flatness measure in round 2
        for data in experiments:
            series = by_file[name].series(data)
            assert series.rounds[-1] == 2 and math.isfinite(series.values[-1]), (name, data.label, series)
    eigenvalues = [by_file["global_top_eigenvalue.png"].series(data).values[-1] for data in experiments]
    assert len(set(eigenvalues)) == 3  # three algorithms, three different global models
    index = write_reports(stack.db, ids, tmp_path / "reports")
    html = index.read_text(encoding="utf-8")
    for name in FLATNESS_FIGURES:
        assert (index.parent / "comparison" / name).stat().st_size > 0 and f"comparison/{name}" in html
    assert all(spec.description in html for spec in specs)
