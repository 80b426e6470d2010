"""experiments/flat-minima-mnist.toml: FedAvg, SCAFFOLD and FedSAM on one Dirichlet(0.1) federation (validated, not run)."""

from __future__ import annotations

from pathlib import Path

from fedland.algorithms import SGD, FedSAM, Scaffold
from fedland.spec import load_specs
from reports.compare import COMPARISONS

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
